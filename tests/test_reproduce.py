"""The papers' recipes (lib.recipes) and python -m lib.reproduce: sources, published figures, plans, and the
WILDS recipes end to end at tiny sizes with every fraction stored and resumed (every recipe: test_recipes.py)."""
import numpy as np
import pandas as pd
import pytest
from conftest import make_wilds_copy

from lib import experiments, recipes, reproduce, runner
from lib.methods import get_method


def test_list_names_every_recipe_with_its_sources(capsys):
    reproduce.main(["--list"])
    out = capsys.readouterr().out
    for name, recipe in recipes.RECIPES.items():
        assert f"{name}: {recipe.paper}" in out
    assert "thuml/CLIPood scripts.sh" in out and "SAFT Table 7, per dataset" in out and "ARF Table 2" in out


def test_every_value_has_a_source_and_every_method_takes_its_hyperparameters():
    for recipe in recipes.RECIPES.values():
        assert all(source.strip() for _, _, source in recipe.sources())
        settings = recipes.plain(recipe.settings)
        assert "batch_size" in settings and ("num_steps" in settings or "epochs" in settings)
        for label, fraction, grid in reproduce.plan(recipe, "DATA"):
            hparams = {k: v[0] if k == "templates" else v for k, v in grid["hparams"].items()}
            method = get_method(grid["methods"][0], **hparams)  # unknown names or bad values raise
            assert all(isinstance(t, str) and "{}" in t for t in method.hparams["templates"] or [])
            assert runner.expand(grid)  # a valid runner grid


def test_published_averages_are_the_means_of_their_columns():
    """An independent check of the transcription: each published 'avg OOD' is the mean of its row's shifts, up to
    rounding (a mean of values rounded to 0.1, itself rounded to 0.1, is off by at most 0.1)."""
    for name in ("arf-table1-imagenet", "arf-table1-domainnet", "arf-table2"):
        recipe = recipes.get_recipe(name)
        average = next(c for c in recipe.columns if c.mean_of)
        for row, values in recipe.published.items():
            assert values[average.name] == pytest.approx(np.mean([values[c] for c in average.mean_of]), abs=0.1), \
                (name, row)


def test_clipood_table_1_plans_leave_one_domain_out_runs_with_its_per_dataset_settings():
    planned = reproduce.plan(recipes.get_recipe("clipood-table1"), "DATA")
    assert len(planned) == 2 * (4 * 4 + 6)  # CLIP and CLIPood, each held-out domain of 5 datasets
    pacs = [grid for label, _, grid in planned if label == "CLIPood" and grid["datasets"] == ["PACS"]]
    domains = ["art_painting", "cartoon", "photo", "sketch"]
    assert [[d for d in domains if d not in g["train_domains"]] for g in pacs] == [[d] for d in domains]
    assert all(g["dataset_options"] == dict(protocol="leave-one-domain-out", test_fraction=0.2) for g in pacs)
    assert pacs[0]["hparams"]["lr"] == 5e-6 and pacs[0]["num_steps"] == 5000 and pacs[0]["batch_size"] == 12
    domainnet = next(g for label, _, g in planned if label == "CLIPood" and g["datasets"] == ["DomainNet"])
    assert domainnet["hparams"]["lr"] == 1e-5 and domainnet["num_steps"] == 20 * 500


def test_the_paper_budget_is_gone_and_says_where_the_papers_settings_are(monkeypatch):
    monkeypatch.delenv("LAB_BUDGET", raising=False)
    with pytest.raises(ValueError, match="lib.reproduce"):
        experiments.budget("paper")
    assert experiments.budget("gpu")["num_steps"] == 2000


def test_ours_beside_published_differences():
    recipe = recipes.get_recipe("arf-table1-domainnet")
    domains = ["real", "sketch", "painting", "infograph", "clipart"]
    results = pd.DataFrame([dict(row=row, fraction=None, seed=seed, dataset="DomainNet", domain=d, group="base",
                                 accuracy=0.5 + 0.1 * i + 0.01 * seed)
                            for row in ("CLIP", "ARF") for seed in (0, 1) for i, d in enumerate(domains)])
    table = reproduce.ours(recipe, results)
    assert table.loc["ARF", "ID"] == pytest.approx(50.5) and table.loc["ARF", "Clipart"] == pytest.approx(90.5)
    assert table.loc["CLIP", "avg OOD"] == pytest.approx(np.mean([60.5, 70.5, 80.5, 90.5]))
    both = reproduce.beside_published(recipe, table)
    assert both.loc["ARF", ("published", "ID")] == 89.8
    assert both.loc["ARF", ("difference", "ID")] == pytest.approx(round(50.5 - 89.8, 1))
    assert np.isnan(both.loc["LP", ("ours", "ID")]) and both.loc["LP", ("published", "ID")] == 86.3


@pytest.mark.parametrize("name", ["paper2-iwildcam", "paper2-fmow"])
def test_wilds_recipes_run_end_to_end_at_tiny_sizes(name, tmp_path_factory, capsys, one_intra_op_thread):
    root = make_wilds_copy(tmp_path_factory.mktemp("wilds"))
    results_dir = tmp_path_factory.mktemp("results")
    args = [name, "--data-root", str(root), "--results-dir", str(results_dir), "--num-steps", "1", "--batch-size", "4",
            "--n-train-per-class", "1", "--n-test-per-class", "1", "--fractions", "1.0", "--model-name", "mini",
            "--device", "cpu"]
    reproduce.main(args)
    out = capsys.readouterr().out
    recipe = recipes.get_recipe(name)
    assert "DRY RUN" in out and "published" in out and "difference" in out
    for label in recipe.methods:
        assert label in out
    for column in recipe.columns:
        assert column.name in out
    stored = sorted(results_dir.glob("*.csv"))
    assert len(stored) == 3  # CLIP (fraction 0), CE and CE + SWA at fraction 1
    table = pd.concat(pd.read_csv(path) for path in stored)
    metric = "macro_f1" if name == "paper2-iwildcam" else "worst_region_accuracy"
    assert set(table.domain) == {"id", "ood"} and table[metric].between(0, 1).all()
    before = {path: path.stat().st_mtime_ns for path in stored}
    reproduce.main(args)  # resumable: everything is read back from the store
    assert {path: path.stat().st_mtime_ns for path in sorted(results_dir.glob("*.csv"))} == before


def test_arf_recipes_take_the_captions_and_candidates_given_and_clips_imagenet_templates():
    planned = reproduce.plan(recipes.get_recipe("arf-table1-imagenet"), "DATA",
                             anchors=dict(captions="caps.csv", candidates="cc3m"))
    arf = next(grid for label, _, grid in planned if label == "ARF")
    assert arf["hparams"]["captions"] == "caps.csv" and arf["hparams"]["candidates"] == "cc3m"
    assert len(arf["hparams"]["templates"][0]) == 80 and arf["hparams"]["templates"][0][0] == "a bad photo of a {}."
    flyp = next(grid for label, _, grid in planned if label == "FLYP")
    assert "captions" not in flyp["hparams"]  # FLYP has no anchors
    assert arf["batch_size"] == 512 and "num_steps" not in arf  # 10 epochs: steps come from the loaded training set
    assert {label for label, _, _ in planned} == {"CLIP", "LP", "FT", "LP-FT", "FLYP", "ARF"}


def test_epochs_become_steps_of_the_loaded_training_set(tmp_path):
    root = make_wilds_copy(tmp_path)
    recipe = recipes.get_recipe("paper2-fmow")
    planned = reproduce.plan(recipe, str(root), dict(batch_size=4, fractions=[0.5, 1.0]))
    steps = {f: reproduce.resolve_epochs(recipe, g, progress=False)["num_steps"] for label, f, g in planned
             if label == "CLIP fine-tuned (CE)"}
    train = 4 + 62  # FMoW's fabricated training split (conftest.FMOW_ROWS and one image per class)
    assert steps == {0.5: 30 * (round(0.5 * train) // 4), 1.0: 30 * (train // 4)}  # 30 epochs (train.py --nepochs)
