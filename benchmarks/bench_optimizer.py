"""The optimizer step of the lab's methods (lib.methods.base.adamw: torch's AdamW, fused where it can be) against
torch's AdamW as it comes (one small kernel per operation and tensor on the CPU), on mini-CLIP's parameters: every
parameter (ce, flyp, arf, saft's dense twin) and the image tower alone (ft, mms, bma, clipood). The two are
interleaved within each repeat, on the same gradients; medians over repeats. It also prints how far the weights of
the two are apart after the steps (the same update, in another order of float operations).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_optimizer.py [repeats] [steps]
"""
import sys
import time

import numpy as np
import torch

from lib.methods.base import adamw
from lib.models import build_mini


def parameters(which):
    torch.manual_seed(0)
    model = build_mini()
    params = [p for n, p in model.named_parameters() if which == "all" or n.startswith("visual.")]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def seconds_per_step(optimizer, steps):
    optimizer.step()  # the state is created on the first step
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - start) / steps


def main(repeats=5, steps=20):
    torch.set_num_threads(1)  # as each of the walkthrough's worker processes
    ratios = {}
    for which in ("all", "visual"):
        plain_params, lab_params = parameters(which), parameters(which)
        plain = torch.optim.AdamW(plain_params, lr=1e-4, weight_decay=0.1)
        lab = adamw(lab_params, lr=1e-4, weight_decay=0.1)
        times = np.array([[seconds_per_step(plain, steps), seconds_per_step(lab, steps)] for _ in range(repeats)])
        apart = max(float((a - b).detach().abs().max()) for a, b in zip(plain_params, lab_params))
        plain_ms, lab_ms = 1000 * np.median(times, axis=0)
        ratios[which] = lab_ms / plain_ms
        print(f"{which:>6} ({sum(p.numel() for p in lab_params) / 1e6:.1f}M parameters): AdamW {plain_ms:.1f} ms, "
              f"lab {lab_ms:.1f} ms per step; weights apart by at most {apart:.1e} after "
              f"{repeats * (steps + 1)} steps")
    print(f"ratio lab/AdamW all {ratios['all']:.2f} visual {ratios['visual']:.2f}")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
