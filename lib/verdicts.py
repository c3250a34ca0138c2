"""Verdicts: does a paper's claim reproduce here? One row per claim, from differences paired by seed.

A claim is {"claim": the paper's words, "method": ..., "baseline": ..., "metric": a column of the summary,
"threshold": in points (default 0)}: it says that `method` - `baseline` on `metric` is above `threshold`
(0: "better than"; -1: "no worse than, within a point"). The verdict reads the 95 % Student-t interval of the
paired difference (per seed: method minus baseline, rows of one method and seed averaged first):

* "reproduced": the whole interval lies above the threshold;
* "not reproduced": the whole interval lies below threshold + smallest_effect, i.e. the data rule out an effect
  that clears the claim's bar by the smallest effect worth claiming (1 point by default: our choice, about the
  accuracy of 8 of the 600 images of a test part);
* "undecided at this power": neither, e.g. an interval from -2 to +3 points, or a single seed.

Each paper notebook ends with its table (save writes it under the results folder); notebook 05 gathers them into
the scoreboard (gather) and the README shows that scoreboard (sync_readme, checked by tests/test_verdicts.py).
"""
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .evaluate import METRIC_NAMES, confidence_interval

SMALLEST_EFFECT = 1.0  # points
VERDICTS = ("reproduced", "not reproduced", "undecided at this power")
COLUMNS = ["claim", "comparison", "metric", "effect", "ci_low", "ci_high", "seeds", "verdict"]


def verdict(low, high, threshold=0.0, smallest_effect=SMALLEST_EFFECT):
    """The verdict on a claim "effect > threshold" from the interval [low, high] of the effect (points)."""
    if np.isnan(low) or np.isnan(high):
        return VERDICTS[2]
    if low > threshold:
        return VERDICTS[0]
    if high < threshold + smallest_effect:
        return VERDICTS[1]
    return VERDICTS[2]


def verdicts(summary, claims, smallest_effect=SMALLEST_EFFECT, level=0.95):
    """A DataFrame with one row per claim: claim, comparison, metric, effect (mean paired difference, points),
    ci_low, ci_high (its `level` Student-t interval), seeds (how many seeds both methods have), threshold and
    verdict. summary: one row per (method, seed, ...) (lib.evaluate.summarize, lib.experiments.dg_summary)."""
    rows = []
    for claim in claims:
        method, baseline, metric = claim["method"], claim["baseline"], claim["metric"]
        missing = [m for m in (method, baseline) if m not in set(summary.method)]
        if missing:
            raise ValueError(f"claim {claim['claim']!r} needs methods {missing}, which the summary does not have; "
                             f"it has {sorted(set(summary.method))}: add them to `methods`.")
        per_seed = summary.groupby(["method", "seed"])[metric].mean()
        delta = (100 * (per_seed.loc[method] - per_seed.loc[baseline])).dropna()
        mean, half = confidence_interval(delta, level)
        threshold = claim.get("threshold", 0.0)
        rows.append({"claim": claim["claim"], "comparison": f"{method} - {baseline}", "metric": metric,
                     "effect": mean, "ci_low": mean - half, "ci_high": mean + half, "seeds": len(delta),
                     "threshold": threshold, "verdict": verdict(mean - half, mean + half, threshold, smallest_effect)})
    return pd.DataFrame(rows, columns=COLUMNS[:-1] + ["threshold", "verdict"])


def to_markdown(table):
    """The table as Markdown: effect and interval in points, the bar each claim must clear, the verdict."""
    front = ["notebook"] if "notebook" in table.columns else []
    lines = ["| " + " | ".join(front + ["claim", "comparison", "metric", "effect (points)", "95 % CI", "bar",
                                        "seeds", "verdict"]) + " |",
             "|" + "---|" * (len(front) + 8)]
    for row in table.itertuples():
        cells = [str(getattr(row, c)) for c in front] + [
            row.claim, f"`{row.comparison}`", METRIC_NAMES.get(row.metric, row.metric), f"{row.effect:+.1f}",
            f"[{row.ci_low:+.1f}, {row.ci_high:+.1f}]", f"> {row.threshold:+.1f}", str(row.seeds), row.verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sentence(table):
    """One sentence that counts the verdicts of the table."""
    counts = table.verdict.value_counts()
    return (f"Of {len(table)} claims, {counts.get(VERDICTS[0], 0)} reproduced, {counts.get(VERDICTS[1], 0)} not "
            f"reproduced, {counts.get(VERDICTS[2], 0)} undecided at this power.")


def report(table, title="Verdicts", smallest_effect=SMALLEST_EFFECT):
    """The table as IPython Markdown, with its sentence and the rule that decided it."""
    from IPython.display import Markdown
    seeds = sorted(set(table.seeds))
    rule = (f"paired by seed ({', '.join(map(str, seeds))} seeds), 95 % Student-t interval in points; reproduced: "
            f"the interval lies above the bar; not reproduced: it lies below the bar + {smallest_effect:g} point "
            f"(the smallest effect we count); otherwise undecided at this power")
    return Markdown(f"**{title}** (computed from the results above: {rule}).\n\n{to_markdown(table)}\n\n"
                    f"{sentence(table)}")


def save(table, results_dir, notebook, setting="default"):
    """Write a notebook's verdicts to results_dir/verdicts/<notebook>.<setting>.csv for notebook 05's scoreboard;
    setting (e.g. the budget) keeps a smoke run from replacing the verdicts of a default one."""
    folder = Path(results_dir) / "verdicts"
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / f"{notebook}.{setting}.csv", index=False)


def gather(results_dir, notebooks, setting="default"):
    """The scoreboard: the saved verdicts of `notebooks` at `setting`, in that order, with a notebook column."""
    files = {n: Path(results_dir) / "verdicts" / f"{n}.{setting}.csv" for n in notebooks}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"no verdicts at {missing}: run those notebooks first with the same results_dir "
                                f"and budget (make walkthrough runs them in order).")
    return pd.concat([pd.read_csv(path).assign(notebook=n) for n, path in files.items()], ignore_index=True)


def parse_markdown(text):
    """The rows of a table written by to_markdown, as a DataFrame of strings (the tests re-derive the verdicts)."""
    lines = [line for line in text.splitlines() if line.startswith("|") and not line.startswith("|---")]
    if not lines:
        return pd.DataFrame()
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]
    return pd.DataFrame(cells[1:], columns=cells[0])


def check_markdown(text, smallest_effect=SMALLEST_EFFECT):
    """The rows of a rendered verdict table whose verdict or counting sentence does not follow from its numbers:
    a list of messages, empty when everything agrees."""
    table = parse_markdown(text)
    problems = []
    for _, row in table.iterrows():
        low, high = (float(x) for x in re.findall(r"[-+]?\d+\.\d+|nan", row["95 % CI"]))
        bar = float(row["bar"].lstrip("> "))
        # The table shows one decimal: a verdict is consistent when the unrounded interval could give it.
        shifts = (-0.05, 0, 0.05)
        possible = {verdict(low + a, high + b, bar, smallest_effect) for a in shifts for b in shifts}
        if row["verdict"] not in possible:
            problems.append(f"{row['claim']} ({row['comparison']}): says {row['verdict']!r}, its interval "
                            f"[{low}, {high}] gives {sorted(possible)}")
    counts = table.verdict.value_counts() if len(table) else pd.Series(dtype=int)
    stated = re.search(r"Of (\d+) claims, (\d+) reproduced, (\d+) not reproduced, (\d+) undecided", text)
    if stated is None:
        problems.append("no sentence counting the verdicts")
    elif [int(x) for x in stated.groups()] != [len(table)] + [int(counts.get(v, 0)) for v in VERDICTS]:
        problems.append(f"the sentence {stated.group(0)!r} does not count the table's verdicts")
    return problems


README_BEGIN, README_END = "<!-- scoreboard: begin -->", "<!-- scoreboard: end -->"


def readme_scoreboard(readme_text):
    """The scoreboard table between the README's markers (None without markers)."""
    match = re.search(re.escape(README_BEGIN) + r"\n(.*?)\n" + re.escape(README_END), readme_text, re.S)
    return match.group(1) if match else None


def sync_readme(readme_path, scoreboard_markdown):
    """Replace the README's scoreboard (between its markers) with `scoreboard_markdown` (notebook 05's output)."""
    path = Path(readme_path)
    text = path.read_text()
    if readme_scoreboard(text) is None:
        raise ValueError(f"{path} has no {README_BEGIN} ... {README_END} markers to put the scoreboard between.")
    table = "\n".join(line for line in scoreboard_markdown.splitlines() if line.startswith("|"))
    new = re.sub(re.escape(README_BEGIN) + r"\n.*?\n" + re.escape(README_END),
                 lambda _: f"{README_BEGIN}\n{table}\n{README_END}", text, flags=re.S)
    path.write_text(new)


def notebook_reports(notebook_path):
    """The verdict reports (Markdown outputs of report) of an executed notebook, in cell order."""
    import json
    cells = json.loads(Path(notebook_path).read_text())["cells"]
    texts = ["".join(output.get("data", {}).get("text/markdown", "")) for cell in cells if cell["cell_type"] == "code"
             for output in cell.get("outputs", [])]
    return [text for text in texts if "| verdict |" in text]


if __name__ == "__main__":  # python -m lib.verdicts NOTEBOOK README: put NOTEBOOK's last scoreboard into README
    import sys
    reports = notebook_reports(sys.argv[1])
    if not reports:
        sys.exit(f"{sys.argv[1]} has no verdict table in its outputs: run it first.")
    sync_readme(sys.argv[2], reports[-1])
