"""Tiny fabricated copies of the real tier's layouts, for tests (and recipes' tests): 8x8 images whose colour and
file name encode the true class, so that a loader's labels and a classifier's answers can be checked against the
files themselves. Each function builds one layout under a root and returns what it wrote."""
import json
from pathlib import Path

import torch
from PIL import Image

from lib.data import coop
from lib.data import imagenet as family


def encode(class_id):
    """The colour of class_id's images: red and green carry the id (ids up to 65535)."""
    return (class_id % 256, class_id // 256, 128)


def decode(images):
    """Class ids from image tensors [B, 3, H, W] in [0, 1] made by `encode` (a pixel away from ObjectNet's frame)."""
    pixels = (images[:, :, images.shape[2] // 2, images.shape[3] // 2] * 255).round().long()
    return pixels[:, 0] + 256 * pixels[:, 1]


def image(path, class_id, size=8):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), encode(class_id)).save(path)
    return path


def true_class(path):
    """The class id a fabricated file name encodes: <id>_<n>.png."""
    return int(Path(path).name.split("_")[0])


def class_folders(folder, folder_ids, per_class):
    """<folder>/<name>/<id>_<n>.png for {folder name: class id}."""
    for name, class_id in folder_ids.items():
        for n in range(per_class):
            image(Path(folder) / name / f"{class_id}_{n}.png", class_id)


# ImageNet classes of the fabricated copy: CLIP's two "missile"s and two "sunglasses", V2's "2" and "10", a class of
# ImageNet-A and of ImageNet-R (each outside the other's subset) and one of both.
IMAGENET_IDS = (2, 10, 657, 744, 836, 837, 6, 1, 11)
OBJECTNET = {"air_freshener": ("Air freshener", []), "alarm_clock": ("Alarm clock", [409]),
             "sunglasses_folder": ("Sunglasses", [836, 837])}  # folder: (ObjectNet label, ImageNet ids)


def imagenet(root, ids=IMAGENET_IDS, per_class=3, variants=tuple(family.LAYOUTS), objectnet=OBJECTNET):
    """CoOp's ImageNet layout with the given class ids (train and every variant; A and R only their subsets' ids)
    and ObjectNet's images and mapping files. Returns root."""
    root = Path(root)
    wnid = {i: family.WNIDS[i] for i in ids}
    class_folders(root / family.TRAIN, {wnid[i]: i for i in ids}, per_class + 2)
    for domain in variants:
        folder, naming = family.LAYOUTS[domain]
        if naming == "index":
            class_folders(root / folder, {str(i): i for i in ids}, per_class)
        elif naming == "wnid":
            subset = family.SUBSETS.get(domain, family.WNIDS)
            class_folders(root / folder, {wnid[i]: i for i in ids if wnid[i] in subset}, per_class)
    if "objectnet" in variants:
        _objectnet(root, objectnet, per_class)
    return root


def _objectnet(root, objectnet, per_class):
    """ObjectNet's images and mapping files: file names carry the ObjectNet class id (1000 + j in sorted
    mapped-folder order; an unmapped folder's images 4000), colours the first ImageNet class it maps to (what a
    PixelOracle "sees"), framed by 2 white pixels. ImageNet's 2012 ids run in reverse of the PyTorch order, so a
    reader that skips that mapping fails."""
    names = family.classnames()
    mapped = sorted(f for f, (_, ids) in objectnet.items() if ids)
    for folder, (label, ids) in objectnet.items():
        class_id = 1000 + mapped.index(folder) if ids else 4000
        for n in range(per_class):  # a 2-pixel frame of another colour, as ObjectNet's images have
            path = image(root / family.LAYOUTS["objectnet"][0] / folder / f"{class_id}_{n}.png",
                         ids[0] if ids else 4000)
            framed = Image.new("RGB", (12, 12), (255, 255, 255))
            framed.paste(Image.open(path), (2, 2))
            framed.save(path)
    mappings = root / family.MAPPINGS
    mappings.mkdir(parents=True)
    (mappings / "folder_to_objectnet_label.json").write_text(json.dumps({f: v[0] for f, v in objectnet.items()}))
    label_of = [f"label {i}: {names[i]}" for i in range(1000)]  # ImageNet's own label text, unique
    (mappings / "objectnet_to_imagenet_1k.json").write_text(json.dumps(
        {label: "; ".join(label_of[i] for i in ids) for label, ids in objectnet.values() if ids}))
    (mappings / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps({str(i): 999 - i for i in range(1000)}))
    (mappings / "imagenet_to_label_2012_v2").write_text("\n".join(label_of[999 - k] for k in range(1000)) + "\n")


def coop_dataset(root, dataset, names, per_split=(5, 3, 2), order=None):
    """CoOp's layout of `dataset` with the given class names (label = position in `names`), per_split images per
    class in train, val and test; a split file, or FGVCAircraft's text files. Returns root."""
    folder, images, split_file = coop.LAYOUTS[dataset]
    base = Path(root) / folder
    items = {}
    for split, count in zip(coop.SPLITS, per_split):
        items[split] = []
        for label, name in enumerate(names):
            for n in range(count):  # FGVCAircraft's images lie flat, <id>.jpg
                relative = f"{label}_{split}{n}.jpg" if split_file is None else f"{name.replace(' ', '_')}/" \
                    f"{label}_{split}{n}.png"
                image(base / images / relative, label)
                items[split].append([relative, label, name])
    if split_file is None:
        (base / "variants.txt").write_text("\n".join(names) + "\n")
        for split in coop.SPLITS:
            (base / f"images_variant_{split}.txt").write_text(
                "".join(f"{path[:-4]} {name}\n" for path, _, name in items[split]))
    else:
        (base / split_file).write_text(json.dumps(items))
    return Path(root)


def domainbed(root, dataset, domains, classes, per_class=5):
    """<root>/<dataset>/<domain>/<class>/<id>_<n>.png, the class id being the sorted position of its folder."""
    ids = {c: i for i, c in enumerate(sorted(classes))}
    for domain in domains:
        class_folders(Path(root) / dataset / domain, ids, per_class)
    return Path(root)


class PixelOracle(torch.nn.Module):
    """A 'CLIP' for fabricated images: its image features are the one-hot of the class each image encodes (over
    `num_classes` ids), so a linear head of the identity is always right; encode_text is CLIP's interface, unused."""

    def __init__(self, num_classes=1200, scale=10.0):
        super().__init__()
        self.num_classes = num_classes
        self.logit_scale = torch.nn.Parameter(torch.tensor(float(scale)).log())

    def encode_image(self, images, normalize=True):
        return torch.nn.functional.one_hot(decode(images), self.num_classes).float()
