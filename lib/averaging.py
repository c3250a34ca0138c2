"""Weight averaging: CLIPood's Beta Moving Average, SWA (paper 2) and WiSE-FT interpolation.

- ``beta_weights`` / ``BetaMovingAverage``: the exact Beta(b, b)-weighted mean of the zero-shot
  weights and every state after each of the ``T`` optimizer steps, kept as one running copy.
- ``StochasticWeightAverage``: the plain mean of the states it is given, via
  ``torch.optim.swa_utils.AveragedModel``.
- ``wise_ft`` / ``wise_ft_sweep``: linear interpolation between zero-shot and fine-tuned weights.
- ``model_stock`` / ``model_stock_ratios``: Model Stock (Jang et al., ECCV 2024), two fine-tuned runs from
  the same start merged towards the pre-trained weights by a per-tensor ratio from the angle between them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import pandas as pd
import scipy.stats
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

__all__ = [
    "beta_weights",
    "BetaMovingAverage",
    "StochasticWeightAverage",
    "wise_ft",
    "wise_ft_sweep",
    "model_stock",
    "model_stock_ratios",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def beta_weights(total_steps: int, beta: float) -> np.ndarray:
    """BMA weights ``w_i = BetaPdf((i + 0.5) / (T + 1); beta, beta)`` for ``i = 0..T``.

    ``i = 0`` is the zero-shot state, ``i`` the state after optimizer step ``i``. The midpoint
    rule keeps every argument inside (0, 1), so the weights are finite even for ``beta < 1``,
    where the pdf diverges at the ends and the first and last states dominate. Returns a float64
    numpy vector of length ``T + 1`` (unnormalized, as in CLIPood's code).
    """
    _check_beta_args(total_steps, beta)
    x = (np.arange(total_steps + 1) + 0.5) / (total_steps + 1)
    weights = scipy.stats.beta.pdf(x, beta, beta)
    # The running mean starts from w_0 alone (r = w_i / sum_{k<i} w_k), so w_0 must not underflow to 0.
    if not (np.isfinite(weights).all() and weights[0] > 0):
        raise ValueError(
            f"BMA beta={beta} over {total_steps} steps puts a weight of 0 (float underflow) on the zero-shot "
            "state, so the Beta-weighted mean is undefined; use a smaller beta (CLIPood uses 0.5, 0.1 for "
            "open classes; a beta in the hundreds already averages only the middle of training)"
        )
    return weights


def _check_beta_args(total_steps: int, beta: float) -> None:
    if not (beta > 0 and np.isfinite(beta)):
        raise ValueError(f"BMA beta must be a finite number > 0 (CLIPood uses 0.5, or 0.1 for open classes); got {beta}")
    if int(total_steps) != total_steps or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer (the number of optimizer steps); got {total_steps}")


class BetaMovingAverage:
    """CLIPood's Beta Moving Average (BMA), a temporal ensemble of the whole trajectory.

    ``BetaMovingAverage(model, beta=0.5, total_steps=T)`` deep-copies ``model`` before training
    (the zero-shot weights, weight ``w_0``); call ``.update(model)`` after each optimizer step
    ``i = 1..T``. It keeps ``avg <- (avg + r * theta_i) / (1 + r)`` with
    ``r = w_i / sum_{k<i} w_k``, which after step ``i`` is exactly
    ``sum_{k<=i} w_k theta_k / sum_{k<=i} w_k``: one extra copy of the weights, not ``T + 1``.
    ``.module`` is that copy (same type as ``model``), ready to evaluate.

    Parameters only, frozen ones included (they are equal in every state, so the average leaves
    them unchanged); buffers are copied from the live model, as CLIPood averages parameters only.
    The average is stored in the parameters' own dtype; low-precision (fp16/bf16) parameters are
    combined in float32 and rounded once per step, which still drifts over thousands of steps, so
    keep float32 master weights (bf16 autocast does) when the average matters.
    """

    def __init__(self, module: nn.Module, beta: float = 0.5, total_steps: int = 1):
        _check_beta_args(total_steps, beta)
        self.beta = float(beta)
        self.total_steps = int(total_steps)
        self.weights = beta_weights(self.total_steps, self.beta)
        self.module = copy.deepcopy(module)
        self.num_updates = 0
        # Sum of the weights of the states already in the average, sum_{k<i} w_k.
        self._weight_sum = float(self.weights[0])

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Fold in the state of ``module`` after the next optimizer step."""
        if self.num_updates >= self.total_steps:
            raise RuntimeError(
                f"BetaMovingAverage.update() called more than total_steps={self.total_steps} times; "
                "the Beta weights are defined over the planned number of steps, so pass the true "
                "number of optimizer steps to the constructor"
            )
        live = self._matched(module)
        i = self.num_updates + 1
        w_i = float(self.weights[i])
        r = w_i / self._weight_sum
        avgs, thetas = self._avg_params, [p.detach() for p in live]
        fast = [k for k, a in enumerate(avgs) if a.dtype not in _LOW_PRECISION
                and thetas[k].dtype == a.dtype and thetas[k].device == a.device]
        if fast:
            # In place, (avg + r*theta)/(1+r) written as a weighted sum, over all tensors at once (foreach
            # kernels: the same per-element operations as a loop over tensors, without its per-tensor overhead).
            fast_avgs = [avgs[k] for k in fast] if len(fast) < len(avgs) else avgs
            fast_thetas = [thetas[k] for k in fast] if len(fast) < len(avgs) else thetas
            torch._foreach_mul_(fast_avgs, 1.0 / (1.0 + r))
            torch._foreach_add_(fast_avgs, fast_thetas, alpha=r / (1.0 + r))
        for k in sorted(set(range(len(avgs))) - set(fast)):
            avg = avgs[k]
            theta = thetas[k].to(avg.device)
            if avg.dtype in _LOW_PRECISION:
                avg.copy_((avg.float() + r * theta.float()) / (1.0 + r))
            else:
                avg.mul_(1.0 / (1.0 + r)).add_(theta.to(avg.dtype), alpha=r / (1.0 + r))
        live_buffers = dict(module.named_buffers())
        for name, buf in self.module.named_buffers():
            if name in live_buffers:
                buf.copy_(live_buffers[name])
        self._weight_sum += w_i
        self.num_updates = i

    def _matched(self, module: nn.Module) -> list:
        """The live module's parameters in the averaged copy's order; names are checked once per module."""
        if getattr(self, "_checked_module", None) is not module:
            live_params = dict(module.named_parameters())
            avg_params = dict(self.module.named_parameters())
            if live_params.keys() != avg_params.keys():
                raise ValueError(
                    "update() got a module whose parameter names differ from the averaged copy: "
                    f"missing {sorted(avg_params.keys() - live_params.keys())[:5]}, "
                    f"unexpected {sorted(live_params.keys() - avg_params.keys())[:5]}"
                )
            self._names = list(avg_params)
            self._avg_params = list(avg_params.values())
            self._checked_module = module
            return [live_params[n] for n in self._names]
        live = list(module.parameters())  # same module object, so same names in the same order
        return live

    def __repr__(self) -> str:
        return (
            f"BetaMovingAverage(beta={self.beta}, total_steps={self.total_steps}, "
            f"num_updates={self.num_updates}, module={type(self.module).__name__})"
        )


class StochasticWeightAverage:
    """Stochastic weight averaging (paper 2): the plain mean of the states passed to ``update``.

    A thin wrapper over ``torch.optim.swa_utils.AveragedModel``. It starts from the first state it
    is given: the module passed to the constructor is only copied for its structure and is not
    part of the average (zero-shot weights not included, as in paper 2's code, which averages
    once per epoch over the last half of training). ``.module`` is the averaged ``nn.Module``;
    ``.num_averaged`` counts the states in it.

    Parameters only (``use_buffers=False``): buffers keep the values they had when the wrapper
    was built. CLIP ViTs have no BatchNorm, so that is exact here; a model with BatchNorm would need
    its running statistics recomputed for the averaged weights with
    ``torch.optim.swa_utils.update_bn(train_loader, swa.module)`` before evaluation.
    """

    def __init__(self, module: nn.Module):
        self.averaged_model = AveragedModel(module, use_buffers=False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Add the current state of ``module`` to the running mean."""
        self.averaged_model.update_parameters(module)

    @property
    def module(self) -> nn.Module:
        return self.averaged_model.module

    @property
    def num_averaged(self) -> int:
        return int(self.averaged_model.n_averaged)

    def __repr__(self) -> str:
        return f"StochasticWeightAverage(num_averaged={self.num_averaged}, module={type(self.module).__name__})"


def wise_ft(
    theta_0: Mapping[str, torch.Tensor],
    theta_1: Mapping[str, torch.Tensor],
    alpha: float,
) -> dict[str, torch.Tensor]:
    """WiSE-FT: the new state dict ``(1 - alpha) * theta_0 + alpha * theta_1``.

    ``theta_0`` is the zero-shot state, ``theta_1`` the fine-tuned one; ``alpha = 0`` returns
    (a copy of) ``theta_0`` exactly and ``alpha = 1`` ``theta_1``. Floating tensors are
    interpolated in ``theta_1``'s dtype and device; others (integer counters, masks) are copied
    from ``theta_1``. The inputs are not modified.
    """
    _check_alpha(alpha)
    if theta_0.keys() != theta_1.keys():
        only_0 = sorted(set(theta_0) - set(theta_1))
        only_1 = sorted(set(theta_1) - set(theta_0))
        raise ValueError(
            "wise_ft needs state dicts with the same keys; only in theta_0: "
            f"{only_0[:5]}{' ...' if len(only_0) > 5 else ''}, only in theta_1: "
            f"{only_1[:5]}{' ...' if len(only_1) > 5 else ''}"
        )
    out = {}
    for name, t1 in theta_1.items():
        t0 = theta_0[name]
        if t0.shape != t1.shape:
            raise ValueError(
                f"wise_ft: shape mismatch for {name!r}: {tuple(t0.shape)} in theta_0, {tuple(t1.shape)} in theta_1"
            )
        t1 = t1.detach()
        if t1.is_floating_point():
            t0 = t0.detach().to(device=t1.device, dtype=t1.dtype)
            # This form (rather than t0 + alpha * (t1 - t0)) is exact at both endpoints.
            out[name] = (1.0 - alpha) * t0 + alpha * t1
        else:
            out[name] = t1.clone()
    return out


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(
            f"WiSE-FT mixing coefficient alpha must be in [0, 1] (0 = zero-shot, 1 = fine-tuned); got {alpha}"
        )


def wise_ft_sweep(
    model: nn.Module,
    theta_0: Mapping[str, torch.Tensor],
    theta_1: Mapping[str, torch.Tensor],
    alphas: Iterable[float],
    evaluate_fn: Callable[[nn.Module], Mapping | pd.DataFrame],
) -> pd.DataFrame:
    """Evaluate ``model`` at each WiSE-FT interpolation ``wise_ft(theta_0, theta_1, alpha)``.

    ``evaluate_fn(model)`` returns a dict (one row) or a DataFrame (its rows); the result stacks
    them with an ``alpha`` column first. The model is left holding ``theta_1`` at the end, even
    if ``evaluate_fn`` raises.
    """
    alphas = [float(a) for a in alphas]
    for a in alphas:
        _check_alpha(a)
    # Snapshot both endpoints: a state dict from model.state_dict() shares storage with the model,
    # so load_state_dict would otherwise overwrite theta_1 (or theta_0) in the first iteration.
    theta_0 = {k: v.detach().clone() for k, v in theta_0.items()}
    theta_1 = {k: v.detach().clone() for k, v in theta_1.items()}
    frames = []
    try:
        for a in alphas:
            model.load_state_dict(wise_ft(theta_0, theta_1, a))
            result = evaluate_fn(model)
            if isinstance(result, pd.DataFrame):
                frame = result.copy()
            elif isinstance(result, Mapping):
                frame = pd.DataFrame([dict(result)])
            else:
                raise TypeError(f"evaluate_fn must return a dict or a pandas DataFrame; got {type(result).__name__}")
            if "alpha" in frame.columns:
                raise ValueError("evaluate_fn's result already has an 'alpha' column; rename it")
            frame.insert(0, "alpha", a)
            frames.append(frame)
    finally:
        model.load_state_dict(theta_1)
    if not frames:
        return pd.DataFrame(columns=["alpha"])
    return pd.concat(frames, ignore_index=True)


def model_stock_ratios(
    theta_0: Mapping[str, torch.Tensor],
    theta_a: Mapping[str, torch.Tensor],
    theta_b: Mapping[str, torch.Tensor],
) -> pd.DataFrame:
    """Model Stock's per-tensor angle and ratio: one row per floating tensor with columns name, cos, t.

    cos is the cosine between the changes ``theta_a - theta_0`` and ``theta_b - theta_0`` (flattened, in
    float64) and ``t = 2 cos / (1 + cos)``, the paper's ratio for two fine-tuned models. Our choices, which the
    paper leaves open: a tensor that either run left unchanged has cos = 0 (no evidence that the runs agree,
    as torch's cosine_similarity gives for a zero vector), and a negative cos is clamped to 0, since the
    formula would extrapolate beyond theta_0 and diverges at cos = -1; both give t = 0, i.e. theta_0.
    """
    _check_same_tensors("model_stock", {"theta_0": theta_0, "theta_a": theta_a, "theta_b": theta_b})
    rows = []
    for name, a in theta_a.items():
        if not a.is_floating_point():
            continue
        change_a = (a.detach().double() - theta_0[name].detach().double().to(a.device)).flatten()
        change_b = (theta_b[name].detach().double().to(a.device) - theta_0[name].detach().double().to(a.device))
        change_b = change_b.flatten()
        norms = change_a.norm() * change_b.norm()
        cos = float(change_a @ change_b / norms) if norms > 0 else 0.0
        cos = min(max(cos, 0.0), 1.0)  # rounding can push an exact 1 a hair above it
        rows.append({"name": name, "cos": cos, "t": 2 * cos / (1 + cos)})
    return pd.DataFrame(rows, columns=["name", "cos", "t"])


def model_stock(
    theta_0: Mapping[str, torch.Tensor],
    theta_a: Mapping[str, torch.Tensor],
    theta_b: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Model Stock (Jang et al., ECCV 2024): the new state dict, per tensor
    ``t * (theta_a + theta_b) / 2 + (1 - t) * theta_0`` with ``t = 2 cos / (1 + cos)`` from the angle between the
    two runs' changes (model_stock_ratios says how zero and negative cosines are handled).

    ``theta_0`` is the pre-trained state both runs started from, ``theta_a`` and ``theta_b`` two fine-tuned
    states (e.g. two seeds). Floating tensors are merged in ``theta_a``'s dtype and device; others (integer
    counters, masks) are copied from ``theta_a``. The inputs are not modified.
    """
    ratios = model_stock_ratios(theta_0, theta_a, theta_b).set_index("name")["t"].to_dict()
    out = {}
    for name, a in theta_a.items():
        a = a.detach()
        if a.is_floating_point():
            t = ratios[name]
            mean = (a + theta_b[name].detach().to(device=a.device, dtype=a.dtype)) / 2
            out[name] = t * mean + (1.0 - t) * theta_0[name].detach().to(device=a.device, dtype=a.dtype)
        else:
            out[name] = a.clone()
    return out


def _check_same_tensors(what: str, states: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """The state dicts must have the same keys and shapes."""
    (first_name, first), *others = states.items()
    for other_name, other in others:
        if first.keys() != other.keys():
            only_first = sorted(set(first) - set(other))[:5]
            only_other = sorted(set(other) - set(first))[:5]
            raise ValueError(f"{what} needs state dicts with the same keys; only in {first_name}: {only_first}, "
                             f"only in {other_name}: {only_other}")
        for name, tensor in first.items():
            if tensor.shape != other[name].shape:
                raise ValueError(f"{what}: shape mismatch for {name!r}: {tuple(tensor.shape)} in {first_name}, "
                                 f"{tuple(other[name].shape)} in {other_name}")
