"""Running methods over seeds on a benchmark, at a named budget, into one tidy results table."""
import copy
import os

import pandas as pd
import torch
from tqdm.auto import tqdm

from .evaluate import class_logits, evaluate, fit_temperature
from .methods import get_method
from .train import finetune

# What "smoke" (tests), "default" (committed notebooks, CPU minutes) and "gpu" (a GPU, any dataset) mean. None of
# them is a paper's setting: those are the recipes of lib.recipes (python -m lib.reproduce --list).
BUDGETS = {
    "smoke": dict(n_train_per_class=8, n_test_per_class=4, num_steps=6, batch_size=16),
    "default": dict(n_train_per_class=64, n_test_per_class=50, num_steps=100, batch_size=64),
    "gpu": dict(n_train_per_class=None, n_test_per_class=100, num_steps=2000, batch_size=128),
    # Whole training and test sets: what lib.reproduce runs the recipes at (each recipe sets its steps and batch).
    "full": dict(n_train_per_class=None, n_test_per_class=None, num_steps=2000, batch_size=128),
}


def budget(name):
    """The settings of a budget; the environment variable LAB_BUDGET, when set, overrides `name` (the tests
    use it to re-run the committed notebooks quickly)."""
    return BUDGETS[budget_name(name)]


def budget_name(name):
    """The budget that `budget(name)` gives: LAB_BUDGET when set, else name (checked)."""
    name = os.environ.get("LAB_BUDGET", name)
    if name == "paper":  # the old name of "gpu", which no paper used
        raise ValueError("The budget 'paper' is now 'gpu': it was no paper's setting. A paper's own setting is a "
                         "recipe: python -m lib.reproduce --list, then python -m lib.reproduce <recipe> "
                         "--data-root DIR.")
    if name not in BUDGETS:
        raise ValueError(f"Unknown budget {name!r}; choose one of {list(BUDGETS)}.")
    return name


def setup(model_name="mini", pretrained=None, dataset="shapeworld", data_root=None, train_domains=("photo",),
          budget="default", device="auto", sizes=None, quick_gelu=None, dataset_options=None, bench=None,
          progress=True):
    """Everything a notebook or a run of lib.runner starts from: (model, tokenizer, bench, settings).

    settings: the budget's sizes (n_train_per_class, n_test_per_class, num_steps, batch_size; LAB_BUDGET
    honoured), updated with `sizes`. bench: `benchmark(...)` at those sizes with the model's transform; its
    `templates` are the data's, which every method and evaluation uses unless given others. quick_gelu goes to
    lib.models.load_clip. `bench`, when given, is that benchmark already loaded (lib.runner loads folder datasets
    before training, to check them)."""
    from .models import load_clip
    settings = {**BUDGETS[budget_name(budget)], **(sizes or {})}  # (the argument hides the function budget)
    model, preprocess, tokenizer = load_clip(model_name, pretrained, device, quick_gelu=quick_gelu)
    if bench is None:
        bench = benchmark(dataset, data_root, train_domains, settings, dataset_options, progress)
    return model, tokenizer, bench.with_transform(preprocess), settings


def benchmark(dataset, data_root, train_domains, settings, dataset_options=None, progress=True):
    """lib.data.load_benchmark at a budget's sizes; dataset_options (e.g. protocol, partial, class_folders,
    cross_dataset) for datasets on disk; its class groups checked (check_groups)."""
    from .data import load_benchmark
    bench = load_benchmark(dataset, data_root, train_domains, settings["n_train_per_class"],
                           settings["n_test_per_class"], progress=progress, **(dataset_options or {}))
    check_groups(bench)
    return bench


def check_groups(bench):
    """Raise, before training, if a class group the benchmark evaluates has fewer than two classes: each group is
    classified among its own classes, so one class scores 100 % by construction and none cannot be evaluated."""
    small = {group: [bench.test.classnames[i] for i in ids] for group, ids in bench.groups.items() if len(ids) < 2}
    if small:
        raise ValueError(f"{bench.name}: the class group(s) {small} have fewer than two classes, so they cannot be "
                         f"evaluated (each group is classified among its own classes); the base/new split of "
                         f"{len(bench.base_classes) + len(bench.new_classes)} classes needs at least four.")


def compare(model, tokenizer, bench, methods, seeds, num_steps, batch_size, device="auto", progress=True,
            hparams=None):
    """Fine-tune every method with every seed; returns (results, trained).

    results: the tidy table of lib.evaluate.evaluate for all runs (columns method, seed, domain, group, n,
    accuracy); trained: {(method, seed): Trained}. hparams: {method: {name: value}} overrides.
    """
    hparams = hparams or {}
    tables, trained = [], {}
    runs = [(m, s) for m in methods for s in seeds]
    for method, seed in tqdm(runs, desc="runs", disable=not progress):
        table, trained[method, seed] = run_one(model, tokenizer, bench, method, seed, num_steps, batch_size, device,
                                               progress, **hparams.get(method, {}))
        table.insert(0, "seed", seed)
        table.insert(0, "method", method)
        tables.append(table)
    return pd.concat(tables, ignore_index=True), trained


def run_one(model, tokenizer, bench, method, seed, num_steps, batch_size, device="auto", progress=True, **hparams):
    """Fine-tune `method` with `seed` on bench.train and evaluate it on bench.test: the one run that compare and
    lib.runner repeat. Returns (table, trained): lib.evaluate.evaluate's table without method or seed columns
    (callers label it), with reliability bins, and, when the benchmark has validation images, the temperature
    fitted on them (a column) and ece_scaled at that temperature; and the Trained. The prompt templates are the
    benchmark's unless hparams set them."""
    return run_shared(model, tokenizer, bench, [(method, hparams)], seed, num_steps, batch_size, device, progress)[0]


def run_shared(model, tokenizer, bench, methods, seed, num_steps, batch_size, device="auto", progress=True,
               evaluate=True):
    """run_one for several (method, hparams) that take one trajectory (Method.trajectory; e.g. "ft" and "bma"):
    one training, then each evaluated (table None when evaluate is False). Returns [(table, trained)] in order."""
    built = [get_method(name, batch_size=batch_size, **{"templates": bench.templates, **hparams})
             for name, hparams in methods]
    trained = finetune(model, built, bench.train, tokenizer, num_steps=num_steps, seed=seed, device=device,
                       progress=progress)
    return [(_evaluated(result, tokenizer, bench) if evaluate else None, result) for result in trained]


def _evaluated(trained, tokenizer, bench):
    templates = trained.method.hparams["templates"]
    temperature = None
    if bench.validation is not None and len(bench.validation):
        temperature = fit_temperature(*class_logits(trained.model, tokenizer, bench.validation, head=trained.head,
                                                    templates=templates))
    table = evaluate(trained.model, tokenizer, bench.test, groups=bench.groups, head=trained.head,
                     templates=templates, scaled_temperature=temperature, reliability=True,
                     classification=bench.classification, metrics=bench.metrics)
    if temperature is not None:
        table["temperature"] = temperature
    return table


def change_probe(model, tokenizer, bench, num_images=256, seed=0):
    """What lib.change compares fine-tuned models on: a seeded sample of num_images held-out test images of every
    domain, a prompt per class (the benchmark's first template), and the zero-shot model's Gram matrices of
    every block on them (computed once). Pass it to lib.change.change_table as **probe."""
    from .change import block_grams
    picks = torch.randperm(len(bench.test), generator=torch.Generator().manual_seed(seed))[:num_images]
    images = bench.test.subset(sorted(picks.tolist()))
    tokens = tokenizer([bench.templates[0].format(c) for c in bench.base_classes + bench.new_classes])
    return dict(images=images, tokens=tokens, grams_0=block_grams(model, images, tokens))


def dg_benchmark(dataset="shapeworld", data_root=None, test_domain="painting", n_train_per_class=32,
                 n_test_per_class=25, test_fraction=0.2, seed=0):
    """DomainBed's leave-one-domain-out problem over ALL classes (paper 2 is closed-set): train on every domain
    but `test_domain`; test on a held-out split of every domain. ID = the test split of the source domains,
    OOD = `test_domain`. Returns a lib.data.Benchmark whose base_classes are all classes and new_classes empty."""
    from .data import Benchmark, folders, shapeworld
    if dataset == "shapeworld":
        domains, classes = list(shapeworld.DOMAINS), list(shapeworld.CLASSES)
        if test_domain not in domains:
            raise ValueError(f"test_domain {test_domain!r} is not a ShapeWorld domain; choose one of {domains}.")
        sources = [d for d in domains if d != test_domain]
        train = shapeworld.make_split("train", sources, classes, n_train_per_class, seed)
        test = shapeworld.make_split("test", domains, classes, n_test_per_class, seed)
        return Benchmark(dataset, train, test, sources, domains, classes, [])
    if data_root is None:
        raise ValueError(f"dataset={dataset!r} is read from disk: set data_root to the folder that holds "
                         f"{dataset}/<domain>/<class>/<image> (DomainBed layout), or use dataset='shapeworld'.")
    everything = folders.load_domainbed(data_root, dataset)
    domains = sorted(set(everything.domains))
    if test_domain not in domains:
        raise ValueError(f"test_domain {test_domain!r} is not a domain of {dataset}; it has {domains}.")
    train_part, test = folders.train_test_split(everything, test_fraction, seed)
    sources = [d for d in domains if d != test_domain]
    train = train_part.where(domains=sources)
    if n_train_per_class is not None:
        train = folders.k_shot(train, n_train_per_class, seed)
    if n_test_per_class is not None:
        test = folders.k_shot(test, n_test_per_class, seed)
    return Benchmark(dataset, train, test, sources, domains, list(everything.classnames), [])


def fraction_sweep(model, tokenizer, bench, methods, fractions, seeds, num_steps, batch_size, device="auto",
                   progress=True, hparams=None):
    """ID and OOD accuracy of every method trained on a `fraction` (0-1) of bench.train, for every seed.

    The sample is lib.data.folders.fraction_sample(bench.train, fraction, seed): balanced over the source
    domains and nested across fractions for one seed. The number of optimizer steps is FIXED (num_steps at every
    fraction > 0: equal compute per point, and a small sample is seen for more epochs); fraction 0 trains nothing
    (zero-shot for CLIP methods, a random head for vision-only). Methods that take one trajectory (e.g. "ce" and
    "ce-swa" with swa_lr None: SWA then only watches ce's steps) share one training, and those that part from one
    ("ce-swa" with its averaging phase) share its steps until they part (lib.train.finetune).

    methods: registry names, or {label: name} to sweep a method under several settings (hparams are then keyed by
    label, e.g. {"ce-swa": ..., "ce-swa (cosine)": ...}). Returns a tidy table: method (the label), fraction,
    seed, domain, n, accuracy (every class in one group, "all").
    """
    hparams = hparams or {}
    named = list(methods.items() if isinstance(methods, dict) else zip(methods, methods))
    groups = by_trajectory(named, lambda item: get_method(item[1], batch_size=batch_size, **hparams.get(item[0], {})))
    runs = [(group, f, s) for f in fractions for s in seeds for group in groups]
    from . import parallel
    workers = parallel.default_workers(len(runs), num_steps, device)
    tables = parallel.map_runs(_fraction_run, runs, (model, tokenizer, bench, num_steps, batch_size, device, hparams),
                               workers, desc="runs", progress=progress)
    return pd.concat([table for group in tables for table in group], ignore_index=True)


def by_trajectory(items, method_of):
    """`items` in groups (in order) that train once (lib.train.finetune given a list of methods): methods,
    method_of(item), that take the same steps (Method.trajectory), joined by those that take their first steps and
    then their own (Method.parts_from: "ce-swa" with its averaging phase joins "ce")."""
    groups = {}
    for item in items:
        groups.setdefault(method_of(item).trajectory(), []).append(item)
    for trajectory in list(groups):
        trunk = method_of(groups[trajectory][0]).parts_from()
        if trunk in groups:
            groups[trunk] += groups.pop(trajectory)
    return list(groups.values())


def _fraction_run(model, tokenizer, bench, num_steps, batch_size, device, hparams, run):
    """One training of fraction_sweep: the tables of the methods of one trajectory."""
    from .data.folders import fraction_sample
    from .evaluate import evaluate as _evaluate
    named, fraction, seed = run
    train = fraction_sample(bench.train, fraction, seed)
    steps = num_steps if len(train) else 0
    methods = [get_method(name, batch_size=batch_size, **hparams.get(label, {})) for label, name in named]
    trained = finetune(model, methods, train, tokenizer, num_steps=steps, seed=seed, device=device, progress=False)
    every_class = {"all": bench.train.ids}  # the test set has the same classes
    return [_evaluate(result.model, tokenizer, bench.test, groups=every_class, head=result.head,
                      templates=result.method.hparams["templates"], method=label, fraction=fraction,
                      seed=seed).drop(columns="group")
            for (label, _), result in zip(named, trained)]


def dg_summary(results, train_domains):
    """One row per (method, fraction, seed): id = mean accuracy over the source domains' test split, ood = mean
    over the held-out domain(s)."""
    keys = [k for k in ("method", "fraction", "seed") if k in results.columns]
    source = results.domain.isin(train_domains)
    return (results.assign(id=results.accuracy.where(source), ood=results.accuracy.where(~source))
            .groupby(keys, sort=False)[["id", "ood"]].mean().reset_index())


def wise_ft_curves(model, tokenizer, bench, finetuned, alphas, templates=None):
    """WiSE-FT trade-off curves: for every {label: fine-tuned model} in `finetuned`, the summary metrics (id,
    domain_shift, base, new, hm) of wise_ft(pre-trained, fine-tuned, alpha) at each alpha. Returns a table with
    columns method, alpha and the metrics. `model` is the pre-trained model (theta_0); it is not modified.
    templates: those the fine-tuned models trained with; None, the benchmark's."""
    from .averaging import wise_ft_sweep
    from .evaluate import summarize
    theta_0 = model.state_dict()
    tables = []
    for label, tuned in finetuned.items():
        work = copy.deepcopy(tuned).eval()

        def metrics(interpolated):
            results = evaluate(interpolated, tokenizer, bench.test, groups=bench.groups, templates=templates,
                               classification=bench.classification)
            return summarize(results.assign(method=label), bench.train_domains).drop(columns="method")
        tables.append(wise_ft_sweep(work, theta_0, tuned.state_dict(), alphas, metrics).assign(method=label))
    table = pd.concat(tables, ignore_index=True)
    return table[["method", "alpha"] + [c for c in table.columns if c not in ("method", "alpha")]]


def wise_ft_selected(model, tokenizer, bench, tuned, alphas, templates=None):
    """WiSE-FT with its mixing coefficient chosen on ID validation data, as the WiSE-FT paper chooses it.

    tuned: {seed: fine-tuned model} (from the pre-trained `model`). For each seed, every alpha is scored by its
    accuracy on bench.validation (base classes of the training domains), and the test summary (id,
    domain_shift, base, new, hm) at every alpha is kept. Ties go to the smallest alpha, the one closest to
    zero-shot (our choice). Returns (selected, curves): one row per seed (method "wise-ft", seed, alpha, the
    metrics) at the chosen alpha, and every alpha's row (columns seed, alpha, validation, the metrics)."""
    from .averaging import wise_ft_sweep
    from .evaluate import summarize
    if bench.validation is None or not len(bench.validation):
        raise ValueError("Choosing WiSE-FT's alpha needs ID validation images, and this benchmark has none: on a "
                         "folder dataset, cap n_train_per_class so that training images are left to validate on.")
    theta_0 = model.state_dict()

    def metrics(interpolated):
        kept = evaluate(interpolated, tokenizer, bench.validation,
                        groups={"base": list(range(len(bench.validation.classnames)))},
                        templates=templates)
        test = evaluate(interpolated, tokenizer, bench.test, groups=bench.groups, templates=templates,
                        classification=bench.classification)
        scores = summarize(test.assign(method="wise-ft"), bench.train_domains).drop(columns="method")
        scores.insert(0, "validation", (kept.accuracy * kept.n).sum() / kept.n.sum())
        return scores
    curves = pd.concat([wise_ft_sweep(copy.deepcopy(fine).eval(), theta_0, fine.state_dict(), alphas, metrics)
                        .assign(seed=seed) for seed, fine in tuned.items()], ignore_index=True)
    best = curves.sort_values(["seed", "validation", "alpha"], ascending=[True, False, True]).groupby("seed").head(1)
    selected = best.drop(columns="validation").assign(method="wise-ft")
    columns = ["method", "seed", "alpha"] + [c for c in selected.columns if c not in ("method", "seed", "alpha")]
    return selected[columns].reset_index(drop=True), curves[["seed"] + [c for c in curves.columns if c != "seed"]]
