"""The papers' benchmarks on tiny fabricated copies (tests/fabricate.py): the ImageNet family, CoOp's split files
and protocols, DomainBed's leave-one-domain-out and in-the-wild protocols, cross-dataset evaluation, classes by
id end to end, and the runner on each."""
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import lib.evaluate
from lib import runner
from lib.data import ImageSet, imagenet, load_benchmark
from lib.evaluate import class_logits, evaluate, leave_one_domain_out
from lib.methods import LinearHead

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fabricate  # noqa: E402 (the tests folder is not a package)

NAMES = imagenet.classnames()


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    """The ImageNet family, and EuroSAT beside it for cross-dataset evaluation."""
    root = fabricate.imagenet(tmp_path_factory.mktemp("data"))
    return fabricate.coop_dataset(root, "EuroSAT", ["Forest", "River", "Sea or Lake"], per_split=(1, 1, 2))


@pytest.fixture(scope="module")
def bench(imagenet_root):
    return load_benchmark("ImageNet", imagenet_root, ["imagenet"], 2, None, partial=True, progress=False)


def test_every_label_of_every_imagenet_test_domain_is_the_files_class(bench):
    assert bench.domains == ["imagenet", "imagenet-v2", "imagenet-sketch", "imagenet-a", "imagenet-r", "objectnet"]
    for part in (bench.train, bench.validation, bench.test):
        truth = [fabricate.true_class(p) for p in part.images]
        assert [part.ids[y] for y in part.labels.tolist()] == truth
    v2 = [fabricate.true_class(p) for p, d in zip(bench.test.images, bench.test.domains) if d == "imagenet-v2"]
    assert {2, 10} <= set(v2)  # V2's folders "10" and "2" are classes 10 and 2, whatever their sorted order
    for label, domain in zip(bench.test.labels.tolist(), bench.test.domains):
        assert (label >= 1000) == (domain == "objectnet")
        assert bench.test.classnames[label] == (NAMES[label] if label < 1000 else
                                                {1000: "alarm clock", 1001: "sunglasses"}[label])
    assert set(fabricate.true_class(p) for p in bench.test.images) - set(range(1002)) == set()  # unmapped: left out
    objectnet = bench.test.domains.index("objectnet")
    framed = bench.test.load(objectnet)
    # ObjectNet's 2-pixel frame is cut
    assert framed.size == (8, 8) and [255, 255, 255] not in np.asarray(framed).reshape(-1, 3).tolist()
    assert np.bincount([y for y in bench.train.labels.tolist()]).max() == 2  # n_train_per_class shots


def test_an_absent_variant_is_left_out_with_a_word_unless_asked_for_and_counts_are_checked(tmp_path):
    root = fabricate.imagenet(tmp_path, ids=(1, 2), per_class=1, variants=("imagenet",))
    with pytest.warns(UserWarning, match="left out the test domain"):
        bench = load_benchmark("ImageNet", root, ["imagenet"], 1, None, partial=True, progress=False)
    assert bench.domains == ["imagenet"]
    with pytest.raises(FileNotFoundError, match="imagenet-adversarial/imagenet-a"):
        load_benchmark("ImageNet", root, ["imagenet"], 1, None, partial=True, variants=["imagenet-a"])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"train has 6 images, not 1281167.*partial=True"):
        load_benchmark("ImageNet", root, ["imagenet"], 1, None)
    with pytest.raises(ValueError, match=r"train_domains must be \['imagenet'\]"):
        load_benchmark("ImageNet", root, ["photo"], 1, None, partial=True)


def _tensors(bench):
    return bench.test.with_transform(TF.to_tensor)


def test_duplicate_imagenet_names_stay_two_classes_end_to_end(bench):
    assert NAMES[657] == NAMES[744] == "missile" and NAMES[836] == NAMES[837] == "sunglasses"
    test = _tensors(bench)
    twins = test.where(domains=["imagenet"], classes=[657, 744, 836, 837])
    oracle = LinearHead(torch.eye(1200)[:1000], torch.zeros(1000), range(1000))
    results = evaluate(fabricate.PixelOracle(), None, twins, groups={"all": list(range(1000))}, head=oracle)
    assert results.n.item() == len(twins) == 4 * 3 and results.accuracy.item() == 1.0  # both twins counted right
    for pair in ((657, 744), (836, 837)):
        both = evaluate(fabricate.PixelOracle(), None, twins, groups={"pair": list(pair)}, head=oracle)
        assert both.n.item() == 6 and both.accuracy.item() == 1.0
    with pytest.raises(ValueError, match="2 classes are named 'missile'"):
        evaluate(fabricate.PixelOracle(), None, twins, groups={"g": ["missile"]}, head=oracle)
    part = bench.train.relabel([744, 657])
    assert part.classnames == ["missile", "missile"] and part.ids == [744, 657]
    assert [part.ids[y] for y in part.labels.tolist()] == [fabricate.true_class(p) for p in part.images]


class RandomFeatures(torch.nn.Module):
    """Features that carry each image's class (PixelOracle's one-hot) through a fixed random map, plus noise."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.map = torch.randn(1200, 16, generator=generator)
        self.logit_scale = torch.nn.Parameter(torch.tensor(3.0))

    def encode_image(self, images, normalize=True):
        noise = torch.randn(len(images), self.map.shape[1], generator=torch.Generator().manual_seed(len(images)))
        return torch.nn.functional.normalize(fabricate.PixelOracle().encode_image(images) @ self.map + noise, dim=-1)


@pytest.mark.parametrize("kind", ["text", "linear"])
def test_subsets_and_objectnet_match_a_brute_force_masked_argmax(monkeypatch, bench, kind):
    model, test = RandomFeatures(), _tensors(bench)
    generator = torch.Generator().manual_seed(1)
    columns = model.map[:1000] + 0.8 * torch.randn(1000, 16, generator=generator)  # class c's head row
    if kind == "text":  # a text head: one row per distinct name (the twins share one), CLIP's scale
        by_name = {name: torch.nn.functional.normalize(columns[NAMES.index(name)], dim=0) for name in set(NAMES)}
        monkeypatch.setattr(lib.evaluate, "zeroshot_head", lambda m, t, names, templates: torch.stack(
            [by_name[n] for n in names]))
        weight, bias, head = torch.stack([by_name[n] for n in NAMES]) * math.exp(3.0), torch.zeros(1000), None
    else:
        weight, bias = columns, 0.1 * torch.randn(1000, generator=generator)
        head = LinearHead(weight, bias, range(1000))
    results = evaluate(model, None, test, groups=bench.groups, head=head, templates=["{}"],
                       classification=bench.classification)
    features = model.encode_image(torch.stack([test[i][0] for i in range(len(test))]))
    logits = features @ weight.T + bias  # every image against all 1000 ImageNet classes
    subsets = {"imagenet-a": imagenet.SUBSETS["imagenet-a"], "imagenet-r": imagenet.SUBSETS["imagenet-r"]}
    mapped = {1000: [409], 1001: [836, 837]}
    for domain in bench.domains:
        idx = [i for i, d in enumerate(test.domains) if d == domain]
        if domain == "objectnet":  # each ObjectNet class: the max over its ImageNet columns
            projected = torch.stack([logits[idx][:, mapped[c]].amax(-1) for c in sorted(mapped)], -1)
            predicted = torch.tensor(sorted(mapped))[projected.argmax(-1)]
        else:
            mask = torch.full((1000,), -math.inf)
            allowed = [imagenet.WNIDS.index(w) for w in subsets[domain]] if domain in subsets else range(1000)
            mask[list(allowed)] = 0
            predicted = (logits[idx] + mask).argmax(-1)
        expected = (predicted == test.labels[idx]).double().mean().item()
        row = results[results.domain == domain].iloc[0]
        assert row.n == len(idx) and row.accuracy == pytest.approx(expected)
    assert set(results.group) == {"base"} and len(results) == len(bench.domains)


def _coop_names():
    return ["zebra", "apple", "mango", "kiwi", "banana"]  # odd, and not alphabetical


def test_coop_base_to_new_takes_the_first_ceil_half_of_label_ids_and_draws_shots_per_class(tmp_path):
    root = fabricate.coop_dataset(tmp_path, "DTD", _coop_names(), per_split=(5, 6, 2))
    split = root / "dtd" / "split_zhou_DescribableTextures.json"
    items = pd.read_json(split, typ="series")
    items["train"] = [item for item in items["train"] if item[1] != 1 or item[0].endswith("train0.png")]
    split.write_text(items.to_json())  # "apple" keeps one training image
    bench = load_benchmark("DTD", root, ["DTD"], 3, None, partial=True, progress=False)
    assert bench.base_classes == ["zebra", "apple", "mango"] and bench.new_classes == ["kiwi", "banana"]
    assert bench.groups == {"base": [0, 1, 2], "new": [3, 4]} and bench.templates == ("{} texture.",)
    counts = np.bincount(bench.train.labels.numpy(), minlength=3).tolist()
    assert counts == [3, 1, 3]  # k shots per class; a class with fewer keeps all
    assert np.bincount(bench.validation.labels.numpy()).tolist() == [3] * 3  # min(shots, 4) from val
    for part in (bench.train, bench.validation, bench.test):
        assert [part.ids[y] for y in part.labels.tolist()] == [fabricate.true_class(p) for p in part.images]
    other_seed = load_benchmark("DTD", root, ["DTD"], 3, None, seed=1, partial=True, progress=False)
    assert other_seed.train.images != bench.train.images  # drawn per seed
    with pytest.raises(ValueError, match=r"train/val/test have \(21, 30, 10\) images, not \(2820, 1128, 1692\)"):
        load_benchmark("DTD", root, ["DTD"], 3, None)


def test_fgvc_aircraft_reads_its_variant_files(tmp_path):
    root = fabricate.coop_dataset(tmp_path, "FGVCAircraft", ["707-320", "A300B4", "727-200"], per_split=(2, 1, 1))
    bench = load_benchmark("FGVCAircraft", root, ["FGVCAircraft"], None, None, partial=True, progress=False)
    assert bench.base_classes == ["707-320", "A300B4"] and bench.new_classes == ["727-200"]
    assert [bench.test.ids[y] for y in bench.test.labels.tolist()] == [fabricate.true_class(p)
                                                                       for p in bench.test.images]


def test_leave_one_domain_out_trains_on_all_classes_of_the_other_domains_and_averages_targets(tmp_path):
    root = fabricate.domainbed(tmp_path, "Toy", ["art", "photo", "sketch"], ["b", "a", "c"], per_class=5)
    bench = load_benchmark("Toy", root, ["art", "photo"], None, None, progress=False,
                           protocol="leave-one-domain-out")
    assert bench.groups == {"base": [0, 1, 2]} and set(bench.train.domains) == {"art", "photo"}
    assert len(bench.test) == 3 * 3 * 1 and set(bench.test.domains) == {"art", "photo", "sketch"}
    with pytest.raises(ValueError, match="every domain but one"):
        load_benchmark("Toy", root, ["art"], None, None, progress=False, protocol="leave-one-domain-out")
    rows = []
    for trained, accuracies in (("art+photo", (0.9, 0.8, 0.5)), ("art+sketch", (0.7, 0.4, 0.6)),
                                ("photo+sketch", (0.2, 0.3, 0.1))):
        rows += [dict(method="ft", seed=0, train_domains=trained, group="base", domain=d, accuracy=a)
                 for d, a in zip(("art", "photo", "sketch"), accuracies)]
    table = leave_one_domain_out(pd.DataFrame(rows)).iloc[0]
    assert (table.art, table.photo, table.sketch) == (0.2, 0.4, 0.5)
    assert table.average == pytest.approx((0.2 + 0.4 + 0.5) / 3)


def test_in_the_wild_classifies_base_and_new_among_both_and_separate_among_their_own(tmp_path, monkeypatch):
    root = fabricate.domainbed(tmp_path, "Toy", ["art", "photo"], ["a", "b", "c", "d", "e"], per_class=6)
    wild = load_benchmark("Toy", root, ["art"], 2, None, progress=False, protocol="in-the-wild")
    separate = load_benchmark("Toy", root, ["art"], 2, None, progress=False)
    assert wild.groups == {"base": [0, 1], "new": [2, 3, 4]}  # floor(5 / 2) base classes
    assert separate.groups == {"base": [0, 1, 2], "new": [3, 4]}  # ceil
    text = torch.nn.functional.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(2)), dim=-1)
    names = wild.test.classnames
    monkeypatch.setattr(lib.evaluate, "zeroshot_head",
                        lambda m, t, classes, templates: text[[names.index(c) for c in classes]])
    model = RandomFeatures()
    model.map = torch.randn(1200, 8, generator=torch.Generator().manual_seed(3))
    test = _tensors(wild)
    features = model.encode_image(torch.stack([test[i][0] for i in range(len(test))]))
    logits = features @ text.T
    for bench, joint in ((wild, True), (separate, False)):
        results = evaluate(model, None, test, groups=bench.groups, classification=bench.classification)
        for row in results.itertuples():
            members = bench.groups[row.group]
            among = list(range(5)) if joint else members
            idx = [i for i, (d, y) in enumerate(zip(test.domains, test.labels.tolist()))
                   if d == row.domain and y in members]
            predicted = torch.tensor(among)[logits[idx][:, among].argmax(-1)]
            assert row.accuracy == pytest.approx((predicted == test.labels[idx]).double().mean().item())


def test_cross_dataset_adds_each_datasets_test_images_with_its_own_classes_and_prompt(imagenet_root):
    bench = load_benchmark("ImageNet", imagenet_root, ["imagenet"], 1, None, partial=True, progress=False,
                           cross_dataset=["EuroSAT"])
    assert bench.domains[-1] == "EuroSAT" and bench.groups["cross-dataset"] == [1002, 1003, 1004]
    plan = bench.classification
    assert plan.classes["EuroSAT"] == [1002, 1003, 1004] and plan.templates["EuroSAT"] == (
        "a centered satellite photo of {}.",)
    euro = [y for y, d in zip(bench.test.labels.tolist(), bench.test.domains) if d == "EuroSAT"]
    assert [bench.test.classnames[y] for y in euro] == ["Forest"] * 2 + ["River"] * 2 + ["Sea or Lake"] * 2
    oracle = LinearHead(torch.eye(1200)[:1000], torch.zeros(1000), range(1000))
    results = evaluate(fabricate.PixelOracle(), None, _tensors(bench), groups=bench.groups, head=oracle,
                       classification=plan)
    assert set(zip(results.domain, results.group)) == {(d, "base") for d in bench.domains[:-1]} | {
        ("EuroSAT", "cross-dataset")}
    assert results[results.group == "base"].accuracy.eq(1.0).all()  # every ImageNet domain, ObjectNet included
    assert results[results.group == "cross-dataset"].accuracy.isna().all()  # a linear head has no EuroSAT classes


def _run(tmp_path, capsys, *args):
    runner.main([*args, "--methods", "ft", "--n-train-per-class", "2", "--n-test-per-class", "1", "--num-steps", "1",
                 "--batch-size", "4", "--budget", "smoke", "--results-dir", str(tmp_path / "results"),
                 "--device", "cpu", "--dataset-option", "partial=true"])
    return pd.concat([pd.read_csv(p) for p in (tmp_path / "results").glob("*.csv")]), capsys.readouterr().out


def test_the_runner_runs_imagenet_and_cross_dataset_end_to_end_one_row_per_test_domain(imagenet_root, tmp_path, capsys):
    table, printed = _run(tmp_path, capsys, "--datasets", "ImageNet", "--data-root", str(imagenet_root),
                          "--train-domains", "imagenet", "--hparam", 'templates=[["a photo of a {}."]]',
                          "--dataset-option", 'cross_dataset=["EuroSAT"]')
    assert sorted(zip(table.domain, table.group)) == sorted([(d, "base") for d in imagenet.LAYOUTS]
                                                            + [("EuroSAT", "cross-dataset")])
    assert table.accuracy.notna().all() and "domain_shift" in printed


def test_the_runner_runs_a_coop_dataset_base_to_new(tmp_path, capsys):
    root = fabricate.coop_dataset(tmp_path / "data", "OxfordPets", _coop_names(), per_split=(3, 2, 1))
    table, _ = _run(tmp_path, capsys, "--datasets", "OxfordPets", "--data-root", str(root),
                    "--train-domains", "OxfordPets")
    assert sorted(zip(table.domain, table.group, table.n)) == [("OxfordPets", "base", 3), ("OxfordPets", "new", 2)]


def test_the_runner_runs_leave_one_domain_out_on_domainbed(tmp_path, capsys):
    root = fabricate.domainbed(tmp_path / "data", "PACS", ["art_painting", "cartoon", "photo"], ["dog", "cat"])
    table, _ = _run(tmp_path, capsys, "--datasets", "PACS", "--data-root", str(root), "--train-domains",
                    "art_painting", "cartoon", "--dataset-option", "protocol=leave-one-domain-out")
    assert sorted(zip(table.domain, table.group)) == [(d, "base") for d in ("art_painting", "cartoon", "photo")]
    assert leave_one_domain_out(table.assign(method="ft", seed=0)).columns.tolist() == [
        "method", "seed", "photo", "average"]
    with pytest.raises(SystemExit):
        _run(tmp_path, capsys, "--datasets", "ImageNet", "--data-root", str(root), "--train-domains", "imagenet")
    assert "imagenet/images/train" in capsys.readouterr().err


def test_class_logits_keep_the_datasets_order_across_interleaved_domains():
    labels = torch.tensor([3, 0, 2, 3, 1, 0])
    images = torch.stack([TF.to_tensor(Image.new("RGB", (8, 8), fabricate.encode(int(c)))) for c in labels])
    data = ImageSet(images, labels, ["a", "b", "a", "c"], ["x", "y", "x", "y", "x", "y"])
    oracle = LinearHead(torch.eye(1200)[:4], torch.zeros(4), range(4))
    logits, local = class_logits(fabricate.PixelOracle(), None, data, [3, 0, 2], head=oracle)
    assert local.tolist() == [0, 1, 2, 0, 1]  # positions in [3, 0, 2] of the labels 3, 0, 2, 3, 0, in order
    assert logits.argmax(-1).tolist() == local.tolist()
