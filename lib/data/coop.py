"""CoOp's datasets in CoOp's DATASETS.md layout, read through its split files (KaiyangZhou/CoOp, Dassl):

    <data_root>/<folder>/<split file>                  {"train" | "val" | "test": [[path, label, classname], ...]}
    <data_root>/<folder>/<images>/<path>               paths relative to the images folder
    <data_root>/fgvc_aircraft/images_variant_{train,val,test}.txt, variants.txt, images/<id>.jpg  (no JSON)

(LAYOUTS: the folder, images folder and split file of each dataset.) ImageNet, CoOp's eleventh, is read by
lib.data.imagenet (protocol="base-to-new"). The test domain is the dataset's name; each dataset has its own
prompt (PROMPTS, SAFT Table 7)."""
import json
import math
from pathlib import Path

import torch

from . import folders
from .benchmark import Benchmark
from .imageset import ImageSet

LAYOUTS = {
    "Caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "OxfordPets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "StanfordCars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "Flowers102": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "Food101": ("food-101", "images", "split_zhou_Food101.json"),
    "FGVCAircraft": ("fgvc_aircraft", "images", None),
    "SUN397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "DTD": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "EuroSAT": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "UCF101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}
PROMPTS = {"Caltech101": "a photo of a {}.", "OxfordPets": "a photo of a {}, a type of pet.",
           "StanfordCars": "a photo of a {}.", "Flowers102": "a photo of a {}, a type of flower.",
           "Food101": "a photo of a {}, a type of food.", "FGVCAircraft": "a photo of a {}, a type of aircraft.",
           "SUN397": "a photo of a {}.", "DTD": "{} texture.", "EuroSAT": "a centered satellite photo of {}.",
           "UCF101": "a photo of a person doing {}."}
# Images per split (train, val, test) of CoOp's split files (SAFT Table 7).
PUBLISHED = {"Caltech101": (4128, 1649, 2465), "OxfordPets": (2944, 736, 3669), "StanfordCars": (6509, 1635, 8041),
             "Flowers102": (4093, 1633, 2463), "Food101": (50500, 20200, 30300), "FGVCAircraft": (3334, 3333, 3333),
             "SUN397": (15880, 3970, 19850), "DTD": (2820, 1128, 1692), "EuroSAT": (13500, 5400, 8100),
             "UCF101": (7639, 1898, 3783)}
SPLITS = ("train", "val", "test")
PROTOCOLS = ("base-to-new", "all")


def load(root, dataset, train_domains=None, n_train_per_class=16, n_test_per_class=None, seed=0, partial=False,
         protocol="base-to-new"):
    """A CoOp dataset as a Benchmark. Train: n_train_per_class shots per class drawn per seed (a class with fewer
    keeps all; CoOp's 16; None: every image), validation min(shots, 4) per class from the val split, test the
    test split (n_test_per_class caps it per class; None: all). protocol "base-to-new": base = the first
    ceil(n/2) label ids of the split file (label order, not sorted names), new = the rest, each group classified
    among its own classes, training on base only; "all": every class (few-shot, cross-dataset). The split
    sizes are checked against PUBLISHED unless partial=True. Our choice: numpy's generator draws the shots, so
    they are CoOp's rule with other random numbers than Dassl's."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {protocol!r} for {dataset}; choose one of {list(PROTOCOLS)}.")
    check(root, dataset, train_domains or [dataset])
    splits, names = read_splits(root, dataset)
    if not partial:
        sizes = tuple(len(splits[s]) for s in SPLITS)
        if sizes != PUBLISHED[dataset]:
            raise ValueError(f"{Path(root) / LAYOUTS[dataset][0]} does not match the published {dataset} split: "
                             f"train/val/test have {sizes} images, not {PUBLISHED[dataset]}; complete it, or pass "
                             f"partial=True (runner: --dataset-option partial=true) if it is intended.")
    n = len(names)
    base = list(range(math.ceil(n / 2) if protocol == "base-to-new" else n))
    new = [c for c in range(n) if c not in base]
    train = splits["train"].where(classes=base).relabel(base)
    validation = splits["val"].where(classes=base).relabel(base)
    test = splits["test"]
    if n_train_per_class is not None:
        train = folders.k_shot(train, n_train_per_class, seed)
        validation = folders.k_shot(validation, min(n_train_per_class, 4), seed)
    if n_test_per_class is not None:
        test = folders.k_shot(test, n_test_per_class, seed)
        validation = folders.k_shot(validation, n_test_per_class, seed)
    groups = {"base": base, "new": new} if new else {"base": base}
    return Benchmark(dataset, train, test, [dataset], [dataset], [names[c] for c in base], [names[c] for c in new],
                     validation, groups, None, (PROMPTS[dataset],))


def read_splits(root, dataset):
    """({split: ImageSet of all its images}, class names by label id) from the split file (or FGVCAircraft's
    text files); every split carries every class name."""
    folder, images, split_file = LAYOUTS[dataset]
    base = Path(root) / folder
    if split_file is None:  # FGVCAircraft: "<image id> <variant>" lines; labels follow variants.txt
        names = [line.strip() for line in (base / "variants.txt").read_text().splitlines() if line.strip()]
        label = {name: i for i, name in enumerate(names)}
        items = {}
        for split in SPLITS:
            lines = [line.strip().split(" ", 1) for line in (base / f"images_variant_{split}.txt").read_text()
                     .splitlines() if line.strip()]
            items[split] = [(f"{image}.jpg", label[variant], variant) for image, variant in lines]
    else:
        items = json.loads((base / split_file).read_text())
        named = {int(y): c for split in SPLITS for _, y, c in items[split]}
        names = [named[y] for y in range(len(named))]
    sets = {split: ImageSet([str(base / images / path) for path, _, _ in items[split]],
                            torch.tensor([int(y) for _, y, _ in items[split]], dtype=torch.long), names,
                            [dataset] * len(items[split])) for split in SPLITS}
    return sets, names


def check(root, dataset, train_domains=None):
    """The cheap check before training: the dataset folder and its split file(s), and the train domain."""
    if train_domains is not None and list(train_domains) != [dataset]:
        raise ValueError(f"{dataset} has one domain, its own name: train_domains must be [{dataset!r}] (runner: "
                         f"--train-domains {dataset}); got {list(train_domains)}.")
    folder, images, split_file = LAYOUTS[dataset]
    needed = [split_file] if split_file else ["variants.txt"] + [f"images_variant_{s}.txt" for s in SPLITS]
    missing = [str(Path(root) / folder / f) for f in needed if not (Path(root) / folder / f).is_file()]
    if missing or not (Path(root) / folder / images).is_dir():
        raise FileNotFoundError(f"{dataset}: expected {missing or []} and the images folder "
                                f"{Path(root) / folder / images} (CoOp's DATASETS.md layout).\n{__doc__}")
