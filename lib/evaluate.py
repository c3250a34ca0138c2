"""Evaluation as tidy tables: one row per (method, seed, domain, class group), and the papers' summaries."""
import json

import numpy as np
import pandas as pd
import scipy.stats
import torch
from sklearn.metrics import f1_score

from .data import Classification, class_ids, templates_for
from .models import encode_images, zeroshot_head


def evaluate(model, tokenizer, dataset, groups=None, head=None, templates=None, temperature=1.0,
             scaled_temperature=None, reliability=False, classification=None, metrics=(), **labels):
    """Accuracy and calibration per domain and class group as a DataFrame (labels, domain, group, n, accuracy,
    ece).

    groups maps a group name to class ids (indices into dataset.classnames; unique names are accepted too);
    each group is classified among its own classes only (the CoOp base-to-new protocol). classification (a
    lib.data.Classification, e.g. bench.classification) narrows a domain's classes (ImageNet-A/R, ObjectNet),
    makes a class the max over other classes' logits (ObjectNet), gives a domain its own prompts (cross-dataset)
    or classifies a group among other classes (CLIPood in the wild). head(image_features, ids) -> logits replaces
    the text head (linear probes), ids being the classes' ids in the benchmark (dataset.ids); a head that does
    not know a group's classes raises KeyError and gives NaN accuracy and ECE. templates: the prompt templates of
    the text head; None, the dataset's (lib.data.templates_for). labels (method=..., seed=...) are copied into
    every row.

    ece is expected_calibration_error of softmax(logits / temperature) over the rows' images. Our choice of
    logits for the text head: the model's own logit_scale.exp() times the cosines (CLIP's zero-shot
    probabilities; 100 for a model without a logit_scale); a head's logits are used as they are. temperature
    (e.g. from fit_temperature on ID validation data) changes the ECE, never the accuracy. scaled_temperature
    adds a column ece_scaled, the ECE at that temperature, so that one pass reports a model before and after
    temperature scaling. reliability=True adds the reliability bins (RELIABILITY_BINS of them) as JSON lists,
    bin_count, bin_confidence_sum and bin_correct_sum: sums, so that rows of several domains or seeds pool
    exactly (pooled_reliability), which is how the runner stores them. metrics: names of METRICS (e.g. a
    benchmark's `metrics`, WILDS's macro_f1 or worst_region_accuracy), one column each, over the row's images.
    """
    groups = groups or {"all": list(range(len(dataset.classnames)))}
    features = encode_images(model, dataset)
    rows = []
    for group, classes in groups.items():
        members = class_ids(dataset.classnames, classes, f"group {group!r}")
        for domain, (logits, local, items) in _group_logits(model, tokenizer, dataset, features, members, head,
                                                            templates, classification, group).items():
            known = logits is not None and len(local) > 0
            row = {**labels, "domain": domain, "group": group, "n": len(local), "accuracy": float("nan"),
                   "ece": float("nan")}
            if known:
                probs = torch.softmax(logits.double() / temperature, dim=-1)
                row["accuracy"] = float((logits.argmax(-1) == local).double().mean())
                row["ece"] = expected_calibration_error(probs, local)
            for name in metrics:
                row[name] = METRICS[name](logits.argmax(-1).cpu().numpy(), local.numpy(),
                                          {key: np.asarray(values)[items] for key, values in
                                           (dataset.metadata or {}).items()}) if known else float("nan")
            if scaled_temperature is not None:
                row["ece_scaled"] = (expected_calibration_error(torch.softmax(logits.double() / scaled_temperature,
                                                                              dim=-1), local)
                                     if known else float("nan"))
            if reliability:
                sums = (_bin_statistics(probs, local, RELIABILITY_BINS) if known
                        else [torch.zeros(RELIABILITY_BINS, dtype=torch.float64)] * 3)
                row.update({name: json.dumps([round(float(v), 6) for v in values])
                            for name, values in zip(BIN_COLUMNS, sums)})
            rows.append(row)
    return pd.DataFrame(rows)


def macro_f1(predictions, labels):
    """WILDS's iWildCam metric: the F1 score of each class present among the labels, averaged (scikit-learn's
    f1_score, average="macro", labels=the labels present); a class only predicted lowers the others' precision."""
    labels = np.asarray(labels)
    return float(f1_score(labels, predictions, average="macro", labels=np.unique(labels), zero_division=0))


def worst_group_accuracy(predictions, labels, groups, exclude=()):
    """The lowest accuracy over the groups present (WILDS's FMoW worst-region accuracy: the groups are regions and
    "Other" is excluded, wilds/datasets/fmow_dataset.py); NaN when no item is left."""
    frame = pd.DataFrame({"correct": np.asarray(predictions) == np.asarray(labels), "group": np.asarray(groups)})
    frame = frame[~frame.group.isin(list(exclude))]
    return float(frame.groupby("group").correct.mean().min()) if len(frame) else float("nan")


# Metrics a benchmark may ask evaluate for (Benchmark.metrics): f(predictions, labels, metadata of those items).
METRICS = {"macro_f1": lambda predictions, labels, metadata: macro_f1(predictions, labels),
           "worst_region_accuracy": lambda predictions, labels, metadata: worst_group_accuracy(
               predictions, labels, metadata["region"], exclude=("Other",))}


def _group_logits(model, tokenizer, dataset, features, members, head, templates, classification, group=None):
    """{domain: (logits or None, labels, item indices)} for the images of each domain whose class is in
    `members`, classified among `members` (or classification.among[group]) narrowed to the domain's classes;
    labels index those candidates. None when the head does not know the classes. The logits of the domains that
    share prompts are computed in one pass over the classes they need (their "columns": a class, or the classes
    it takes the max over), then each domain takes its candidates' columns."""
    plan = classification or Classification()
    default_templates = tuple(templates or templates_for(dataset))
    candidates_of = plan.among.get(group, members)
    labels = dataset.labels.tolist()
    candidates, passes = {}, {}
    for domain in dict.fromkeys(dataset.domains):
        allowed = set(plan.classes.get(domain, candidates_of))
        candidates[domain] = [c for c in candidates_of if c in allowed]
        if domain in plan.classes and not set(candidates[domain]) & set(members):
            continue  # a domain with its own classes, none of them in this group (e.g. cross-dataset ones)
        passes.setdefault(tuple(plan.templates.get(domain, default_templates)), []).append(domain)
    member_set = set(members)
    out = {}
    for prompts, domains in passes.items():
        wanted = {d: set(candidates[d]) & member_set for d in domains}
        items = [i for i, (d, y) in enumerate(zip(dataset.domains, labels)) if d in wanted and y in wanted[d]]
        columns = list(dict.fromkeys(k for d in domains for c in candidates[d] for k in plan.columns.get(c, [c])))
        logits = _logits(model, tokenizer, dataset, features[items], columns, head, prompts) if items else None
        position = {k: j for j, k in enumerate(columns)}
        for domain in domains:
            here = torch.tensor([dataset.domains[i] == domain for i in items], dtype=torch.bool)
            index = {c: j for j, c in enumerate(candidates[domain])}
            local = torch.tensor([index[labels[i]] for i, h in zip(items, here) if h], dtype=torch.long)
            mine_items = [i for i, h in zip(items, here) if h]
            if logits is None:
                out[domain] = (None, local, mine_items)
                continue
            mine = logits[here]
            spans = [[position[k] for k in plan.columns.get(c, [c])] for c in candidates[domain]]
            if all(len(span) == 1 for span in spans):
                out[domain] = (mine[:, [span[0] for span in spans]], local, mine_items)
            else:  # a class whose logit is the max over several classes' (ObjectNet over ImageNet)
                out[domain] = (torch.stack([mine[:, span].amax(-1) for span in spans], -1), local, mine_items)
    return out


def _logits(model, tokenizer, dataset, features, columns, head, templates):
    """Logits [N, len(columns)] of the head, or of the model's text head with `templates`; None when the head does
    not know the classes."""
    if head is not None:
        try:
            return head(features, [dataset.ids[c] for c in columns]).float()
        except KeyError:
            return None
    text_features = zeroshot_head(model, tokenizer, [dataset.classnames[c] for c in columns], list(templates))
    scale = model.logit_scale.exp().item() if hasattr(model, "logit_scale") else 100.0
    return scale * features @ text_features.to(features.device).T


def class_logits(model, tokenizer, dataset, classes=None, head=None, templates=None):
    """(logits [N, C], labels [N]) of the dataset's images of `classes` (ids; all its classes by default),
    classified among those classes exactly as evaluate does; labels index into `classes`. For fit_temperature."""
    members = class_ids(dataset.classnames, range(len(dataset.classnames)) if classes is None else classes)
    parts = [part for part in _group_logits(model, tokenizer, dataset, encode_images(model, dataset), members, head,
                                            templates, None).values() if len(part[2])]
    if any(logits is None for logits, _, _ in parts):
        raise KeyError(f"the head does not know all of the classes {members}")
    order = torch.tensor([i for _, _, items in parts for i in items]).argsort()  # back to the dataset's order
    return torch.cat([logits for logits, _, _ in parts])[order], torch.cat([local for _, local, _ in parts])[order]


RELIABILITY_BINS = 15  # the standard (Guo et al. 2017): equal-width bins of the top-class probability
BIN_COLUMNS = ("bin_count", "bin_confidence_sum", "bin_correct_sum")


def _bin_statistics(probs, labels, num_bins):
    """Per equal-width confidence bin (b/B, (b+1)/B]: count, sum of confidences, sum of correct predictions."""
    probs = torch.as_tensor(probs, dtype=torch.float64)
    labels = torch.as_tensor(labels).long()
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"probs must be [N, C] and labels [N]; got {tuple(probs.shape)} and {tuple(labels.shape)}")
    if int(num_bins) != num_bins or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer; got {num_bins!r}")
    confidences, predictions = probs.max(dim=-1)
    correct = (predictions == labels).double()
    # Inner edges only: bucketize puts x in bin b when edge[b-1] < x <= edge[b], Guo et al.'s half-open bins.
    edges = torch.linspace(0, 1, num_bins + 1, dtype=torch.float64)[1:-1]
    bins = torch.bucketize(confidences, edges)
    count = torch.bincount(bins, minlength=num_bins).double()
    return count, torch.bincount(bins, confidences, num_bins), torch.bincount(bins, correct, num_bins)


def expected_calibration_error(probs, labels, num_bins=15):
    """ECE (Naeini et al. 2015, Guo et al. 2017): sum over equal-width confidence bins of
    |bin| / N * |accuracy(bin) - mean confidence(bin)|, where confidence is the top-class probability and
    bin b holds confidences in (b/B, (b+1)/B]. probs [N, C] (rows sum to 1), labels [N]; NaN when N = 0."""
    count, confidence_sum, correct_sum = _bin_statistics(probs, labels, num_bins)
    total = count.sum()
    if total == 0:
        return float("nan")
    return float((correct_sum - confidence_sum).abs().sum() / total)


def reliability_table(probs, labels, num_bins=15):
    """The bins of a reliability diagram: bin, lower, upper, count, confidence (mean), accuracy; empty bins have
    count 0 and NaN means. sum(count * |accuracy - confidence|) / N is expected_calibration_error."""
    return _reliability_frame(*(sums.numpy() for sums in _bin_statistics(probs, labels, num_bins)))


def pooled_reliability(results):
    """The reliability table (reliability_table's columns) of all images of the rows of `results` together, from
    the bin sums that evaluate(..., reliability=True) stores: e.g. every domain-shift row of a method over all
    seeds. Its ECE, sum(count * |accuracy - confidence|) / N, is that of the pooled images."""
    missing = [c for c in BIN_COLUMNS if c not in results.columns]
    if missing:
        raise ValueError(f"these results have no reliability bins ({missing}); they were stored before the runner "
                         f"kept them: delete their files under the results folder and run them again.")
    return _reliability_frame(*(np.sum([json.loads(v) for v in results[c]], axis=0) for c in BIN_COLUMNS))


PARTS = {"id": ("base", True), "domain_shift": ("base", False), "new": ("new", None)}


def reliability_tables(results, train_domains, part="domain_shift", by="method"):
    """{method: pooled_reliability} over all seeds for one part of the protocol: "id" (base classes, training
    domains), "domain_shift" (base classes, the other domains) or "new" (new classes, every domain)."""
    group, seen = PARTS[part]
    rows = results[results.group == group]
    if seen is not None:
        rows = rows[rows.domain.isin(train_domains) == seen]
    return {key: pooled_reliability(frame) for key, frame in rows.groupby(by, sort=False)}


def _reliability_frame(count, confidence_sum, correct_sum):
    edges = np.linspace(0, 1, len(count) + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return pd.DataFrame({"bin": np.arange(len(count)), "lower": edges[:-1], "upper": edges[1:],
                             "count": np.rint(count).astype(int), "confidence": confidence_sum / count,
                             "accuracy": correct_sum / count})


def fit_temperature(logits, labels, max_iter=50):
    """Temperature scaling (Guo et al. 2017): the scalar T > 0 that minimizes the cross-entropy of
    softmax(logits / T) on held-out data (the ID validation set; never the test domains). Fitted with
    torch.optim.LBFGS (strong Wolfe line search); our choice is to optimize log T, so T stays positive."""
    logits = torch.as_tensor(logits).detach().double().cpu()
    labels = torch.as_tensor(labels).long().cpu()
    log_temperature = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_temperature.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_temperature.detach().exp())


def harmonic_mean(base, new):
    """CoOp's H = 2BN / (B + N)."""
    return 2 * base * new / (base + new)


def summarize(results, train_domains, base_group="base", new_group="new"):
    """One row per (method, seed): id (base classes, training domains), domain_shift (base classes, the other
    domains, mean over domains), new (new classes, mean over all domains), base (base classes, mean over all
    domains) and hm, the harmonic mean of base and new. When the results have an ece column (tables stored
    before it existed have none), id_ece, domain_shift_ece and new_ece are the same means of the per-domain ECE
    (our choice: a mean over domains like the accuracies, not the ECE of the pooled images); likewise
    id_ece_scaled, ... from an ece_scaled column (after temperature scaling), and id_macro_f1, ... from the
    columns of METRICS (WILDS: one test domain each side, so the mean is the split's value)."""
    keys = [k for k in ("method", "seed") if k in results.columns]
    per_part = [c for c in ("ece", "ece_scaled", *METRICS) if c in results.columns]

    def per_run(frame):
        base = frame[frame.group == base_group]
        new = frame[frame.group == new_group]
        seen = base.domain.isin(train_domains)
        out = {"id": base[seen].accuracy.mean(),
               "domain_shift": base[~seen].accuracy.mean(),
               "base": base.accuracy.mean(),
               "new": new.accuracy.mean() if len(new) else np.nan}
        out["hm"] = harmonic_mean(out["base"], out["new"])
        for column in per_part:
            out[f"id_{column}"] = base[seen][column].mean()
            out[f"domain_shift_{column}"] = base[~seen][column].mean()
            out[f"new_{column}"] = new[column].mean() if len(new) else np.nan
        return pd.Series(out)

    columns = ["domain", "group", "accuracy"] + per_part
    return results.groupby(keys, sort=False)[columns].apply(per_run).reset_index()


def leave_one_domain_out(results, group="base"):
    """DomainBed's leave-one-domain-out table (CLIPood Table 1): one row per (method, seed), a column per target
    domain (the accuracy on the domain that run held out, its train_domains being all the others) and "average",
    the mean over targets. results: runner tables of every target's run, with their train_domains column
    ("a+b+c", as lib.runner stores it)."""
    keys = [k for k in ("method", "seed") if k in results.columns]
    rows = results[results.group == group]
    held_out = rows[[d not in trained.split("+") for d, trained in zip(rows.domain, rows.train_domains)]]
    table = held_out.pivot_table(index=keys, columns="domain", values="accuracy", aggfunc="mean")
    table.columns.name = None
    return table.assign(average=table.mean(axis=1)).reset_index()


def confidence_interval(values, level=0.95):
    """(mean, half-width) of a Student-t interval over seeds; half-width NaN for a single seed."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return (values.mean() if len(values) else np.nan), np.nan
    half = scipy.stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return values.mean(), half


def with_ci(summary, by="method", level=0.95):
    """Mean and 95 % CI half-width across seeds for every metric column: columns metric and metric_ci."""
    metrics = [c for c in summary.columns if c not in (by, "seed")]
    rows = []
    for key, frame in summary.groupby(by, sort=False):
        row = {by: key, "seeds": len(frame)}
        for metric in metrics:
            row[metric], row[f"{metric}_ci"] = confidence_interval(frame[metric], level)
        rows.append(row)
    return pd.DataFrame(rows)


def format_table(table, metrics=("id", "domain_shift", "new", "hm"), by="method"):
    """A with_ci table as strings 'mean ± half-width' in percent, one row per method."""
    def cell(row, metric):
        mean, half = 100 * row[metric], 100 * row[f"{metric}_ci"]
        return f"{mean:.1f}" if np.isnan(half) else f"{mean:.1f} ± {half:.1f}"
    return pd.DataFrame({metric: [cell(row, metric) for _, row in table.iterrows()] for metric in metrics},
                        index=pd.Index(table[by], name=by))


METRIC_NAMES = {"id": "in distribution", "domain_shift": "under domain shift", "new": "on new classes",
                "base": "on base classes", "hm": "in harmonic mean", "ood": "out of distribution"}
METRIC_NAMES.update({f"{part}_{ece}": f"{label} {METRIC_NAMES[part]}" for part in ("id", "domain_shift", "new")
                     for ece, label in (("ece", "ECE"), ("ece_scaled", "ECE after temperature scaling"))})


def paired_differences(summary, method, baseline, metrics=("id", "domain_shift", "new")):
    """{metric: (mean, 95 % half-width)} of `method` minus `baseline`, paired by seed, in points (x 100).
    summary: one row per (method, seed, ...) with the metric columns (summarize, lib.experiments.dg_summary);
    rows of one method and seed (e.g. several data fractions) are averaged first."""
    per_seed = summary.groupby(["method", "seed"])[list(metrics)].mean()
    delta = per_seed.loc[method] - per_seed.loc[baseline]
    return {metric: tuple(100 * x for x in confidence_interval(delta[metric])) for metric in metrics}


def takeaway(summary, comparisons, metrics=("id", "domain_shift", "new"), title="Take-away"):
    """A notebook's take-away as Markdown, every number computed from `summary` (paired_differences), so that
    the prose cannot go stale when the notebook is re-run. comparisons: [(method, baseline)]; one bullet each:
    "`clipood` against `ft`: +13.2 ± 1.2 points on new classes, ...". Returns IPython.display.Markdown."""
    from IPython.display import Markdown
    seeds = summary.seed.nunique()
    lines = [f"**{title}** (computed from the results above: paired by seed over {seeds} seed"
             f"{'s' if seeds != 1 else ''}, mean ± 95 % CI in points):", ""]
    for method, baseline in comparisons:
        differences = paired_differences(summary, method, baseline, metrics)
        parts = [f"{mean:+.1f}" + ("" if np.isnan(half) else f" ± {half:.1f}") + f" {METRIC_NAMES.get(m, m)}"
                 for m, (mean, half) in differences.items()]
        lines.append(f"* `{method}` against `{baseline}`: {', '.join(parts)}")
    return Markdown("\n".join(lines))


def leaders(summary, metric, lower_is_better=True, title=None):
    """Which methods lead on `metric` (e.g. domain_shift_ece), as Markdown computed from `summary`: the best mean,
    then every method whose paired difference to it (by seed, 95 % CI) includes 0, i.e. that the seeds cannot
    tell apart from the best, then the worst. Returns IPython.display.Markdown."""
    from IPython.display import Markdown
    means = summary.groupby("method", sort=False)[metric].mean().dropna()
    order = list(means.sort_values(ascending=lower_is_better).index)
    best = order[0]

    def cell(method):
        mean, half = confidence_interval(summary[summary.method == method][metric])
        return f"`{method}` {100 * mean:.1f}" + ("" if np.isnan(half) else f" ± {100 * half:.1f}")
    tied = [m for m in order[1:] if _ci_includes_zero(paired_differences(summary, m, best, [metric])[metric])]
    worst = order[-1]
    seeds = summary.seed.nunique()
    lines = [f"**{title or METRIC_NAMES.get(metric, metric)}** (computed from the results above; mean ± 95 % CI "
             f"over {seeds} seed{'s' if seeds != 1 else ''}, in points; {'lower' if lower_is_better else 'higher'} "
             f"is better):", "",
             f"* best: {cell(best)}",
             "* not distinguishable from it (paired by seed, the 95 % CI of the difference includes 0): "
             + (", ".join(cell(m) for m in tied if m != worst) or "none"),
             f"* worst: {cell(worst)}" + (" (the seeds cannot tell it from the best either)" if worst in tied else "")]
    return Markdown("\n".join(lines))


def _ci_includes_zero(difference):
    mean, half = difference
    return bool(np.isnan(half) or abs(mean) <= half)
