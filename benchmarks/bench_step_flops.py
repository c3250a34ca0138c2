"""How close a training step of the default budget comes to the machine's own matrix-multiply speed: the headroom
that any engineering of the loop could win back on a CPU without changing what is computed.

For each method: the floating-point operations of one step of lib.train.finetune on mini-CLIP at the default budget
(torch.utils.flop_counter: matrix products, convolutions and attention, forward and backward; the elementwise
operations are not counted, so the rate is a lower bound of the work done), the seconds per step (the difference
of two runs, so that setup cancels), and their rate. The ceiling is torch's single-matrix product at two sizes: a
product of the shape that dominates the image tower (tokens of a batch x width, width x 4 width) and a square one.
One torch thread, as each of the walkthrough's worker processes (lib.parallel). Run it alone on an idle machine.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_step_flops.py [methods...]

The last line is `ratio step/matmul <method> <x> ...` (1.0: every second of the step multiplies matrices as fast as
torch can); 1 / x is the most a faster loop could gain for that method.
"""
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from lib import experiments
from lib.methods import get_method
from lib.train import finetune


def seconds_and_flops(model, tokenizer, bench, settings, name, num_steps):
    def method():
        return get_method(name, batch_size=settings["batch_size"], templates=bench.templates)
    with FlopCounterMode(display=False) as counter:
        finetune(model, method(), bench.train, tokenizer, num_steps=1, seed=0, progress=False)
    setup_and_one = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        finetune(model, method(), bench.train, tokenizer, num_steps=2, seed=0, progress=False)
    flops = counter.get_total_flops() - setup_and_one
    seconds = []
    for steps in (2, 2 + num_steps):
        start = time.perf_counter()
        finetune(model, method(), bench.train, tokenizer, num_steps=steps, seed=0, progress=False)
        seconds.append(time.perf_counter() - start)
    return (seconds[1] - seconds[0]) / num_steps, flops


def matmul_rate(rows, inner, columns, repeats=50):
    a, b = torch.randn(rows, inner), torch.randn(inner, columns)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * rows * inner * columns * repeats / (time.perf_counter() - start)


def main(methods=("ft", "ce", "flyp", "arf"), num_steps=20):
    torch.set_num_threads(1)
    model, tokenizer, bench, settings = experiments.setup(progress=False)
    visual = model.visual
    tokens = settings["batch_size"] * (visual.grid_size[0] * visual.grid_size[1] + 1)
    width = visual.conv1.out_channels
    ceiling = max(matmul_rate(tokens, width, 4 * width), matmul_rate(512, 512, 512, repeats=20))
    print(f"matrix products, one thread: {ceiling / 1e9:.1f} GFLOP/s (the best of {tokens}x{width} @ {width}x"
          f"{4 * width} and 512x512 @ 512x512)")
    ratios = {}
    finetune(model, get_method("ft", batch_size=settings["batch_size"]), bench.train, tokenizer, num_steps=2,
             progress=False)  # warm-up
    for name in methods:
        seconds, flops = seconds_and_flops(model, tokenizer, bench, settings, name, num_steps)
        ratios[name] = flops / seconds / ceiling
        print(f"{name}: {flops / 1e9:.2f} GFLOP per step, {seconds:.3f} s per step, {flops / seconds / 1e9:.1f} "
              f"GFLOP/s; at the ceiling {flops / ceiling:.3f} s")
    print("ratio step/matmul " + " ".join(f"{name} {ratio:.2f}" for name, ratio in ratios.items()))


if __name__ == "__main__":
    main(*([tuple(sys.argv[1:])] if len(sys.argv) > 1 else []))
