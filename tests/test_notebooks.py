"""Every notebook takes papermill's parameters and follows the conventions. Execution is nbval's (`make test` runs
every committed notebook at the smoke budget through it): one run per notebook, not two."""
import json
from pathlib import Path

import nbformat
import papermill
import pytest

from lib import notebooks

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_papermill_injects_parameters_that_the_notebook_declares(path, tmp_path):
    parameters = dict(budget="smoke", seeds=[0, 1])
    assert set(parameters) <= set(notebooks.known_parameters(path))
    output = tmp_path / path.name
    papermill.execute_notebook(str(path), str(output), parameters=parameters, prepare_only=True,
                               kernel_name="python3", progress_bar=False)
    cells = nbformat.read(output, as_version=4).cells
    tags = [c.metadata.get("tags", []) for c in cells if c.cell_type == "code"]
    # papermill puts its cell right after the one tagged parameters, so the derived values see the new budget
    assert "parameters" in tags[0] and "injected-parameters" in tags[1]
    injected = next(c.source for c in cells if "injected-parameters" in c.metadata.get("tags", []))
    assert 'budget = "smoke"' in injected and "seeds = [0, 1]" in injected


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_conventions(path):
    cells = nbformat.read(path, as_version=4).cells
    code = [c for c in cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "the first code cell must be tagged parameters"
    for name in ("model_name", "pretrained", "dataset", "data_root", "device", "budget", "seeds"):
        assert f"{name} =" in code[0].source, name
    # papermill's injected-parameters cell (the committed run's parameters) only assigns, so it has no output.
    ran = [c for c in code[1:] if c.source.strip() and "injected-parameters" not in c.metadata.get("tags", [])]
    assert all(c.outputs for c in ran), "commit the default run's outputs"
    assert not any(o.get("output_type") == "error" for c in code for o in c.outputs)
    shown = json.dumps([c.outputs for c in code])
    assert str(path.parent.parent) not in shown and "PosixPath('/" not in shown, "an output shows a machine's path"
