"""Paper 2's methods: SWA through the registry, end-to-end CE, the vision-only baseline, the fraction sweep."""
import numpy as np
import pytest
import torch

from lib import experiments, methods, models
from lib.data import shapeworld as sw
from lib.evaluate import evaluate
from lib.train import finetune


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = models.build_mini().eval()
    train = sw.make_split("unit-swa", domains=["photo", "sketch"], classes=sw.CLASSES[:4], n_per_class=4)
    return model, models.mini_tokenizer(), train.with_transform(models.mini_preprocess)


def test_swa_is_the_mean_of_the_states_at_the_chosen_steps(setup, monkeypatch):
    model, tokenizer, train = setup
    recorded = {}
    original = methods.EndToEndCrossEntropy.after_step

    def record(self, model, step):  # the base's hook sees the live state after every optimizer step
        original(self, model, step)
        recorded[step + 1] = {k: v.detach().clone() for k, v in model.named_parameters()}

    monkeypatch.setattr(methods.EndToEndCrossEntropy, "after_step", record)
    method = methods.get_method("ce-swa", lr=1e-3, batch_size=8, warmup_steps=1, swa_start=0.5, swa_every=2)
    trained = finetune(model, method, train, tokenizer, num_steps=10, progress=False)
    assert method.swa_steps == [8, 10]  # the ends of the periods [6, 8) and [8, 10), which start at or after 5
    assert set(recorded) == set(range(1, 11))
    averaged = dict(trained.model.named_parameters())
    for name, value in averaged.items():
        expected = torch.stack([recorded[s][name] for s in (8, 10)]).mean(0)
        torch.testing.assert_close(value, expected)
    assert not torch.equal(averaged["visual.proj"], recorded[10]["visual.proj"])


def test_swa_every_defaults_to_one_epoch_and_validates(setup):
    model, tokenizer, train = setup  # 32 images, batch 8: one epoch is 4 steps
    method = methods.get_method("ce+swa", batch_size=8)
    method.setup(model, tokenizer, train, num_steps=16, seed=0)
    assert method.swa_steps == [12, 16]
    method = methods.get_method("ce+swa", batch_size=8, swa_every=100)
    method.setup(model, tokenizer, train, num_steps=16, seed=0)
    assert method.swa_steps == [16]  # nothing qualifies: the final state
    with pytest.raises(ValueError, match="swa_start"):
        methods.get_method("ce+swa", swa_start=1.0).setup(model, tokenizer, train, num_steps=4, seed=0)


def test_ce_trains_both_encoders_and_logit_scale(setup):
    model, tokenizer, train = setup
    trained = finetune(model, methods.get_method("ce", num_steps=3, batch_size=8, lr=1e-3, warmup_steps=1),
                       train, tokenizer, progress=False)
    before, after = model.state_dict(), trained.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("visual.") for k in changed)
    assert any(k.startswith("transformer.") for k in changed)
    assert "logit_scale" in changed and "text_projection" in changed


def test_vision_only_trains_its_head_and_gives_nan_on_new_classes(setup):
    _, tokenizer, train = setup
    model = models.load_clip("mini", device="cpu")[0]  # a random encoder maps every image to nearly one point
    trained = finetune(model, methods.get_method("vision-only", num_steps=40, batch_size=16, lr=1e-3, warmup_steps=1),
                       train, tokenizer, progress=False)
    assert np.mean(trained.history[-5:]) < 0.7 * np.mean(trained.history[:5])
    assert not any(k.startswith("vision_only_head") for k in model.state_dict())  # the caller's model is untouched
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, trained.model.state_dict()[k])}
    assert changed and all(k.startswith("visual.") for k in changed)
    groups = {"seen": list(sw.CLASSES[:4]), "new": list(sw.CLASSES[4:8])}
    test = sw.make_split("unit-swa-test", domains=["photo"], classes=sw.CLASSES[:8], n_per_class=3) \
        .with_transform(models.mini_preprocess)
    results = evaluate(trained.model, tokenizer, test, groups=groups, head=trained.head)
    assert results.set_index("group").loc["new", "accuracy"] != results.set_index("group").loc["new", "accuracy"]
    fitted = evaluate(trained.model, tokenizer, train, head=trained.head)
    assert fitted.accuracy.mean() > 0.4  # it fits its own training images (chance: 0.25)
    swa = finetune(model, methods.get_method("vision-only+swa", num_steps=4, batch_size=16),
                   train, tokenizer, progress=False)
    assert swa.head is not None and swa.head.weight.shape == (4, 128)


def test_fraction_sweep_trains_ce_and_both_swa_variants_together_under_their_labels(setup, monkeypatch):
    model, tokenizer, _ = setup
    bench = experiments.dg_benchmark("shapeworld", test_domain="painting", n_train_per_class=2, n_test_per_class=1)
    bench = bench.with_transform(models.mini_preprocess)
    assert bench.train_domains == ["photo", "sketch", "cartoon"] and set(bench.train.domains) == set(bench.train_domains)
    trained = []
    real = experiments.finetune
    monkeypatch.setattr(experiments, "finetune", lambda model, methods, *a, **k: trained.append(len(methods))
                        or real(model, methods, *a, **k))
    labels = {"ce": "ce", "ce-swa": "ce-swa", "ce-swa (cosine)": "ce-swa", "vision-only": "vision-only"}
    cosine = {"ce-swa (cosine)": dict(swa_lr=None)}  # SWA on ce's own schedule: ce is its live model
    results = experiments.fraction_sweep(model, tokenizer, bench, labels, [0, 0.5], seeds=[0], num_steps=2,
                                         batch_size=8, progress=False, hparams=cosine)
    # ce and its cosine SWA share a run, from which the averaging phase branches off (lib.train.finetune)
    assert set(results.method) == set(labels) and trained == [3, 1] * 2
    trained_half = results[results.fraction == 0.5].pivot_table(index="domain", columns="method", values="accuracy")
    assert not trained_half["ce-swa"].equals(trained_half["ce-swa (cosine)"])  # each label its own hparams
    assert len(results) == 4 * 2 * len(sw.DOMAINS)
    zero = results[results.fraction == 0].pivot_table(index="domain", columns="method", values="accuracy")
    assert (zero["ce"] == zero["ce-swa"]).all()  # fraction 0 is the zero-shot model for both
    summary = experiments.dg_summary(results, bench.train_domains)
    assert list(summary.columns) == ["method", "fraction", "seed", "id", "ood"] and len(summary) == 8


def test_swa_averages_the_epochs_that_start_after_the_start_fraction(setup):
    """22 epochs from 2/3 (14.7 epochs): paper 2's code averages the last 7 epochs (not 8)."""
    model, tokenizer, train = setup
    method = methods.get_method("ce+swa", batch_size=8, swa_every=1, swa_start=2 / 3)
    method.setup(model, tokenizer, train, num_steps=22, seed=0)
    assert method.swa_steps == list(range(16, 23))
    method = methods.get_method("ce+swa", batch_size=8, swa_every=1, swa_start=0.7)
    method.setup(model, tokenizer, train, num_steps=10, seed=0)
    assert method.swa_steps == [8, 9, 10]  # 0.7 * 10 is 7, not 7.000000000000001


@pytest.mark.parametrize("swa_start, swa_every, swa_anneal", [(0.5, 2, 10), (0.3, 1, 3), (0.0, 3, 2)])
def test_swa_lr_follows_the_papers_averaging_phase(setup, swa_start, swa_every, swa_anneal):
    """swa_lr: the base schedule until averaging starts, then a cosine anneal to swa_lr over swa_anneal averaged
    periods (fewer if fewer are averaged), the rate constant within a period: the closed form of paper 2's SWALR."""
    model, tokenizer, train = setup
    num_steps, lr, swa_lr = 20, 1e-3, 5e-3
    method = methods.get_method("ce+swa", lr=lr, warmup_steps=2, batch_size=8, swa_start=swa_start,
                                swa_every=swa_every, swa_lr=swa_lr, swa_anneal=swa_anneal)
    method.setup(model, tokenizer, train, num_steps=num_steps, seed=0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = method.make_scheduler(optimizer, num_steps)
    seen = []
    for _ in range(num_steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()

    def cosine(step):
        return lr * ((step + 1) / 2 if step < 2 else 0.5 * (1 + np.cos(np.pi * (step - 2) / (num_steps - 2))))
    start = method.swa_steps[0] - swa_every
    anneal = min(swa_anneal, len(method.swa_steps))
    expected = []
    for step in range(num_steps):
        if step < start:
            expected.append(cosine(step))
        else:
            alpha = (1 - np.cos(np.pi * min(1.0, ((step - start) // swa_every) / anneal))) / 2
            expected.append(swa_lr * alpha + cosine(start) * (1 - alpha))
    assert seen == pytest.approx(expected, rel=1e-6)
    assert seen[-1] != pytest.approx(cosine(num_steps - 1))  # the phase does change the rate


def test_swa_lr_spreads_the_averaged_states(setup):
    """The paper's raised rate in the averaging phase moves the weights between averaged states far more than the
    decaying cosine, whose last states barely differ (why SWA had no effect under the cosine schedule)."""
    model, tokenizer, train = setup
    spreads = {}
    for swa_lr in (None, 1e-3):
        states = []
        method = methods.get_method("ce+swa", lr=1e-4, batch_size=8, warmup_steps=1, swa_every=2, swa_lr=swa_lr)
        original = method.observe  # SWA's own hook, called whether it watches ce's steps or sets the rate

        def record(model, step, original=original, method=method, states=states):
            original(model, step)
            if step + 1 in method.swa_steps:
                states.append(model.visual.proj.detach().clone())
        method.observe = record
        finetune(model, method, train, tokenizer, num_steps=12, progress=False)
        spreads[swa_lr] = max((a - b).norm().item() for a, b in zip(states, states[1:]))
    assert spreads[1e-3] > 3 * spreads[None] > 0
