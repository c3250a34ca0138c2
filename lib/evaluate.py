"""Evaluation as tidy tables: one row per (method, seed, domain, class group), and the papers' summaries."""
import numpy as np
import pandas as pd
import scipy.stats
import torch

from .models import SHAPEWORLD_TEMPLATES, encode_images, zeroshot_head


def evaluate(model, tokenizer, dataset, groups=None, head=None, templates=SHAPEWORLD_TEMPLATES, **labels):
    """Accuracy per domain and class group as a DataFrame (labels, domain, group, n, accuracy).

    groups maps a group name to class names; each group is classified among its own classes only (the CoOp
    base-to-new protocol). head(image_features, classnames) -> logits replaces the text head (linear probes);
    a head that does not know a group's classes gives NaN accuracy for it. labels (method=..., seed=...) are
    copied into every row.
    """
    groups = groups or {"all": list(dataset.classnames)}
    features = encode_images(model, dataset)
    labels_all = dataset.labels
    domains = np.array(dataset.domains)
    rows = []
    for group, classes in groups.items():
        unknown = [c for c in classes if c not in dataset.classnames]
        if unknown:
            raise ValueError(f"Group {group!r} names classes {unknown} that the dataset does not have; "
                             f"its classes are {dataset.classnames}.")
        in_group = torch.tensor([dataset.classnames[y] in classes for y in labels_all])
        local = torch.tensor([classes.index(dataset.classnames[y]) if m else -1
                              for y, m in zip(labels_all, in_group)])
        predictions = _predict(model, tokenizer, features[in_group], classes, head, templates)
        correct = None if predictions is None else (predictions == local[in_group]).numpy()
        group_domains = domains[in_group.numpy()]
        for domain in dict.fromkeys(dataset.domains):
            here = group_domains == domain
            accuracy = float(correct[here].mean()) if correct is not None and here.any() else float("nan")
            rows.append({**labels, "domain": domain, "group": group, "n": int(here.sum()), "accuracy": accuracy})
    return pd.DataFrame(rows)


def _predict(model, tokenizer, features, classes, head, templates):
    if head is not None:
        try:
            return head(features, classes).argmax(-1)
        except KeyError:
            return None
    text_features = zeroshot_head(model, tokenizer, classes, templates).to(features.device)
    return (features @ text_features.T).argmax(-1)


def harmonic_mean(base, new):
    """CoOp's H = 2BN / (B + N)."""
    return 2 * base * new / (base + new)


def summarize(results, train_domains, base_group="base", new_group="new"):
    """One row per (method, seed): id (base classes, training domains), domain_shift (base classes, the other
    domains, mean over domains), new (new classes, mean over all domains), base (base classes, mean over all
    domains) and hm, the harmonic mean of base and new."""
    keys = [k for k in ("method", "seed") if k in results.columns]

    def per_run(frame):
        base = frame[frame.group == base_group]
        new = frame[frame.group == new_group]
        seen = base.domain.isin(train_domains)
        out = {"id": base[seen].accuracy.mean(),
               "domain_shift": base[~seen].accuracy.mean(),
               "base": base.accuracy.mean(),
               "new": new.accuracy.mean() if len(new) else np.nan}
        out["hm"] = harmonic_mean(out["base"], out["new"])
        return pd.Series(out)

    return results.groupby(keys, sort=False)[["domain", "group", "accuracy"]].apply(per_run).reset_index()


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
