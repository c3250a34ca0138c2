"""A resumable experiment runner: `python -m lib.runner` or `run_grid(grid)`.

A grid names methods, seeds, hyperparameters, datasets and a budget, or explicit sizes (n_train_per_class,
n_test_per_class, num_steps, batch_size); a list value is a sweep. Every run is one point of the grid; its tidy
results go to results/<key>.csv, where the key is a hash of the run's parameters, next to results/<key>.json (the
parameters). A run whose CSV exists is skipped, and a CSV appears only complete (written to a temporary file,
then renamed), so a sweep killed at any moment resumes where it stopped without redoing or corrupting anything.

    >>> table = run_grid({"methods": ["ft", "clipood"], "seeds": [0, 1, 2], "budget": "default"})

Under `torchrun --nproc_per_node=N -m lib.runner ...` every rank trains every run data-parallel
(lib.train.finetune) and evaluates it (the same test set on every rank: simple, not faster); rank 0 alone writes.
"""
import argparse
import hashlib
import itertools
import json
import os
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import experiments
from .evaluate import format_table, summarize, with_ci
from .notebooks import parse_value

# A run's size: the budget's values unless the grid sets them (None = the budget's).
SIZES = ("n_train_per_class", "n_test_per_class", "num_steps", "batch_size")
GRID_DEFAULTS = dict(methods=["ft"], seeds=[0], hparams={}, datasets=["shapeworld"], data_root=None,
                     train_domains=["painting"], budget="default", model_name="mini", pretrained=None,
                     **dict.fromkeys(SIZES))


def expand(grid):
    """The runs of a grid: one dict per (dataset, size, method, seed, hyperparameter combination), in a fixed
    order; a list value of a hyperparameter or a size is a sweep. The budget is the one that will run
    (LAB_BUDGET overrides the grid's), so a key never mixes budgets. Sizes the grid sets explicitly are part of a
    run (and of its key) only when set, so the keys of budget-only runs stay what they were."""
    unknown = sorted(set(grid) - set(GRID_DEFAULTS))
    if unknown:
        raise ValueError(f"Unknown grid key(s) {unknown}; a grid takes {sorted(GRID_DEFAULTS)}.")
    grid = {**GRID_DEFAULTS, **grid}
    sizes_as_hparams = sorted(set(SIZES) & set(grid["hparams"]))
    if sizes_as_hparams:
        raise ValueError(f"{sizes_as_hparams} set a run's size: give them as grid keys (or --num-steps, "
                         f"--batch-size, ...), not as hyperparameters.")
    sizes = _combinations({name: grid[name] for name in SIZES if grid[name] is not None})
    return [dict(method=method, seed=seed, hparams=hparams, dataset=dataset, data_root=grid["data_root"],
                 train_domains=list(grid["train_domains"]), budget=experiments.budget_name(grid["budget"]),
                 model_name=grid["model_name"], pretrained=grid["pretrained"], **size)
            for dataset in grid["datasets"] for size in sizes for method in grid["methods"]
            for seed in grid["seeds"] for hparams in _combinations(grid["hparams"])]


def _combinations(values):
    """Every combination of {name: value or list of values} as a list of {name: value}."""
    names = sorted(values)
    choices = [values[n] if isinstance(values[n], list) else [values[n]] for n in names]
    return [dict(zip(names, combo)) for combo in itertools.product(*choices)]


def run_key(run):
    """A short, stable hash of a run's parameters (key order does not matter)."""
    return hashlib.sha1(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_size(run):
    """n_train_per_class, n_test_per_class, num_steps and batch_size of a run: its budget's, then its own."""
    return {**experiments.budget(run["budget"]), **{name: run[name] for name in SIZES if name in run}}


def validate(runs):
    """Fail before any training: unknown methods or hyperparameters, unknown budgets, missing dataset folders."""
    from .methods import get_method
    for run in runs:
        get_method(run["method"], **run["hparams"])
        for name, value in run_size(run).items():
            if name in run and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer (or a list of them); got {value!r}.")
        if run["dataset"] != "shapeworld":
            if run["data_root"] is None:
                raise ValueError(f"dataset {run['dataset']!r} is read from disk: set data_root to the folder that "
                                 f"holds {run['dataset']}/<domain>/<class>/<image> (DomainBed layout).")
            folder = Path(run["data_root"]) / run["dataset"]
            if not folder.is_dir():
                raise FileNotFoundError(f"No dataset folder {folder}: put {run['dataset']} there in the DomainBed "
                                        f"layout <data_root>/{run['dataset']}/<domain>/<class>/<image>, or fix "
                                        f"data_root / the dataset name in the grid.")


def run_grid(grid, results_dir="results", device="auto", progress=True):
    """Run every run of the grid that has no result yet; returns the tidy results of all of them (the runs'
    parameters as columns: method, seed, dataset and one column per hyperparameter).

    grid keys (all optional; see GRID_DEFAULTS): methods, seeds, hparams ({name: value or list of values}),
    datasets, data_root, train_domains, budget, model_name, pretrained, and the sizes in SIZES."""
    from .data import load_benchmark
    from .models import load_clip
    runs = expand(grid)
    validate(runs)
    results_dir = Path(results_dir)
    writer = not dist.is_initialized() or dist.get_rank() == 0
    if writer:
        results_dir.mkdir(parents=True, exist_ok=True)
        for partial in results_dir.glob("*.tmp"):  # left by a run killed while writing
            partial.unlink()
    _barrier()
    todo = [run for run in runs if not (results_dir / f"{run_key(run)}.csv").exists()]  # the same on every rank
    loaded = {}
    for run in tqdm(todo, desc=f"runs ({len(runs) - len(todo)} of {len(runs)} done before)",
                    disable=not (progress and writer)):
        path = results_dir / f"{run_key(run)}.csv"
        size = run_size(run)
        setting = (run["model_name"], run["pretrained"], run["dataset"], run["data_root"],
                   tuple(run["train_domains"]), size["n_train_per_class"], size["n_test_per_class"])
        if setting not in loaded:
            loaded.clear()  # one model and benchmark in memory at a time
            model, preprocess, tokenizer = load_clip(run["model_name"], run["pretrained"], device)
            bench = load_benchmark(run["dataset"], run["data_root"], run["train_domains"],
                                   size["n_train_per_class"], size["n_test_per_class"]).with_transform(preprocess)
            loaded[setting] = model, tokenizer, bench
        model, tokenizer, bench = loaded[setting]
        table, _ = experiments.run_one(model, tokenizer, bench, run["method"], run["seed"], size["num_steps"],
                                       size["batch_size"], device, progress=False, **run["hparams"])
        if writer:
            _write_atomically(path, run, table.assign(train_domains="+".join(run["train_domains"])))
    _barrier()  # every rank reads rank 0's files
    return load_results(runs, results_dir)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def load_results(runs, results_dir="results"):
    """The stored tables of `runs`, concatenated, with columns for the runs' parameters: method, label (the method
    with its hyperparameters and explicit sizes, what tells runs of one method apart), seed, dataset, one column
    per hyperparameter and per explicit size."""
    tables = []
    for run in runs:
        table = pd.read_csv(Path(results_dir) / f"{run_key(run)}.csv")
        varied = {**run["hparams"], **{name: run[name] for name in SIZES if name in run}}
        label = " ".join([run["method"]] + [f"{n}={v}" for n, v in sorted(varied.items())])
        tables.append(table.assign(method=run["method"], label=label, seed=run["seed"], dataset=run["dataset"],
                                   **{name: json.dumps(value) if isinstance(value, (list, dict)) else value
                                      for name, value in varied.items()}))
    return pd.concat(tables, ignore_index=True)


def _write_atomically(path, run, table):
    for target, write in ((path.with_suffix(".json"), lambda f: json.dump(run, f, indent=1, default=str)),
                          (path, lambda f: table.to_csv(f, index=False))):
        partial = target.with_name(target.name + ".tmp")
        with open(partial, "w") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, target)  # the CSV, written last, is what marks the run as done


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", nargs="?", type=Path, help="a JSON file with grid keys (flags override it)")
    parser.add_argument("--methods", nargs="+")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--datasets", nargs="+")
    parser.add_argument("--data-root")
    parser.add_argument("--train-domains", nargs="+")
    parser.add_argument("--budget")
    for size in SIZES:
        parser.add_argument(f"--{size.replace('_', '-')}", type=int, help="overrides the budget's")
    parser.add_argument("--model-name")
    parser.add_argument("--pretrained")
    parser.add_argument("--hparam", action="append", default=[], metavar="NAME=VALUE",
                        help="a hyperparameter (a JSON or Python value; a list is a sweep), repeatable")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    grid = json.loads(args.grid.read_text()) if args.grid else {}
    for key in ("methods", "seeds", "datasets", "data_root", "train_domains", "budget", "model_name", "pretrained",
                *SIZES):
        if getattr(args, key) is not None:
            grid[key] = getattr(args, key)
    for item in args.hparam:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--hparam takes NAME=VALUE; got {item!r}")
        grid.setdefault("hparams", {})[name] = parse_value(value)
    try:
        validate(expand(grid))
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    rank = 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
        gpu = torch.cuda.is_available() and args.device != "cpu"
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # before NCCL starts on a device
        dist.init_process_group("nccl" if gpu else "gloo")
        rank = dist.get_rank()
    try:
        results = run_grid(grid, args.results_dir, args.device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        by_run = results.assign(method=results["label"])
        train_domains = grid.get("train_domains", GRID_DEFAULTS["train_domains"])
        print(format_table(with_ci(summarize(by_run, train_domains))))


if __name__ == "__main__":
    main()
