"""The trade-off explorer of notebook 06: where one knob of a method puts it on the ID/OOD frontier.

Every point is a run of lib.runner, so a knob value seen before trains nothing (its stored result is read) and a
new one trains once per seed. WiSE-FT's mixing coefficient needs no run: it interpolates weights already trained
(lib.experiments.wise_ft_curves). Beside the frontier, the papers' published ViT-B/16 figures, for orientation
only: other models, data and protocols.
"""

import pandas as pd

from . import runner
from .evaluate import summarize
from .methods import get_method

# knob: (method, hyperparameter, the values a slider offers; the registry default is among them)
KNOBS = {
    "bma_beta": ("clipood", "beta", (0.1, 0.25, 0.5, 1.0, 2.0)),
    "saft_alpha": ("saft", "alpha", (1e-4, 1e-3, 1e-2, 1e-1)),
    "arf_cap_weight": ("arf", "cap_weight", (0.0, 0.5, 1.0, 2.0)),
    "arf_ret_weight": ("arf", "ret_weight", (0.0, 0.5, 1.0, 2.0)),
}

# As published (percent), quoted for orientation: none of these is comparable to a ShapeWorld number.
PUBLISHED_VIT_B16 = pd.DataFrame([
    ("zero-shot CLIP", "ImageNet", 68.3, 59.5, "third-party re-run of the baselines, 3 seeds; OOD = mean of 4 shifts"),
    ("fine-tuning", "ImageNet", 82.8, 57.1, "same re-run"),
    ("FLYP", "ImageNet", 82.7, 60.6, "same re-run"),
    ("ARF", "ImageNet", 82.7, 62.6, "same re-run"),
    ("Model Stock", "ImageNet", 84.1, None, "Model Stock (ECCV 2024): two fine-tuned models"),
    ("zero-shot CLIP", "OfficeHome", None, 82.0, "CLIPood (ICML 2023): DomainBed, leave one domain out"),
    ("CLIPood", "OfficeHome", None, 87.0, "same"),
    ("zero-shot CLIP", "TerraIncognita", None, 33.4, "same"),
    ("CLIPood", "TerraIncognita", None, 60.4, "same"),
], columns=["method", "benchmark", "ID accuracy", "OOD accuracy", "source and protocol"])
PUBLISHED_OOD_ECE = pd.DataFrame([("FLYP", 18.4), ("CaRot", 7.9)], columns=["method", "OOD ECE (ImageNet shifts)"])


def defaults():
    """{knob: the registry's default value}: where the sliders start."""
    return {knob: get_method(method).hparams[name] for knob, (method, name, _) in KNOBS.items()}


def knob_grid(grid, knob, value):
    """The grid of one knob value: the knob's method with that hyperparameter, left out when it is the registry's
    default, so the point is the very run notebook 05 stored for the method as shipped."""
    method, name, _ = KNOBS[knob]
    hparams = {} if get_method(method).hparams[name] == value else {name: value}
    return {**grid, "methods": [method], "hparams": hparams}


def points(grid, sweep):
    """The runner's grids of a sweep {knob: value, or a list of values}, one per value."""
    return [knob_grid(grid, knob, value) for knob, values in sweep.items()
            for value in (values if isinstance(values, (list, tuple)) else [values])]


def frontier(grid, choices, results_dir="results", device="auto", progress=True):
    """One summary row per knob (mean over the grid's seeds): knob, method, value, id, domain_shift, new, hm.
    choices: {knob: value}; values not stored yet are trained through the runner (and stored), side by side, with
    the runner's progress bar (it names the methods) unless progress=False."""
    tables = runner.run_grids(points(grid, choices), results_dir, device=device, progress=progress)
    rows = []
    for (knob, value), results in zip(choices.items(), tables):
        summary = summarize(results, grid["train_domains"])
        rows.append({"knob": knob, "method": KNOBS[knob][0], "value": value,
                     **summary[["id", "domain_shift", "new", "hm"]].mean().to_dict()})
    return pd.DataFrame(rows)


def train(grid, sweep, results_dir="results", device="auto", progress=True):
    """Train and store, side by side, every run of a sweep {knob: value or [values]} that is not stored yet."""
    runner.run_grids(points(grid, sweep), results_dir, device=device, progress=progress)


def missing_runs(grid, sweep, results_dir="results"):
    """How many runs train(grid, sweep) would train: those not stored yet (what a first use costs)."""
    runs = {runner.run_key(run) for point in points(grid, sweep) for run in runner.expand(point)}
    return sum(not runner.stored(results_dir, key)[0] for key in runs)


def stored(grid, results_dir="results"):
    """frontier's rows for every knob value whose runs are all stored already (nothing trains)."""
    done = {}
    for knob, (_, _, values) in KNOBS.items():
        for value in values:
            runs = runner.expand(knob_grid(grid, knob, value))
            if all(runner.stored(results_dir, runner.run_key(run))[0] for run in runs):
                done.setdefault(knob, []).append(value)
    return pd.concat([frontier(grid, {knob: value}, results_dir, progress=False) for knob, values in done.items()
                      for value in values],
                     ignore_index=True) if done else pd.DataFrame(columns=["knob", "method", "value", "id",
                                                                            "domain_shift", "new", "hm"])


def explore(grid, choices, wise=None, wise_alpha=None, references=None, results_dir="results", device="auto"):
    """The explorer's figure for one position of the sliders (the function behind notebook 06's widget):
    frontier(choices) over stored(), with WiSE-FT's curve and the references (lib.plots.tradeoff_figure)."""
    from .plots import tradeoff_figure
    chosen = frontier(grid, choices, results_dir, device)
    seeds = ", ".join(map(str, grid.get("seeds", [0])))
    return tradeoff_figure(stored(grid, results_dir), chosen, wise, wise_alpha, references,
                           title=f"the trade-off explorer (seeds {seeds}; large points: the sliders' values)")


def interact(draw, note, manual=False, **sliders):
    """ipywidgets' interact for `draw(**values)`, a function that draws a matplotlib figure (and may return it): the
    figure is shown once per move (interact alone shows a returned figure twice, matplotlib's and the value's), and
    a reader without a kernel (a committed notebook, a static viewer) sees `note`, not the widget's text."""
    import ipywidgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    def show(**values):
        draw(**values)
        plt.show()
    widget = ipywidgets.interactive(show, {"manual": manual, "manual_name": "Run"}, **sliders)
    bundle = widget._repr_mimebundle_()
    bundle["text/plain"] = note
    display(bundle, raw=True)  # returns nothing: a returned widget would be displayed a second time
