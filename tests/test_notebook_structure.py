"""Each paper notebook (01-04) reads like a chapter: equations in LaTeX, each followed by the lib code that
implements it (its source, or a re-implementation asserted equal to lib), then the experiments, and it ends with
a Summary and at least three Exercises (issue 14)."""
import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
# The equations each notebook must state (a phrase of the markdown cell that holds the LaTeX).
EQUATIONS = {
    "01_clipood": ["Margin Metric Softmax", "Beta Moving Average"],
    "02_robust_ft_swa": ["End-to-end cross-entropy", "Stochastic weight averaging"],
    "03_arf_anchors": ["FLYP's loss", "ARF's loss", "WiSE-FT"],
    "04_saft": ["The score", "The mask", "The sparse update"],
}


def cells(name):
    notebook = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    return [(cell["cell_type"], "".join(cell["source"])) for cell in notebook["cells"]]


@pytest.mark.parametrize("name", sorted(EQUATIONS))
def test_each_equation_is_followed_by_the_code_that_implements_it(name):
    notebook = cells(name)
    for phrase in EQUATIONS[name]:
        at = [i for i, (kind, text) in enumerate(notebook) if kind == "markdown" and phrase in text and "$$" in text]
        assert at, f"{name}: no LaTeX equation cell for {phrase!r}"
        kind, following = notebook[at[0] + 1]
        assert kind == "code" and ("inspect.getsource" in following or "assert " in following), \
            f"{name}: the equation {phrase!r} is not followed by lib's code (getsource or an assert against lib)"
    first_experiment = min(i for i, (_, text) in enumerate(notebook)
                           if any(call in text for call in ("experiments.compare", "experiments.fraction_sweep",
                                                            "runner.stored_compare")))
    last_equation = max(i for i, (kind, text) in enumerate(notebook) if kind == "markdown" and "$$" in text)
    assert last_equation < first_experiment, f"{name}: the equations come before the experiments"


@pytest.mark.parametrize("name", sorted(EQUATIONS))
def test_ends_with_a_summary_and_at_least_three_exercises(name):
    markdown = [text for kind, text in cells(name) if kind == "markdown"]
    headings = [text.splitlines()[0] for text in markdown[-2:]]
    assert headings == ["## Summary", "## Exercises"], f"{name}: ends with {headings}"
    exercises = re.findall(r"^\s*(?:\d+\.|[*-]) ", markdown[-1], re.M)
    assert len(exercises) >= 3, f"{name}: {len(exercises)} exercises"
