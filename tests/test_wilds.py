"""WILDS iWildCam and FMoW (lib.data.wilds) on fabricated copies of their releases, and their metrics."""
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FMOW_REGIONS, FMOW_ROWS, make_wilds_copy
from PIL import Image
from sklearn.metrics import f1_score

from lib.data import load_benchmark, wilds
from lib.evaluate import evaluate, macro_f1, summarize, worst_group_accuracy


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_wilds_copy(tmp_path_factory.mktemp("wilds"))


def _row(path):
    """The metadata row of a fabricated FMoW image, from its pixels (red + 256 * green)."""
    red, green, _ = Image.open(path).getpixel((0, 0))
    return red + 256 * green


def test_fmow_splits_follow_wilds_time_after_2016(root):
    table = wilds.read_table("FMoW", root)
    expected = {i: split for i, (_, _, _, split) in enumerate(FMOW_ROWS) if split is not None}
    fabricated = dict(zip([int(Path(p).stem.split("_")[-1]) for p in table.path], table.split))
    assert {i: s for i, s in fabricated.items() if i < len(FMOW_ROWS)} == expected
    assert all(s == "train" for i, s in fabricated.items() if i >= len(FMOW_ROWS))  # the per-class train rows
    for path, region in zip(table.path, table.region):  # the image of a row is rgb_img_<row>.png (seq rows counted)
        row = _row(path)
        assert row == int(Path(path).stem.split("_")[-1])
        if row < len(FMOW_ROWS):
            assert region == FMOW_REGIONS.get(FMOW_ROWS[row][2], "Other")
    assert set(table.label) == set(range(62))


def test_fmow_benchmark_domains_classes_and_groups(root):
    bench = load_benchmark("FMoW", root, train_domains=["id"], n_train_per_class=None, n_test_per_class=None)
    assert len(bench.base_classes) == 62 and bench.new_classes == [] and list(bench.groups) == ["base"]
    assert bench.base_classes[:3] == ["airport", "airport hangar", "airport terminal"]
    assert wilds.TEMPLATES["FMoW"] == ("a centered satellite photo of {}.",)
    assert wilds.TEMPLATES["iWildCam"] == ("this is a photo of {}.",)
    split = bench.test.metadata["split"]
    assert list(np.array(bench.test.domains)[split == "test"]) == ["ood"] * 4
    assert list(np.array(bench.test.domains)[split == "id_test"]) == ["id"] * 2
    assert set(bench.validation.metadata["split"]) == {"id_val"} and len(bench.train) == 4 + 62
    assert bench.metrics == ("worst_region_accuracy",)
    for image, label in zip(bench.test.images, bench.test.labels):  # the label of row i is category i % 62
        assert _row(image) % 62 == label


def test_iwildcam_splits_labels_and_locations(root):
    bench = load_benchmark("iWildCam", root, train_domains=["id"], n_train_per_class=None, n_test_per_class=None)
    assert len(wilds.IWILDCAM_CLASSES) == 182 and bench.base_classes[0] == "empty"
    for part, splits in ((bench.train, {"train"}), (bench.validation, {"id_val"}), (bench.test, {"id_test", "test"})):
        for path, label, domain, split, location in zip(part.images, part.labels.tolist(), part.domains,
                                                         part.metadata["split"], part.metadata["location"]):
            truth_split, truth_label, truth_location, _ = Path(path).stem.rsplit("_", 3)
            assert (split, label, location) == (truth_split, int(truth_label), int(truth_location))
            assert split in splits and domain == ("ood" if split == "test" else "id")
    assert len(bench.train) == 182 and bench.metrics == ("macro_f1",)


def test_fractions_caps_and_group_balanced_weights(root):
    def bench(**options):
        return load_benchmark("iWildCam", root, train_domains=["id"], n_train_per_class=None, n_test_per_class=1,
                              **options)
    assert len(bench(fraction=0.1).train) == round(0.1 * 182) and len(bench(fraction=0).train) == 0
    capped = bench()
    assert max(np.bincount(capped.test.labels[np.array(capped.test.domains) == "ood"])) == 1
    weights, locations = capped.train.metadata["weight"], capped.train.metadata["location"]
    for location in set(locations):  # every location's weights sum to 1: each equally likely per draw
        assert weights[locations == location].sum() == pytest.approx(1.0)
    assert "weight" not in bench(group_balanced=False).train.metadata


def test_group_balanced_batches_draw_every_group_equally(root):
    from lib.train import _batches
    part = load_benchmark("iWildCam", root, train_domains=["id"], n_train_per_class=None,
                          n_test_per_class=1).train.subset(list(range(120)))  # locations of 40 images each
    keep = [i for i in range(120) if part.metadata["location"][i] != 0 or i % 10 == 0]  # few of location 0
    part = part.subset(keep)
    part.metadata["weight"] = wilds.group_weights(part.metadata["location"])
    part = part.with_transform(lambda image: torch.zeros(1))
    counts = np.bincount(part.metadata["location"], minlength=3)
    assert counts[0] < counts[1] / 5  # the fabricated subset is far from balanced
    drawn = np.concatenate([part.metadata["location"][indices.numpy()]
                            for _, _, indices in itertools.islice(_batches(part, 50, 0, 0), 60)])
    shares = np.bincount(drawn, minlength=3) / len(drawn)
    assert np.allclose(shares, 1 / 3, atol=0.03)


def test_macro_f1_is_over_the_labels_present():
    rng = np.random.default_rng(0)
    labels, predictions = rng.integers(0, 5, 200), rng.integers(0, 7, 200)  # 5 and 6 are predicted, never true
    by_hand = []
    for c in np.unique(labels):
        tp = np.sum((predictions == c) & (labels == c))
        precision, recall = tp / max(1, np.sum(predictions == c)), tp / np.sum(labels == c)
        by_hand.append(0 if tp == 0 else 2 * precision * recall / (precision + recall))
    assert macro_f1(predictions, labels) == pytest.approx(np.mean(by_hand))
    assert macro_f1(predictions, labels) != pytest.approx(f1_score(labels, predictions, average="macro"))


def test_worst_region_accuracy_through_evaluate_equals_a_brute_force(root, fixed_features):
    bench = load_benchmark("FMoW", root, train_domains=["id"], n_train_per_class=None, n_test_per_class=None)
    # Features: a one-hot of row % 61 (not 62), so that some rows are right and others wrong.
    test = bench.test.with_transform(lambda image: torch.nn.functional.one_hot(torch.tensor(_row_of(image) % 61), 62)
                                     .float())
    rows = evaluate(fixed_features(), None, test, groups=bench.groups, head=lambda features, classes: features,
                    metrics=bench.metrics)
    for domain, row in rows.set_index("domain").iterrows():
        accuracy = {}
        for path, label, region, d in zip(test.images, test.labels.tolist(), test.metadata["region"], test.domains):
            if d == domain and region != "Other":
                accuracy.setdefault(region, []).append(_row(path) % 61 == label)
        assert row.worst_region_accuracy == pytest.approx(min(np.mean(v) for v in accuracy.values()))
    summary = summarize(rows.assign(method="m", seed=0), bench.train_domains)
    assert summary.domain_shift_worst_region_accuracy[0] == rows.set_index("domain").worst_region_accuracy["ood"]
    rng = np.random.default_rng(1)
    predictions, labels, groups = rng.integers(0, 3, 90), rng.integers(0, 3, 90), rng.choice(["a", "b", "Other"], 90)
    brute = min(np.mean(predictions[groups == g] == labels[groups == g]) for g in ("a", "b"))
    assert worst_group_accuracy(predictions, labels, groups, exclude=("Other",)) == pytest.approx(brute)


def _row_of(image):
    red, green, _ = image.getpixel((0, 0))
    return red + 256 * green


def test_wilds_errors_say_what_to_do(tmp_path, root):
    with pytest.raises(FileNotFoundError, match="fmow_v1.1"):
        load_benchmark("FMoW", tmp_path, train_domains=["id"])
    with pytest.raises(ValueError, match=r"\['id'\]"):
        load_benchmark("FMoW", root, train_domains=["photo"])
    with pytest.raises(ValueError, match="fraction"):
        load_benchmark("shapeworld", train_domains=["photo"], fraction=0.5)
    with pytest.raises(ValueError, match=r"no dataset option\(s\) \['fraction'\].*its options are \[.*'protocol'"):
        load_benchmark("PACS", root, train_domains=["photo"], fraction=0.5)


def test_splits_equal_the_wilds_package(root):
    """Optional: the `wilds` package's own splits of the same fabricated copies (skipped when it is not installed)."""
    pytest.importorskip("wilds")
    from wilds import get_dataset
    for name, dataset in (("iwildcam", "iWildCam"), ("fmow", "FMoW")):
        theirs = get_dataset(dataset=name, root_dir=str(root), download=False)
        table = wilds.read_table(dataset, root)
        for split in ("train", "id_val", "id_test", "val", "test"):
            subset = theirs.get_subset(split)
            ours = table[table.split == split]
            images = ([f"rgb_img_{i}.png" for i in theirs.full_idxs[subset.indices]] if name == "fmow"
                      else list(theirs._input_array[subset.indices]))
            assert images == [Path(p).name for p in ours.path] and len(images) > 0
            assert subset.y_array.tolist() == ours.label.tolist()
