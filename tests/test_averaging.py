"""BMA, SWA and WiSE-FT against exact averages of explicitly stored states."""

import copy

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from torch import nn

from lib.averaging import (
    BetaMovingAverage,
    StochasticWeightAverage,
    beta_weights,
    wise_ft,
    wise_ft_sweep,
)


def _model(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))
    m[0].bias.requires_grad_(False)  # a frozen parameter: averaged too, and stays unchanged
    return m


def _train(model, steps, callback, seed=1):
    """A few random SGD steps with momentum (so states differ a lot); callback after each."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2, momentum=0.9)
    model.train()
    for _ in range(steps):
        x = torch.randn(16, 5, generator=g)
        y = torch.randint(0, 3, (16,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        callback(model)


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ----------------------------------------------------------------------------- beta_weights


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0, 2.0])
def test_beta_weights_match_pdf_and_are_symmetric(beta):
    T = 9
    w = beta_weights(T, beta)
    assert w.shape == (T + 1,)
    x = (np.arange(T + 1) + 0.5) / (T + 1)
    np.testing.assert_allclose(w, scipy.stats.beta.pdf(x, beta, beta), rtol=1e-12)
    np.testing.assert_allclose(w, w[::-1], rtol=1e-12)
    assert np.all(np.isfinite(w)) and np.all(w > 0)


def test_beta_weights_shapes_of_the_trajectory():
    np.testing.assert_allclose(beta_weights(7, 1.0), np.ones(8))
    w = beta_weights(10, 0.5)  # U-shaped: the zero-shot and final states weigh most
    assert w.argmax() in (0, 10) and w.argmin() == 5
    w = beta_weights(10, 2.0)  # hump-shaped: the middle of training weighs most
    assert w.argmin() in (0, 10) and w.argmax() == 5


def test_beta_weights_errors():
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        beta_weights(5, 0.0)
    with pytest.raises(ValueError, match="total_steps must be a positive integer"):
        beta_weights(0, 0.5)


# ----------------------------------------------------------------------------- BMA


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0, 2.0])
def test_bma_equals_exact_weighted_mean_of_all_states(beta):
    T = 12
    model = _model()
    states = [_params(model)]  # theta_0: the zero-shot weights
    bma = BetaMovingAverage(model, beta=beta, total_steps=T)

    def cb(m):
        bma.update(m)
        states.append(_params(m))

    _train(model, T, cb)
    assert bma.num_updates == T and len(states) == T + 1
    w = torch.tensor(beta_weights(T, beta), dtype=torch.float64)
    for name, p in bma.module.named_parameters():
        stacked = torch.stack([s[name].double() for s in states])
        expected = torch.einsum("t,t...->...", w, stacked) / w.sum()
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-5)
    # The average is not any single state (the test would be vacuous otherwise).
    assert not torch.allclose(bma.module[3].weight, model[3].weight, atol=1e-3)
    # The frozen bias never moved, so its average is that value exactly.
    torch.testing.assert_close(bma.module[0].bias, states[0]["0.bias"], rtol=0, atol=1e-6)


def test_bma_intermediate_average_is_prefix_weighted_mean():
    T, beta = 6, 0.5
    model = _model()
    states = [_params(model)]
    bma = BetaMovingAverage(model, beta=beta, total_steps=T)

    def cb(m):
        bma.update(m)
        states.append(_params(m))

    _train(model, 3, cb)  # stop halfway: average of theta_0..theta_3 with w_0..w_3
    w = torch.tensor(beta_weights(T, beta)[:4], dtype=torch.float64)
    name = "3.weight"
    expected = torch.einsum("t,t...->...", w, torch.stack([s[name].double() for s in states])) / w.sum()
    torch.testing.assert_close(bma.module[3].weight.detach().double(), expected, rtol=1e-5, atol=1e-5)


def test_bma_copies_buffers_instead_of_averaging_them():
    model = _model()
    bma = BetaMovingAverage(model, beta=0.5, total_steps=4)
    _train(model, 4, bma.update)
    for (name, b_avg), (_, b_live) in zip(bma.module.named_buffers(), model.named_buffers()):
        assert torch.equal(b_avg, b_live), name
    assert int(bma.module[1].num_batches_tracked) == 4


def test_bma_module_is_independent_copy_of_same_type():
    model = _model()
    before = _params(model)
    bma = BetaMovingAverage(model, total_steps=3)
    assert type(bma.module) is type(model) and bma.module is not model
    assert bma.module[0].weight.data_ptr() != model[0].weight.data_ptr()
    _train(model, 1, bma.update)
    # Training moved the live model but the copy started from the zero-shot weights.
    assert not torch.equal(model[3].weight, before["3.weight"])
    with torch.no_grad():
        model[3].weight.add_(100.0)  # later edits of the live model do not leak into the average
    assert bma.module[3].weight.abs().max() < 50
    assert bma.beta == 0.5 and "num_updates=1" in repr(bma)


def test_bma_errors():
    model = _model()
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        BetaMovingAverage(model, beta=0.0, total_steps=5)
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        BetaMovingAverage(model, beta=-1.0, total_steps=5)
    with pytest.raises(ValueError, match="total_steps must be a positive integer"):
        BetaMovingAverage(model, beta=0.5, total_steps=0)
    bma = BetaMovingAverage(model, beta=0.5, total_steps=2)
    bma.update(model)
    bma.update(model)
    with pytest.raises(RuntimeError, match="more than total_steps=2"):
        bma.update(model)
    bma = BetaMovingAverage(model, beta=0.5, total_steps=2)
    with pytest.raises(ValueError, match="parameter names differ"):
        bma.update(nn.Linear(5, 7))
    assert bma.num_updates == 0


def test_bma_bfloat16_module():
    T = 5
    model = _model().to(torch.bfloat16)
    states = [_params(model)]
    bma = BetaMovingAverage(model, beta=0.5, total_steps=T)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(T):
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
            bma.update(model)
            states.append(_params(model))
    w = torch.tensor(beta_weights(T, 0.5), dtype=torch.float64)
    p = bma.module[3].weight
    assert p.dtype == torch.bfloat16
    expected = torch.einsum("t,t...->...", w, torch.stack([s["3.weight"].double() for s in states])) / w.sum()
    torch.testing.assert_close(p.double(), expected, rtol=0.02, atol=0.02)


# ----------------------------------------------------------------------------- SWA


def test_swa_is_plain_mean_of_given_states_excluding_construction_state():
    model = _model()
    zero_shot = _params(model)
    swa = StochasticWeightAverage(model)
    assert swa.num_averaged == 0
    given = []

    def cb(m):
        swa.update(m)
        given.append(_params(m))

    _train(model, 5, cb)
    assert swa.num_averaged == 5
    assert type(swa.module) is type(model)
    for name, p in swa.module.named_parameters():
        expected = torch.stack([s[name] for s in given]).mean(0)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
    # The zero-shot weights are not in it: including them would give a different mean.
    with_zs = torch.stack([zero_shot["3.weight"]] + [s["3.weight"] for s in given]).mean(0)
    assert not torch.allclose(swa.module[3].weight, with_zs, atol=1e-4)


def test_swa_first_update_copies_the_state():
    model = _model()
    swa = StochasticWeightAverage(_model(seed=5))  # constructor state is irrelevant
    swa.update(model)
    for (name, p), (_, q) in zip(swa.module.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), name


# ----------------------------------------------------------------------------- WiSE-FT


def _states():
    a, b = _model(0), _model(1)
    _train(b, 2, lambda m: None)
    return a.state_dict(), b.state_dict()


def test_wise_ft_endpoints_exact_and_midpoint():
    s0, s1 = _states()
    out0 = wise_ft(s0, s1, 0.0)
    out1 = wise_ft(s0, s1, 1.0)
    mid = wise_ft(s0, s1, 0.5)
    for k in s1:
        if s1[k].is_floating_point():
            assert torch.equal(out0[k], s0[k]), k
            torch.testing.assert_close(mid[k], (s0[k] + s1[k]) / 2)
        else:  # num_batches_tracked: from theta_1 regardless of alpha
            assert torch.equal(out0[k], s1[k]) and torch.equal(mid[k], s1[k])
        assert torch.equal(out1[k], s1[k]), k
    assert set(out0) == set(s0)
    assert int(s0["1.num_batches_tracked"]) != int(s1["1.num_batches_tracked"])


def test_wise_ft_returns_new_tensors_and_leaves_inputs_alone():
    s0, s1 = _states()
    c0, c1 = copy.deepcopy(s0), copy.deepcopy(s1)
    out = wise_ft(s0, s1, 1.0)
    for t in out.values():
        t.add_(1)
    for k in s0:
        assert torch.equal(s0[k], c0[k]) and torch.equal(s1[k], c1[k])


def test_wise_ft_errors():
    s0, s1 = _states()
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
            wise_ft(s0, s1, bad)
    missing = {k: v for k, v in s1.items() if k != "3.bias"}
    with pytest.raises(ValueError, match="same keys.*3.bias"):
        wise_ft(s0, missing, 0.5)
    reshaped = dict(s1, **{"3.bias": torch.zeros(4)})
    with pytest.raises(ValueError, match="shape mismatch"):
        wise_ft(s0, reshaped, 0.5)


def test_wise_ft_sweep_with_dict_and_dataframe_results():
    model = _model(1)
    _train(model, 2, lambda m: None)
    theta_1 = model.state_dict()  # shares storage with the model on purpose
    theta_1_copy = copy.deepcopy(theta_1)
    theta_0 = _model(0).state_dict()
    model.eval()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))

    def evaluate(m):
        return {"w_sum": m[3].weight.sum().item(), "out": m(x).sum().item()}

    df = wise_ft_sweep(model, theta_0, theta_1, [0.0, 0.5, 1.0], evaluate)
    assert list(df.columns) == ["alpha", "w_sum", "out"] and list(df.alpha) == [0.0, 0.5, 1.0]
    expected = [wise_ft(theta_0, theta_1_copy, a)["3.weight"].sum().item() for a in (0.0, 0.5, 1.0)]
    np.testing.assert_allclose(df.w_sum, expected, rtol=1e-6)
    for k, v in model.state_dict().items():  # theta_1 restored, despite the aliasing
        assert torch.equal(v, theta_1_copy[k]), k

    def evaluate_rows(m):
        return pd.DataFrame({"domain": ["a", "b"], "acc": [m[3].bias[0].item(), m[3].bias[1].item()]})

    df = wise_ft_sweep(model, theta_0, theta_1_copy, [0.25, 0.75], evaluate_rows)
    assert list(df.columns) == ["alpha", "domain", "acc"] and len(df) == 4
    assert list(df.alpha) == [0.25, 0.25, 0.75, 0.75]
    b0, b1 = theta_0["3.bias"], theta_1_copy["3.bias"]
    assert df.acc.iloc[3] == pytest.approx((0.25 * b0[1] + 0.75 * b1[1]).item(), rel=1e-6)


def test_wise_ft_sweep_restores_theta_1_on_error_and_validates_alphas():
    model = _model(1)
    theta_1 = copy.deepcopy(model.state_dict())
    theta_0 = _model(0).state_dict()

    def boom(m):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        wise_ft_sweep(model, theta_0, theta_1, [0.0], boom)
    for k, v in model.state_dict().items():
        assert torch.equal(v, theta_1[k]), k
    with pytest.raises(ValueError, match="alpha must be in"):
        wise_ft_sweep(model, theta_0, theta_1, [0.0, 2.0], lambda m: {})
    with pytest.raises(TypeError, match="dict or a pandas DataFrame"):
        wise_ft_sweep(model, theta_0, theta_1, [0.5], lambda m: 1.0)
