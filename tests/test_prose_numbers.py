"""Numbers in prose come from code: every figure a notebook's markdown quotes appears in its outputs (issue 14).

A figure is a number written with a sign (+12.8), a decimal point (13.0) or a unit of a result (89 %, 3 points).
Numbers inside LaTeX ($...$), code spans and links, and arXiv identifiers, are not figures. A figure matches an
output when the same number (same value, same decimals) appears in the text of any output of the notebook;
a take-away rendered by lib.evaluate.takeaway is an output, so its numbers never need checking.
"""
import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))
NUMBER = r"\d[\d,]*(?:\.\d+)?"
FIGURE = re.compile(rf"(?<![\w.\-/])([+\-−]{NUMBER}|{NUMBER}(?=\s?(?:%|points?\b|pp\b))|\d[\d,]*\.\d+)(?![\w.]\d)")
NOT_PROSE = re.compile(r"\$\$.*?\$\$|\$[^$]*\$|`[^`]*`|\]\([^)]*\)|arXiv[:\s]+\d+\.\d+", re.S)


def figures(markdown):
    """The figures quoted in a markdown text, as strings without sign or thousands separators."""
    text = NOT_PROSE.sub(" ", markdown)
    return [match.lstrip("+-−").replace(",", "") for match in FIGURE.findall(text)]


def output_text(notebook):
    parts = []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            parts.append("".join(output.get("text", "")))
            for kind, value in output.get("data", {}).items():
                if kind.startswith("text/") and kind != "text/html":
                    parts.append("".join(value))
    return "\n".join(parts)


def quoted(figure, text):
    """Whether the number `figure` appears in `text` as a number (not as a part of a longer one)."""
    return re.search(rf"(?<![\d.]){re.escape(figure)}(?![\d]|\.\d)", text.replace(",", "")) is not None


def test_figures_are_parsed_as_a_reader_sees_them():
    text = ("`clipood` gains +13.2 ± 1.2 points and 89 % of 1,500 images; lam = 0.3 in $\\lambda = 0.3$ and "
            "`lam=0.5`, ViT-B-16, arXiv 2302.00864, 3 seeds, the -3 points")
    assert figures(text) == ["13.2", "1.2", "89", "0.3", "3"]
    assert quoted("13.2", "new: +13.2 ± 1.2") and not quoted("13.2", "113.25") and quoted("1500", "1,500 steps")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_figure_in_the_prose_appears_in_the_outputs(path):
    notebook = json.loads(path.read_text())
    outputs = output_text(notebook)
    missing = [(i, figure) for i, cell in enumerate(notebook["cells"]) if cell["cell_type"] == "markdown"
               for figure in figures("".join(cell["source"])) if not quoted(figure, outputs)]
    assert not missing, (f"{path.name}: figures in the prose that no output shows (cell, figure): {missing}; "
                         f"render them from the results (lib.evaluate.takeaway) or drop them")
