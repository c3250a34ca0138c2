"""The ImageNet family in CoOp's DATASETS.md layout (data_root is CoOp's $DATA folder), plus ObjectNet as it ships:

    <data_root>/
      imagenet/images/train/<wnid>/<image>           the training set (1000 wnid folders)
      imagenet/images/val/<wnid>/<image>             test domain "imagenet" (the validation set, in class folders)
      imagenetv2/imagenetv2-matched-frequency-format-val/<index>/<image>     "imagenet-v2" (folders 0..999)
      imagenet-sketch/images/<wnid>/<image>          "imagenet-sketch"
      imagenet-adversarial/imagenet-a/<wnid>/<image>  "imagenet-a" (200 classes)
      imagenet-rendition/imagenet-r/<wnid>/<image>    "imagenet-r" (200 classes)
      objectnet-1.0/images/<folder>/<image>           "objectnet" (the 113 classes its mappings tie to ImageNet)
      objectnet-1.0/mappings/folder_to_objectnet_label.json, objectnet_to_imagenet_1k.json,
                             pytorch_to_imagenet_2012_id.json, imagenet_to_label_2012_v2

Classes are ImageNet's 1000 in the order of the shipped wnid list (imagenet_wnids.txt, the standard class index),
named by open_clip's IMAGENET_CLASSNAMES (CLIP's names, two of which repeat: classes are ids, never names).
ImageNet-A and -R are classified among their 200 classes (imagenet_a_wnids.txt, imagenet_r_wnids.txt); ObjectNet's
classes are ids 1000 and up, each the max over the ImageNet classes it maps to, its images cropped by the 2-pixel
frame (wise-ft's protocol). A variant whose folder is absent is left out with a warning, unless `variants` names it.
"""
import json
import warnings
from pathlib import Path

import torch

from . import folders
from .benchmark import Benchmark, Classification
from .files import image_files, subfolders
from .imageset import ImageSet

HERE = Path(__file__).resolve().parent
WNIDS = (HERE / "imagenet_wnids.txt").read_text().split()
SUBSETS = {"imagenet-a": (HERE / "imagenet_a_wnids.txt").read_text().split(),
           "imagenet-r": (HERE / "imagenet_r_wnids.txt").read_text().split()}
# Test domain -> its folder under data_root and how its class folders are named.
LAYOUTS = {
    "imagenet": ("imagenet/images/val", "wnid"),
    "imagenet-v2": ("imagenetv2/imagenetv2-matched-frequency-format-val", "index"),
    "imagenet-sketch": ("imagenet-sketch/images", "wnid"),
    "imagenet-a": ("imagenet-adversarial/imagenet-a", "wnid"),
    "imagenet-r": ("imagenet-rendition/imagenet-r", "wnid"),
    "objectnet": ("objectnet-1.0/images", "objectnet"),
}
TRAIN = "imagenet/images/train"
MAPPINGS = "objectnet-1.0/mappings"
# Images of each release (ImageNet-1k, and the variants' papers); ObjectNet's 113-class share is not checked.
PUBLISHED = {"train": 1_281_167, "imagenet": 50_000, "imagenet-v2": 10_000, "imagenet-sketch": 50_889,
             "imagenet-a": 7_500, "imagenet-r": 30_000}
OBJECTNET_BORDER = 2
PROTOCOLS = ("domain-shift", "base-to-new")


def classnames():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    return list(IMAGENET_CLASSNAMES)


def load(root, dataset="ImageNet", train_domains=("imagenet",), n_train_per_class=None, n_test_per_class=None,
         seed=0, partial=False, protocol="domain-shift", variants=None):
    """ImageNet as a Benchmark: train on n_train_per_class images per class of the training set (k shots drawn
    per seed; None: all), test on every test domain present (LAYOUTS; `variants` lists those required), at most
    n_test_per_class images per class and domain; validation takes training images the cap leaves out.

    protocol "domain-shift" (WiSE-FT, FLYP, ARF, SAFT Table 1): every class, one group "base", prompts CLIP's 80
    ImageNet templates. "base-to-new" (CoOp, SAFT Table 2): base = classes 0..499, new = 500..999, each group among
    its own, the ImageNet test domain only, prompt "a photo of a {}." (SAFT Table 7). Image counts are checked
    against PUBLISHED unless partial=True.
    """
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {protocol!r} for ImageNet; choose one of {list(PROTOCOLS)}.")
    check(root, dataset, train_domains)
    names = classnames()
    if protocol == "base-to-new":
        variants, wanted = ["imagenet"], ["imagenet"]
    else:
        unknown = sorted(set(variants or []) - set(LAYOUTS))
        if unknown:
            raise ValueError(f"Unknown ImageNet test domain(s) {unknown}; they are {list(LAYOUTS)}.")
        wanted = list(LAYOUTS)
    present = [d for d in wanted if (Path(root) / LAYOUTS[d][0]).is_dir()]
    absent = [d for d in wanted if d not in present]
    required = [d for d in absent if d in (variants or ["imagenet"])]
    if required:
        raise FileNotFoundError(f"No folder for the test domain(s) {required}: expected "
                                f"{[str(Path(root) / LAYOUTS[d][0]) for d in required]}.\n{__doc__}")
    if absent:
        warnings.warn(f"ImageNet: left out the test domain(s) {absent}, whose folders are absent under {root} "
                      f"({[LAYOUTS[d][0] for d in absent]}).", stacklevel=2)
    counts = {}
    train = _read(Path(root) / TRAIN, "wnid", "imagenet", names, counts, "train")
    parts = [_read(Path(root) / LAYOUTS[d][0], LAYOUTS[d][1], d, names, counts, d) for d in present if d != "objectnet"]
    columns = {}
    if "objectnet" in present:
        objectnet, columns = _read_objectnet(Path(root), names, counts)
        parts.append(objectnet)
    if not partial:
        wrong = {d: n for d, n in counts.items() if d in PUBLISHED and n != PUBLISHED[d]}
        if wrong:
            raise ValueError(f"{root} does not match the published ImageNet family: "
                             f"{', '.join(f'{d} has {n} images, not {PUBLISHED[d]}' for d, n in wrong.items())}. "
                             f"A partial copy gives numbers that cannot be compared with the papers'; complete it, "
                             f"or pass partial=True (runner: --dataset-option partial=true) if it is intended.")
    test_names = parts[-1].classnames  # with ObjectNet's classes after ImageNet's, when it is there
    test = ImageSet([p for part in parts for p in part.images], torch.cat([part.labels for part in parts]),
                    test_names, [d for part in parts for d in part.domains],
                    border={"objectnet": OBJECTNET_BORDER})
    imagenet_ids = list(range(len(names)))
    if protocol == "base-to-new":
        base, new = imagenet_ids[:500], imagenet_ids[500:]
        groups, prompts, classification = {"base": base, "new": new}, ("a photo of a {}.",), None
    else:
        base, new = list(range(len(test_names))), []
        groups, prompts = {"base": base}, tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)  # open_clip: callables
        classification = Classification(classes={d: imagenet_ids for d in present})
        for d, wnids in SUBSETS.items():
            classification.classes[d] = [WNIDS.index(w) for w in wnids]
        if columns:
            classification.classes["objectnet"] = list(columns)
            classification.columns = columns
    pool = train.where(classes=base).relabel(base) if protocol == "base-to-new" else train
    validation = pool.subset([])
    if n_train_per_class is not None:
        validation = folders.k_shot_rest(pool, n_train_per_class, seed)
        pool = folders.k_shot(pool, n_train_per_class, seed)
    if n_test_per_class is not None:
        test = folders.k_shot(test, n_test_per_class, seed)
        validation = folders.k_shot(validation, n_test_per_class, seed)
    return Benchmark(dataset, pool, test, ["imagenet"], present, [test_names[c] for c in base],
                     [test_names[c] for c in new], validation, groups, classification, prompts)


def _read(folder, naming, domain, names, counts, count_as):
    """The images of one class-folder tree, labelled by wnid or by integer index (ImageNet-V2: "10" sorts before
    "2", so the folder name is the label, never its sorted position)."""
    label_of = ({w: i for i, w in enumerate(WNIDS)} if naming == "wnid"
                else {str(i): i for i in range(len(WNIDS))})
    paths, labels = [], []
    for sub in subfolders(folder):
        if sub.name not in label_of:
            raise ValueError(f"{sub} is not a class folder of {domain}: expected "
                             f"{'an ImageNet wnid (e.g. n01440764)' if naming == 'wnid' else 'an index 0..999'}.")
        images = image_files(sub)
        paths.extend(map(str, images))
        labels.extend([label_of[sub.name]] * len(images))
    if not paths:
        raise FileNotFoundError(f"{folder} has no class folders with images.\n{__doc__}")
    counts[count_as] = len(paths)
    return ImageSet(paths, torch.tensor(labels), names, [domain] * len(paths))


def objectnet_classes(root, names):
    """(folders, class names, {class id: ImageNet ids}) of ObjectNet's classes that map to ImageNet, from the
    mapping files of the user's copy (as wise-ft reads them): folders sorted, class ids from len(names) on."""
    mappings = Path(root) / MAPPINGS
    files = ["folder_to_objectnet_label.json", "objectnet_to_imagenet_1k.json", "pytorch_to_imagenet_2012_id.json",
             "imagenet_to_label_2012_v2"]
    missing = [f for f in files if not (mappings / f).is_file()]
    if missing:
        raise FileNotFoundError(f"ObjectNet's mapping files {missing} are missing from {mappings} (they ship with "
                                f"ObjectNet 1.0).\n{__doc__}")
    folder_label = json.loads((mappings / files[0]).read_text())
    to_imagenet = json.loads((mappings / files[1]).read_text())
    pytorch_of = {int(v): int(k) for k, v in json.loads((mappings / files[2]).read_text()).items()}
    imagenet_id = {line.strip(): pytorch_of[i] for i, line in enumerate((mappings / files[3]).read_text().splitlines())}
    label_folder = {label: folder for folder, label in folder_label.items()}
    mapped = {label_folder[label]: (label, [imagenet_id[n] for n in targets.split("; ")])
              for label, targets in to_imagenet.items()}
    kept = sorted(mapped)
    columns = {len(names) + j: mapped[f][1] for j, f in enumerate(kept)}
    return kept, [mapped[f][0].lower() for f in kept], columns


def _read_objectnet(root, names, counts):
    """(ImageSet of ObjectNet's mapped classes, labelled from len(names) on, with ImageNet's classes before them;
    {class id: ImageNet ids})."""
    folder = root / LAYOUTS["objectnet"][0]
    kept, objectnet_names, columns = objectnet_classes(root, names)
    paths, labels = [], []
    for j, name in enumerate(kept):
        images = image_files(folder / name) if (folder / name).is_dir() else []
        paths.extend(map(str, images))
        labels.extend([len(names) + j] * len(images))
    counts["objectnet"] = len(paths)
    return (ImageSet(paths, torch.tensor(labels, dtype=torch.long), names + objectnet_names,
                     ["objectnet"] * len(paths)), columns)


def check(root, dataset="ImageNet", train_domains=("imagenet",)):
    """The cheap check before training: the training folder, and "imagenet" as the train domain."""
    if list(train_domains) != ["imagenet"]:
        raise ValueError(f"ImageNet trains on its training set: train_domains must be ['imagenet'] (runner: "
                         f"--train-domains imagenet); got {list(train_domains)}.")
    if not (Path(root) / TRAIN).is_dir():
        raise FileNotFoundError(f"No ImageNet training folder {Path(root) / TRAIN}.\n{__doc__}")
