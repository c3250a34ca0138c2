import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from lib.data import ImageSet
from lib.evaluate import confidence_interval, evaluate, harmonic_mean, summarize, with_ci


def test_evaluate_matches_a_hand_count(fixed_features):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(40, 4, generator=generator)
    labels = torch.randint(0, 4, (40,), generator=generator)
    domains = ["a"] * 25 + ["b"] * 15
    data = ImageSet(images=features, labels=labels, classnames=["w", "x", "y", "z"], domains=domains)
    weight = torch.randn(4, 4, generator=generator)

    def head(image_features, class_ids):
        return image_features @ weight[class_ids].T

    groups = {"first": ["w", "x"], "second": ["y", "z"]}
    results = evaluate(fixed_features(), None, data, groups=groups, head=head, method="m", seed=3)
    assert set(results.columns) >= {"method", "seed", "domain", "group", "n", "accuracy"}
    normalized = torch.nn.functional.normalize(features, dim=-1)
    for row in results.itertuples():
        classes = groups[row.group]
        idx = [i for i in range(40) if domains[i] == row.domain and data.classnames[labels[i]] in classes]
        correct = 0
        for i in idx:
            scores = [float(normalized[i] @ weight[data.classnames.index(c)]) for c in classes]
            correct += classes[int(np.argmax(scores))] == data.classnames[labels[i]]
        assert row.n == len(idx)
        assert row.accuracy == pytest.approx(correct / len(idx))
        assert row.method == "m" and row.seed == 3


def test_a_head_without_the_classes_gives_nan(fixed_features):
    data = ImageSet(images=torch.randn(6, 3), labels=torch.tensor([0, 1, 2, 0, 1, 2]), classnames=["a", "b", "c"],
                    domains=["d"] * 6)

    def head(image_features, class_ids):
        if 2 in class_ids:
            raise KeyError(2)
        return image_features[:, :len(class_ids)]

    results = evaluate(fixed_features(), None, data, groups={"known": ["a", "b"], "unknown": ["c"]}, head=head)
    assert results.set_index("group").accuracy.isna().tolist() == [False, True]


def test_group_with_unknown_classes_is_rejected(fixed_features):
    data = ImageSet(images=torch.randn(2, 3), labels=torch.tensor([0, 1]), classnames=["a", "b"], domains=["d"] * 2)
    with pytest.raises(ValueError, match="does not have"):
        evaluate(fixed_features(), None, data, groups={"g": ["a", "zebra"]}, head=lambda f, c: f[:, :len(c)])


def test_summarize_by_hand():
    rows = []
    accuracy = {("photo", "base"): 0.9, ("sketch", "base"): 0.5, ("paint", "base"): 0.3,
                ("photo", "new"): 0.6, ("sketch", "new"): 0.4, ("paint", "new"): 0.2}
    for seed in (0, 1):
        for (domain, group), value in accuracy.items():
            rows.append({"method": "ft", "seed": seed, "domain": domain, "group": group, "n": 10,
                         "accuracy": value + seed * 0.01})
    summary = summarize(pd.concat([pd.DataFrame(rows[:6]), pd.DataFrame(rows[6:])]), train_domains=["photo"])
    first = summary.iloc[0]
    assert first.id == pytest.approx(0.9)
    assert first.domain_shift == pytest.approx(0.4)
    assert first.new == pytest.approx(0.4)
    assert first.base == pytest.approx(1.7 / 3)
    assert first.hm == pytest.approx(2 * (1.7 / 3) * 0.4 / (1.7 / 3 + 0.4))
    assert summary.seed.tolist() == [0, 1]
    table = with_ci(summary)
    assert table.loc[0, "id"] == pytest.approx(0.905)
    assert table.loc[0, "seeds"] == 2


def test_confidence_interval_is_students_t():
    values = [0.61, 0.65, 0.58, 0.7]
    mean, half = confidence_interval(values)
    low, high = scipy.stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=scipy.stats.sem(values))
    assert mean == pytest.approx(np.mean(values))
    assert half == pytest.approx((high - low) / 2)
    assert np.isnan(confidence_interval([0.5])[1])
    assert harmonic_mean(0.8, 0.4) == pytest.approx(2 * 0.8 * 0.4 / 1.2)


def test_takeaway_renders_the_paired_differences_of_the_table():
    from lib.evaluate import paired_differences, takeaway
    summary = pd.DataFrame({"method": ["ft"] * 3 + ["clipood"] * 3, "seed": [0, 1, 2] * 2,
                            "id": [0.80, 0.82, 0.84, 0.79, 0.80, 0.84], "new": [0.50, 0.52, 0.54, 0.62, 0.66, 0.64]})
    differences = paired_differences(summary, "clipood", "ft", metrics=("id", "new"))
    assert differences["new"][0] == pytest.approx(12.0) and differences["id"][0] == pytest.approx(-1.0)
    assert differences["new"][1] == pytest.approx(confidence_interval([12, 14, 10])[1])
    text = takeaway(summary, [("clipood", "ft")], metrics=("id", "new")).data
    assert "`clipood` against `ft`: -1.0 ± " in text and "+12.0 ± 5.0 on new classes" in text and "3 seeds" in text
    one_seed = takeaway(summary[summary.seed == 0], [("clipood", "ft")], metrics=("new",)).data
    assert "+12.0 on new classes" in one_seed and "±" not in one_seed.split(":", 1)[1].split("\n", 2)[2]
