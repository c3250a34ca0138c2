"""The resumable experiment runner (lib.runner) and the parameterized notebook command (lib.notebooks)."""
import json

import nbformat
import pytest

from lib import notebooks, runner

GRID = {"methods": ["zeroshot", "ft"], "seeds": [0, 1], "budget": "smoke", "train_domains": ["photo"]}


def test_expand_sweeps_lists_of_hyperparameters_and_keys_are_stable():
    runs = runner.expand({"methods": ["ft", "mms"], "seeds": [0, 1, 2], "hparams": {"lr": [1e-4, 1e-3], "lam": 0.3}})
    assert len(runs) == 2 * 3 * 2
    assert {(r["method"], r["seed"], r["hparams"]["lr"]) for r in runs} == \
        {(m, s, lr) for m in ("ft", "mms") for s in range(3) for lr in (1e-4, 1e-3)}
    keys = [runner.run_key(r) for r in runs]
    assert len(set(keys)) == len(keys)  # every parameter tells runs apart
    reordered = {name: runs[0][name] for name in reversed(list(runs[0]))}
    assert runner.run_key(reordered) == keys[0]
    assert runner.run_key({**runs[0], "budget": "paper"}) != keys[0]
    assert runs[0]["budget"] == "smoke"  # the budget that runs: LAB_BUDGET (set by conftest) overrides the grid


@pytest.mark.parametrize("grid, error, match", [
    ({"methods": ["sgd-magic"]}, ValueError, "Unknown method 'sgd-magic'"),
    ({"methods": ["ft"], "hparams": {"learning_rate": 1.0}}, ValueError, "Unknown hyperparameter"),
    ({"methodz": ["ft"]}, ValueError, "Unknown grid key"),
    ({"datasets": ["PACS"], "data_root": "/nonexistent-root"}, FileNotFoundError, "DomainBed layout"),
    ({"datasets": ["PACS"]}, ValueError, "set data_root"),
])
def test_bad_grids_fail_before_any_training(monkeypatch, tmp_path, grid, error, match):
    monkeypatch.setattr(runner, "finetune", lambda *a, **k: pytest.fail("trained before validating"))
    with pytest.raises(error, match=match):
        runner.run_grid(grid, tmp_path)


def test_a_killed_sweep_resumes_without_redoing_runs_or_corrupt_files(monkeypatch, tmp_path):
    real_finetune, trained = runner.finetune, []

    def crash_on_third(*args, **kwargs):
        if len(trained) == 2:
            # The crash comes while a result is being written: a partial file is left behind.
            (tmp_path / "deadbeef.csv.tmp").write_text("method,acc")
            raise KeyboardInterrupt
        trained.append(kwargs["seed"])
        return real_finetune(*args, **kwargs)

    monkeypatch.setattr(runner, "finetune", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        runner.run_grid(GRID, tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.csv"))) == 2

    done_before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.csv")}
    trained.clear()
    monkeypatch.setattr(runner, "finetune", lambda *a, **k: trained.append(k["seed"]) or real_finetune(*a, **k))
    results = runner.run_grid(GRID, tmp_path, progress=False)
    assert len(trained) == 2  # only the two runs that had not finished
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.csv") if p.name in done_before} == done_before
    assert not list(tmp_path.glob("*.tmp"))
    assert len(list(tmp_path.glob("*.csv"))) == 4 and len(list(tmp_path.glob("*.json"))) == 4
    assert set(zip(results.method, results.seed)) == {(m, s) for m in GRID["methods"] for s in GRID["seeds"]}
    assert results.accuracy.between(0, 1).all() and results.groupby(["method", "seed"]).size().nunique() == 1

    for sidecar in tmp_path.glob("*.json"):  # the parameters of every result, under its key
        assert runner.run_key(json.loads(sidecar.read_text())) == sidecar.stem
    trained.clear()
    again = runner.run_grid(GRID, tmp_path, progress=False)
    assert trained == [] and again.equals(results)


# ----------------------------------------------------------------------------------------------- notebooks
@pytest.fixture
def tiny_notebook(tmp_path):
    notebook = nbformat.v4.new_notebook()
    parameters = nbformat.v4.new_code_cell("seeds = [0]\nbudget = 'default'\nlr = 1e-4")
    parameters.metadata["tags"] = ["parameters"]
    notebook.cells = [parameters, nbformat.v4.new_code_cell("print(type(seeds).__name__, budget, lr * 2)")]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "tiny.ipynb"
    nbformat.write(notebook, path)
    return path


def test_parameter_values_are_parsed_like_python_literals():
    assert notebooks.parse_value("[0, 1, 2]") == [0, 1, 2]
    assert notebooks.parse_value("1e-3") == 1e-3 and notebooks.parse_value("None") is None
    assert notebooks.parse_value("ViT-B-16") == "ViT-B-16" and notebooks.parse_value("true") is True


def test_unknown_parameter_names_are_rejected_with_the_known_ones(tiny_notebook, tmp_path):
    with pytest.raises(ValueError, match=r"Unknown parameter\(s\) \['sedes'\].*budget.*lr.*seeds"):
        notebooks.run(tiny_notebook, tmp_path / "out", {"sedes": [1]})


def test_committed_notebooks_are_never_overwritten():
    committed = sorted(notebooks.NOTEBOOKS_DIR.glob("0*.ipynb"))[0]
    with pytest.raises(ValueError, match="committed"):
        notebooks.run(committed, notebooks.NOTEBOOKS_DIR, {})


def test_a_run_injects_the_parameters_into_a_copy(tiny_notebook, tmp_path):
    output = notebooks.run(tiny_notebook, tmp_path / "out", {"seeds": [3, 4], "lr": 0.5})
    executed = nbformat.read(output, as_version=4)
    assert output.parent == tmp_path / "out"
    assert "list default 1.0" in executed.cells[-1].outputs[0]["text"]
    assert nbformat.read(tiny_notebook, as_version=4).cells[-1].outputs == []
