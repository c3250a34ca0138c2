"""What branching SWA's averaging phase off `ce` saves: notebook 02's sweep trains, for each fraction and seed, `ce`,
`ce-swa (cosine)` (SWA watching ce's steps) and `ce-swa` (SWA with its averaging phase, which takes ce's steps until
the phase starts). Separately that is two trainings (ce with its cosine SWA, then ce-swa alone: 2 x 40 steps);
branched (lib.train.finetune given all three) it is one training of 40 steps plus the phase's 20. Both sides give the
same models bit for bit (tests/test_train.py); this times them, interleaved, at notebook 02's default sweep size
(all the training data, 40 steps of 64), in one thread as a walkthrough worker. Run it alone on an idle machine.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_branch.py [--repeats 3]

The last line is `ratio branched/separate <x>` (median seconds; < 1: branching is faster).
"""
import argparse
import statistics
import time

import torch

from lib import experiments
from lib.methods import get_method
from lib.train import finetune


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dg = experiments.dg_benchmark("shapeworld", None, "painting", n_train_per_class=32, n_test_per_class=25)
    model, tokenizer, bench, _ = experiments.setup(train_domains=dg.train_domains, device="cpu", bench=dg,
                                                   progress=False)
    ce = dict(lr=1e-4, weight_decay=1e-4, batch_size=64, num_steps=40)  # notebook 02's
    swa = dict(ce, swa_start=0.5, swa_every=1, swa_lr=1e-4)

    def train(methods):
        return finetune(model, methods, bench.train, tokenizer, seed=0, device="cpu", progress=False, num_workers=0)

    sides = {
        "separate": lambda: (train([get_method("ce", **ce), get_method("ce-swa", **dict(swa, swa_lr=None))]),
                             train(get_method("ce-swa", **swa))),
        "branched": lambda: train([get_method("ce", **ce), get_method("ce-swa", **dict(swa, swa_lr=None)),
                                   get_method("ce-swa", **swa)]),
    }
    seconds = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, side in sides.items():
            start = time.perf_counter()
            side()
            seconds[name].append(time.perf_counter() - start)
    for name, values in seconds.items():
        print(f"{name}: {', '.join(f'{v:.1f}' for v in values)} s")
    ratio = statistics.median(seconds["branched"]) / statistics.median(seconds["separate"])
    print(f"ratio branched/separate {ratio:.3f}")


if __name__ == "__main__":
    main()
