"""A resumable experiment runner: `python -m lib.runner` or `run_grid(grid)`.

A grid names methods, seeds, hyperparameters, datasets and a budget, or explicit sizes (n_train_per_class,
n_test_per_class, num_steps, batch_size); a list value is a sweep. Every run is one point of the grid; its tidy
results go to results/<key>.csv, where the key is a hash of the run's parameters, next to results/<key>.json (the
parameters) and results/change/<key>.csv (where it changed the model, per block: load_changes). A run whose CSV
exists is skipped, and a CSV appears only complete (written to a temporary file, then renamed, after the other
two), so a sweep killed at any moment resumes where it stopped without redoing or corrupting anything.
A run is trained while holding a lock on results/<key>.lock, so two runners on one folder never train the same
run twice: the second skips it, and waits for its result at the end. Everything that can be checked before
training is (methods, hyperparameters, model, dataset folders and images, the results folder), and a run whose
loss, gradients or weights stop being finite raises instead of being stored (lib.train.finetune).

    >>> table = run_grid({"methods": ["ft", "clipood"], "seeds": [0, 1, 2], "budget": "default"})

Under `torchrun --nproc_per_node=N -m lib.runner ...` every rank trains every run data-parallel
(lib.train.finetune) and evaluates it (the same test set on every rank: simple, not faster); rank 0 alone writes.
"""
import argparse
import contextlib
import fcntl
import functools
import hashlib
import itertools
import json
import os
import tempfile
from pathlib import Path

# torch, pandas and the rest of the lab are imported where they are needed, so that --help and usage errors are
# instant (importing them takes seconds).
from .checks import Number, check_number
from .notebooks import parse_value

# A run's size: the budget's values unless the grid sets them (None = the budget's).
SIZES = ("n_train_per_class", "n_test_per_class", "num_steps", "batch_size")
# Part of a run (and of its key) only when set, like the sizes, so that the keys of earlier runs stay valid:
# dataset_options go to lib.data.load_benchmark (class_folders, partial), quick_gelu to lib.models.load_clip.
OPTIONAL = dict(dataset_options={}, quick_gelu=None)
GRID_DEFAULTS = dict(methods=["ft"], seeds=[0], hparams={}, datasets=["shapeworld"], data_root=None,
                     train_domains=["painting"], budget="default", model_name="mini", pretrained=None,
                     **dict.fromkeys(SIZES), **OPTIONAL)


def expand(grid):
    """The runs of a grid: one dict per (dataset, size, method, seed, hyperparameter combination), in a fixed
    order; a list value of a hyperparameter or a size is a sweep. The budget is the one that will run
    (LAB_BUDGET overrides the grid's), so a key never mixes budgets. Sizes the grid sets explicitly are part of a
    run (and of its key) only when set, so the keys of budget-only runs stay what they were."""
    from . import experiments
    unknown = sorted(set(grid) - set(GRID_DEFAULTS))
    if unknown:
        raise ValueError(f"Unknown grid key(s) {unknown}; a grid takes {sorted(GRID_DEFAULTS)}.")
    grid = {**GRID_DEFAULTS, **grid}
    sizes_as_hparams = sorted(set(SIZES) & set(grid["hparams"]))
    if sizes_as_hparams:
        raise ValueError(f"{sizes_as_hparams} set a run's size: give them as grid keys (or --num-steps, "
                         f"--batch-size, ...), not as hyperparameters.")
    sizes = _combinations({name: grid[name] for name in SIZES if grid[name] is not None})
    options = {name: grid[name] for name, default in OPTIONAL.items() if grid[name] != default}
    return [dict(method=method, seed=seed, hparams=hparams, dataset=dataset, data_root=grid["data_root"],
                 train_domains=list(grid["train_domains"]), budget=experiments.budget_name(grid["budget"]),
                 model_name=grid["model_name"], pretrained=grid["pretrained"], **size, **options)
            for dataset in grid["datasets"] for size in sizes for method in grid["methods"]
            for seed in grid["seeds"] for hparams in _combinations(grid["hparams"])]


def stored_compare(grid, hparams=None, results_dir="results", device="auto", progress=True):
    """lib.experiments.compare through the store: the tidy results of every method and seed of `grid`, read where
    the same run is stored already (by another notebook or the command line) and trained and stored otherwise.
    hparams: {method: {name: value}}, as compare takes them; a value equal to the registry's default is left out
    of the run, so that a method as shipped is one stored run whichever notebook asks for it."""
    import pandas as pd
    from .methods import get_method
    tables = []
    for method in grid["methods"]:
        defaults = get_method(method).hparams
        changed = {name: value for name, value in (hparams or {}).get(method, {}).items()
                   if name not in defaults or defaults[name] != value}
        tables.append(run_grid({**grid, "methods": [method], "hparams": changed}, results_dir, device, progress))
    return pd.concat(tables, ignore_index=True)


def _combinations(values):
    """Every combination of {name: value or list of values} as a list of {name: value}."""
    names = sorted(values)
    choices = [values[n] if isinstance(values[n], list) else [values[n]] for n in names]
    return [dict(zip(names, combo)) for combo in itertools.product(*choices)]


def run_key(run):
    """A short, stable hash of a run's parameters (key order does not matter). A checkpoint file given as
    `pretrained` counts by its content, so replaced weights never reuse the results of the old ones."""
    keyed = dict(run)
    if run.get("pretrained") and Path(run["pretrained"]).is_file():
        stat = Path(run["pretrained"]).stat()
        keyed["pretrained_sha256"] = _file_hash(str(Path(run["pretrained"]).resolve()), stat.st_size, stat.st_mtime_ns)
    return hashlib.sha1(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def _file_hash(path, size, mtime_ns):  # size and mtime: a file changed in place is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_size(run):
    """n_train_per_class, n_test_per_class, num_steps and batch_size of a run: its budget's, then its own."""
    from . import experiments
    return {**experiments.budget(run["budget"]), **{name: run[name] for name in SIZES if name in run}}


def validate(runs):
    """Fail before any training on what can be checked without loading data: methods, modifiers and every
    hyperparameter (at the run's own num_steps and batch_size), what a method needs from a dataset (e.g. arf's
    captions on folders), budgets and sizes, models and checkpoint files, dataset folders and train domains.
    (prepare then loads the folder datasets, which checks their images.)"""
    from .methods import get_method
    from .models import check_model
    size_rule = Number(1, integer=True, why="a run's size; a list of them is a sweep")
    models_checked = set()
    for run in runs:
        for name in SIZES:
            if name in run:
                check_number("runner", name, run[name], size_rule)
        size = run_size(run)
        method = get_method(run["method"], num_steps=size["num_steps"], batch_size=size["batch_size"],
                            **run["hparams"])
        method.check_dataset(run["dataset"])
        if (run["model_name"], run["pretrained"]) not in models_checked:  # a checkpoint file is read once
            check_model(run["model_name"], run["pretrained"])
            models_checked.add((run["model_name"], run["pretrained"]))
        if run["dataset"] != "shapeworld":
            if run["data_root"] is None:
                raise ValueError(f"dataset {run['dataset']!r} is read from disk: set data_root to the folder that "
                                 f"holds {run['dataset']}/<domain>/<class>/<image> (DomainBed layout).")
            folder = Path(run["data_root"]) / run["dataset"]
            if not folder.is_dir():
                raise FileNotFoundError(f"No dataset folder {folder}: put {run['dataset']} there in the DomainBed "
                                        f"layout <data_root>/{run['dataset']}/<domain>/<class>/<image>, or fix "
                                        f"data_root / the dataset name in the grid.")
            missing = [d for d in run["train_domains"] if not (folder / d).is_dir()]
            if missing:
                found = sorted(p.name for p in folder.iterdir() if p.is_dir())
                raise FileNotFoundError(f"{folder} has no folder for the train domain(s) {missing}; its domains are "
                                        f"{found}: fix train_domains.")
        else:
            from .data import shapeworld
            missing = [d for d in run["train_domains"] if d not in shapeworld.DOMAINS]
            if missing:
                raise ValueError(f"train_domains {missing} are not ShapeWorld domains; choose from "
                                 f"{list(shapeworld.DOMAINS)}.")


def _setting(run):
    """What a run needs loaded: the model and the benchmark (one of each in memory at a time)."""
    size = run_size(run)
    return (run["model_name"], run["pretrained"], run.get("quick_gelu"), run["dataset"], run["data_root"],
            tuple(run["train_domains"]), size["n_train_per_class"], size["n_test_per_class"],
            json.dumps(run.get("dataset_options", {}), sort_keys=True))


def prepare(grid, results_dir="results", progress=True):
    """Every check that can run before training: validate, then load (and so check) the folder datasets of the
    runs still to do, then make sure results_dir can be written. Returns (runs, todo, benchmarks by setting)."""
    from . import experiments
    runs = expand(grid)
    validate(runs)
    results_dir = Path(results_dir)
    todo = [run for run in runs if not (results_dir / f"{run_key(run)}.csv").exists()]
    benchmarks = {}
    for run in todo:
        if run["dataset"] != "shapeworld" and _setting(run) not in benchmarks:
            benchmarks[_setting(run)] = experiments.benchmark(run["dataset"], run["data_root"], run["train_domains"],
                                                              run_size(run), run.get("dataset_options"), progress)
    _check_writable(results_dir)
    return runs, todo, benchmarks


def _check_writable(results_dir):
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=results_dir):
            pass
    except OSError as error:
        raise PermissionError(f"Cannot write results to {results_dir} ({error}); give --results-dir (results_dir) "
                              f"a folder you can write to.") from error


def run_grid(grid, results_dir="results", device="auto", progress=True):
    """Run every run of the grid that has no result yet; returns the tidy results of all of them (the runs'
    parameters as columns: method, seed, dataset and one column per hyperparameter).

    grid keys (all optional; see GRID_DEFAULTS): methods, seeds, hparams ({name: value or list of values}),
    datasets, data_root, train_domains, budget, model_name, pretrained, the sizes in SIZES, and OPTIONAL's
    dataset_options ({"class_folders": "intersection", "partial": True}) and quick_gelu."""
    return execute(*prepare(grid, results_dir, progress), results_dir, device, progress)


def execute(runs, todo, benchmarks, results_dir="results", device="auto", progress=True):
    """Train and store the runs of `todo` (prepare's output), each under its lock; a run another runner holds is
    left for the end, then waited for. Returns the results of all `runs`."""
    from tqdm.auto import tqdm
    results_dir = Path(results_dir)
    writer = _rank() == 0
    loaded, deferred = {}, []
    names = ", ".join(dict.fromkeys(str(run.get("method")) for run in runs))
    for run in tqdm(todo, desc=f"{names}: runs ({len(runs) - len(todo)} of {len(runs)} done before)",
                    disable=not (progress and writer)):
        with _claim(results_dir / f"{run_key(run)}.csv", blocking=False) as claimed:
            if claimed is None:
                deferred.append(run)
            elif claimed:
                _train_and_store(run, loaded, benchmarks, results_dir, device, writer)
    for run in deferred:  # held by another runner: wait for it; train it only if that runner died without it
        with _claim(results_dir / f"{run_key(run)}.csv", blocking=True) as claimed:
            if claimed:
                _train_and_store(run, loaded, benchmarks, results_dir, device, writer)
    _barrier()  # every rank reads rank 0's files
    return load_results(runs, results_dir)


def _train_and_store(run, loaded, benchmarks, results_dir, device, writer):
    from . import experiments
    from .change import change_table
    size, setting = run_size(run), _setting(run)
    if setting not in loaded:
        loaded.clear()  # one model and benchmark in memory at a time
        model, tokenizer, bench, _ = experiments.setup(
            run["model_name"], run["pretrained"], run["dataset"], run["data_root"], run["train_domains"],
            run["budget"], device, sizes={name: run[name] for name in SIZES if name in run},
            quick_gelu=run.get("quick_gelu"), dataset_options=run.get("dataset_options"),
            bench=benchmarks.get(setting))
        loaded[setting] = model, tokenizer, bench, experiments.change_probe(model, tokenizer, bench)
    model, tokenizer, bench, probe = loaded[setting]
    table, trained = experiments.run_one(model, tokenizer, bench, run["method"], run["seed"], size["num_steps"],
                                         size["batch_size"], device, progress=False, **run["hparams"])
    change = change_table(model, {run["method"]: trained.model}, **probe).drop(columns="method")
    if writer:
        _write_atomically(results_dir / f"{run_key(run)}.csv", run,
                          table.assign(train_domains="+".join(run["train_domains"])), change)


@contextlib.contextmanager
def _claim(path, blocking):
    """Whether this process should train the run whose result is `path`: True (it holds <key>.lock and there is no
    result yet), False (the result exists: another runner finished it) or None (another runner holds the lock and
    blocking is False). The lock is fcntl.flock's, which the kernel releases when a process dies, so a runner
    killed with SIGKILL leaves no stale claim. Under torch.distributed rank 0 decides for every rank."""
    lock_path = path.with_suffix(".lock")
    fd = None
    try:
        decision = None
        if _rank() == 0:
            fd = os.open(lock_path, os.O_CREAT | os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                decision = not path.exists()
            except BlockingIOError:
                decision = None
        decision = _from_rank_0(decision)
        if decision:
            for partial in path.parent.glob(f"{path.stem}.*.tmp"):  # left by a runner killed while writing
                partial.unlink()
        yield decision
        if fd is not None and decision is not None and path.exists():
            # Removed (while held) only once the result exists: a runner that opens the name afterwards locks a new
            # file and finds the result; after a failure the file stays, so two waiters cannot both take the run.
            with contextlib.suppress(FileNotFoundError):  # a runner that finished the run removed it already
                os.unlink(lock_path)
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the lock


def _rank():
    import torch.distributed as dist
    return dist.get_rank() if dist.is_initialized() else 0


def _from_rank_0(value):
    import torch.distributed as dist
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier():
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()


def load_results(runs, results_dir="results"):
    """The stored tables of `runs`, concatenated, with columns for the runs' parameters: method, label (the method
    with its hyperparameters and explicit sizes, what tells runs of one method apart), seed, dataset, one column
    per hyperparameter and per explicit size."""
    return _load(runs, results_dir)


def load_changes(runs, results_dir="results"):
    """Where each of `runs` changed the model (lib.change.change_table against the zero-shot model, per block of
    both towers, on experiments.change_probe's held-out images and prompts), with load_results' run columns."""
    missing = [run for run in runs if not (Path(results_dir) / "change" / f"{run_key(run)}.csv").exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of these runs have no stored per-block change (e.g. "
                                f"{missing[0]['method']}, seed {missing[0]['seed']}): they ran before the runner "
                                f"kept it, or have not run. Delete their files under {results_dir} and run_grid again.")
    return _load(runs, Path(results_dir) / "change")


def _load(runs, folder):
    import pandas as pd
    tables = []
    for run in runs:
        table = pd.read_csv(Path(folder) / f"{run_key(run)}.csv")
        varied = {**run["hparams"], **{name: run[name] for name in SIZES if name in run}}
        label = " ".join([run["method"]] + [f"{n}={v}" for n, v in sorted(varied.items())])
        tables.append(table.assign(method=run["method"], label=label, seed=run["seed"], dataset=run["dataset"],
                                   **{name: json.dumps(value) if isinstance(value, (list, dict)) else value
                                      for name, value in varied.items()}))
    return pd.concat(tables, ignore_index=True)


def _write_atomically(path, run, table, change):
    (path.parent / "change").mkdir(exist_ok=True)
    for target, write in ((path.with_suffix(".json"), lambda f: json.dump(run, f, indent=1, default=str)),
                          (path.parent / "change" / path.name, lambda f: change.to_csv(f, index=False)),
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
    parser.add_argument("--dataset-option", action="append", default=[], metavar="NAME=VALUE",
                        help="an option of lib.data.load_benchmark for folder datasets: class_folders=intersection "
                             "(keep the classes every domain has), partial=true (a partial copy is intended)")
    parser.add_argument("--quick-gelu", type=parse_value, metavar="true|false",
                        help="the activation of open_clip models (default: decided by the weights)")
    args = parser.parse_args(argv)
    try:
        grid = json.loads(args.grid.read_text()) if args.grid else {}
    except (OSError, json.JSONDecodeError) as error:
        parser.error(f"cannot read the grid file {args.grid}: {error}")
    for key in ("methods", "seeds", "datasets", "data_root", "train_domains", "budget", "model_name", "pretrained",
                "quick_gelu", *SIZES):
        if getattr(args, key) is not None:
            grid[key] = getattr(args, key)
    for flag, key, items in (("--hparam", "hparams", args.hparam), ("--dataset-option", "dataset_options",
                                                                   args.dataset_option)):
        for item in items:
            name, sep, value = item.partition("=")
            if not sep:
                parser.error(f"{flag} takes NAME=VALUE; got {item!r}")
            grid.setdefault(key, {})[name] = parse_value(value)
    try:
        planned = prepare(grid, args.results_dir)
    except (ValueError, OSError) as error:  # a usage error: nothing has trained and nothing is written
        parser.error(str(error))
    import torch
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
        gpu = torch.cuda.is_available() and args.device != "cpu"
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # before NCCL starts on a device
        dist.init_process_group("nccl" if gpu else "gloo")
    try:
        results = execute(*planned, args.results_dir, args.device)
        if _rank() == 0:
            print(summary_table(results, grid.get("train_domains", GRID_DEFAULTS["train_domains"])))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def summary_table(results, train_domains):
    """The CLI's table: one row per run label, with a dataset column when the results hold several datasets
    (their numbers are never averaged together)."""
    import pandas as pd
    from .evaluate import format_table, summarize, with_ci
    tables = {dataset: format_table(with_ci(summarize(part.assign(method=part["label"]), train_domains)))
              for dataset, part in results.groupby("dataset", sort=False)}
    if len(tables) == 1:
        return next(iter(tables.values())).to_string()
    return pd.concat(tables, names=["dataset"]).to_string()


if __name__ == "__main__":
    main()
