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
    """Replace experiments.finetune (what every run calls) by itself plus a record of (method, seed) for each method
    it trains (one training may serve several methods: lib.train.finetune)."""
    real, calls = experiments.finetune, []

    def counted(model, method, *args, **kwargs):
        calls.extend((m.name, kwargs["seed"]) for m in (method if isinstance(method, list) else [method]))
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


def test_the_key_is_a_fixed_function_of_the_parameters_and_provenance_and_changes_with_any_of_them(monkeypatch):
    monkeypatch.setattr(runner, "dataset_fingerprint", lambda run: f"files of {run['dataset']} in {run['data_root']}")
    run = runner.expand({"methods": ["ft"], "seeds": [0], "budget": "smoke"})[0]
    key = runner.run_key(run)
    assert runner.run_key(dict(reversed(list(run.items())))) == key
    changed = dict(method="mms", seed=1, hparams={"lr": 1e-3}, dataset="PACS", data_root="/data",
                   train_domains=["sketch"], budget="default", model_name="ViT-B-16", pretrained="openai")
    assert set(changed) == set(run)
    for name, value in changed.items():
        assert runner.run_key({**run, name: value}) != key, name
    assert runner.run_key({**run, "num_steps": 3}) != key
    # What produced a result: the code, the libraries, the checkpoint's content, the dataset's files.
    for name, other in (("code_fingerprint", lambda: "other code"), ("_versions", lambda names: {"torch": "9.9"}),
                        ("checkpoint_fingerprint", lambda name, pretrained: "sha256 of other weights"),
                        ("dataset_fingerprint", lambda run: "other files")):
        with monkeypatch.context() as patch:
            patch.setattr(runner, name, other)
            assert runner.run_key(run) != key, name
    assert runner.run_key(run) == key


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
        if Path(target).parent == tmp_path and Path(target).suffix == ".csv" and len(list(tmp_path.glob("*.csv"))) == 2:
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
        assert runner.run_key(json.loads(sidecar.read_text())["run"]) == sidecar.stem
    trained.clear()
    again = runner.run_grid(GRID, tmp_path, progress=False)
    assert trained == [] and again.equals(results)


def test_every_run_stores_calibration_and_where_it_changed_the_model(tmp_path):
    """Beside accuracy: ECE before and after temperature scaling (fitted on ID validation), reliability bins whose
    counts are the test images, and the per-block change, which is nil for zero-shot and, for ft (the image
    encoder trains), confined to the image tower."""
    results = runner.run_grid(GRID, tmp_path, progress=False)
    assert (results.temperature > 0).all() and results.ece_scaled.between(0, 1).all()
    counts = results.bin_count.map(lambda v: sum(json.loads(v)))
    assert (counts == results.n).all()
    changes = runner.load_changes(runner.expand(GRID), tmp_path)
    assert set(changes.encoder) >= {"image", "text"} and set(zip(changes.method, changes.seed)) == \
        {(m, s) for m in GRID["methods"] for s in GRID["seeds"]}
    blocks = changes[changes.block >= 0]
    zeroshot, ft = blocks[blocks.method == "zeroshot"], blocks[blocks.method == "ft"]
    assert (zeroshot.relative_change == 0).all() and zeroshot.cka.sub(1).abs().max() < 1e-6
    assert (ft[ft.encoder == "image"].relative_change > 0).all()
    assert (ft[ft.encoder == "text"].relative_change == 0).all()
    assert ft[ft.encoder == "image"].cka.between(0, 1 + 1e-9).all() and ft[ft.encoder == "image"].cka.min() < 1
    with pytest.raises(FileNotFoundError, match="is not stored in .*trains it again"):
        runner.load_changes(runner.expand({**GRID, "seeds": [5]}), tmp_path)


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

    def stop(grid, *args, **kwargs):
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
    from_compare, trained = experiments.compare(model, tokenizer, bench, ["ft"], [1], size["num_steps"],
                                                size["batch_size"], progress=False)
    assert list(from_compare.columns[:2]) == ["method", "seed"]
    columns = list(from_compare.columns)
    pd.testing.assert_frame_equal(from_runner[columns], from_compare)
    history, = runner.load_histories(runner.expand(grid), tmp_path)
    assert history == trained["ft", 1].history and len(history) == size["num_steps"]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    """A small DomainBed-layout dataset "Toy": domains art and photo, classes dog, horse (base), lion and zebra
    (new)."""
    from PIL import Image
    root = tmp_path_factory.mktemp("domainbed")
    for d in ("art", "photo"):
        for c in ("dog", "horse", "lion", "zebra"):
            (root / "Toy" / d / c).mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (8, 8), (40 * i, 80, 0)).save(root / "Toy" / d / c / f"{i}.png")
    return root


FOLDER = {"datasets": ["Toy"], "data_root": "TOY", "train_domains": ["photo"], "budget": "smoke"}


@pytest.mark.parametrize("grid, error, match", [
    ({"methods": ["clipood"], "hparams": {"beta": float("inf")}}, ValueError, "beta must be a finite number > 0"),
    ({"methods": ["clipood"], "hparams": {"beta": 1e6}}, ValueError, "float underflow"),
    ({"methods": ["ft+swa"], "hparams": {"swa_start": 1.5}}, ValueError, r"swa_start must be a finite number in \[0, 1\)"),
    ({"methods": ["ft", "lp+saft"]}, ValueError, "'lp' does not train"),
    ({"methods": ["zeroshot+saft"]}, ValueError, "'zeroshot' does not train"),
    ({"methods": ["ft"], "model_name": "ViT-Q-99"}, ValueError, "Unknown model name 'ViT-Q-99'"),
    ({"methods": ["ft"], "train_domains": ["x-ray"]}, ValueError, r"train_domains \['x-ray'\] are not ShapeWorld"),
    ({**FOLDER, "methods": ["ft", "arf"]}, ValueError, r"arf on 'Toy' needs a caption .*--hparam captions=PATH.csv"),
    ({**FOLDER, "methods": ["arf-ret"]}, ValueError, r"arf-ret on 'Toy' needs a web-like candidate corpus"),
    ({**FOLDER, "methods": ["ft"], "train_domains": ["sketch"]}, FileNotFoundError, r"no folder for the train domain"),
    ({**FOLDER, "methods": ["ft"], "dataset_options": {"class_folders": "union"}}, ValueError, "class_folders must be"),
])
def test_the_invalid_grids_of_issue_13_fail_before_any_training(monkeypatch, tmp_path, toy_root, grid, error, match):
    grid = {**grid, **({"data_root": str(toy_root)} if grid.get("data_root") == "TOY" else {})}
    monkeypatch.setattr(experiments, "finetune", lambda *a, **k: pytest.fail("trained before validating"))
    with pytest.raises(error, match=match):
        runner.run_grid(grid, tmp_path / "results")
    assert not (tmp_path / "results").exists()


def test_a_results_dir_that_cannot_be_written_fails_before_training(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(runner.tempfile, "TemporaryFile", refuse)
    monkeypatch.setattr(experiments, "finetune", lambda *a, **k: pytest.fail("trained before validating"))
    with pytest.raises(PermissionError, match="Cannot write results to .*give --results-dir"):
        runner.run_grid({"methods": ["ft"], "train_domains": ["photo"]}, tmp_path / "results")


@pytest.mark.parametrize("hparams", [{"lr": 1e10}])
def test_a_diverged_run_raises_and_is_never_stored(tmp_path, hparams):
    grid = {"methods": ["zeroshot", "ft"], "hparams": hparams, "train_domains": ["photo"], "num_steps": 20}
    with pytest.raises(FloatingPointError, match=r"ft: the .* is (nan|inf) at step"):
        runner.run_grid(grid, tmp_path, progress=False)
    stored = [json.loads(p.read_text())["run"]["method"] for p in tmp_path.glob("*.json")]
    assert stored == ["zeroshot"] and len(list(tmp_path.glob("*.csv"))) == 1  # the finished run only


def test_folder_datasets_train_with_their_own_templates_and_a_dataset_column(monkeypatch, tmp_path, toy_root,
                                                                                capsys):
    real, seen = experiments.finetune, []

    def record(model, method, *args, **kwargs):
        trained = real(model, method, *args, **kwargs)
        seen.extend(t.method.hparams["templates"] for t in trained)  # the data's, which the method resolved
        return trained
    monkeypatch.setattr(experiments, "finetune", record)
    runner.main(["--methods", "zeroshot", "--datasets", "shapeworld", "Toy", "--data-root", str(toy_root),
                 "--train-domains", "photo", "--budget", "smoke", "--results-dir", str(tmp_path), "--device", "cpu"])
    assert seen == [models.SHAPEWORLD_TEMPLATES, models.REAL_TEMPLATES]
    table = capsys.readouterr().out
    assert "dataset" in table and "shapeworld" in table and "Toy" in table
    results = runner.load_results(runner.expand({"methods": ["zeroshot"], "datasets": ["shapeworld", "Toy"],
                                                 "data_root": str(toy_root), "train_domains": ["photo"]}), tmp_path)
    assert set(results.dataset) == {"shapeworld", "Toy"}


def test_the_key_of_a_checkpoint_file_follows_its_content(tmp_path):
    checkpoint = tmp_path / "weights.pt"
    checkpoint.write_bytes(b"first weights")
    run = runner.expand({"methods": ["ft"], "model_name": "ViT-B-16", "pretrained": str(checkpoint)})[0]
    before = runner.run_key(run)
    checkpoint.write_bytes(b"other weights")
    assert runner.run_key(run) != before


def test_two_runners_on_one_folder_never_train_a_run_twice(monkeypatch, tmp_path):
    import threading
    trained = count_trainings(monkeypatch)
    results, errors = [], []

    def one_runner():
        try:
            results.append(runner.run_grid(GRID, tmp_path, progress=False))
        except BaseException as error:  # surfaced below
            errors.append(error)
    threads = [threading.Thread(target=one_runner) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(trained) == sorted((m, s) for m in GRID["methods"] for s in GRID["seeds"])  # each run once
    assert results[0].equals(results[1]) and not list(tmp_path.glob("*.lock"))


def test_a_claim_held_by_another_runner_is_waited_for(tmp_path):
    import fcntl
    run = runner.expand(GRID)[0]
    lock = tmp_path / f"{runner.run_key(run)}.lock"
    with open(lock, "w") as other:  # another runner's claim
        fcntl.flock(other, fcntl.LOCK_EX)
        with runner._claim(tmp_path, runner.run_key(run), blocking=False) as claimed:
            assert claimed is None
    with runner._claim(tmp_path, runner.run_key(run), blocking=False) as claimed:
        assert claimed is True  # released (as the kernel does when a runner dies)


def test_help_and_usage_errors_are_instant():
    for argv, code in ((["--help"], 0), (["--hparam", "lr"], 2), (["--num-steps", "x"], 2)):
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "lib.runner", *argv], cwd=ROOT, capture_output=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == code and time.monotonic() - start < 2, (argv, done.stderr[-500:])
    check = subprocess.run([sys.executable, "-c", "import sys, lib.runner; "
                            "print(sorted(m for m in ('torch', 'pandas', 'open_clip') if m in sys.modules))"],
                           cwd=ROOT, capture_output=True, text=True)
    assert check.stdout.strip() == "[]"


def test_stored_compare_shares_runs_between_notebooks_whatever_defaults_they_spell_out(monkeypatch, tmp_path):
    runner.run_grid({**GRID, "methods": ["mms"], "seeds": [0]}, tmp_path, progress=False)
    trained = count_trainings(monkeypatch)
    grid = {**GRID, "methods": ["zeroshot", "mms"], "seeds": [0]}
    shipped = runner.stored_compare(grid, {"mms": {"lam": 0.3}}, tmp_path, progress=False)
    assert trained == [("zeroshot", 0)]  # mms with its default lam is the run stored above
    assert set(shipped.method) == {"zeroshot", "mms"} and len(shipped) == 2 * ROWS_PER_RUN
    changed = runner.stored_compare(grid, {"mms": {"lam": 0.0}}, tmp_path, progress=False)
    assert trained == [("zeroshot", 0), ("mms", 0)] and set(changed[changed.method == "mms"].lam) == {0.0}


def test_runs_of_one_trajectory_train_once_and_store_what_they_would_alone(monkeypatch, tmp_path):
    calls = []
    real = experiments.finetune
    monkeypatch.setattr(experiments, "finetune", lambda model, methods, *a, **k: calls.append(
        sorted(m.name for m in methods)) or real(model, methods, *a, **k))
    one_seed = {**GRID, "seeds": [0]}
    runs = (runner.expand({**one_seed, "methods": ["ft", "mms", "ce-swa", "ce"]})
            + runner.expand({**one_seed, "methods": ["bma"], "hparams": {"beta": [0.5, 2.0]}}))
    for folder in ("together", "alone"):
        (tmp_path / folder).mkdir()
    together = runner.execute(runs, runs, {}, tmp_path / "together", progress=False)
    # BMA only watches ft's steps; SWA's averaging phase branches off ce's training (lib.train.finetune)
    assert sorted(calls) == [["bma", "bma", "ft"], ["ce", "ce-swa"], ["mms"]]
    calls.clear()
    alone = pd.concat([runner.execute([run], [run], {}, tmp_path / "alone", progress=False) for run in runs],
                      ignore_index=True)
    assert len(calls) == len(runs)
    columns = ["method", "beta", "domain", "group", "accuracy", "ece"]
    assert together[columns].sort_values(columns[:4]).reset_index(drop=True).equals(
        alone[columns].sort_values(columns[:4]).reset_index(drop=True))
    histories = [{path.stem: json.loads(path.read_text())["history"] for path in (tmp_path / folder).glob("*.json")}
                 for folder in ("together", "alone")]
    assert histories[0] == histories[1] and len(histories[0]) == len(runs)  # the same keys, the same losses
