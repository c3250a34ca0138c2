"""Reproduce a published table: `python -m lib.reproduce <recipe> --data-root DIR` (and `--list`).

Every method of the recipe (lib.recipes) is trained and evaluated through lib.runner's store (run_grid: resumable,
each run's result kept under --results-dir, torchrun-aware), on the recipe's benchmarks at its sizes, then our
numbers are printed beside the published ones with the difference. Sizes can be overridden for a dry run
(--num-steps, --batch-size, --n-train-per-class, --n-test-per-class, --fractions, --datasets, --templates,
--model-name, --pretrained none, --partial); the table then says it is not the recipe's setting.

    python -m lib.reproduce --list
    python -m lib.reproduce paper2-fmow --data-root /data/wilds
    torchrun --nproc_per_node=8 -m lib.reproduce arf-table1-imagenet --data-root /data --captions captions.csv \\
        --candidates /data/cc3m
"""
import argparse
import json

from .recipes import RECIPES, get_recipe, plain, templates

SIZE_OVERRIDES = ("num_steps", "batch_size", "n_train_per_class", "n_test_per_class")
DATASET_SETTINGS = ("group_balanced", "test_fraction")  # recipe settings that are the loader's dataset options


def _per_dataset(value, dataset):
    return value[dataset] if isinstance(value, dict) and dataset in value else value


def plan(recipe, data_root, overrides=None, seeds=(0,), anchors=None):
    """The runner grids of a recipe: [(row label, fraction or None, grid)], one per method, benchmark and data
    fraction. overrides: sizes (SIZE_OVERRIDES), fractions, datasets (some of the recipe's), templates,
    model_name, pretrained, partial (a copy whose image
    counts differ from the release); anchors: {captions, candidates}
    for ARF's methods."""
    overrides = dict(overrides or {})
    settings = plain(recipe.settings)
    model = plain(recipe.model)
    if "model_name" in overrides:  # another model does not take the recipe's weights
        model = dict(model_name=overrides["model_name"], pretrained=overrides.get("pretrained"))
    fractions = overrides.get("fractions", settings["fraction"]) if "fraction" in settings else None
    runs = [run for run in recipe.runs if run["dataset"] in overrides.get("datasets", [run["dataset"]])]
    if not runs:
        raise ValueError(f"{recipe.name} has no run on {overrides['datasets']}; its datasets are "
                         f"{sorted({run['dataset'] for run in recipe.runs})}.")
    planned = []
    for run in runs:
        dataset = run["dataset"]
        options = {**run["dataset_options"], **{k: settings[k] for k in DATASET_SETTINGS if k in settings},
                   **({"partial": True} if overrides.get("partial") else {})}
        for label, (method, hparams) in recipe.methods.items():
            if method is None:
                continue
            values = {name: _per_dataset(v, dataset) for name, v in plain(hparams).items()}
            values.update({k: v for k, v in (anchors or {}).items() if k in values and v is not None})
            if "templates" in values:
                # a list in a grid is a sweep: one value
                values["templates"] = [templates(overrides.get("templates", values["templates"]))]
            sizes = {name: _per_dataset(settings[name], dataset) for name in SIZE_OVERRIDES if name in settings}
            sizes.update({name: overrides[name] for name in SIZE_OVERRIDES if name in overrides})
            for fraction in ([0.0] if method == "zeroshot" else fractions) if fractions else [None]:
                grid = dict(methods=[method], seeds=list(seeds), hparams=values, datasets=[dataset],
                            data_root=data_root, train_domains=run["train_domains"], budget="full", **model, **sizes,
                            dataset_options={**options, **({} if fraction is None else {"fraction": fraction})})
                planned.append((label, fraction, grid))
    return planned


def resolve_epochs(recipe, grid, progress=True):
    """num_steps for a recipe given in epochs: epochs x (training images // batch size), from the training set
    loaded at the grid's sizes (one epoch is at least one step)."""
    from . import experiments
    epochs = plain(recipe.settings).get("epochs")
    if epochs is None or "num_steps" in grid or grid["methods"] == ["zeroshot"]:
        return grid
    size = {**experiments.BUDGETS["full"], **{k: grid[k] for k in SIZE_OVERRIDES if k in grid}}
    bench = experiments.benchmark(grid["datasets"][0], grid["data_root"], grid["train_domains"], size,
                                  grid["dataset_options"], progress)
    return {**grid, "num_steps": max(1, epochs * (len(bench.train) // min(size["batch_size"], len(bench.train))))}


def run(recipe, data_root, results_dir="results", overrides=None, seeds=(0,), anchors=None, device="auto",
        progress=True):
    """Train and evaluate every run of the recipe through the runner's store; the tidy results of all of them, with
    columns row (the published row label) and fraction."""
    import pandas as pd
    from .runner import run_grid
    tables = []
    for label, fraction, grid in plan(recipe, data_root, overrides, seeds, anchors):
        results = run_grid(resolve_epochs(recipe, grid, progress), results_dir, device, progress)
        tables.append(results.assign(row=label, fraction=fraction))
    return pd.concat(tables, ignore_index=True)


def ours(recipe, results):
    """Our table in the published table's shape: one row per published row label (and per data fraction), one
    column per recipe column, in percent (the mean over seeds, and over held-out domains where the column says)."""
    import pandas as pd
    import scipy.stats
    from .evaluate import leave_one_domain_out
    keys = ["row"] + (["fraction"] if results["fraction"].notna().any() else [])
    table = {}
    for column in recipe.columns:
        if column.mean_of:
            parts = pd.concat([table[name] for name in column.mean_of], axis=1)
            table[column.name] = pd.Series(scipy.stats.hmean(parts, axis=1), parts.index) if column.harmonic \
                else parts.mean(axis=1)
            continue
        rows = results
        if column.datasets:
            rows = rows[rows.dataset.isin(column.datasets)]
        if column.group:
            rows = rows[rows.group == column.group]
        if column.domains == "held-out":  # each target's run on its held-out domain, then the mean over targets
            if rows.empty:  # a dry run without this column's dataset
                table[column.name] = pd.Series(dtype=float)
                continue
            targets = leave_one_domain_out(rows.assign(method=rows.row), column.group or "base")
            table[column.name] = 100 * targets.groupby("method", sort=False)["average"].mean().rename_axis("row")
            continue
        if column.domains:
            rows = rows[rows.domain.isin(column.domains)]
        table[column.name] = 100 * rows.groupby(keys, sort=False)[column.metric].mean()
    return pd.DataFrame(table)


def beside_published(recipe, table):
    """Our numbers, the published ones and ours minus published, column by column (NaN where a table has none)."""
    import pandas as pd
    rows = list(dict.fromkeys([*table.index.get_level_values(0), *recipe.published]))
    published = pd.DataFrame.from_dict(recipe.published, orient="index").reindex(rows)
    ours_ = table.groupby(level=0, sort=False).last() if table.index.nlevels > 1 else table
    ours_ = ours_.reindex(rows)
    parts = {"ours": ours_, "published": published.reindex(columns=ours_.columns),
             "difference": ours_ - published.reindex(columns=ours_.columns)}
    return pd.concat(parts, axis=1).round(2)  # the published figures keep their two decimals (SAFT's)


def describe(recipe):
    lines = [f"{recipe.name}: {recipe.paper}, {recipe.table}",
             f"  published: {recipe.published_source}"]
    lines += [f"  published in the text: {text}" for text in recipe.published_text]
    lines += [f"  {what} = {json.dumps(value, default=str)[:80]}  [{source}]"
              for what, value, source in recipe.sources()]
    lines += [f"  note: {note}" for note in recipe.notes]
    if recipe.missing:
        lines.append(f"  not in the lab (published row only): {recipe.missing}")
    return "\n".join(lines)


def report(recipe, results, overrides=None):
    """Print our table and the table beside the published figures."""
    table = ours(recipe, results)
    print(f"{recipe.paper}, {recipe.table}")
    if overrides:
        print(f"DRY RUN, not the recipe's setting: {overrides}")
    print("ours:")
    print(table.round(1).to_string())
    print(f"beside the published figures ({recipe.published_source}; ours at the largest fraction when swept):")
    print(beside_published(recipe, table).to_string())
    for text in recipe.published_text:
        print(f"published in the text: {text}")


def published_markdown(recipe):
    """The recipe's published figures as the README shows them: a heading line, then a Markdown table (or the
    figures given in the text, or a line saying none are transcribed)."""
    lines = [f"**`{recipe.name}`**: {recipe.paper}, {recipe.table}. Published: {recipe.published_source}."]
    if recipe.published:
        names = [c.name for c in recipe.columns if any(c.name in row for row in recipe.published.values())]
        lines += ["", "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += [f"| {label} | " + " | ".join(f"{row[n]:g}" if n in row else "" for n in names) + " |"
                  for label, row in recipe.published.items()]
    lines += [f"Published in the text: {text}." for text in recipe.published_text]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", help="a recipe name (--list names them)")
    parser.add_argument("--list", action="store_true", help="every recipe with its source and settings")
    parser.add_argument("--data-root")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--captions", help="ARF: the captions CSV of the training images (python -m lib.captions)")
    parser.add_argument("--candidates", help="ARF: the candidate corpus (a CSV, or a folder of webdataset shards)")
    for name in SIZE_OVERRIDES:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help="a dry run's size (not the recipe's)")
    parser.add_argument("--fractions", nargs="+", type=float, help="a dry run's data fractions (not the recipe's)")
    parser.add_argument("--templates", nargs="+", help="a dry run's prompt templates (not the recipe's)")
    parser.add_argument("--datasets", nargs="+", help="a dry run on some of the recipe's datasets (not its table)")
    parser.add_argument("--model-name", help="a dry run's model (not the recipe's)")
    parser.add_argument("--pretrained", help="a dry run's weights; none = random (not the recipe's)")
    parser.add_argument("--partial", action="store_true",
                        help="a dry run on copies whose image counts differ from the releases (not the recipe's)")
    args = parser.parse_args(argv)
    if args.list or args.recipe is None:
        print("\n\n".join(describe(r) for r in RECIPES.values()) if args.list else
              "recipes: " + ", ".join(RECIPES) + " (--list for their settings and sources)")
        return
    try:
        recipe = get_recipe(args.recipe)
    except ValueError as error:
        parser.error(str(error))
    if args.fractions and "fraction" not in recipe.settings:
        parser.error(f"--fractions: {recipe.name} trains on the whole training set (no data fraction to sweep).")
    if args.data_root is None:
        parser.error("--data-root is required: the folder that holds the recipe's datasets (see README).")
    overrides = {name: getattr(args, name)
                 for name in (*SIZE_OVERRIDES, "fractions", "datasets", "templates", "model_name")
                 if getattr(args, name) is not None}
    if args.pretrained is not None:
        overrides["pretrained"] = None if args.pretrained == "none" else args.pretrained
    if args.partial:
        overrides["partial"] = True
    from .runner import distributed
    with distributed(args.device) as rank:
        results = run(recipe, args.data_root, args.results_dir, overrides, args.seeds,
                      dict(captions=args.captions, candidates=args.candidates), args.device, progress=rank == 0)
    if rank == 0:
        report(recipe, results, overrides)


if __name__ == "__main__":
    main()
