"""Runs per minute of the runner on the CPU: one process with every thread against lib.parallel's worker processes,
each with its share of the threads. Each side trains the same `--runs` runs of `ft` (seeds 0, 1, ...) at the default
budget into an empty results folder, start-up included (importing, loading the model and the data): what a notebook
or `python -m lib.runner` pays. Run it alone on an idle machine.

    PYTHONPATH=. python benchmarks/bench_workers.py --runs 6 --workers 2

The last line is `ratio workers/one-process <x>` (runs per minute, > 1: the workers are faster).
"""
import argparse
import tempfile
import time

from lib import runner


def minutes_per_run(runs, workers, method):
    grid = {"methods": [method], "seeds": list(range(runs)), "budget": "default"}
    with tempfile.TemporaryDirectory() as results_dir:
        start = time.perf_counter()
        runner.execute(*runner.prepare(grid, results_dir, progress=False), results_dir, progress=False,
                       workers=workers)
        return (time.perf_counter() - start) / 60 / runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--method", default="ft")
    args = parser.parse_args()
    one = minutes_per_run(args.runs, 1, args.method)
    print(f"one process: {1 / one:.2f} runs/min")
    several = minutes_per_run(args.runs, args.workers, args.method)
    print(f"{args.workers} workers: {1 / several:.2f} runs/min")
    print(f"ratio workers/one-process {one / several:.2f}")


if __name__ == "__main__":
    main()
