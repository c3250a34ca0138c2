"""The `saft` registry modifier (lib.methods.SparseAdaptation), the `ce` base it defaults to, and the function
behind notebook 04's alpha slider."""
import copy
import math

import matplotlib.pyplot as plt
import pytest
import torch

from lib import methods, models, plots
from lib.sparse import SparseAdamW, parameter_scores
from lib.train import finetune

FAST = dict(num_steps=3, batch_size=12, warmup_steps=1)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest.py


@pytest.fixture(scope="module")
def setup(random_mini_setup):
    return random_mini_setup


def test_saft_is_ce_with_sparse_adaptation_over_both_encoders():
    method = methods.get_method("saft")
    assert method.name == "saft" and isinstance(method, methods.SparseAdaptation)
    assert isinstance(method.base, methods.EndToEndCrossEntropy)
    assert method.hparams["alpha"] == 0.001 and method.hparams["strategy"] == "gradient"
    model = models.build_mini()
    names = {n for n, _ in method.trainable_parameters(model)}
    assert names == {n for n, _ in model.named_parameters()}  # image and text encoders and logit_scale


@pytest.mark.parametrize("alpha", [0, -0.1, 1.5, float("nan"), "0.1"])
def test_alpha_outside_unit_interval_fails_at_get_method(alpha):
    with pytest.raises(ValueError, match="alpha"):
        methods.get_method("saft", alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        methods.get_method("mms+saft", alpha=alpha)


def test_unknown_strategy_and_bad_score_batches_fail_at_get_method():
    with pytest.raises(ValueError, match="strategy"):
        methods.get_method("saft", strategy="largest")
    with pytest.raises(ValueError, match="score_batches"):
        methods.get_method("saft", score_batches=0)


def test_unselected_entries_stay_bit_identical_after_finetune(setup):
    model, tokenizer, train = setup
    method = methods.get_method("saft", alpha=0.01, lr=1e-2, weight_decay=0.5, grad_clip=1e-3, **FAST)
    trained = finetune(model, method, train, tokenizer, progress=False)
    before, after, mask = model.state_dict(), trained.model.state_dict(), method.mask
    n_changed = 0
    for name, _ in model.named_parameters():
        unselected = ~mask[name]
        assert torch.equal(before[name][unselected], after[name][unselected]), name
        n_changed += int((before[name] != after[name]).sum())
    assert 0 < n_changed <= sum(int(m.sum()) for m in mask.values())
    for name, buffer in before.items():  # BatchNorm statistics and every other buffer too
        if name not in mask:
            assert torch.equal(buffer, after[name]), name


def test_alpha_one_reproduces_dense_ce_step_for_step(setup, monkeypatch):
    model, tokenizer, train = setup
    # SparseAdamW repeats torch's AdamW operation by operation; the lab's dense methods use the fused kernel, whose
    # rounding Adam amplifies on entries with no gradient but rounding noise (attention's key bias).
    monkeypatch.setattr(methods.base, "adamw", lambda params, lr, weight_decay: torch.optim.AdamW(
        params, lr=lr, weight_decay=weight_decay))
    hparams = dict(lr=1e-3, weight_decay=0.1, grad_clip=1.0, **FAST)
    dense = finetune(model, methods.get_method("ce", **hparams), train, tokenizer, progress=False, seed=3)
    sparse = finetune(model, methods.get_method("ce+saft", alpha=1.0, **hparams),
                      train, tokenizer, progress=False, seed=3)
    assert dense.history == pytest.approx(sparse.history, rel=1e-5, abs=1e-7)
    for (name, a), b in zip(dense.model.state_dict().items(), sparse.model.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), dense.model.state_dict().values()))


def test_ce_trains_both_encoders_and_logit_scale(setup):
    model, tokenizer, train = setup
    trained = finetune(model, methods.get_method("ce", lr=1e-3, **FAST), train, tokenizer, progress=False)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, trained.model.state_dict()[k])}
    assert any(k.startswith("visual.") for k in changed)
    assert any(k.startswith("transformer.") for k in changed)
    assert "logit_scale" in changed


@pytest.mark.parametrize("name", ["mms+saft", "ft+saft", "mms+saft+bma"])
def test_saft_composes_with_frozen_text_losses(setup, name):
    model, tokenizer, train = setup
    method = methods.get_method(name, alpha=0.01, lr=1e-2, **FAST)
    trained = finetune(model, method, train, tokenizer, progress=False)
    assert all(math.isfinite(loss) for loss in trained.history)
    after = trained.model.state_dict()
    # BMA's running mean avg <- (avg + r * theta) / (1 + r) is not bit-exact when theta == avg (rounding), so
    # with bma the frozen entries are compared up to float32 rounding.
    same = torch.equal if "bma" not in name else (lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=1e-7))
    changed = {k for k, v in model.state_dict().items() if not same(v, after[k])}
    assert changed and all(k.startswith("visual.") for k in changed)  # mms/ft train the image encoder only
    saft = method if isinstance(method, methods.SparseAdaptation) else method.base
    assert isinstance(saft, methods.SparseAdaptation) and isinstance(saft.base, methods.FrozenTextMethod)
    assert set(saft.mask) == {n for n, _ in model.named_parameters() if n.startswith("visual.")}
    n_visual = sum(p.numel() for n, p in model.named_parameters() if n.startswith("visual."))
    assert sum(int(m.sum()) for m in saft.mask.values()) == math.floor(0.01 * n_visual)


@pytest.mark.parametrize("strategy", ["gradient", "fisher", "random", "magnitude"])
def test_every_strategy_selects_alpha_of_the_entries_with_a_sparse_optimizer(setup, strategy):
    model, tokenizer, train = setup
    method = methods.get_method("saft", alpha=0.002, strategy=strategy, score_batches=1)
    clone = copy.deepcopy(model)
    method.setup(clone, tokenizer, train, num_steps=1, seed=0)
    total = sum(p.numel() for p in clone.parameters())
    assert sum(int(m.sum()) for m in method.mask.values()) == math.floor(0.002 * total)
    assert isinstance(method.make_optimizer(method.trainable_parameters(clone)), SparseAdamW)


def test_gradient_scores_pick_different_entries_than_random(setup):
    model, tokenizer, train = setup
    masks = {}
    for strategy in ("gradient", "random"):
        method = methods.get_method("saft", alpha=0.01, strategy=strategy, score_batches=1)
        method.setup(copy.deepcopy(model), tokenizer, train, num_steps=1, seed=0)
        masks[strategy] = method.mask
    overlap = sum(int((masks["gradient"][n] & masks["random"][n]).sum()) for n in masks["gradient"])
    assert overlap < 0.1 * sum(int(m.sum()) for m in masks["gradient"].values())


def test_slider_function_counts_the_global_mask_per_layer():
    model = models.build_mini()
    scores = parameter_scores(model, None, [], strategy="random", seed=0)
    total = sum(p.numel() for p in model.parameters())
    for alpha in (1e-4, 1e-2, 1.0):
        fig, counts = plots.saft_alpha_figure(scores, alpha)
        assert int(counts["count"].sum()) == math.floor(alpha * total)
        assert int(counts["total"].sum()) == total
        assert set(counts.encoder) == {"image", "text", "other"}
        assert set(counts[counts.encoder == "image"].block) == {-1, 0, 1, 2, 3}  # outside the blocks and 4 ViT blocks
        assert set(counts[counts.encoder == "text"].block) == {-1, 0, 1, 2}
        assert len(fig.axes) == 3 and "alpha" in fig._suptitle.get_text()
        plt.close(fig)
    _, all_of_them = plots.saft_alpha_figure(scores, 1.0)
    assert (all_of_them["count"] == all_of_them["total"]).all()
    with pytest.raises(ValueError, match="alpha"):
        plots.saft_alpha_figure(scores, 0.0)


def test_one_batch_scores_cover_every_parameter_of_both_encoders():
    from lib.sparse import one_batch_scores
    torch.manual_seed(0)
    model = models.build_mini().eval()
    scores = one_batch_scores(model, models.mini_tokenizer(), torch.randn(4, 3, 32, 32),
                              ["a photo of a star.", "a sketch of a ring.", "a photo of a cube.", "a heart."])
    assert list(scores) == [n for n, _ in model.named_parameters()]
    assert all(s.shape == p.shape for s, p in zip(scores.values(), model.parameters()))
    assert scores["logit_scale"].item() > 0 and scores["visual.conv1.weight"].abs().sum() > 0
    assert scores["transformer.resblocks.0.attn.in_proj_weight"].abs().sum() > 0
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # .grad fields left alone


def test_saft_keeps_the_parameter_groups_of_its_base(setup):
    """vision-only+saft: the head trains at head_lr, as in vision-only (SparseAdamW takes the base's groups)."""
    model, tokenizer, train = setup
    method = methods.get_method("vision-only+saft", alpha=0.5, head_lr=0.05, lr=1e-4, **FAST)
    trained = finetune(model, method, train, tokenizer, progress=False)
    optimizer = method.make_optimizer(method.named)
    head = {id(p) for n, p in method.named if n.startswith("vision_only_head.")}
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert head and {rates[i] for i in head} == {0.05}
    assert {rates[i] for i in rates if i not in head} == {1e-4}
    assert trained.head is not None
