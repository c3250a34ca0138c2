"""The resumable experiment runner (lib.runner): grids, keys, validation before training, resuming after a crash."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from lib import experiments, models, runner
from lib.data import load_benchmark

GRID = {"methods": ["zeroshot", "ft"], "seeds": [0, 1], "budget": "smoke", "train_domains": ["photo"]}
ROOT = Path(__file__).resolve().parent.parent
ROWS_PER_RUN = 4 * 2  # ShapeWorld's domains x the base and new groups


def count_trainings(monkeypatch):
    """Replace experiments.finetune (what every run calls) by itself plus a record of (method, seed)."""
    real, calls = experiments.finetune, []

    def counted(model, method, *args, **kwargs):
        calls.append((method, kwargs["seed"]))
        return real(model, method, *args, **kwargs)
    monkeypatch.setattr(experiments, "finetune", counted)
    return calls


def test_expand_sweeps_lists_of_hyperparameters_and_keys_are_stable():
    runs = runner.expand({"methods": ["ft", "mms"], "seeds": [0, 1, 2], "hparams": {"lr": [1e-4, 1e-3], "lam": 0.3}})
    assert len(runs) == 2 * 3 * 2
    assert {(r["method"], r["seed"], r["hparams"]["lr"]) for r in runs} == \
        {(m, s, lr) for m in ("ft", "mms") for s in range(3) for lr in (1e-4, 1e-3)}
    keys = [runner.run_key(r) for r in runs]
    assert len(set(keys)) == len(keys)  # every parameter tells runs apart
    reordered = {name: runs[0][name] for name in reversed(list(runs[0]))}
    assert runner.run_key(reordered) == keys[0]
    assert runs[0]["budget"] == "smoke"  # the budget that runs: LAB_BUDGET (set by conftest) overrides the grid


def test_the_key_is_a_fixed_function_of_the_parameters_and_changes_with_any_of_them():
    run = runner.expand({"methods": ["ft"], "seeds": [0], "budget": "smoke"})[0]
    # Pinned: results/ of earlier sessions (notebook 05's cache) stay valid only while this holds.
    assert runner.run_key(run) == "396014c9b10be0d1"
    changed = dict(method="mms", seed=1, hparams={"lr": 1e-3}, dataset="PACS", data_root="/data",
                   train_domains=["sketch"], budget="default", model_name="ViT-B-16", pretrained="openai")
    assert set(changed) == set(run)
    for name, value in changed.items():
        assert runner.run_key({**run, name: value}) != runner.run_key(run), name
    assert runner.run_key({**run, "num_steps": 3}) != runner.run_key(run)


def test_explicit_sizes_override_the_budget_sweep_and_become_columns(tmp_path):
    grid = {"methods": ["zeroshot"], "hparams": {"lr": [1e-4, 1e-3]}, "train_domains": ["photo"],
            "n_train_per_class": 2, "n_test_per_class": [1, 2], "num_steps": 1}
    runs = runner.expand(grid)
    assert len(runs) == 2 * 2
    assert runner.run_size(runs[0]) == dict(n_train_per_class=2, n_test_per_class=1, num_steps=1,
                                            batch_size=experiments.BUDGETS["smoke"]["batch_size"])
    results = runner.run_grid(grid, tmp_path, progress=False)
    assert len(results) == 4 * ROWS_PER_RUN
    assert {"method", "label", "seed", "dataset", "lr", "n_test_per_class", "num_steps"} <= set(results.columns)
    assert (results.n == 6 * results.n_test_per_class).all()  # six classes per group and domain
    assert results.label.nunique() == 4 and "n_test_per_class=2" in results.label.iloc[-1]


@pytest.mark.parametrize("grid, error, match", [
    ({"methods": ["sgd-magic"]}, ValueError, "Unknown method 'sgd-magic'"),
    ({"methods": ["ft", "ft+bmaa"]}, ValueError, "Unknown modifier"),
    ({"methods": ["ft"], "hparams": {"learning_rate": 1.0}}, ValueError, "Unknown hyperparameter"),
    ({"methods": ["ft"], "hparams": {"num_steps": 10}}, ValueError, "give them as grid keys"),
    ({"num_steps": "ten"}, ValueError, "num_steps must be an integer >= 1"),
    ({"batch_size": [16, 0]}, ValueError, "batch_size must be an integer >= 1"),
    ({"methodz": ["ft"]}, ValueError, "Unknown grid key"),
    ({"budget": "huge"}, ValueError, "Unknown budget"),
    ({"datasets": ["shapeworld", "PACS"], "data_root": "/nonexistent-root"}, FileNotFoundError, "DomainBed layout"),
    ({"datasets": ["PACS"]}, ValueError, "set data_root"),
])
def test_bad_grids_fail_before_any_training(monkeypatch, tmp_path, grid, error, match):
    monkeypatch.delenv("LAB_BUDGET", raising=False)  # the grid's budget is the one checked
    monkeypatch.setattr(experiments, "finetune", lambda *a, **k: pytest.fail("trained before validating"))
    with pytest.raises(error, match=match):
        runner.run_grid(grid, tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_sweep_that_crashes_while_writing_resumes_without_redoing_runs_or_corrupt_files(monkeypatch, tmp_path):
    real_replace = os.replace

    def crash_on_third_result(source, target):
        if Path(target).suffix == ".csv" and len(list(tmp_path.glob("*.csv"))) == 2:
            raise KeyboardInterrupt  # killed between writing the third CSV and renaming it into place
        real_replace(source, target)
    monkeypatch.setattr(runner.os, "replace", crash_on_third_result)
    with pytest.raises(KeyboardInterrupt):
        runner.run_grid(GRID, tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.csv"))) == 2 and len(list(tmp_path.glob("*.csv.tmp"))) == 1
    monkeypatch.setattr(runner.os, "replace", real_replace)

    done_before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.csv")}
    trained = count_trainings(monkeypatch)
    results = runner.run_grid(GRID, tmp_path, progress=False)
    assert len(trained) == 2  # only the two runs that had not finished
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.csv") if p.name in done_before} == done_before
    assert not list(tmp_path.glob("*.tmp"))
    assert len(list(tmp_path.glob("*.csv"))) == 4 and len(list(tmp_path.glob("*.json"))) == 4
    assert set(zip(results.method, results.seed)) == {(m, s) for m in GRID["methods"] for s in GRID["seeds"]}
    assert results.accuracy.between(0, 1).all() and (results.groupby(["method", "seed"]).size() == ROWS_PER_RUN).all()

    for sidecar in tmp_path.glob("*.json"):  # the parameters of every result, under its key
        assert runner.run_key(json.loads(sidecar.read_text())) == sidecar.stem
    trained.clear()
    again = runner.run_grid(GRID, tmp_path, progress=False)
    assert trained == [] and again.equals(results)


def test_the_cli_killed_with_sigkill_resumes_and_prints_a_summary(monkeypatch, tmp_path, capsys):
    argv = ["--methods", "zeroshot", "ft", "--seeds", "0", "1", "--budget", "smoke", "--train-domains", "photo",
            "--results-dir", str(tmp_path), "--device", "cpu"]
    process = subprocess.Popen([sys.executable, "-m", "lib.runner", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("*.csv")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, process.stderr.read().decode()[-3000:]
    finished = list(tmp_path.glob("*.csv"))
    assert 1 <= len(finished) < 4
    for path in finished:  # a result that exists is complete
        assert len(pd.read_csv(path)) == ROWS_PER_RUN and path.with_suffix(".json").exists()

    trained = count_trainings(monkeypatch)
    runner.main(argv)
    assert len(trained) == 4 - len(finished)
    assert len(list(tmp_path.glob("*.csv"))) == 4 and not list(tmp_path.glob("*.tmp"))
    summary = capsys.readouterr().out
    assert "zeroshot" in summary and "ft" in summary and "domain_shift" in summary


def test_the_cli_maps_flags_to_grid_keys_over_a_grid_file(monkeypatch, tmp_path):
    class Mapped(Exception):
        pass

    def stop(grid, *args):
        raise Mapped(grid)
    monkeypatch.setattr(runner, "prepare", stop)
    grid_file = tmp_path / "grid.json"
    grid_file.write_text(json.dumps({"methods": ["ft"], "seeds": [5], "datasets": ["shapeworld"]}))
    with pytest.raises(Mapped) as mapped:
        runner.main([str(grid_file), "--seeds", "0", "1", "--num-steps", "3", "--methods", "mms",
                     "--hparam", "lam=[0.1, 0.3]", "--hparam", "templates=[\"a {}.\"]"])
    assert mapped.value.args[0] == {"methods": ["mms"], "seeds": [0, 1], "datasets": ["shapeworld"], "num_steps": 3,
                                    "hparams": {"lam": [0.1, 0.3], "templates": ["a {}."]}}


def test_the_cli_reports_a_bad_grid_as_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        runner.main(["--methods", "ft", "sgd-magic", "--budget", "smoke"])
    assert exit_info.value.code == 2
    assert "Unknown method 'sgd-magic'" in capsys.readouterr().err


def test_the_runner_and_compare_give_the_same_results(tmp_path):
    """Both go through experiments.run_one: one run, trained twice, gives one table."""
    grid = {"methods": ["ft"], "seeds": [1], "train_domains": ["photo"], "n_test_per_class": 2}
    from_runner = runner.run_grid(grid, tmp_path, progress=False)
    size = runner.run_size(runner.expand(grid)[0])
    model, preprocess, tokenizer = models.load_clip("mini")
    bench = load_benchmark("shapeworld", None, ["photo"], size["n_train_per_class"], 2).with_transform(preprocess)
    from_compare, _ = experiments.compare(model, tokenizer, bench, ["ft"], [1], size["num_steps"], size["batch_size"],
                                          progress=False)
    assert list(from_compare.columns[:2]) == ["method", "seed"]
    columns = list(from_compare.columns)
    pd.testing.assert_frame_equal(from_runner[columns], from_compare)
