"""lib.verdicts: the rule, the paired interval against scipy, the rendered tables and the notebooks' outputs."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from lib import verdicts

ROOT = Path(__file__).resolve().parent.parent


def synthetic_summary(gains, seeds=5, noise=0.002, seed=0):
    """One row per (method, seed): `base` at 0.6 plus a per-seed effect, and each method of `gains` (accuracy
    units) above it by its gain plus a small noise, so the verdicts are known."""
    rng = np.random.default_rng(seed)
    seed_effect = rng.normal(0, 0.05, seeds)  # shared by all methods of a seed: pairing removes it
    rows = [{"method": "base", "seed": s, "new": 0.6 + seed_effect[s]} for s in range(seeds)]
    for method, gain in gains.items():
        rows += [{"method": method, "seed": s, "new": 0.6 + seed_effect[s] + gain + rng.normal(0, noise)}
                 for s in range(seeds)]
    return pd.DataFrame(rows)


def claim(method, threshold=0.0):
    return {"claim": f"{method} beats base", "method": method, "baseline": "base", "metric": "new",
            "threshold": threshold}


def test_rule_at_its_edges():
    assert verdicts.verdict(0.1, 3.0) == "reproduced"
    assert verdicts.verdict(-0.1, 3.0) == "undecided at this power"
    assert verdicts.verdict(-3.0, 0.9) == "not reproduced"  # rules out a gain of 1 point
    assert verdicts.verdict(-3.0, -0.5) == "not reproduced"  # the other side of 0
    assert verdicts.verdict(-0.5, 0.5, threshold=-1.0) == "reproduced"  # "no worse, within a point"
    assert verdicts.verdict(-3.0, -1.5, threshold=-1.0) == "not reproduced"
    assert verdicts.verdict(float("nan"), float("nan")) == "undecided at this power"


def test_paired_interval_matches_scipy_and_known_verdicts():
    summary = synthetic_summary({"good": 0.05, "null": -0.05, "tiny": 0.0})
    table = verdicts.verdicts(summary, [claim("good"), claim("null"), claim("tiny")]).set_index("comparison")
    wide = summary.pivot(index="seed", columns="method", values="new")
    delta = 100 * (wide["good"] - wide["base"])
    low, high = scipy.stats.t.interval(0.95, len(delta) - 1, loc=delta.mean(), scale=scipy.stats.sem(delta))
    assert np.isclose(table.loc["good - base", "ci_low"], low) and np.isclose(table.loc["good - base", "ci_high"], high)
    assert table.loc["good - base", "seeds"] == 5
    assert list(table.verdict) == ["reproduced", "not reproduced", "not reproduced"]
    # Without pairing the seed effect (5 points) would swamp a 5-point gain; paired, the interval is tight.
    assert table.loc["good - base", "ci_high"] - table.loc["good - base", "ci_low"] < 1


def test_one_seed_is_undecided_and_a_missing_method_is_named():
    summary = synthetic_summary({"good": 0.05}, seeds=1)
    assert verdicts.verdicts(summary, [claim("good")]).verdict[0] == "undecided at this power"
    with pytest.raises(ValueError, match="absent"):
        verdicts.verdicts(summary, [claim("absent")])


def test_rendered_table_checks_itself():
    table = verdicts.verdicts(synthetic_summary({"good": 0.05, "null": -0.05}), [claim("good"), claim("null")])
    text = verdicts.report(table).data
    assert verdicts.check_markdown(text) == []
    assert "Of 2 claims, 1 reproduced, 1 not reproduced, 0 undecided" in text
    assert verdicts.check_markdown(text.replace("| reproduced |", "| not reproduced |", 1))  # the verdict lies
    assert verdicts.check_markdown(text.replace("1 reproduced, 1 not", "2 reproduced, 0 not"))  # the sentence lies
    points = {"base": [0.0, 0.0, 0.0], "edge": [-0.1, 0.5, 0.3]}  # in points: interval [-0.53, +0.99]
    edge = verdicts.verdicts(pd.DataFrame([{"method": m, "seed": s, "new": 0.6 + v / 100} for m, values in
                                           points.items() for s, v in enumerate(values)]), [claim("edge")])
    assert edge.ci_high[0] < 1 and f"{edge.ci_high[0]:+.1f}" == "+1.0" and edge.verdict[0] == "not reproduced"
    assert verdicts.check_markdown(verdicts.report(edge).data) == []  # rounding to the bar is not a lie


def test_gather_and_readme(tmp_path):
    table = verdicts.verdicts(synthetic_summary({"good": 0.05}), [claim("good")])
    verdicts.save(table, tmp_path, "01_x")
    verdicts.save(table.assign(verdict="not reproduced"), tmp_path, "01_x", "smoke")  # another setting
    with pytest.raises(FileNotFoundError, match="02_y"):
        verdicts.gather(tmp_path, ["01_x", "02_y"])
    board = verdicts.gather(tmp_path, ["01_x"])
    assert list(board.notebook) == ["01_x"] and board.verdict[0] == "reproduced"
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{verdicts.README_BEGIN}\nold\n{verdicts.README_END}\nrest\n")
    text = verdicts.report(board).data
    verdicts.sync_readme(readme, text)
    assert verdicts.readme_scoreboard(readme.read_text()) == verdicts.to_markdown(board)
    assert readme.read_text().endswith("rest\n")


def _verdict_cells(name):
    cells = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())["cells"]
    return [c for c in cells if c["cell_type"] == "code" and "verdicts.report(" in "".join(c["source"])]


# Every paper notebook ends with its verdict table, and 05 with the scoreboard of them all.
VERDICT_NOTEBOOKS = ["01_clipood", "02_robust_ft_swa", "03_arf_anchors", "04_saft", "05_comparison"]


@pytest.mark.parametrize("name", VERDICT_NOTEBOOKS)
def test_committed_verdicts_agree_with_their_numbers(name):
    """Every notebook ends with a verdict table; where it has been run, its verdicts and its sentence follow from
    the numbers it shows."""
    assert _verdict_cells(name), f"{name} has no verdict table (a cell calling verdicts.report)"
    reports = verdicts.notebook_reports(ROOT / "notebooks" / f"{name}.ipynb")
    assert reports, f"{name} has not been run since its verdict cell was added (make walkthrough)"
    for text in reports:
        assert verdicts.check_markdown(text) == []


def test_readme_shows_notebook_05s_scoreboard():
    readme = verdicts.readme_scoreboard((ROOT / "README.md").read_text())
    assert readme is not None, "README.md has no scoreboard markers"
    reports = verdicts.notebook_reports(ROOT / "notebooks" / "05_comparison.ipynb")
    assert reports, "notebook 05 has not been run since its scoreboard was added (make walkthrough)"
    board = "\n".join(line for line in reports[-1].splitlines() if line.startswith("|"))
    assert readme == board, "README's scoreboard differs from notebook 05's: python -m lib.verdicts " \
                            "notebooks/05_comparison.ipynb README.md"
