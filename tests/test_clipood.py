"""CLIPood in the registry (mms, bma, clipood) and the functions behind notebook 01's sliders."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lib import plots
from lib.averaging import beta_weights
from lib.losses import mms_margins
from lib.methods import BetaAverage, MarginMetricSoftmax, get_method


def test_bma_weight_figure_draws_the_normalized_weights():
    fig = plots.bma_weight_figure([0.5, 2.0], 20)
    lines = fig.axes[0].get_lines()
    assert len(lines) == 2
    w = beta_weights(20, 0.5)
    np.testing.assert_allclose(lines[0].get_ydata(), 100 * w / w.sum())
    assert lines[0].get_xdata()[-1] == 20
    plots.plt.close(fig)


def test_bma_weight_figure_rejects_bad_arguments():
    with pytest.raises(ValueError, match="beta"):
        plots.bma_weight_figure(0.0, 10)
    with pytest.raises(ValueError, match="total_steps"):
        plots.bma_weight_figure(0.5, 0)


def test_mms_margin_figure_shows_the_margin_matrix():
    t = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    fig = plots.mms_margin_figure(t, list("abcd"), 0.3)
    data = fig.axes[0].collections[0].get_array().reshape(4, 4)
    np.testing.assert_allclose(np.asarray(data), mms_margins(t, 0.3).numpy(), atol=1e-6)
    assert np.allclose(np.diag(np.asarray(data)), 0, atol=1e-6)
    plots.plt.close(fig)
    with pytest.raises(ValueError, match="lam"):
        plots.mms_margin_figure(t, list("abcd"), -0.1)


def test_clipood_is_mms_wrapped_by_bma_with_both_hparams():
    method = get_method("clipood")
    assert isinstance(method, BetaAverage) and isinstance(method.base, MarginMetricSoftmax)
    assert method.name == "clipood"
    assert method.hparams["lam"] == 0.3 and method.hparams["beta"] == 0.5 and method.hparams["scale"] is None
    tuned = get_method("clipood", lam=0.1, beta=2.0)
    assert tuned.base.hparams["lam"] == 0.1 and tuned.hparams["beta"] == 2.0
    bma = get_method("bma")
    assert isinstance(bma, BetaAverage) and bma.base.name == "ft"


def test_mms_takes_the_model_temperature_by_default_and_scale_overrides_it(tiny_setup):
    model, tokenizer, train_set = tiny_setup
    images = torch.stack([train_set[i][0] for i in range(4)])
    labels = torch.stack([train_set[i][1] for i in range(4)])
    losses = {}
    for name, hparams in [("ft", {}), ("mms", dict(lam=0.0)), ("mms", dict(lam=0.0, scale=100.0))]:
        method = get_method(name, **hparams)
        method.setup(model, tokenizer, train_set, num_steps=1, seed=0)
        with torch.no_grad():
            losses[name, hparams.get("scale")] = method.loss(model, images, labels, None).item()
    # lam = 0 removes the margins: at the model's own temperature mms is ft's loss, at 100 it is not.
    assert model.logit_scale.exp().item() < 90
    assert losses["mms", None] == pytest.approx(losses["ft", None], rel=1e-6)
    assert losses["mms", 100.0] != pytest.approx(losses["ft", None], rel=1e-3)


@pytest.mark.parametrize("name, hparams, match", [
    ("mms", dict(lam=-0.1), "lam"), ("mms", dict(scale=0.0), "scale"), ("mms", dict(scale="x"), "scale"), ("clipood", dict(lam=-1), "lam"),
    ("bma", dict(beta=0), "beta"), ("clipood", dict(beta=-0.5), "beta"), ("mms+bma", dict(beta="x"), "beta"),
])
def test_bad_hparams_raise_clear_errors(name, hparams, match):
    with pytest.raises(ValueError, match=match):
        get_method(name, **hparams)


def test_bma_with_no_steps_raises_through_finetune(tiny_setup):
    model, tokenizer, train_set = tiny_setup
    from lib.train import finetune
    with pytest.raises(ValueError, match="num_steps"):
        finetune(model, get_method("clipood", num_steps=0, batch_size=4), train_set, tokenizer, progress=False)


def test_clipood_returns_the_beta_average_not_the_last_state(tiny_setup):
    model, tokenizer, train_set = tiny_setup
    from lib.train import finetune
    kw = dict(seed=0, progress=False, device="cpu")
    mms = finetune(model, get_method("mms", num_steps=3, batch_size=4), train_set, tokenizer, **kw).model
    clipood = finetune(model, get_method("clipood", num_steps=3, batch_size=4), train_set, tokenizer, **kw).model
    # Same trajectory (same seed and loss), but clipood returns the Beta-weighted mean of its states.
    names = [n for n, _ in model.named_parameters() if n.startswith("visual.")]
    p_mms, p_clip, p_0 = (dict(m.named_parameters()) for m in (mms, clipood, model))
    assert any(not torch.equal(p_mms[n], p_clip[n]) for n in names)
    w = beta_weights(3, 0.5)
    # The average lies between zero-shot and final weights in the sense of its weight on the start.
    n = names[0]
    assert not torch.equal(p_clip[n], p_0[n])
    text_names = [n for n, _ in model.named_parameters() if not n.startswith("visual.")]
    assert all(torch.allclose(p_clip[n], p_0[n], atol=1e-6) for n in text_names)  # frozen text encoder (up to rounding)
    assert w[0] > 0


@pytest.fixture(scope="module")
def tiny_setup():
    from lib.data import load_benchmark
    from lib.models import load_clip
    model, preprocess, tokenizer = load_clip("mini", device="cpu")
    bench = load_benchmark("shapeworld", None, ["painting"], 2, 1).with_transform(preprocess)
    return model, tokenizer, bench.train


@pytest.mark.parametrize("beta, match", [
    (float("inf"), "beta must be a finite number > 0"),
    (1e6, "weight of 0 .float underflow. on the zero-shot state"),
])
def test_a_beta_that_makes_bma_undefined_is_rejected_when_built(beta, match):
    with pytest.raises(ValueError, match=match):
        get_method("clipood", beta=beta)
    with pytest.raises(ValueError, match=match):
        get_method("ft+bma", beta=beta, num_steps=6)
