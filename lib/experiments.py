"""Running methods over seeds on a benchmark, at a named budget, into one tidy results table."""
import os

import pandas as pd
from tqdm.auto import tqdm

from .evaluate import evaluate
from .train import finetune

# What "smoke" (tests), "default" (committed notebooks, CPU minutes) and "paper" (a GPU) mean.
BUDGETS = {
    "smoke": dict(n_train_per_class=8, n_test_per_class=4, num_steps=6, batch_size=16),
    "default": dict(n_train_per_class=32, n_test_per_class=25, num_steps=150, batch_size=64),
    "paper": dict(n_train_per_class=None, n_test_per_class=100, num_steps=2000, batch_size=128),
}


def budget(name):
    """The settings of a budget; the environment variable LAB_BUDGET, when set, overrides `name` (the tests
    use it to re-run the committed notebooks quickly)."""
    name = os.environ.get("LAB_BUDGET", name)
    if name not in BUDGETS:
        raise ValueError(f"Unknown budget {name!r}; choose one of {list(BUDGETS)}.")
    return BUDGETS[name]


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
        run = finetune(model, method, bench.train, tokenizer, num_steps=num_steps, seed=seed, device=device,
                       progress=progress, batch_size=batch_size, **hparams.get(method, {}))
        trained[method, seed] = run
        tables.append(evaluate(run.model, tokenizer, bench.test, groups=bench.groups, head=run.head,
                               templates=run.method.hparams["templates"], method=method, seed=seed))
    return pd.concat(tables, ignore_index=True), trained
