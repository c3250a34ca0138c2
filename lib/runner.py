"""A resumable experiment runner: `python -m lib.runner` or `run_grid(grid)`.

A grid names methods, seeds, hyperparameters (a list value is a sweep), datasets and a budget. Every run is one
(method, seed, hyperparameters, dataset) point; its tidy results go to results/<key>.csv, where the key is a hash
of the run's parameters, next to results/<key>.json (the parameters). A run whose CSV exists is skipped, and a
CSV appears only complete (written to a temporary file, then renamed), so a sweep killed at any moment resumes
where it stopped without redoing or corrupting anything.

    >>> table = run_grid({"methods": ["ft", "clipood"], "seeds": [0, 1, 2], "budget": "default"})

Under torchrun every rank trains every run data-parallel (lib.train.finetune) and rank 0 alone writes results.
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
from .evaluate import evaluate, format_table, summarize, with_ci
from .train import finetune

GRID_DEFAULTS = dict(methods=["ft"], seeds=[0], hparams={}, datasets=["shapeworld"], data_root=None,
                     train_domains=["painting"], budget="default", model_name="mini", pretrained=None)


def expand(grid):
    """The runs of a grid: one dict per (dataset, method, seed, hyperparameter combination), in a fixed order.
    The budget is the one that will run (LAB_BUDGET overrides the grid's), so a key never mixes budgets."""
    unknown = sorted(set(grid) - set(GRID_DEFAULTS))
    if unknown:
        raise ValueError(f"Unknown grid key(s) {unknown}; a grid takes {sorted(GRID_DEFAULTS)}.")
    grid = {**GRID_DEFAULTS, **grid}
    names = sorted(grid["hparams"])
    values = [v if isinstance(v, list) else [v] for v in (grid["hparams"][n] for n in names)]
    combos = [dict(zip(names, combo)) for combo in itertools.product(*values)]
    return [dict(method=method, seed=seed, hparams=hparams, dataset=dataset, data_root=grid["data_root"],
                 train_domains=list(grid["train_domains"]), budget=experiments.budget_name(grid["budget"]),
                 model_name=grid["model_name"],
                 pretrained=grid["pretrained"])
            for dataset in grid["datasets"] for method in grid["methods"] for seed in grid["seeds"]
            for hparams in combos]


def run_key(run):
    """A short, stable hash of a run's parameters (key order does not matter)."""
    return hashlib.sha1(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()[:16]


def validate(runs):
    """Fail before any training: unknown methods or hyperparameters, unknown budgets, missing dataset folders."""
    from .methods import get_method
    for run in runs:
        get_method(run["method"], **run["hparams"])
        experiments.budget(run["budget"])
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
    parameters as columns: method, seed, dataset and one column per hyperparameter)."""
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
        setting = (run["model_name"], run["pretrained"], run["dataset"], run["data_root"],
                   tuple(run["train_domains"]), run["budget"])
        if setting not in loaded:
            loaded.clear()  # one model and benchmark in memory at a time
            model, preprocess, tokenizer = load_clip(run["model_name"], run["pretrained"], device)
            size = experiments.budget(run["budget"])
            bench = load_benchmark(run["dataset"], run["data_root"], run["train_domains"],
                                   size["n_train_per_class"], size["n_test_per_class"]).with_transform(preprocess)
            loaded[setting] = model, tokenizer, bench, size
        model, tokenizer, bench, size = loaded[setting]
        trained = finetune(model, run["method"], bench.train, tokenizer, num_steps=size["num_steps"],
                           seed=run["seed"], device=device, progress=False,
                           **{"batch_size": size["batch_size"], **run["hparams"]})
        table = evaluate(trained.model, tokenizer, bench.test, groups=bench.groups, head=trained.head,
                         templates=trained.method.hparams["templates"])
        if writer:
            _write_atomically(path, run, table.assign(train_domains="+".join(run["train_domains"])))
    _barrier()  # every rank reads rank 0's files
    return load_results(runs, results_dir)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def load_results(runs, results_dir="results"):
    tables = []
    for run in runs:
        table = pd.read_csv(Path(results_dir) / f"{run_key(run)}.csv")
        label = " ".join([run["method"]] + [f"{n}={v}" for n, v in sorted(run["hparams"].items())])
        tables.append(table.assign(method=run["method"], label=label, seed=run["seed"], dataset=run["dataset"],
                                   **{name: json.dumps(value) if isinstance(value, (list, dict)) else value
                                      for name, value in run["hparams"].items()}))
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


def _parse_value(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", nargs="?", type=Path, help="a JSON file with grid keys (flags override it)")
    parser.add_argument("--methods", nargs="+")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--datasets", nargs="+")
    parser.add_argument("--data-root")
    parser.add_argument("--train-domains", nargs="+")
    parser.add_argument("--budget")
    parser.add_argument("--model-name")
    parser.add_argument("--pretrained")
    parser.add_argument("--hparam", action="append", default=[], metavar="NAME=VALUE",
                        help="a hyperparameter (JSON value; a JSON list is a sweep), repeatable")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    grid = json.loads(args.grid.read_text()) if args.grid else {}
    for key in ("methods", "seeds", "datasets", "data_root", "train_domains", "budget", "model_name", "pretrained"):
        if getattr(args, key) is not None:
            grid[key] = getattr(args, key)
    for item in args.hparam:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--hparam takes NAME=VALUE; got {item!r}")
        grid.setdefault("hparams", {})[name] = _parse_value(value)
    rank = 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
        dist.init_process_group("nccl" if args.device != "cpu" and torch.cuda.is_available() else "gloo")
        rank = dist.get_rank()
        if torch.cuda.is_available() and args.device != "cpu":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
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
