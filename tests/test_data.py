import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from lib import models
from lib.data import folders, load_benchmark, shapeworld as sw


def test_shapeworld_is_deterministic_and_streams_differ():
    a = sw.make_split("train", domains=["photo", "sketch"], n_per_class=2, seed=3)
    b = sw.make_split("train", domains=["photo", "sketch"], n_per_class=2, seed=3)
    c = sw.make_split("test", domains=["photo", "sketch"], n_per_class=2, seed=3)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (2 * 2 * len(sw.CLASSES), 3, 32, 32)
    assert a.images.min() >= 0 and a.images.max() <= 1


def test_split_is_balanced_and_labels_index_the_given_classes():
    split = sw.make_split("x", domains=["cartoon"], classes=sw.NEW_CLASSES, n_per_class=3)
    assert split.classnames == list(sw.NEW_CLASSES)
    assert np.bincount(split.labels.numpy()).tolist() == [3] * len(sw.NEW_CLASSES)
    for i in range(len(split)):
        assert split.classnames[split.labels[i]] in split.captions[i]
        assert "cartoon" in split.captions[i]


def test_benchmark_pictures_follow_the_downstream_convention():
    """Every labelled picture: the label is the main object, large and centred, beside `distractors` small
    objects of other, distinct classes in distinct corners; the full caption names all of them."""
    for distractors in (0, 1, 2):
        split = sw.make_split("convention", domains=["photo", "painting"], n_per_class=3, distractors=distractors,
                              clutter_share=1.0)
        scenes = split.scenes
        shapes, corners = scenes["distractor_shape"], scenes["distractor_corner"]
        assert ((shapes >= 0).sum(1) == distractors).all() and ((corners >= 0).sum(1) == distractors).all()
        for i in range(len(split)):
            used = shapes[i][shapes[i] >= 0]
            assert sw.CLASSES[scenes["shape"][i]] == split.classnames[split.labels[i]]
            assert scenes["shape"][i] not in used and len(set(used)) == len(used)
            assert len(set(corners[i][corners[i] >= 0])) == distractors
            assert all(f"small {d['color']} {d['shape']} {d['position']}" in split.captions[i]
                       for d in sw.scene_distractors(scenes, i))
        if distractors:
            attributes = [sw.scene_attributes(scenes, i) for i in range(len(split))]
            assert {a["size"] for a in attributes} == {"large"} and {a["position"] for a in attributes} == {"in the center"}
    half = sw.make_split("convention", domains=["photo"], n_per_class=40, clutter_share=0.5).scenes
    assert 0.4 < (half["distractor_shape"] >= 0).any(1).mean() < 0.6
    with pytest.raises(ValueError, match="distractors"):
        sw.make_split("x", distractors=3)
    with pytest.raises(ValueError, match="clutter_share"):
        sw.make_split("x", clutter_share=1.5)


def test_web_captions_name_any_object_of_a_cluttered_picture():
    """The task shift: alt-text names the main object of a cluttered picture no more often than a distractor."""
    scenes, captions = sw.web_captions(3000, seed=0, noise=0.0)
    cluttered = (scenes["distractor_shape"] >= 0).any(1)
    assert cluttered.mean() == pytest.approx(sw.WEB_CLUTTER_SHARE, abs=0.03)
    first_named = []
    for i in np.flatnonzero(cluttered):
        named = [(captions[i].find(c), c) for c in sw.CLASSES if captions[i].find(c) >= 0]
        first_named.append(min(named)[1] == sw.CLASSES[scenes["shape"][i]])
    objects = 1 + (scenes["distractor_shape"][cluttered] >= 0).sum(1)
    # Named uniformly among the objects: the expected share of the main object is mean(1 / objects).
    assert np.mean(first_named) == pytest.approx(np.mean(1 / objects), abs=0.05)


def test_base_new_is_the_coop_convention():
    assert sw.BASE_CLASSES + sw.NEW_CLASSES == tuple(sorted(sw.CLASSES))
    assert folders.base_new_split(list(reversed(sw.CLASSES))) == (list(sw.BASE_CLASSES), list(sw.NEW_CLASSES))
    assert len(sw.DOMAINS) >= 4 and len(sw.CLASSES) >= 12


def test_domains_look_different():
    """Five image statistics tell the styles apart: the domain shift is real, not only a name."""
    def statistics(images):
        steps = (images[..., 1:, :] - images[..., :-1, :]).abs()
        saturation = images.max(1).values - images.min(1).values
        return torch.stack([steps.mean(dim=(1, 2, 3)), (steps > 0.3).float().mean(dim=(1, 2, 3)),
                            images.std(dim=(1, 2, 3)), saturation.mean(dim=(1, 2)),
                            (saturation < 0.05).float().mean(dim=(1, 2))], 1).numpy()
    fit, check = sw.make_split("fit", n_per_class=4), sw.make_split("check", n_per_class=4)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    classifier.fit(statistics(fit.images), fit.domains)
    assert classifier.score(statistics(check.images), check.domains) > 0.9


def test_captions_carry_attributes_beyond_the_class():
    corpus = sw.web_corpus(500, seed=0, noise=0.0)  # paintings are 1 % of the web
    words = " ".join(corpus.captions)
    for values in (sw.COLORS, sw.SIZES, sw.BACKGROUNDS, sw.DOMAINS):
        assert all(v in words for v in values)
    full = sw.caption(corpus.scenes, 0)
    attributes = sw.scene_attributes(corpus.scenes, 0)
    assert all(v in full for v in attributes.values())


def test_web_corpora_are_disjoint():
    pretrain = sw.web_corpus(50, seed=0, stream="pretrain")
    candidates = sw.web_corpus(50, seed=0, stream="candidates")
    flat_a = pretrain.images.flatten(1)
    flat_b = candidates.images.flatten(1)
    assert torch.cdist(flat_a, flat_b).min() > 0


def test_unknown_shapeworld_names_are_rejected():
    with pytest.raises(ValueError, match="no domain"):
        sw.make_split("x", domains=["x-ray"])
    with pytest.raises(ValueError, match="no class"):
        sw.make_split("x", classes=["dog"])


def _tree(root, domains=("art", "photo"), classes=("dog", "tall_giraffe", "horse"), n=4):
    for d in domains:
        for c in classes:
            folder = root / "Toy" / d / c
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
    return root


def test_domainbed_loader_reads_the_layout(tmp_path):
    data = folders.load_domainbed(_tree(tmp_path), "Toy")
    assert data.classnames == ["dog", "horse", "tall giraffe"]
    assert len(data) == 2 * 3 * 4
    assert sorted(set(data.domains)) == ["art", "photo"]
    image, label = data[0]
    assert isinstance(image, Image.Image) and label.item() == 0
    only = folders.load_domainbed(tmp_path, "Toy", domains=["photo"], classes=["tall giraffe"])
    assert len(only) == 4 and only.classnames == ["tall giraffe"]


def test_domainbed_errors_show_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="Expected layout"):
        folders.load_domainbed(tmp_path, "PACS")
    _tree(tmp_path)
    with pytest.raises(FileNotFoundError, match="no domain folder"):
        folders.load_domainbed(tmp_path, "Toy", domains=["sketch"])
    with pytest.raises(ValueError, match="match no class folder"):
        folders.load_domainbed(tmp_path, "Toy", classes=["zebra"])


def test_fraction_sample_sizes_balance_and_nesting():
    data = sw.make_split("frac", domains=["photo", "sketch", "cartoon"], n_per_class=5)
    per_domain = len(data) // 3
    previous = set()
    for fraction in (0, 0.03, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0):
        sample = folders.fraction_sample(data, fraction, seed=1)
        counts = {d: sample.domains.count(d) for d in ("photo", "sketch", "cartoon")}
        assert set(counts.values()) == {int(round(fraction * per_domain))}
        current = {tuple(sample.images[i].flatten()[:8].tolist()) for i in range(len(sample))}
        assert previous <= current
        previous = current
    assert folders.fraction_sample(data, 0.5, seed=1).captions == folders.fraction_sample(data, 0.5, seed=1).captions
    with pytest.raises(ValueError):
        folders.fraction_sample(data, 1.5)


def test_k_shot_and_train_test_split():
    data = sw.make_split("k", domains=["photo"], n_per_class=6)
    few = folders.k_shot(data, 2, seed=0)
    assert np.bincount(few.labels.numpy()).tolist() == [2] * len(sw.CLASSES)
    train, test = folders.train_test_split(data, 0.5, seed=0)
    assert len(train) + len(test) == len(data)
    assert np.bincount(test.labels.numpy()).tolist() == [3] * len(sw.CLASSES)
    overlap = torch.cdist(train.images.flatten(1), test.images.flatten(1)).min()
    assert overlap > 0


def test_folder_checks_find_empty_and_mismatched_class_folders(tmp_path):
    _tree(tmp_path)
    (tmp_path / "Toy" / "art" / "zebra").mkdir()  # empty, and in one domain only
    with pytest.raises(ValueError, match=r"different class folders.*missing \{'photo': \['zebra'\]\}.*"
                                         r"class_folders='intersection'"):
        folders.load_domainbed(tmp_path, "Toy")
    (tmp_path / "Toy" / "photo" / "zebra").mkdir()
    with pytest.raises(FileNotFoundError, match=r"2 class folder\(s\) .* have no images.*'art/zebra', 'photo/zebra'"):
        folders.load_domainbed(tmp_path, "Toy")
    (tmp_path / "Toy" / "photo" / "zebra").rmdir()
    (tmp_path / "Toy" / "art" / "zebra").rmdir()
    (tmp_path / "Toy" / "art" / "cat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "Toy" / "art" / "cat" / "0.png")
    kept = folders.load_domainbed(tmp_path, "Toy", class_folders="intersection")
    assert kept.classnames == ["dog", "horse", "tall giraffe"]


def test_unreadable_images_are_all_reported_with_their_paths_before_training(tmp_path):
    _tree(tmp_path)
    first = tmp_path / "Toy" / "art" / "dog" / "0.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(first)
    first.write_bytes(first.read_bytes()[:6000])  # a truncated download: the header reads, the pixels do not
    second = tmp_path / "Toy" / "art" / "dog" / "1.png"
    second.write_bytes(b"not an image")
    with pytest.raises(OSError, match=r"2 of \d+ images cannot be read") as error:
        load_benchmark("Toy", tmp_path, ["art"], None, None, progress=False)
    assert str(first) in str(error.value) and str(second) in str(error.value)
    with pytest.raises(OSError, match=f"Cannot read image {first}"):
        folders.load_domainbed(tmp_path, "Toy")[0]


def test_a_partial_copy_of_a_published_dataset_is_an_error_unless_intended(tmp_path):
    _tree(tmp_path, domains=("art_painting", "cartoon", "photo", "sketch"),
          classes=("dog", "elephant", "giraffe", "guitar", "horse", "house", "person"), n=1)
    (tmp_path / "Toy").rename(tmp_path / "PACS")
    with pytest.raises(ValueError, match=r"does not match the published PACS: art_painting has 7 images, not 2048.*"
                                         r"partial=True"):
        folders.load_domainbed(tmp_path, "PACS")
    assert len(folders.load_domainbed(tmp_path, "PACS", partial=True)) == 4 * 7


def test_folder_benchmarks_cap_the_test_set_check_train_domains_and_use_real_templates(tmp_path):
    _tree(tmp_path, n=6)
    bench = load_benchmark("Toy", tmp_path, ["art"], 2, 1, progress=False)
    assert len(bench.test) == 2 * 3 * 1  # n_test_per_class per domain and class, as on ShapeWorld
    assert bench.templates == models.REAL_TEMPLATES
    assert load_benchmark("shapeworld", None, ["photo"], 1, 1).templates == models.SHAPEWORLD_TEMPLATES
    with pytest.raises(ValueError, match=r"train_domains \['sketch'\] are not domains of Toy"):
        load_benchmark("Toy", tmp_path, ["sketch"], 2, 1, progress=False)


def test_validation_holds_base_classes_of_the_training_domains_never_trained_or_tested_on(tmp_path):
    _tree(tmp_path, n=6)
    folder = load_benchmark("Toy", tmp_path, ["art"], 2, 1, progress=False)
    world = load_benchmark("shapeworld", None, ["cartoon"], 3, 2)
    for bench in (folder, world):
        validation = bench.validation
        assert len(validation) == len(bench.base_classes) * 1 * (1 if bench is folder else 2)
        assert set(validation.domains) == set(bench.train_domains)
        assert validation.classnames == bench.base_classes
        for other in (bench.train, bench.test):
            if bench is folder:
                assert not set(validation.images) & set(other.images)
            else:
                flat = other.images.flatten(1)
                assert not any((flat == image.flatten()).all(1).any() for image in validation.images)
    everything = load_benchmark("Toy", tmp_path, ["art"], None, 1, progress=False)
    assert len(everything.validation) == 0  # every training image trains: nothing is left to validate on
