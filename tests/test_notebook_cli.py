"""Parameterized notebook runs (python -m lib.notebooks): parameter parsing, unknown names and the committed
notebooks refused before any kernel starts, and injection into a copy (a two-cell notebook, not a real one)."""
import nbformat
import pytest

from lib import notebooks

COMMITTED = sorted(notebooks.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


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


@pytest.fixture
def no_execution(monkeypatch):
    import papermill
    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: pytest.fail("executed a notebook"))


@pytest.mark.parametrize("text, value", [
    ("3", 3), ("-2", -2), ("1e-3", 1e-3), ("0.5", 0.5), ("[0, 1, 2]", [0, 1, 2]), ('["photo"]', ["photo"]),
    ("{'lam': 0.1}", {"lam": 0.1}), ("None", None), ("null", None), ("True", True), ("false", False),
    ("ViT-B-16", "ViT-B-16"), ("openai", "openai"), ("/data/domain bed", "/data/domain bed"), ('"0"', "0"),
    ("", ""), ('{"lam": true, "b": null}', {"lam": True, "b": None}), ("(1, 2)", (1, 2)),
])
def test_values_are_parsed_as_json_or_python_literals_else_strings(text, value):
    parsed = notebooks.parse_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_unknown_parameter_names_are_rejected_with_the_known_ones(tiny_notebook, tmp_path, no_execution):
    with pytest.raises(ValueError, match=r"Unknown parameter\(s\) \['sedes'\].*\['budget', 'lr', 'seeds'\]"):
        notebooks.run(tiny_notebook, tmp_path / "out", {"sedes": [1], "lr": 0.1})
    assert not (tmp_path / "out").exists()


def test_every_committed_notebook_declares_its_parameters():
    for path in COMMITTED:
        assert {"model_name", "pretrained", "dataset", "data_root", "budget", "seeds"} <= \
            set(notebooks.known_parameters(path)), path.name


@pytest.mark.parametrize("out_dir, name", [
    (notebooks.NOTEBOOKS_DIR, None),
    (notebooks.NOTEBOOKS_DIR / "variants", None),
    (notebooks.NOTEBOOKS_DIR.parent / "runs", "../notebooks/" + COMMITTED[0].name),
])
def test_nothing_is_written_inside_notebooks(out_dir, name, no_execution):
    with pytest.raises(ValueError, match="committed notebooks; choose an output folder outside notebooks/"):
        notebooks.run(COMMITTED[0], out_dir, {"budget": "smoke"}, name=name)


def test_the_cli_reports_errors_as_usage_errors(tiny_notebook, tmp_path, capsys, no_execution):
    for argv, message in [([str(tiny_notebook), str(tmp_path), "-p", "sedes", "[1]"], "Unknown parameter(s) ['sedes']"),
                          (["run", str(COMMITTED[0]), str(notebooks.NOTEBOOKS_DIR)], "inside"),
                          ([str(tmp_path / "missing.ipynb")], "No such file")]:
        with pytest.raises(SystemExit) as exit_info:
            notebooks.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_cli_injects_typed_parameters_into_a_copy(tiny_notebook, tmp_path, capsys):
    notebooks.main(["run", str(tiny_notebook), str(tmp_path / "out"), "-p", "seeds", "[3, 4]", "-p", "lr", "0.5",
                    "-p", "budget", "smoke", "--name", "tiny-smoke.ipynb"])
    output = tmp_path / "out" / "tiny-smoke.ipynb"
    assert capsys.readouterr().out.strip().endswith(str(output))
    executed = nbformat.read(output, as_version=4)
    assert "list smoke 1.0" in executed.cells[-1].outputs[0]["text"]
    assert nbformat.read(tiny_notebook, as_version=4).cells[-1].outputs == []  # the input is untouched
