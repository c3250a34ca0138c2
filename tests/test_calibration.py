"""Calibration: expected calibration error, reliability bins, temperature scaling, and ECE in evaluate."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from lib.data import ImageSet
from lib.evaluate import (class_logits, evaluate, expected_calibration_error, fit_temperature, leaders,
                          pooled_reliability, reliability_table, reliability_tables, summarize)


def brute_force_ece(probs, labels, num_bins=15):
    """The textbook loop: for each bin (lower, upper], |bin| / N * |accuracy - mean confidence|."""
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels)
    confidences = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    ece = 0.0
    for b in range(num_bins):
        lower, upper = b / num_bins, (b + 1) / num_bins
        members = [i for i in range(len(labels)) if lower < confidences[i] <= upper]
        if members:
            ece += len(members) / len(labels) * abs(correct[members].mean() - confidences[members].mean())
    return ece


@pytest.mark.parametrize("num_bins", [1, 10, 15])
def test_ece_matches_a_brute_force_loop(num_bins):
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(500, 5, generator=generator), dim=-1)
    labels = torch.randint(0, 5, (500,), generator=generator)
    assert expected_calibration_error(probs, labels, num_bins) == pytest.approx(brute_force_ece(probs, labels, num_bins))
    table = reliability_table(probs, labels, num_bins)
    filled = table[table["count"] > 0]
    assert table["count"].sum() == 500
    assert (filled["count"] * (filled.accuracy - filled.confidence).abs()).sum() / 500 == pytest.approx(
        brute_force_ece(probs, labels, num_bins))


def test_ece_bin_edges_are_half_open_on_the_left():
    # Confidence exactly 0.5 (a float) belongs to the bin (0.4, 0.5] with 10 bins, as in the brute-force loop.
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25], [0.55, 0.25, 0.2]])
    labels = torch.tensor([0, 1, 0])
    assert expected_calibration_error(probs, labels, 10) == pytest.approx(brute_force_ece(probs, labels, 10))
    assert reliability_table(probs, labels, 10)["count"].tolist() == [0, 0, 0, 0, 2, 1, 0, 0, 0, 0]


def test_perfect_calibration_gives_ece_near_zero():
    # Labels drawn from the predicted distribution itself: calibrated by construction.
    generator = torch.Generator().manual_seed(1)
    probs = torch.softmax(2 * torch.randn(200_000, 4, generator=generator), dim=-1)
    labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    assert expected_calibration_error(probs, labels) < 0.01


def test_overconfident_case_has_its_closed_form_ece():
    # Every prediction has confidence 0.9 and accuracy 0.6: one filled bin, ECE = |0.6 - 0.9| = 0.3.
    probs = torch.tensor([[0.9, 0.1]] * 10)
    labels = torch.tensor([0] * 6 + [1] * 4)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.3)
    # Two confidence levels in two bins: 0.5 * |1.0 - 0.95| + 0.5 * |0.0 - 0.7| = 0.375.
    probs = torch.tensor([[0.95, 0.05]] * 4 + [[0.7, 0.3]] * 4)
    labels = torch.tensor([0] * 4 + [1] * 4)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.375)
    assert np.isnan(expected_calibration_error(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)))


def test_temperature_scaling_recovers_a_known_temperature():
    generator = torch.Generator().manual_seed(2)
    true_temperature = 2.5
    logits = 4 * torch.randn(20_000, 6, generator=generator)
    labels = torch.multinomial(torch.softmax(logits / true_temperature, dim=-1), 1, generator=generator).squeeze(1)
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(true_temperature, rel=0.05)
    before = expected_calibration_error(torch.softmax(logits, -1), labels)
    after = expected_calibration_error(torch.softmax(logits / temperature, -1), labels)
    assert after < 0.02 < before


def test_evaluate_reports_ece_per_domain_and_group_from_the_heads_logits(fixed_features):
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(60, 4, generator=generator)
    labels = torch.randint(0, 4, (60,), generator=generator)
    domains = ["a"] * 35 + ["b"] * 25
    classnames = ["w", "x", "y", "z"]
    data = ImageSet(images=features, labels=labels, classnames=classnames, domains=domains)
    weight = 5 * torch.randn(4, 4, generator=generator)

    def head(image_features, class_ids):
        if class_ids == [3]:
            raise KeyError(3)
        return image_features @ weight[class_ids].T

    groups = {"first": ["w", "x", "y"], "second": ["z"]}
    results = evaluate(fixed_features(), None, data, groups=groups, head=head, temperature=2.0, method="m")
    assert list(results.columns) == ["method", "domain", "group", "n", "accuracy", "ece"]
    normalized = torch.nn.functional.normalize(features, dim=-1)
    for row in results.itertuples():
        if row.group == "second":
            assert np.isnan(row.accuracy) and np.isnan(row.ece)
            continue
        idx = [i for i in range(60) if domains[i] == row.domain and classnames[labels[i]] in groups[row.group]]
        logits = normalized[idx] @ weight[:3].T
        expected = brute_force_ece(torch.softmax(logits / 2.0, -1), labels[idx].numpy())
        assert row.ece == pytest.approx(expected)
    logits, local = class_logits(fixed_features(), None, data, ["w", "x", "y"], head=head)
    assert logits.shape == (len(local), 3) and int(local.max()) <= 2


def test_evaluate_text_head_uses_the_models_logit_scale(monkeypatch, fixed_features):
    import lib.evaluate
    text = torch.nn.functional.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(4)), dim=-1)
    monkeypatch.setattr(lib.evaluate, "zeroshot_head", lambda model, tokenizer, classes, templates: text)
    features = torch.randn(30, 4, generator=torch.Generator().manual_seed(5))
    labels = torch.arange(30) % 3
    data = ImageSet(images=features, labels=labels, classnames=["a", "b", "c"], domains=["d"] * 30)
    results = evaluate(fixed_features(scale=7.0), None, data)
    probs = torch.softmax(7.0 * torch.nn.functional.normalize(features, dim=-1) @ text.T, -1)
    assert results.ece.item() == pytest.approx(brute_force_ece(probs, labels))
    assert results.accuracy.item() == pytest.approx(float((probs.argmax(-1) == labels).double().mean()))


def test_stored_bins_pool_domains_exactly_and_scaled_ece_is_the_ece_at_that_temperature(fixed_features):
    """The runner stores bin sums per (domain, group) row; pooling rows must give the reliability table of all
    their images together, and ece_scaled the ECE after temperature scaling, both against direct computations."""
    generator = torch.Generator().manual_seed(8)
    features = torch.randn(90, 3, generator=generator)
    labels = torch.randint(0, 3, (90,), generator=generator)
    domains = ["a"] * 40 + ["b"] * 30 + ["c"] * 20
    data = ImageSet(images=features, labels=labels, classnames=["x", "y", "z"], domains=domains)
    weight = 4 * torch.randn(3, 3, generator=generator)

    def head(image_features, class_ids):
        return image_features @ weight.T

    results = evaluate(fixed_features(), None, data, head=head, scaled_temperature=2.5, reliability=True)
    probs = torch.softmax(torch.nn.functional.normalize(features, dim=-1).double() @ weight.double().T, -1)
    shifted = np.array([d != "a" for d in domains])
    pooled = pooled_reliability(results[results.domain != "a"])
    direct = reliability_table(probs[shifted], labels[shifted])
    assert pooled["count"].tolist() == direct["count"].tolist() and pooled["count"].sum() == 50
    filled = direct["count"] > 0
    np.testing.assert_allclose(pooled.confidence[filled], direct.confidence[filled], atol=1e-5)
    np.testing.assert_allclose(pooled.accuracy[filled], direct.accuracy[filled], atol=1e-12)
    pooled_ece = (pooled["count"] * (pooled.accuracy - pooled.confidence).abs()).sum() / pooled["count"].sum()
    assert pooled_ece == pytest.approx(brute_force_ece(probs[shifted], labels[shifted].numpy()), abs=1e-5)
    for row in results.itertuples():
        here = np.array([d == row.domain for d in domains])
        scaled = torch.softmax(torch.log(probs[here]) / 2.5, -1)
        assert row.ece_scaled == pytest.approx(brute_force_ece(scaled, labels[here].numpy()))
    with pytest.raises(ValueError, match="no reliability bins"):
        pooled_reliability(results.drop(columns="bin_count"))


def test_summarize_adds_ece_summaries_only_when_present():
    rows = [{"method": "ft", "seed": 0, "domain": d, "group": g, "n": 5, "accuracy": 0.5, "ece": e}
            for (d, g, e) in [("photo", "base", 0.1), ("sketch", "base", 0.2), ("paint", "base", 0.4),
                              ("photo", "new", 0.3), ("sketch", "new", 0.5), ("paint", "new", 0.7)]]
    summary = summarize(pd.DataFrame(rows), train_domains=["photo"]).iloc[0]
    assert summary.id_ece == pytest.approx(0.1)
    assert summary.domain_shift_ece == pytest.approx(0.3)
    assert summary.new_ece == pytest.approx(0.5)
    old = summarize(pd.DataFrame(rows).drop(columns="ece"), train_domains=["photo"])
    assert "id_ece" not in old.columns


def test_reliability_diagram_has_titles_labels_and_a_legend():
    from lib import plots
    generator = torch.Generator().manual_seed(6)
    logits = 3 * torch.randn(500, 4, generator=generator)
    labels = torch.randint(0, 4, (500,), generator=generator)
    tables = {"ft": reliability_table(torch.softmax(logits, -1), labels),
              "ft + T": reliability_table(torch.softmax(logits / 3, -1), labels)}
    fig = plots.reliability_diagram(tables, title="calibration")
    panels = [ax for ax in fig.axes if ax.get_xlabel()]
    assert len(panels) == 2 and fig._suptitle.get_text() == "calibration"
    expected = expected_calibration_error(torch.softmax(logits, -1), labels)
    assert f"{100 * expected:.1f} %" in panels[0].get_title()
    assert panels[0].get_ylabel() == "accuracy (%)" and fig.legends
    plots.plt.close(fig)


def test_reliability_tables_pool_the_rows_of_each_part_of_the_protocol():
    rows = []
    for method, seed, domain, group, count in [("a", 0, "photo", "base", 3), ("a", 1, "photo", "base", 4),
                                               ("a", 0, "sketch", "base", 5), ("a", 0, "sketch", "new", 7),
                                               ("b", 0, "sketch", "base", 2)]:
        bins = [0] * 15
        bins[-1] = count
        rows.append({"method": method, "seed": seed, "domain": domain, "group": group, "n": count,
                     "bin_count": json.dumps(bins), "bin_confidence_sum": json.dumps([b * 0.99 for b in bins]),
                     "bin_correct_sum": json.dumps([b // 2 for b in bins])})
    results = pd.DataFrame(rows)
    counts = {part: {m: int(t["count"].sum()) for m, t in reliability_tables(results, ["photo"], part).items()}
              for part in ("id", "domain_shift", "new")}
    assert counts == {"id": {"a": 7}, "domain_shift": {"a": 5, "b": 2}, "new": {"a": 7}}
    assert reliability_tables(results, ["photo"], "id")["a"].accuracy.iloc[-1] == pytest.approx((1 + 2) / 7)


def test_leaders_names_the_best_the_methods_the_seeds_cannot_tell_apart_and_the_worst():
    values = {"a": [0.10, 0.11, 0.12], "b": [0.105, 0.12, 0.114], "c": [0.30, 0.31, 0.33], "d": [0.14, 0.15, 0.16]}
    summary = pd.DataFrame([{"method": m, "seed": s, "domain_shift_ece": v[s]} for m, v in values.items()
                            for s in range(3)])
    text = leaders(summary, "domain_shift_ece").data
    assert "best: `a` 11.0 ± 2.5" in text and "ECE under domain shift" in text
    assert "it (paired by seed, the 95 % CI of the difference includes 0): `b` 11.3" in text
    assert "`d`" not in text.split("worst")[0].split("includes 0)")[1]  # d is worse than a at every seed
    assert "worst: `c` 31.3" in text
    assert "best: `c`" in leaders(summary, "domain_shift_ece", lower_is_better=False).data
