"""The project's figures (matplotlib + seaborn), each saved to figures/ as PNG when given a path."""
import os
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from .change import UNMOVED

FIGURES = Path(os.environ.get("LAB_FIGURES") or Path(__file__).resolve().parent.parent / "figures")
METRIC_LABELS = {"id": "ID\n(train domain, base)", "domain_shift": "domain shift\n(other domains, base)",
                 "new": "new classes\n(all domains)", "base": "base classes\n(all domains)",
                 "hm": "harmonic mean\n(base, new)"}
sns.set_theme(style="whitegrid", context="notebook")


def save(fig, name):
    """Save a figure as figures/<name>.png (created if needed). Returns nothing, so that a notebook cell ending
    with it shows no path of the machine it ran on."""
    FIGURES.mkdir(exist_ok=True)
    fig.savefig(FIGURES / f"{name}.png", dpi=120, bbox_inches="tight")


def example_grid(dataset, domains, classes, title="ShapeWorld"):
    """One image per (domain, class): rows are domains, columns classes, each cell with its class name."""
    fig, axes = plt.subplots(len(domains), len(classes), figsize=(1.1 * len(classes), 1.25 * len(domains)))
    axes = np.atleast_2d(axes)
    for r, domain in enumerate(domains):
        for c, name in enumerate(classes):
            ax = axes[r, c]
            index = next(i for i in range(len(dataset))
                         if dataset.domains[i] == domain and dataset.classnames[dataset.labels[i]] == name)
            ax.imshow(dataset.images[index].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(domain, fontsize=10)
    fig.suptitle(title, y=1.0)
    fig.tight_layout()
    return fig


def accuracy_heatmap(results, title):
    """Accuracy per domain (rows) and class group (columns) of one run."""
    table = results.pivot_table(index="domain", columns="group", values="accuracy", sort=False)
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * table.shape[1], 0.5 + 0.5 * table.shape[0]))
    sns.heatmap(table * 100, annot=True, fmt=".0f", cmap="viridis", vmin=0, vmax=100, ax=ax,
                cbar_kws={"label": "accuracy (%)"})
    ax.set_title(title)
    ax.set_xlabel("class group")
    ax.set_ylabel("domain")
    return fig


def metric_bars(table, metrics=("id", "domain_shift", "new"), title="", by="method"):
    """Bars of mean accuracy across seeds with 95 % CI error bars; `table` comes from lib.evaluate.with_ci."""
    fig, ax = plt.subplots(figsize=(1.2 + 1.6 * len(metrics), 3.6))
    keys = list(table[by])
    width = 0.8 / len(keys)
    palette = sns.color_palette("colorblind", len(keys))
    for k, key in enumerate(keys):
        row = table[table[by] == key].iloc[0]
        x = np.arange(len(metrics)) + (k - (len(keys) - 1) / 2) * width
        means = [100 * row[m] for m in metrics]
        errors = [100 * np.nan_to_num(row[f"{m}_ci"]) for m in metrics]
        ax.bar(x, means, width, yerr=errors, capsize=3, label=f"{key} (n={row['seeds']})", color=palette[k])
    ax.set_xticks(np.arange(len(metrics)), [METRIC_LABELS.get(m, m) for m in metrics], fontsize=9)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(title=by, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def loss_curves(histories, title="training loss"):
    """histories: {label: [loss per step]}."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, history in histories.items():
        ax.plot(np.arange(1, len(history) + 1), history, label=label, alpha=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def per_layer_figure(counts, title="SAFT: selected parameters per layer"):
    """Bars of selected entries per residual block (ResNet stage for a ModifiedResNet image tower), one panel
    per encoder, on a log axis; `counts` is lib.sparse.per_layer_counts(mask). Block -1 (embeddings, stem,
    attention pool, final norms, projections) is drawn as "outside"; the label above a bar is its share of that
    group (%)."""
    encoders = [e for e in ("image", "text", "other") if e in set(counts.encoder)]
    fig, axes = plt.subplots(1, len(encoders), figsize=(3.2 + 2.4 * len(encoders), 3.4), squeeze=False,
                             gridspec_kw={"width_ratios": [max(2, (counts.encoder == e).sum()) for e in encoders]})
    palette = dict(zip(("image", "text", "other"), sns.color_palette("colorblind", 3)))
    for ax, encoder in zip(axes[0], encoders):
        rows = counts[counts.encoder == encoder].sort_values("block")
        labels = ["outside" if b < 0 else str(b) for b in rows.block]
        bars = ax.bar(labels, rows["count"], color=palette[encoder])
        for bar, count, total in zip(bars, rows["count"], rows["total"]):  # vertical, so that 13 bars never collide
            ax.annotate(_percent(100 * count / total), (bar.get_x() + bar.get_width() / 2, max(bar.get_height(), 1)),
                        xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7,
                        rotation=90)
        ax.set_yscale("log")  # counts span 1 to 1e5: a linear axis hides every small block
        ax.set_ylim(0.8, 30 * max(1, rows["count"].max()))
        ax.set_title(f"{encoder} encoder ({int(rows['count'].sum()):,} selected)" if encoder != "other"
                     else f"other ({int(rows['count'].sum()):,})", fontsize=10)
        ax.set_xlabel("residual block" if encoder != "other" else "")
        ax.tick_params(axis="x", labelsize=8, rotation=90 if len(labels) > 6 else 0)
    axes[0][0].set_ylabel("selected entries (count)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _percent(value):
    """A share in percent with three significant digits and no exponent: 100%, 8.6%, 0.032%, <0.001%."""
    return f"{value:.3g}%" if value >= 1e-3 or value == 0 else "<0.001%"


def saft_alpha_figure(scores, alpha, title=None):
    """The figure behind notebook 04's alpha slider: the global top-alpha mask of `scores` (lib.sparse.saft_mask)
    counted per layer; returns (figure, counts)."""
    from .sparse import per_layer_counts, saft_mask  # plots stays importable without the sparse machinery
    counts = per_layer_counts(saft_mask(scores, alpha))
    total = int(counts["total"].sum())
    fig = per_layer_figure(counts, title or f"alpha = {alpha:.2%}: {int(counts['count'].sum()):,} of {total:,} entries")
    return fig, counts


def alpha_curves(table, metrics=("id", "domain_shift", "new"), reference=None, title=""):
    """Accuracy vs alpha (log x axis), one line per metric; `table` has columns alpha and the metrics (0-1).
    reference: {label: {metric: value}} drawn as dashed horizontal lines (e.g. zero-shot, dense ft)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    palette = sns.color_palette("colorblind", len(metrics))
    for color, metric in zip(palette, metrics):
        ax.plot(table["alpha"], 100 * table[metric], "o-", color=color, label=METRIC_LABELS.get(metric, metric))
        for (label, values), style in zip((reference or {}).items(), ("--", ":", "-.")):
            ax.axhline(100 * values[metric], color=color, linestyle=style, alpha=0.6, linewidth=1)
    for label, style in zip(reference or {}, ("--", ":", "-.")):
        ax.plot([], [], color="gray", linestyle=style, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("alpha (fraction of parameters trained, log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    return fig


def fraction_curves(table, metrics=("id", "ood"), reference=None, title="", labels=None):
    """Accuracy vs percentage of training data, one panel per metric, one line per method with its 95 % CI band
    (fill_between); `table` has columns method, fraction (0-1), seeds and metric / metric_ci (lib.evaluate.with_ci
    per fraction). reference: {label: {metric: value}} drawn as dashed horizontal lines (e.g. zero-shot)."""
    labels = labels or {"id": "ID (test split of the source domains)", "ood": "OOD (held-out domain)"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8), squeeze=False, sharey=True)
    methods = list(dict.fromkeys(table["method"]))
    palette = dict(zip(methods, sns.color_palette("colorblind", len(methods))))
    for ax, metric in zip(axes[0], metrics):
        for method in methods:
            rows = table[table.method == method].sort_values("fraction")
            x, y = 100 * rows["fraction"], 100 * rows[metric]
            half = 100 * np.nan_to_num(rows[f"{metric}_ci"].to_numpy(dtype=float))
            ax.plot(x, y, "o-", color=palette[method], label=f"{method} (n={int(rows['seeds'].max())} seeds)", ms=4)
            ax.fill_between(x, y - half, y + half, color=palette[method], alpha=0.2, linewidth=0)
        for (label, values), style in zip((reference or {}).items(), ("--", ":", "-.")):
            ax.axhline(100 * values[metric], color="gray", linestyle=style, linewidth=1, label=label)
        ax.set_xlabel("training data (%)")
        ax.set_title(labels.get(metric, metric), fontsize=10)
    axes[0][0].set_ylabel("accuracy (%, mean and 95 % CI over seeds)")
    fig.supxlabel("x: the share of the source domains' training split used, the same number of steps at every share",
                  fontsize=9)
    return _legend_outside(fig, axes[0], "method", title)  # inside, it hid the OOD curves


def bma_weight_figure(beta, total_steps, title=None):
    """The figure behind notebook 01's beta slider: CLIPood's BMA weight of every state of the trajectory
    (lib.averaging.beta_weights, normalized to sum 1), for one beta or a list of betas; returns the figure."""
    from .averaging import beta_weights
    betas = [beta] if isinstance(beta, (int, float)) else list(beta)
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    for b, color in zip(betas, sns.color_palette("colorblind", len(betas))):
        w = beta_weights(total_steps, b)
        ax.plot(np.arange(total_steps + 1), 100 * w / w.sum(), color=color, label=f"beta = {b:g}")
    ax.set_xlabel(f"optimizer step i (0 = zero-shot weights, {total_steps} = final)")
    ax.set_ylabel("weight in the average (%)")
    ax.set_title(title or "BMA: weight of each state of the trajectory")
    ax.legend(fontsize=8)
    return fig


def mms_margin_figure(text_features, classnames, lam, title=None):
    """The figure behind notebook 01's lambda slider: the MMS margins lam * (1 - cos(t_i, t_j))
    (lib.losses.mms_margins; row = true class, column = competing class) as a heatmap; returns the figure."""
    from .losses import mms_margins
    margins = mms_margins(text_features.float(), lam).cpu().numpy()
    n = len(classnames)
    fig, ax = plt.subplots(figsize=(1.5 + 0.55 * n, 1.0 + 0.5 * n))
    sns.heatmap(margins, annot=True, fmt=".2f", cmap="magma", xticklabels=classnames, yticklabels=classnames,
                ax=ax, annot_kws={"fontsize": 7}, cbar_kws={"label": "margin (cosine units; x scale in the logits)"})
    ax.set_xlabel("competing class j")
    ax.set_ylabel("true class i")
    ax.set_title(title or f"MMS margins lam * (1 - cos(t_i, t_j)), lam = {lam:g}")
    return fig


def sweep_heatmaps(table, row, col, metrics=("id", "domain_shift", "new"), title=""):
    """One heatmap per metric of accuracy (%) over a 2-D hyperparameter grid; `table` has columns row, col and
    the metrics (0-1), one row per grid point (e.g. notebook 01's lambda x beta sweep)."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        grid = table.pivot_table(index=row, columns=col, values=metric) * 100
        sns.heatmap(grid, annot=True, fmt=".1f", cmap="viridis", ax=ax, cbar_kws={"label": "accuracy (%)"})
        ax.set_title(METRIC_LABELS.get(metric, metric), fontsize=9)
        ax.set_xlabel(col)
        ax.set_ylabel(row)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def wise_ft_figure(table, x_metrics=("domain_shift", "new"), title="WiSE-FT: interpolating towards zero-shot"):
    """ID accuracy against each OOD metric along WiSE-FT curves (lib.experiments.wise_ft_curves), one line per
    method from alpha = 0 (zero-shot, a star) to alpha = 1 (the fine-tuned model, a square)."""
    fig, axes = plt.subplots(1, len(x_metrics), figsize=(5.2 * len(x_metrics), 4), squeeze=False)
    methods = list(dict.fromkeys(table["method"]))
    palette = dict(zip(methods, sns.color_palette("colorblind", len(methods))))
    for ax, metric in zip(axes[0], x_metrics):
        for method in methods:
            rows = table[table.method == method].sort_values("alpha")
            x, y = 100 * rows[metric].to_numpy(), 100 * rows["id"].to_numpy()
            ax.plot(x, y, "o-", color=palette[method], label=method, ms=4)
            ax.plot(x[-1], y[-1], "s", color=palette[method], ms=8)
            ax.plot(x[0], y[0], "*", color="black", ms=12)
        ax.set_xlabel(f"{METRIC_LABELS.get(metric, metric).replace(chr(10), ' ')} accuracy (%)")
        ax.set_ylabel("ID accuracy (%)")
    axes[0][0].plot([], [], "*", color="black", label="alpha = 0 (zero-shot)")
    axes[0][0].plot([], [], "s", color="gray", label="alpha = 1 (fine-tuned)")
    axes[0][0].legend(fontsize=8, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def anchor_examples(train_set, captions, neighbours, anchor_set, rows=4, shown=3, title=None):
    """ARF's anchors for a few training images (like the paper's Figure 5): each row is a training image with
    its caption anchor, then its `shown` nearest retrieved pairs (image and caption). Images are the raw ones
    (ImageSet.load), so pass the sets before or after a transform alike."""
    picks = np.linspace(0, len(train_set) - 1, rows).astype(int)
    fig, axes = plt.subplots(rows, 1 + shown, figsize=(3.1 * (1 + shown), 2.5 * rows), squeeze=False)
    for r, i in enumerate(picks):
        cells = [(train_set, int(i), f"training image\n{_wrap(captions[i])}")]
        cells += [(anchor_set, int(j), f"retrieved #{n + 1}\n{_wrap(anchor_set.captions[j])}")
                  for n, j in enumerate(neighbours[i, :shown].tolist())]
        for ax, (dataset, index, label) in zip(axes[r], cells):
            image = dataset.load(index)
            ax.imshow(image.permute(1, 2, 0).numpy() if hasattr(image, "permute") else image, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_xlabel(label, fontsize=7)
    fig.suptitle(title or "ARF anchors: caption anchor (left) and retrieved image-text pairs")
    fig.tight_layout()
    return fig


def _wrap(text, width=34):
    return "\n".join(textwrap.wrap(text, width))


def id_ood_scatter(table, x_metrics=("domain_shift", "new"), title="every method: ID against OOD accuracy"):
    """One point per method with 95 % CI bars on both axes (a lib.evaluate.with_ci table): ID accuracy against
    each OOD metric. Up and to the right is better; the zero-shot point, when present, is a black star."""
    fig, axes = plt.subplots(1, len(x_metrics), figsize=(5.2 * len(x_metrics) + 2.4, 4.4), squeeze=False)
    styles = _method_styles(list(table["method"]))
    for ax, metric in zip(axes[0], x_metrics):
        for row in table.itertuples():
            x, y = 100 * getattr(row, metric), 100 * row.id
            if np.isnan(x):
                continue
            ax.errorbar(x, y, xerr=100 * np.nan_to_num(getattr(row, f"{metric}_ci")),
                        yerr=100 * np.nan_to_num(row.id_ci), capsize=2, linestyle="none", label=row.method,
                        **styles[row.method])
        ax.set_xlabel(f"{METRIC_LABELS.get(metric, metric).replace(chr(10), ' ')} accuracy (%)")
        ax.set_ylabel("ID accuracy (%)")
    return _legend_outside(fig, axes[0], "method (no point: no new-class head)", title)


def _method_styles(methods):
    """{method: errorbar/plot style}: 20 distinct colours and 8 markers, so that 16 methods never share a look;
    zero-shot is a black star."""
    colors = sns.color_palette("tab20", 20)
    markers = "osD^vP<>"
    styles = {m: dict(marker=markers[i % len(markers)], ms=6, color=colors[(2 * i) % 20 + (i // 10) % 2])
              for i, m in enumerate(methods)}
    if "zeroshot" in styles:
        styles["zeroshot"] = dict(marker="*", ms=13, color="black")
    return styles


def reliability_diagram(tables, title="reliability diagram", ece=None, columns=5):
    """One panel per label of {label: lib.evaluate.reliability_table(probs, labels)} (or pooled_reliability), in
    rows of `columns`: bars of accuracy per confidence bin, the gap to the bin's mean confidence in red, the
    diagonal of perfect calibration, and the share of images per bin as a line on a second axis. ece: {label:
    value} for the panel titles (computed from the table when not given)."""
    labels = list(tables)
    ncols = min(columns, len(labels))
    nrows = -(-len(labels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols + 0.6, 3.4 * nrows + 0.4), squeeze=False,
                             sharey=True)
    panels = axes.flatten()
    shares = []
    for ax, label in zip(panels, labels):
        table = tables[label]
        width = float((table.upper - table.lower).iloc[0])
        filled = table[table["count"] > 0]
        value = ece[label] if ece else float((filled["count"] * (filled.accuracy - filled.confidence).abs()).sum()
                                             / max(1, filled["count"].sum()))
        ax.bar(filled.lower, 100 * filled.accuracy, width, align="edge", color=sns.color_palette("colorblind")[0],
               edgecolor="white", label="accuracy")
        ax.bar(filled.lower, 100 * (filled.confidence - filled.accuracy), width, bottom=100 * filled.accuracy,
               align="edge", color="tab:red", alpha=0.35, label="gap to confidence")
        ax.plot([0, 1], [0, 100], "--", color="gray", label="perfect calibration")
        share = ax.twinx()  # how many images each bin holds: a large gap in an almost empty bin matters little
        share.plot(table.lower + width / 2, 100 * table["count"] / max(1, table["count"].sum()), ".-", color="black",
                   alpha=0.5, ms=4, label="images in bin")
        share.set_ylim(0, 100)
        share.grid(False)
        last_column = ax in axes[:, -1] or ax is panels[len(labels) - 1]
        share.tick_params(labelright=last_column)
        if last_column:
            share.set_ylabel("images in bin (%)")
        shares.append(share)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 100)
        ax.set_title(f"{label}\nECE = {100 * value:.1f} %", fontsize=10)
        ax.set_xlabel("confidence (top-class probability)")
        if ax in axes[:, 0]:
            ax.set_ylabel("accuracy (%)")
    for ax in panels[len(labels):]:
        ax.set_visible(False)
    handles, names = panels[0].get_legend_handles_labels()
    share_handles, share_names = shares[0].get_legend_handles_labels()
    fig.legend(handles + share_handles, names + share_names, loc="lower center", ncol=4, fontsize=8,
               bbox_to_anchor=(0.5, -0.08 / nrows))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def change_figure(table, title="where each method changes the model"):
    """The per-block picture from lib.change.change_table: top row the relative weight change
    ||theta - theta_0|| / ||theta_0|| per residual block (log scale), bottom row the linear CKA of each block's
    output with the zero-shot model's (1 = unchanged up to rotation and scale); one column per tower, one line
    per method in its own colour and marker. The parameters outside the residual blocks (embeddings, final norm,
    projections; block -1) are the point "outside" at the left of the top row (they have no output of their own,
    so no CKA); changes below lib.change.UNMOVED (float rounding) are left out."""
    encoders = [e for e in ("image", "text") if e in set(table.encoder)]
    methods = list(dict.fromkeys(table["method"]))
    styles = _method_styles(methods)
    fig, axes = plt.subplots(2, len(encoders), figsize=(4.6 * len(encoders) + 2.2, 6.6), squeeze=False,
                             sharex="col")
    for column, encoder in enumerate(encoders):
        rows = table[table.encoder == encoder]
        moved = rows[rows.relative_change >= UNMOVED]  # float rounding of an average is not a move
        for row, (data, metric, label) in enumerate(((moved, "relative_change", "relative weight change"),
                                                      (rows[rows.block >= 0], "cka", "CKA with zero-shot output"))):
            ax = axes[row][column]
            means = data.groupby(["method", "block"], sort=False)[metric].agg(["mean", "sem", "count"])
            for method in methods:
                if method not in means.index.get_level_values("method"):
                    continue
                line = means.loc[method].sort_index()
                half = np.nan_to_num(line["sem"].to_numpy() * _t95(line["count"].to_numpy()))
                style = styles[method]
                ax.plot(line.index, line["mean"], label=method, linewidth=1.2, **style)
                low = line["mean"] - half
                if row == 0:  # a log axis: a band that reaches 0 is cut where a change stops counting as one
                    low = np.maximum(low, UNMOVED)
                ax.fill_between(line.index, low, line["mean"] + half, color=style["color"], alpha=0.12, linewidth=0)
            ax.set_ylabel(label)
            ax.set_xlabel("residual block" if row == 1 else "")
            blocks = sorted(set(rows.block))
            ax.set_xticks(blocks, ["outside" if b < 0 else str(b) for b in blocks], fontsize=8)
        axes[0][column].set_yscale("log")
        axes[0][column].set_title(f"{encoder} encoder")
    return _legend_outside(fig, axes.flat, "method", title)


def _legend_outside(fig, axes, legend_title, title):
    """One legend for all `axes`, each label once, right of the panels; the figure's title; the figure."""
    handles = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               title=legend_title)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _t95(counts):
    """The 95 % Student-t quantile for each count of seeds (NaN for one seed: no band)."""
    import scipy.stats
    counts = np.asarray(counts, dtype=float)
    return np.where(counts > 1, scipy.stats.t.ppf(0.975, np.maximum(counts - 1, 1)), np.nan)


def tradeoff_figure(points, selected, wise=None, wise_alpha=None, references=None, x_metrics=("domain_shift", "new"),
                    title="the trade-off explorer"):
    """ID accuracy against each OOD metric, as in id_ood_scatter: every stored knob value (lib.explorer.stored;
    small, one colour per knob, labelled with its value), the selected values (lib.explorer.frontier; large,
    outlined), WiSE-FT's curve over its mixing coefficient (wise: columns alpha and the metrics) with wise_alpha
    marked, and references (columns method and the metrics; zero-shot a black star)."""
    knobs = list(dict.fromkeys(list(points.get("knob", [])) + list(selected["knob"])))
    palette = dict(zip(knobs, sns.color_palette("colorblind", len(knobs))))
    fig, axes = plt.subplots(1, len(x_metrics), figsize=(6.2 * len(x_metrics), 4.6), squeeze=False)
    for ax, metric in zip(axes[0], x_metrics):
        for row in points.itertuples():
            x, y = 100 * getattr(row, metric), 100 * row.id
            ax.plot(x, y, "o", color=palette[row.knob], alpha=0.45, ms=5)
            ax.annotate(f"{row.value:g}", (x, y), textcoords="offset points", xytext=(3, -8), fontsize=6, alpha=0.7)
        for row in selected.itertuples():
            ax.plot(100 * getattr(row, metric), 100 * row.id, "o", color=palette[row.knob], ms=11,
                    markeredgecolor="black", label=f"{row.knob} = {row.value:g}")
        if wise is not None:
            curve = wise.sort_values("alpha")
            ax.plot(100 * curve[metric], 100 * curve["id"], "-", color="gray", lw=1.5, label="WiSE-FT of ft")
            if wise_alpha is not None:
                chosen = curve[curve.alpha == wise_alpha]
                ax.plot(100 * chosen[metric], 100 * chosen["id"], "D", color="gray", ms=9, markeredgecolor="black",
                        label=f"WiSE-FT alpha = {wise_alpha:g}")
        for row in ([] if references is None else references.itertuples()):
            style = dict(marker="*", ms=14, color="black") if row.method == "zeroshot" else \
                dict(marker="s", ms=8, color="dimgray")
            ax.plot(100 * getattr(row, metric), 100 * row.id, linestyle="none", label=row.method, **style)
        ax.set_xlabel(f"{METRIC_LABELS.get(metric, metric).replace(chr(10), ' ')} accuracy (%)")
        ax.set_ylabel("ID accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(title)
    fig.tight_layout()
    return fig
