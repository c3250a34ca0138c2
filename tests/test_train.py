import math

import pytest
import torch

from lib import methods, models
from lib.methods import robust_ft
from lib.data import shapeworld as sw
from lib.evaluate import evaluate
from lib.methods.base import adamw
from lib.train import cosine_schedule, finetune

FAST = dict(num_steps=4, batch_size=16, warmup_steps=1)


@pytest.fixture(scope="module")
def setup():
    model, _, _ = models.load_clip("mini", device="cpu")
    train = sw.make_split("unit-train", domains=["photo"], classes=sw.BASE_CLASSES, n_per_class=4)
    return model, models.mini_tokenizer(), train.with_transform(models.mini_preprocess)


def test_cosine_schedule_closed_form():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=2.0)
    scheduler = cosine_schedule(optimizer, num_steps=10, warmup_steps=2)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [1.0, 2.0] + [2.0 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert seen == pytest.approx(expected)


@pytest.mark.parametrize("grouped", [False, True])
def test_the_lab_optimizer_is_torchs_adamw_fused(grouped):
    torch.manual_seed(0)
    weights = [torch.randn(40, 30), torch.randn(30)]
    copies = [[w.clone().requires_grad_() for w in weights] for _ in range(2)]

    def params(a, b):  # as LP-FT gives them: the head in a group of its own, at its own rate
        return [{"params": [a]}, {"params": [b], "lr": 1e-2}] if grouped else [a, b]

    lab = adamw(params(*copies[0]), lr=1e-3, weight_decay=0.1)
    reference = torch.optim.AdamW(params(*copies[1]), lr=1e-3, weight_decay=0.1, fused=False)
    assert lab.defaults["fused"] and not reference.defaults["fused"]
    for _ in range(5):
        gradients = [torch.randn_like(w) for w in weights]
        for optimizer, tensors in ((lab, copies[0]), (reference, copies[1])):
            for tensor, gradient in zip(tensors, gradients):
                tensor.grad = gradient.clone()
            optimizer.step()
    for a, b, start in zip(*copies, weights):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6) and not torch.equal(a, start)


def test_ft_trains_only_the_image_encoder_and_leaves_the_callers_model(setup):
    model, tokenizer, train = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = finetune(model, methods.get_method("ft", lr=1e-3, **FAST), train, tokenizer, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    after = trained.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("visual.") for k in changed)
    assert len(trained.history) == FAST["num_steps"]


def test_seeds_make_runs_repeatable(setup):
    model, tokenizer, train = setup
    a = finetune(model, methods.get_method("ft", **FAST), train, tokenizer, seed=1, progress=False).history
    b = finetune(model, methods.get_method("ft", **FAST), train, tokenizer, seed=1, progress=False).history
    c = finetune(model, methods.get_method("ft", **FAST), train, tokenizer, seed=2, progress=False).history
    assert a == b and a != c


def test_ft_lowers_the_training_loss(setup):
    model, tokenizer, train = setup
    trained = finetune(model, methods.get_method("ft", num_steps=30, batch_size=24, lr=1e-3),
                       train, tokenizer, progress=False)
    first, last = sum(trained.history[:5]) / 5, sum(trained.history[-5:]) / 5
    assert last < 0.7 * first


def test_zeroshot_returns_the_model_unchanged(setup):
    model, tokenizer, train = setup
    trained = finetune(model, methods.get_method("zeroshot"), train, tokenizer, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.model.state_dict().values()))
    assert trained.history == [] and trained.head is None


def test_linear_probe_knows_only_its_classes(setup):
    model, tokenizer, train = setup
    trained = finetune(model, methods.get_method("lp", C=1e4), train, tokenizer, progress=False)
    results = evaluate(trained.model, tokenizer, train, groups={"base": list(sw.BASE_CLASSES)}, head=trained.head)
    assert results.accuracy.iloc[0] > 0.5  # logistic regression fits its own 24 training images
    with pytest.raises(KeyError, match="only the classes"):
        trained.head(torch.zeros(1, 128), [len(sw.CLASSES)])  # an id beyond its classes


def test_registry_errors_name_what_is_known():
    with pytest.raises(ValueError, match="Unknown method 'sgd-magic'.*ft"):
        methods.get_method("sgd-magic")
    with pytest.raises(ValueError, match="Unknown hyperparameter"):
        methods.get_method("ft", learning_rate=1.0)
    with pytest.raises(ValueError, match="Unknown modifier"):
        methods.get_method("ft+teleport")


@pytest.mark.parametrize("name", sorted(methods.METHODS) + sorted(methods.ALIASES))
def test_every_registered_method_runs_a_few_steps(setup, name):
    """DomainBed's habit: every method of the registry trains on the tiny split and gives finite losses."""
    model, tokenizer, train = setup
    trained = finetune(model, methods.get_method(name, **FAST), train, tokenizer, progress=False)
    assert all(math.isfinite(loss) for loss in trained.history)
    method = methods.get_method(name)
    assert len(trained.history) == (FAST["num_steps"] if method.trains else 0)
    results = evaluate(trained.model, tokenizer, train, groups={"base": list(sw.BASE_CLASSES)}, head=trained.head)
    assert 0 <= results.accuracy.iloc[0] <= 1


@pytest.mark.parametrize("name, hparams, match", [
    ("ft", dict(lr=1e10), r"ft: the (loss|gradient norm) is (nan|inf) at step \d+ of 20.*lower lr"),
    ("ft+swa", dict(lr=1e10), r"ft\+swa: the (loss|gradient norm) is (nan|inf) at step \d+ of 20"),
])
def test_a_diverged_run_stops_with_the_method_step_and_cause(setup, name, hparams, match):
    model, tokenizer, train = setup
    with pytest.raises(FloatingPointError, match=match):
        finetune(model, methods.get_method(name, num_steps=20, batch_size=16, **hparams), train, tokenizer,
                 progress=False)


def test_non_finite_returned_weights_stop_the_run(setup, monkeypatch):
    """A state that goes non-finite at the last step (or in a weight average) is caught before it is returned."""
    model, tokenizer, train = setup
    method = methods.get_method("ft", **FAST)
    real = method.finalize

    def poisoned(model, history):
        with torch.no_grad():
            next(model.visual.parameters()).fill_(float("nan"))
        return real(model, history)
    monkeypatch.setattr(method, "finalize", poisoned)
    with pytest.raises(FloatingPointError, match="weights it returns are not finite after 4 steps"):
        finetune(model, method, train, tokenizer, progress=False)


def test_finetune_records_the_number_of_steps_that_ran(setup):
    model, tokenizer, train = setup
    trained = finetune(model, methods.get_method("ft", num_steps=2, batch_size=16), train, tokenizer, progress=False)
    assert trained.method.hparams["num_steps"] == 2 == len(trained.history)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 0"):
        finetune(model, methods.get_method("ft"), train, tokenizer, progress=False, num_steps=2.5)


@pytest.mark.parametrize("name, hparams, match", [
    ("ft", dict(lr=0), r"ft: lr must be a finite number > 0 \(the optimizer's step size\); got 0"),
    ("ft", dict(lr=float("nan")), "lr must be a finite number > 0"),
    ("ft", dict(batch_size=8.5), "batch_size must be an integer >= 1"),
    ("ce", dict(grad_clip=-1), "grad_clip must be a finite number >= 0"),
    ("lp", dict(C=0), "C must be a finite number > 0"),
    ("vision-only", dict(head_lr=-1), "head_lr must be"),
    ("flyp", dict(k=0), "k must be an integer >= 1"),
    ("arf", dict(anchor_fraction=0), r"anchor_fraction must be a finite number in \(0, 1\]"),
    ("ft+swa", dict(swa_start=1.5), r"ft\+swa: swa_start must be a finite number in \[0, 1\)"),
    ("ft+swa", dict(swa_every=0.5), "swa_every must be an integer >= 1 or None"),
    ("saft", dict(alpha=2), r"alpha must be a finite number in \(0, 1\]"),
])
def test_every_numeric_hyperparameter_is_checked_when_the_method_is_built(name, hparams, match):
    with pytest.raises(ValueError, match=match):
        methods.get_method(name, **hparams)


@pytest.mark.parametrize("name", ["lp+saft", "zeroshot+saft", "lp+bma", "zeroshot+swa"])
def test_a_modifier_on_a_method_that_does_not_train_is_rejected_when_built(name):
    with pytest.raises(ValueError, match="acts on training steps, but '(lp|zeroshot)' does not train"):
        methods.get_method(name)


@pytest.mark.parametrize("names", [
    [("ft", {}), ("bma", {}), ("bma", {"beta": 2.0})],  # BMA only watches ft's steps
    [("mms", {}), ("clipood", {})],
    [("ce", {}), ("ce-swa", {"swa_lr": None})],  # SWA on ce's own schedule watches ce's steps
])
def test_methods_with_one_trajectory_share_a_training_that_equals_their_own(setup, names):
    model, tokenizer, train = setup
    shared = finetune(model, [methods.get_method(n, **FAST, **h) for n, h in names], train, tokenizer, seed=3,
                      progress=False)
    for (name, hparams), together in zip(names, shared):
        alone = finetune(model, methods.get_method(name, **FAST, **hparams), train, tokenizer, seed=3, progress=False)
        assert together.history == alone.history and together.method.hparams == alone.method.hparams
        assert all(torch.equal(a, b) for a, b in zip(together.model.state_dict().values(),
                                                     alone.model.state_dict().values()))
    first, *others = [t.model.state_dict()["visual.proj"] for t in shared]
    assert all(not torch.equal(first, other) for other in others)  # each got its own average


@pytest.mark.parametrize("names", [
    [("ce", {}), ("ce-swa", {})],  # parts from ce where its averaging phase starts (step 3 of 6)
    [("ce-swa", {"swa_lr": 1e-3}), ("ce", {}), ("ce-swa", {"swa_lr": None}), ("ce-swa", {"swa_start": 0.0})],
    [("ce-swa", {"swa_lr": None}), ("ce-swa", {"swa_start": 0.75}), ("ce-swa", {"swa_start": 0.75})],
])
def test_methods_that_part_from_a_trajectory_branch_off_and_equal_their_own_training(setup, names, monkeypatch):
    model, tokenizer, train = setup
    def build(name, hparams):  # 6 steps, SWA averaging every step of its phase
        return methods.get_method(name, **dict(FAST, num_steps=6), **({"swa_every": 1} if "swa" in name else {}),
                                  **hparams)
    built = [build(n, h) for n, h in names]
    losses = []
    original = robust_ft.EndToEndCrossEntropy.loss
    monkeypatch.setattr(robust_ft.EndToEndCrossEntropy, "loss", lambda *args: losses.append(1) or original(*args))
    shared = finetune(model, built, train, tokenizer, seed=3, progress=False)
    # one training of ce's 6 steps, and each branch only its own steps after its phase starts
    own = {}
    for m in built:
        if m.parts_from() is not None and m.trajectory() not in own:  # the first of a branch is the one set up
            own[m.trajectory()] = 6 - m.parting_step
    assert len(losses) == 6 + sum(own.values()) < 6 * (1 + len(own))
    for (name, hparams), together in zip(names, shared):
        alone = finetune(model, build(name, hparams), train, tokenizer, seed=3, progress=False)
        assert together.history == alone.history and together.method.hparams == alone.method.hparams
        assert all(torch.equal(a, b) for a, b in zip(together.model.state_dict().values(),
                                                     alone.model.state_dict().values()))


@pytest.mark.parametrize("names", [["ft", "mms"], ["ft", "ce-swa"], ["bma", "clipood"]])
def test_methods_that_take_different_steps_cannot_share_a_training(setup, names):
    model, tokenizer, train = setup  # ce-swa takes ce's first steps, never ft's
    assert methods.get_method(names[0]).trajectory() != methods.get_method(names[1]).trajectory()
    with pytest.raises(ValueError, match="do not take the same steps"):
        finetune(model, [methods.get_method(n, **FAST) for n in names], train, tokenizer, progress=False)
