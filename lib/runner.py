"""A resumable experiment runner: `python -m lib.runner` or `run_grid(grid)`.

A grid names methods, seeds, hyperparameters, datasets and a budget, or explicit sizes (n_train_per_class,
n_test_per_class, num_steps, batch_size); a list value is a sweep (a list of templates is one value). Every run is
one point of the grid; its tidy results go to results/<key>.csv, next to results/change/<key>.csv (where it changed
the model, per block: load_changes) and results/<key>.json (its provenance). The key is a hash of the run's
parameters and of what produced it (provenance): the code that trains and evaluates, the libraries that compute,
the checkpoint's content and the dataset's files, so a result is reused only by the same experiment. The .json,
written last, marks a run as done; it holds each CSV's rows and sha256, checked on every read, so a damaged, cut
or incomplete result is trained again (with one line saying so), never read. A sweep killed at any moment resumes
where it stopped without redoing or corrupting anything.
A run is trained while holding a lock on results/<key>.lock, so two runners on one folder never train the same
run twice: the second skips it, and waits for its result at the end. Everything that can be checked before
training is (methods, hyperparameters, seeds, device, model and checkpoint, dataset folders and images, the
results folder), and a run whose loss, gradients or weights stop being finite raises instead of being stored
(lib.train.finetune).

    >>> table = run_grid({"methods": ["ft", "clipood"], "seeds": [0, 1, 2], "budget": "default"})

Under `torchrun --nproc_per_node=N -m lib.runner ...` every rank trains every run data-parallel
(lib.train.finetune) and evaluates it (each rank encodes its shard of the test set: lib.models.encode_images); rank 0
alone writes. `--launcher slurm|local` submits one job per run instead (lib.launch, through submitit).
"""
import argparse
import ast
import contextlib
import fcntl
import functools
import hashlib
import io
import itertools
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

# torch, pandas and the rest of the lab are imported where they are needed, so that --help and usage errors are
# instant (importing them takes seconds).
from . import launch
from .checks import SEED, Number, check_number, parse_value

# A run's size: the budget's values unless the grid sets them (None = the budget's).
SIZES = ("n_train_per_class", "n_test_per_class", "num_steps", "batch_size")
# Part of a run (and of its key) only when set, like the sizes, so that the keys of earlier runs stay valid:
# dataset_options go to lib.data.load_benchmark (e.g. protocol, partial, class_folders), quick_gelu to
# lib.models.load_clip.
OPTIONAL = dict(dataset_options={}, quick_gelu=None)
GRID_DEFAULTS = dict(methods=["ft"], seeds=[0], hparams={}, datasets=["shapeworld"], data_root=None,
                     train_domains=["painting"], budget="default", model_name="mini", pretrained=None,
                     **dict.fromkeys(SIZES), **OPTIONAL)


def expand(grid):
    """The runs of a grid: one dict per (dataset, size, method, seed, hyperparameter combination), in a fixed
    order; a list value of a hyperparameter or a size is a sweep, except that a list of strings is one value of
    `templates` (a list of such lists sweeps them). The budget is the one that will run
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
    swept = dict(grid["hparams"])
    templates = swept.get("templates")
    if isinstance(templates, list) and templates and all(isinstance(t, str) for t in templates):
        swept["templates"] = [templates]  # one list of templates is one value; a list of lists is a sweep
    options = {name: grid[name] for name, default in OPTIONAL.items() if grid[name] != default}
    return [dict(method=method, seed=seed, hparams=hparams, dataset=dataset, data_root=grid["data_root"],
                 train_domains=list(grid["train_domains"]), budget=experiments.budget_name(grid["budget"]),
                 model_name=grid["model_name"], pretrained=grid["pretrained"], **size, **options)
            for dataset in grid["datasets"] for size in sizes for method in grid["methods"]
            for seed in grid["seeds"] for hparams in _combinations(swept)]


def stored_compare(grid, hparams=None, results_dir="results", device="auto", progress=True, keep_weights=()):
    """lib.experiments.compare through the store: the tidy results of every method and seed of `grid`, read where
    the same run is stored already (by another notebook or the command line) and trained and stored otherwise.
    hparams: {method: {name: value}}, as compare takes them; a value equal to the registry's default is left out
    of the run, so that a method as shipped is one stored run whichever notebook asks for it. keep_weights: the
    seeds whose fine-tuned weights the store keeps, for stored_models (weight mixing and merging)."""
    import pandas as pd
    grids = [_as_shipped(grid, method, (hparams or {}).get(method, {})) for method in grid["methods"]]
    return pd.concat(run_grids(grids, results_dir, device, progress, keep_weights), ignore_index=True)


def stored_models(grid, hparams=None, results_dir="results", device="auto", progress=True):
    """{(method, seed): fine-tuned model} for the runs of stored_compare(grid, hparams): the weights the store kept
    (keep_weights), so that a mix or merge (WiSE-FT, Model Stock) starts from the very run whose results are stored.
    A run not stored yet is trained and stored, its weights kept; a run stored without its weights is fine-tuned
    again for them (its stored results are left as they are) and they are kept from then on. Methods that classify
    with a head of their own (lp, vision-only, lp-ft) have no model to mix: an error."""
    from . import parallel
    grids = [_as_shipped(grid, method, (hparams or {}).get(method, {})) for method in grid["methods"]]
    runs_of_grids, todo, benchmarks = _plan(grids, results_dir, progress, device)
    runs = sum(runs_of_grids, [])
    train_missing(runs, todo, benchmarks, results_dir, device, progress, keep_weights={run["seed"] for run in runs})
    unkept = [run for run in runs if not _weights_path(results_dir, run_key(run)).exists()]
    if unkept:
        workers = parallel.default_workers(len(unkept), max(run_size(run)["num_steps"] for run in unkept), device)
        parallel.map_runs(_keep_weights, unkept, (results_dir, device, benchmarks), workers, progress=progress,
                          desc=f"{len(unkept)} stored run(s) fine-tuned again for their weights")
    return {(run["method"], run["seed"]): _load_model(run, results_dir, device) for run in runs}


def stored_sweep(grid, method, variants, results_dir="results", device="auto", progress=True):
    """stored_compare of `method` once for each {name: value} of the list `variants`, all trained together (side by
    side in the workers, where a sweep of one run per value would train one at a time): one table per variant."""
    return run_grids([_as_shipped(grid, method, variant) for variant in variants], results_dir, device, progress)


def _as_shipped(grid, method, hparams):
    """The grid of `method` alone with `hparams`, less the values equal to the registry's defaults."""
    from .methods import get_method
    defaults = get_method(method).hparams
    changed = {name: value for name, value in hparams.items() if name not in defaults or defaults[name] != value}
    return {**grid, "methods": [method], "hparams": changed}


def _combinations(values):
    """Every combination of {name: value or list of values} as a list of {name: value}."""
    names = sorted(values)
    choices = [values[n] if isinstance(values[n], list) else [values[n]] for n in names]
    return [dict(zip(names, combo)) for combo in itertools.product(*choices)]


def grid_of(run):
    """The grid whose only run is `run` (expand(grid_of(run)) == [run]): every swept value as a list of one, so
    that a value that is itself a list stays one value. What lib.launch gives each job."""
    grid = {key: value for key, value in run.items() if key not in ("method", "seed", "dataset", "hparams")}
    grid.update(methods=[run["method"]], seeds=[run["seed"]], datasets=[run["dataset"]],
                hparams={name: [value] for name, value in run["hparams"].items()})
    grid.update({name: [run[name]] for name in SIZES if name in run})
    return grid


def run_key(run):
    """A short, stable hash of a run's parameters (key order does not matter) and of its provenance (what produced
    it: the code, the libraries, the checkpoint's content, the dataset's files), so that a change of any of them
    trains the run again instead of reusing a result it did not produce."""
    keyed = {**run, "provenance": provenance(run)}
    return hashlib.sha1(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Modules that cannot change a stored number (they draw, explore, run notebooks, or pretrain: the checkpoint's own
# hash keys what pretraining made). Every other module of lib/ is part of the code fingerprint.
UNKEYED_MODULES = ("explorer.py", "notebooks.py", "plots.py", "pretrain.py")
# The libraries whose arithmetic makes the numbers (pandas only formats them, and is recorded, not keyed).
KEYED_LIBRARIES = ("torch", "torchvision", "open_clip_torch", "numpy", "pillow")


def provenance(run):
    """What a run's result depends on besides its parameters, all part of its key: code (code_fingerprint),
    libraries (their versions), checkpoint (checkpoint_fingerprint) and data (dataset_fingerprint)."""
    return dict(code=code_fingerprint(), libraries=_versions(KEYED_LIBRARIES),
                checkpoint=checkpoint_fingerprint(run["model_name"], run["pretrained"]), data=dataset_fingerprint(run))


@functools.lru_cache(maxsize=1)
def code_fingerprint():
    """source_fingerprint of lib/, computed once a process."""
    return source_fingerprint(Path(__file__).resolve().parent)


def source_fingerprint(package):
    """sha256 (16 hex digits) of the syntax trees of a package's modules (but UNKEYED_MODULES), docstrings left
    out: any change of behaviour changes it, while comments, docstrings and line breaks do not (they are not in the
    tree). A refactor that keeps the behaviour still changes it: the key errs on the side of training again. (The
    dump can differ between Python versions; such a change, too, trains again.)"""
    digest = hashlib.sha256()
    package = Path(package)
    for path in sorted(package.rglob("*.py")):
        if path.name in UNKEYED_MODULES and path.parent == package:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        digest.update(f"{path.relative_to(package)}\n{ast.dump(tree)}\n".encode())
    return digest.hexdigest()[:16]


def checkpoint_fingerprint(model_name, pretrained):
    """The weights a run starts from: a file (mini-CLIP's committed data/mini_clip.pt when pretrained is None) by
    the sha256 of its content; an open_clip tag by its name (open_clip's version, keyed too, fixes what it means);
    pretrained=None for an open_clip name is its seeded random initialization."""
    from .models import MINI_CHECKPOINT
    path = MINI_CHECKPOINT if model_name == "mini" and not pretrained else Path(pretrained) if pretrained else None
    if path is None:
        return "random (seed 0)"
    if not path.is_file():
        return f"tag {pretrained}"
    stat = path.stat()
    return "sha256 " + _file_hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_hash(path, size, mtime_ns):  # size and mtime: a file changed in place is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_fingerprint(run):
    """The data a run trains and tests on: ShapeWorld is generated by lib.data.shapeworld from the seed (the code
    fingerprint covers it); a dataset on disk by lib.data.files.fingerprint of the benchmark's files (their absolute
    root, relative paths, sizes, modification times, labels, domains and class names), loaded once a process."""
    if run["dataset"] == "shapeworld":
        return "shapeworld (generated)"
    from .data.files import fingerprint
    bench = _folder_benchmark(run, progress=False)
    return fingerprint(bench.train, bench.test, bench.validation)


# (absolute data root, setting) -> the folder benchmark last loaded (and checked) in this process: prepare loads
# it afresh on every call, so a process that lives on (a notebook kernel) still sees files that changed.
_BENCHMARKS = {}


def _folder_benchmark(run, progress=True, fresh=False):
    from . import experiments
    where = (os.path.abspath(run["data_root"]), _setting(run))
    if fresh or where not in _BENCHMARKS:
        _BENCHMARKS[where] = experiments.benchmark(run["dataset"], run["data_root"], run["train_domains"],
                                                   run_size(run), run.get("dataset_options"), progress)
    return _BENCHMARKS[where]


@functools.lru_cache(maxsize=4)
def _versions(names):
    return {name: _version(name) for name in names}


def _version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def _git_commit():
    """The checkout's commit, "+changes" when lib/ differs from it, or None outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        changes = subprocess.run(["git", "status", "--porcelain", "lib"], cwd=root, capture_output=True, text=True,
                                 timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode:
        return None
    return commit.stdout.strip() + ("+changes" if changes.stdout.strip() else "")


def record(run, trained, device):
    """The .json of a stored run: its parameters, its key and provenance, the hyperparameters that actually ran
    (the method's, defaults and data templates resolved), the loss after every step (load_histories), and what is
    recorded without being keyed: the commit, every library version, Python, the device, the number of processes
    and the time."""
    import torch
    return dict(run=run, key=run_key(run), provenance=provenance(run), hparams=trained.method.hparams,
                history=[float(loss) for loss in trained.history], git_commit=_git_commit(),
                versions=_versions(KEYED_LIBRARIES + ("pandas",)),
                python=platform.python_version(), device=str(device),
                world_size=torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
                time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def run_size(run):
    """n_train_per_class, n_test_per_class, num_steps and batch_size of a run: its budget's, then its own."""
    from . import experiments
    return {**experiments.budget(run["budget"]), **{name: run[name] for name in SIZES if name in run}}


def validate(runs):
    """Fail before any training on what can be checked without loading data: seeds, methods, modifiers and every
    hyperparameter (at the run's own num_steps and batch_size), what a method needs from a dataset (e.g. arf's
    captions on folders), budgets and sizes, models and checkpoint files, dataset folders and train domains.
    (prepare then loads the folder datasets, which checks their images.)"""
    from .data import loader
    from .methods import get_method
    from .models import check_model
    size_rule = Number(1, integer=True, why="a run's size; a list of them is a sweep")
    models_checked = set()
    for run in runs:  # the arguments first, then what they name
        check_number("runner", "seed", run["seed"], SEED)
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
                                 f"holds it (the README's real-tier section draws each layout).")
            loader(run["dataset"]).check(run["data_root"], run["dataset"], run["train_domains"])
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


def prepare(grid, results_dir="results", progress=True, device="auto"):
    """Every check that can run before training: the device and validate, then load (and so check) the folder
    datasets (their files are part of the keys), the stored results (a damaged one is trained again, with one line
    saying so) and whether results_dir can be written. Returns (runs, todo, benchmarks by setting)."""
    from .models import pick_device
    pick_device(device)
    runs = expand(grid)
    validate(runs)
    benchmarks = {}
    for run in runs:
        if run["dataset"] != "shapeworld" and _setting(run) not in benchmarks:
            benchmarks[_setting(run)] = _folder_benchmark(run, progress, fresh=True)
    results_dir = Path(results_dir)
    todo = []
    for run in runs:
        done, problem = stored(results_dir, run_key(run))
        if problem:
            print(f"{problem}: treated as missing, {run['method']} seed {run['seed']} trains again.", file=sys.stderr)
        if not done:
            todo.append(run)
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
    return execute(*prepare(grid, results_dir, progress, device), results_dir, device, progress)


def run_grids(grids, results_dir="results", device="auto", progress=True, keep_weights=()):
    """run_grid for several grids at once: their missing runs train together (one pool of workers; a run two grids
    share trains once, as do runs of one trajectory); one table per grid, in order. keep_weights: as stored_compare."""
    runs_of_grids, todo, benchmarks = _plan(grids, results_dir, progress, device)
    train_missing(sum(runs_of_grids, []), todo, benchmarks, results_dir, device, progress, keep_weights=keep_weights)
    return [load_results(runs, results_dir) for runs in runs_of_grids]


def _plan(grids, results_dir, progress, device):
    """prepare for several grids: (the runs of each grid, the runs to train, a run two grids share once, and the
    benchmarks by setting)."""
    planned = [prepare(grid, results_dir, progress, device) for grid in grids]
    todo = list({run_key(run): run for _, grid_todo, _ in planned for run in grid_todo}.values())
    benchmarks = {setting: bench for _, _, found in planned for setting, bench in found.items()}
    return [runs for runs, _, _ in planned], todo, benchmarks


def execute(runs, todo, benchmarks, results_dir="results", device="auto", progress=True, workers=None):
    """Train and store the runs of `todo` (prepare's output), each under its lock; a run another runner holds is
    left for the end, then waited for. Runs that take one trajectory (same setting, size and seed, and methods that
    differ only in weight averages that watch the steps: lib.methods.base.Watcher, e.g. ft and bma) train once.
    workers: processes that train side by side on the CPU (lib.parallel; None: lib.parallel.default_workers).
    Returns the results of all `runs`."""
    train_missing(runs, todo, benchmarks, results_dir, device, progress, workers)
    return load_results(runs, results_dir)


def train_missing(runs, todo, benchmarks, results_dir="results", device="auto", progress=True, workers=None,
                  keep_weights=()):
    """execute without reading the results back; the weights of the runs whose seed is in keep_weights are kept."""
    from . import parallel
    results_dir = Path(results_dir)
    writer = _rank() == 0
    groups = _trajectories(todo)
    if workers is None:
        workers = parallel.default_workers(len(groups), max((run_size(run)["num_steps"] for run in todo), default=0),
                                           device)
    names = ", ".join(dict.fromkeys(str(run.get("method")) for run in runs))
    shared = f", {len(todo)} in {len(groups)} trainings" if len(groups) < len(todo) else ""
    claimed = parallel.map_runs(_train_if_free, groups, (results_dir, device, benchmarks, False, writer, keep_weights),
                                workers,
                                desc=f"{names}: runs ({len(runs) - len(todo)} of {len(runs)} done before{shared})",
                                progress=progress and writer)
    for run in [run for group, claims in zip(groups, claimed) for run, claim in zip(group, claims) if claim is None]:
        # held by another runner: wait for it; train it only if that runner died without it
        if progress and writer:
            print(f"waiting for another runner training {run['method']} seed {run['seed']} (it holds "
                  f"{results_dir / run_key(run)}.lock)", file=sys.stderr)
        _train_if_free(results_dir, device, benchmarks, True, writer, keep_weights, [run])
    _barrier()  # every rank reads rank 0's files


def _trajectories(runs):
    """`runs` in groups that take the same steps: one setting, size and seed, and methods with one trajectory."""
    from .experiments import by_trajectory
    from .methods import get_method

    def method_of(run):
        return get_method(run["method"], batch_size=run_size(run)["batch_size"], **run["hparams"])
    groups = {}
    for run in runs:
        where = json.dumps({k: v for k, v in run.items() if k not in ("method", "hparams")}, sort_keys=True,
                           default=str)
        groups.setdefault(where, []).append(run)
    return [group for same in groups.values() for group in by_trajectory(same, method_of)]


def _train_if_free(results_dir, device, benchmarks, blocking, writer, keep_weights, group):
    """Train and store the runs of `group` (one trajectory) that no other runner holds or has stored, in one
    training: _claim's decision for each run (None: held)."""
    with contextlib.ExitStack() as stack:
        claims = [stack.enter_context(_claim(results_dir, run_key(run), blocking)) for run in group]
        free = [run for run, claimed in zip(group, claims) if claimed]
        if free:
            _train_and_store(free, benchmarks, results_dir, device, writer, keep_weights)
    return claims


# What the last run loaded (model, tokenizer, benchmark, change probe), kept for the next run of the same setting:
# one model and benchmark in memory at a time, in each process.
_loaded = {}


def _setting_loaded(run, benchmarks, device):
    """(model, tokenizer, bench, change probe) of the run's setting, loaded once per process."""
    from . import experiments
    setting = (_setting(run), json.dumps(provenance(run), sort_keys=True, default=str), str(device))
    if setting not in _loaded:
        _loaded.clear()
        model, tokenizer, bench, _ = experiments.setup(
            run["model_name"], run["pretrained"], run["dataset"], run["data_root"], run["train_domains"],
            run["budget"], device, sizes={name: run[name] for name in SIZES if name in run},
            quick_gelu=run.get("quick_gelu"), dataset_options=run.get("dataset_options"),
            bench=benchmarks.get(_setting(run)))
        _loaded[setting] = model, tokenizer, bench, experiments.change_probe(model, tokenizer, bench)
    return _loaded[setting]


def _train_and_store(runs, benchmarks, results_dir, device, writer, keep_weights=()):
    """Train the runs (one trajectory: one training) and store each; keep the weights of those whose seed is in
    keep_weights."""
    from . import experiments
    from .change import change_table
    from .models import pick_device
    model, tokenizer, bench, probe = _setting_loaded(runs[0], benchmarks, device)
    size = run_size(runs[0])
    outcomes = experiments.run_shared(model, tokenizer, bench, [(r["method"], r["hparams"]) for r in runs],
                                      runs[0]["seed"], size["num_steps"], size["batch_size"], device, progress=False)
    for run, (table, trained) in zip(runs, outcomes):
        change = change_table(model, {run["method"]: trained.model}, **probe).drop(columns="method")
        if writer:
            _write_atomically(results_dir, run_key(run), record(run, trained, pick_device(device)),
                              table.assign(train_domains="+".join(run["train_domains"])), change)
            if run["seed"] in keep_weights:
                _save_weights(results_dir, run_key(run), model, trained)


def _keep_weights(results_dir, device, benchmarks, run):
    """Fine-tune a stored run again and keep its weights (stored_models)."""
    from . import experiments
    model, tokenizer, bench, _ = _setting_loaded(run, benchmarks, device)
    size = run_size(run)
    trained = experiments.run_shared(model, tokenizer, bench, [(run["method"], run["hparams"])], run["seed"],
                                     size["num_steps"], size["batch_size"], device, progress=False,
                                     evaluate=False)[0][1]
    if _rank() == 0:
        _save_weights(results_dir, run_key(run), model, trained)


def _weights_path(results_dir, key):
    return Path(results_dir) / "weights" / f"{key}.pt"


def _save_weights(results_dir, key, start, trained):
    """The tensors that fine-tuning changed (the rest are the pre-trained model's), written atomically."""
    import torch
    if trained.head is not None:
        raise ValueError(f"{trained.method.name} classifies with a head of its own, so it has no model to mix or "
                         f"merge: keep the weights of methods that classify with the text encoder.")
    before = start.state_dict()
    changed = {name: tensor.detach().cpu() for name, tensor in trained.model.state_dict().items()
               if not torch.equal(tensor.cpu(), before[name].cpu())}
    path = _weights_path(results_dir, key)
    path.parent.mkdir(exist_ok=True)
    content = io.BytesIO()
    torch.save(changed, content)
    _replace_atomically(path, content.getvalue())


def _load_model(run, results_dir, device):
    """The run's fine-tuned model: the pre-trained one with the kept tensors loaded over it."""
    import torch
    from .models import load_clip
    model = load_clip(run["model_name"], run["pretrained"], device, quick_gelu=run.get("quick_gelu"))[0]
    changed = torch.load(_weights_path(results_dir, run_key(run)), map_location="cpu")
    missing = sorted(set(changed) - set(model.state_dict()))
    if missing:
        raise ValueError(f"the kept weights of {run['method']} seed {run['seed']} name tensors the model lacks "
                         f"({missing[:3]}): they come from another model; delete {results_dir}/weights/ to refit.")
    model.load_state_dict({**model.state_dict(), **changed})
    return model.eval()


@contextlib.contextmanager
def _claim(results_dir, key, blocking):
    """Whether this process should train the run stored under `key`: True (it holds <key>.lock and there is no
    intact result yet), False (the result is stored: another runner finished it) or None (another runner holds the
    lock and blocking is False). The lock is fcntl.flock's, which the kernel releases when a process dies, so a
    runner killed with SIGKILL leaves no stale claim. Under torch.distributed rank 0 decides for every rank."""
    lock_path = Path(results_dir) / f"{key}.lock"
    fd = None
    try:
        decision = None
        if _rank() == 0:
            fd = os.open(lock_path, os.O_CREAT | os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                decision = not stored(results_dir, key)[0]
            except BlockingIOError:
                decision = None
        decision = _from_rank_0(decision)
        if decision:
            for partial in Path(results_dir).glob(f"{key}.*.tmp"):  # left by a runner killed while writing
                partial.unlink()
        yield decision
        if fd is not None and decision is not None and stored(results_dir, key)[0]:
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
    per hyperparameter and per explicit size. A run not stored intact is an error, never read."""
    return _load(runs, results_dir)


def load_changes(runs, results_dir="results"):
    """Where each of `runs` changed the model (lib.change.change_table against the zero-shot model, per block of
    both towers, on experiments.change_probe's held-out images and prompts), with load_results' run columns."""
    return _load(runs, results_dir, "change")


def load_histories(runs, results_dir="results"):
    """The training loss after every optimizer step of each of `runs` (a list of lists, in the order of `runs`),
    read from their stored .json; a run not stored intact is an error, as in load_results."""
    histories = []
    for run in runs:
        key = run_key(run)
        _check_stored(run, key, results_dir)
        histories.append(json.loads(_paths(results_dir, key)["json"].read_text())["history"])
    return histories


def stored(results_dir, key):
    """(done, problem): whether the run under `key` is stored intact (its .json, written last, and both CSVs with
    the rows and sha256 the .json records), and else why not (None when nothing of it is there)."""
    paths = _paths(results_dir, key)
    if not any(path.exists() for path in paths.values()):
        return False, None
    where = f"the stored run {Path(results_dir) / key}"
    try:
        sidecar = json.loads(paths["json"].read_text())
        expected = {part: (sidecar[part]["rows"], sidecar[part]["sha256"]) for part in ("results", "change")}
    except FileNotFoundError:
        return False, f"{where} has no .json (its writing was cut short)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return False, f"{where} has an unreadable .json ({type(error).__name__}: {error})"
    for part, (rows, digest) in expected.items():
        try:
            content = paths[part].read_bytes()
        except OSError:
            return False, f"{where} lacks its {part} CSV {paths[part]}"
        if hashlib.sha256(content).hexdigest() != digest:
            found = max(content.count(b"\n") - 1, 0)
            return False, (f"{where} has a damaged {part} CSV {paths[part]} (sha256 differs from its .json; "
                           f"{found} of {rows} rows)")
    return True, None


def _paths(results_dir, key):
    results_dir = Path(results_dir)
    return {"results": results_dir / f"{key}.csv", "change": results_dir / "change" / f"{key}.csv",
            "json": results_dir / f"{key}.json"}


def _load(runs, results_dir, part="results"):
    import pandas as pd
    tables = []
    for run in runs:
        key = run_key(run)
        _check_stored(run, key, results_dir)
        table = pd.read_csv(io.BytesIO(_paths(results_dir, key)[part].read_bytes()))
        varied = {**run["hparams"], **{name: run[name] for name in SIZES if name in run}}
        label = " ".join([run["method"]] + [f"{n}={v}" for n, v in sorted(varied.items())])
        tables.append(table.assign(method=run["method"], label=label, seed=run["seed"], dataset=run["dataset"],
                                   **{name: json.dumps(value) if isinstance(value, (list, dict)) else value
                                      for name, value in varied.items()}))
    return pd.concat(tables, ignore_index=True)


def _check_stored(run, key, results_dir):
    done, problem = stored(results_dir, key)
    if not done:  # never read a damaged or missing result
        raise FileNotFoundError(f"{problem or f'the run {key} is not stored in {results_dir}'} "
                                f"({run['method']}, seed {run['seed']}): run_grid (or python -m lib.runner) with "
                                f"the same grid trains it again.")


def _write_atomically(results_dir, key, sidecar, table, change):
    """Each file written to a temporary name, then renamed; the .json, which records the CSVs' rows and sha256,
    last: it is what marks the run as done."""
    paths = _paths(results_dir, key)
    paths["change"].parent.mkdir(exist_ok=True)
    frames = {"change": change, "results": table}
    contents = {part: frame.to_csv(index=False).encode() for part, frame in frames.items()}
    for part, content in contents.items():
        sidecar[part] = dict(file=str(paths[part].relative_to(results_dir)), rows=len(frames[part]),
                             sha256=hashlib.sha256(content).hexdigest())
    contents["json"] = json.dumps(sidecar, indent=1, default=str).encode()
    for part, content in contents.items():
        _replace_atomically(paths[part], content)


def _replace_atomically(path, content):
    """Write `content` (bytes) to a temporary name beside `path`, then rename it: a reader sees the old file or the
    whole new one, never a part."""
    partial = path.with_name(path.name + ".tmp")
    with open(partial, "wb") as file:
        file.write(content)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)


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
    parser.add_argument("--workers", type=int, help="processes that train runs side by side on the CPU (default: "
                                                     "lib.parallel.default_workers; LAB_WORKERS sets it too)")
    parser.add_argument("--dataset-option", action="append", default=[], metavar="NAME=VALUE",
                        help="an option of lib.data.load_benchmark for datasets on disk, e.g. protocol=base-to-new|"
                             "in-the-wild|leave-one-domain-out (DomainBed), protocol=domain-shift|base-to-new "
                             "(ImageNet), cross_dataset='[\"DTD\"]', class_folders=intersection, partial=true")
    parser.add_argument("--quick-gelu", type=parse_value, metavar="true|false",
                        help="the activation of open_clip models (default: decided by the weights)")
    launch.add_arguments(parser)
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
        planned = prepare(grid, args.results_dir, device=args.device)
    except (ValueError, OSError) as error:  # a usage error: nothing has trained and nothing is written
        parser.error(str(error))
    except KeyboardInterrupt:
        print(f"\nInterrupted before training; nothing was stored. Run it again: {_command(argv)}", file=sys.stderr)
        sys.exit(130)
    if args.launcher:  # one job per run (lib.launch); the table is then read from the store
        launch.main(args, {run_key(run): grid_of(run) for run in planned[1]}, args.results_dir)
        missing = prepare(grid, args.results_dir, device=args.device)[1]
        if missing:
            raise SystemExit(f"{len(missing)} of {len(planned[1])} jobs ended without storing their run (their logs "
                             f"say why); run the same command again: only those runs are submitted again.")
        print(summary_table(load_results(planned[0], args.results_dir),
                            grid.get("train_domains", GRID_DEFAULTS["train_domains"])))
        return
    try:
        with distributed(args.device):
            results = execute(*planned, args.results_dir, args.device, workers=args.workers)
            if _rank() == 0:
                print(summary_table(results, grid.get("train_domains", GRID_DEFAULTS["train_domains"])))
    except KeyboardInterrupt:  # one line, not a traceback: every finished run is stored, and is kept
        runs, results_dir = planned[0], Path(args.results_dir)
        done = sum(stored(results_dir, run_key(run))[0] for run in runs)
        print(f"\nInterrupted: {done} of {len(runs)} runs are stored in {results_dir}. The same command resumes "
              f"where it stopped: {_command(argv)}", file=sys.stderr)
        sys.exit(130)


@contextlib.contextmanager
def distributed(device="auto"):
    """The process group of a command launched by torchrun (nccl on GPUs, gloo on the CPU), for the duration of the
    block; nothing when it runs as one process. Yields the rank (0 alone)."""
    import torch
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
        gpu = torch.cuda.is_available() and device != "cpu"
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # before NCCL starts on a device
        dist.init_process_group("nccl" if gpu else "gloo")
    try:
        yield _rank()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _command(argv):
    return shlex.join([Path(sys.executable).name, "-m", "lib.runner", *(sys.argv[1:] if argv is None else argv)])


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
