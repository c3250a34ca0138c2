"""Per-step training time of CLIPood's methods (`mms`, `bma` = ft+bma, `clipood` = mms+bma) as ratios to `ft`
on mini-CLIP, from one run of the real loop (lib.train.finetune). Methods are interleaved within each repeat so
that load changes on a shared machine hit them alike; a step is the time between consecutive after_step calls
(the first two steps of each run dropped); medians over all steps of all repeats. Goals: mms <= 1.03x,
bma <= 1.10x ft.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_clipood.py [repeats] [steps]
"""
import sys
import time

import numpy as np

from lib.data import load_benchmark
from lib.methods import get_method
from lib.models import load_clip
from lib.train import finetune

METHODS = ("ft", "mms", "bma", "clipood")


def step_times(model, tokenizer, train_set, name, steps, seed):
    method = get_method(name, batch_size=64)
    stamps = []
    inner = method.after_step

    def timed(model, step):
        inner(model, step)
        stamps.append(time.perf_counter())

    method.after_step = timed
    finetune(model, method, train_set, tokenizer, num_steps=steps, seed=seed, device="cpu", progress=False)
    return np.diff(stamps)[1:]


def main(repeats=5, steps=22):
    model, preprocess, tokenizer = load_clip("mini", device="cpu")
    bench = load_benchmark("shapeworld", None, ["painting"], 32, 1).with_transform(preprocess)
    times = {m: [] for m in METHODS}
    for r in range(repeats):
        for m in METHODS:
            times[m].extend(step_times(model, tokenizer, bench.train, m, steps, seed=r))
    ft = np.median(times["ft"])
    print(f"median step time over {repeats} x {steps} steps (batch 64, CPU): ft {1000 * ft:.1f} ms")
    for m in METHODS[1:]:
        print(f"{m:8s} {1000 * np.median(times[m]):7.1f} ms  ratio to ft {np.median(times[m]) / ft:.3f}")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:3]))
