"""Every recipe of lib.recipes runs end to end through python -m lib.reproduce at tiny sizes (on one of its
benchmarks: --datasets), on fabricated copies of every layout (tests/fabricate.py, conftest.make_wilds_copy) with
mini-CLIP's random weights, and prints the published column; the published figures agree with themselves
(averages, H) and with the README."""
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_wilds_copy

import fabricate
from lib import recipes, reproduce
from lib.data import coop, folders
from lib.data import imagenet as family

COOP_CLASSES = ["c0", "c1", "c2", "c3"]  # four: base and new get two each (ceil and floor)


def _anchor_inputs(root):
    """ARF's two inputs for the images under root: a caption for each, and a small candidate corpus."""
    images = sorted(p for p in root.rglob("*") if p.suffix in (".png", ".jpg"))
    pd.DataFrame(dict(path=images, caption="a tiny picture")).to_csv(root / "captions.csv", index=False)
    pd.DataFrame(dict(path=images[:8], caption=[f"web caption {i}" for i in range(8)])).to_csv(
        root / "candidates.csv", index=False)
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One root holding every layout the recipes read, at a few images per class, and ARF's two inputs."""
    root = tmp_path_factory.mktemp("data")
    fabricate.imagenet(root, per_class=1)
    for dataset in coop.LAYOUTS:
        fabricate.coop_dataset(root, dataset, COOP_CLASSES, per_split=(1, 1, 1))
    for dataset, published in folders.PUBLISHED.items():
        fabricate.domainbed(root, dataset, list(published["images"]), ["a", "b", "c", "d"], per_class=5)
    make_wilds_copy(root)
    return _anchor_inputs(root)


@pytest.fixture(scope="module")
def imagenet_every_class(tmp_path_factory):
    """ImageNet with a training image of every class: `lp` fits its head over the classes it is shown (the
    other recipes take the smaller copy, whose SAFT and LP-FT passes over 1000 images would be slow)."""
    root = fabricate.imagenet(tmp_path_factory.mktemp("imagenet"), per_class=1)
    others = {family.WNIDS[i]: i for i in range(1000) if i not in fabricate.IMAGENET_IDS}
    fabricate.class_folders(root / family.TRAIN, others, 1)
    return _anchor_inputs(root)


@pytest.mark.parametrize("name", list(recipes.RECIPES))
def test_every_recipe_runs_end_to_end_and_prints_the_published_column(name, request, tmp_path, capsys,
                                                                       one_intra_op_thread):
    recipe = recipes.get_recipe(name)
    datasets = list(dict.fromkeys(run["dataset"] for run in recipe.runs))
    dataset = next((d for d in datasets if d != "ImageNet"), datasets[0])  # one benchmark keeps the test quick
    linear_probe = any(method == "lp" for method, _ in recipe.methods.values())
    data_root = request.getfixturevalue("imagenet_every_class" if dataset == "ImageNet" and linear_probe
                                        else "data_root")
    reproduce.main([name, "--datasets", dataset, "--data-root", str(data_root), "--results-dir", str(tmp_path),
                    "--num-steps", "1", "--batch-size", "4", "--templates", "a photo of a {}.",
                    "--n-train-per-class", "1", "--n-test-per-class", "1",
                    "--model-name", "mini", "--pretrained", "none", "--partial", "--device", "cpu",
                    "--captions", str(data_root / "captions.csv"), "--candidates", str(data_root / "candidates.csv"),
                    *(["--fractions", "1.0"] if "fraction" in recipe.settings else [])])
    out = capsys.readouterr().out
    assert "DRY RUN" in out and recipe.published_source in out
    ours_part, published_part = out.split("\nours:\n")[1].split("beside the published figures")
    for column in recipe.columns:
        assert column.name in ours_part
    def line(part, label):  # the printed row of a label: the label, then figures
        return next(x for x in part.splitlines() if re.match(re.escape(label) + r"\s+(-?\d|NaN)", x))

    extra = 1 if "fraction" in recipe.settings else 0  # the fraction printed in our table's index
    for label, (method, _) in recipe.methods.items():
        row = line(published_part, label)
        figures = [float(x) for x in re.findall(r"-?\d+\.\d+|nan", row.replace("NaN", "nan"))]
        published = [v for c in recipe.columns for k, v in recipe.published.get(label, {}).items() if k == c.name]
        assert all(any(np.isclose(v, f) for f in figures) for v in published), (label, row)
        if method is not None:  # a run made: our numbers are percentages, not NaN, for every column
            ours_row = line(ours_part, label)
            ours = [float(x) for x in re.findall(r"-?\d+\.\d+|nan", ours_row.replace("NaN", "nan"))][extra:]
            assert len(ours) == len(recipe.columns), (label, ours_row)
            run = [x for x, c in zip(ours, recipe.columns) if c.datasets in (None, (dataset,)) and not c.mean_of]
            assert run and all(0 <= x <= 100 for x in run), (label, ours_row)
    runs = [run for run in recipe.runs if run["dataset"] == dataset]
    stored = list(Path(tmp_path).glob("*.csv"))
    assert len(stored) == len(runs) * (len(recipe.methods) - len(recipe.missing))  # one per method and run


def test_leave_one_domain_out_columns_average_the_held_out_domains():
    """CLIPood Table 1's column against a brute force: each target's run scored on its held-out domain only."""
    recipe = recipes.get_recipe("clipood-table1")
    rng = np.random.default_rng(0)
    rows = []
    for run in recipe.runs:
        for seed in (0, 1):
            for domain in folders.PUBLISHED[run["dataset"]]["images"]:
                rows.append(dict(row="CLIPood", fraction=None, seed=seed, dataset=run["dataset"], domain=domain,
                                 group="base", train_domains="+".join(run["train_domains"]), accuracy=rng.random()))
    results = pd.DataFrame(rows)
    table = reproduce.ours(recipe, results)
    for dataset in folders.PUBLISHED:
        held_out = [r["accuracy"] for r in rows if r["dataset"] == dataset
                    and r["domain"] not in r["train_domains"].split("+")]
        assert table.loc["CLIPood", dataset] == pytest.approx(100 * np.mean(held_out))


def test_published_h_is_the_harmonic_mean_of_base_and_new():
    saft = recipes.get_recipe("saft-base-to-new").published["SAFT"]
    assert 2 * saft["base"] * saft["new"] / (saft["base"] + saft["new"]) == pytest.approx(saft["H"], abs=0.005)


def test_the_readme_shows_every_recipes_published_figures():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for recipe in recipes.RECIPES.values():
        assert reproduce.published_markdown(recipe) in readme, recipe.name
        assert f"lib.reproduce {recipe.name} " in readme, recipe.name
