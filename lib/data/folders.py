"""Real datasets on disk: the DomainBed layout, the CoOp base-to-new split, k-shot and data-fraction samples."""
from pathlib import Path

import numpy as np
import torch

from .imageset import ImageSet

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
LAYOUT = """Expected layout (DomainBed):
    {root}/
      {dataset}/
        <domain>/          e.g. art_painting, cartoon, photo, sketch for PACS
          <class>/         the same class folders in every domain
            <image>.jpg"""


def load_domainbed(root, dataset, domains=None, classes=None):
    """All images of `dataset` under root in the DomainBed layout, as an ImageSet of file paths.

    Class names are the sorted folder names with underscores read as spaces; labels index that sorted list.
    domains and classes restrict what is loaded (class names as in the folders or with spaces).
    """
    base = Path(root) / dataset
    layout = LAYOUT.format(root=root, dataset=dataset)
    if not base.is_dir():
        raise FileNotFoundError(f"No dataset folder {base}.\n{layout}")
    found_domains = sorted(p.name for p in base.iterdir() if p.is_dir())
    if not found_domains:
        raise FileNotFoundError(f"{base} has no domain folders.\n{layout}")
    domains = list(domains) if domains is not None else found_domains
    missing = [d for d in domains if d not in found_domains]
    if missing:
        raise FileNotFoundError(f"{base} has no domain folder(s) {missing}; it has {found_domains}.\n{layout}")
    folders = sorted({p.name for d in domains for p in (base / d).iterdir() if p.is_dir()})
    if not folders:
        raise FileNotFoundError(f"The domain folders of {base} have no class folders.\n{layout}")
    classnames = [_readable(f) for f in folders]
    if classes is not None:
        wanted = [_readable(c) for c in classes]
        unknown = [c for c in wanted if c not in classnames]
        if unknown:
            raise ValueError(f"Class names {unknown} match no class folder of {base}; its classes are {classnames}.")
        folders = [f for f, c in zip(folders, classnames) if c in wanted]
        classnames = [_readable(f) for f in folders]
    paths, labels, item_domains = [], [], []
    for domain in domains:
        for label, folder in enumerate(folders):
            for path in sorted((base / domain / folder).glob("*")):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    paths.append(str(path))
                    labels.append(label)
                    item_domains.append(domain)
    if not paths:
        raise FileNotFoundError(f"No images ({sorted(IMAGE_SUFFIXES)}) under {base} for domains {domains}.\n{layout}")
    return ImageSet(images=paths, labels=torch.tensor(labels), classnames=classnames, domains=item_domains)


def _readable(name):
    return name.replace("_", " ")


def base_new_split(classnames):
    """CoOp's convention: sort the class names; the first half (rounded up) is base, the rest new."""
    names = sorted(classnames)
    half = (len(names) + 1) // 2
    return names[:half], names[half:]


def train_test_split(dataset, test_fraction=0.2, seed=0):
    """A split per (domain, class), so both parts keep every domain and class; deterministic by seed."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for _, indices in _groups(dataset, by_class=True).items():
        indices = rng.permutation(indices)
        n_test = int(round(len(indices) * test_fraction))
        test.extend(indices[:n_test])
        train.extend(indices[n_test:])
    return dataset.subset(sorted(train)), dataset.subset(sorted(test))


def k_shot(dataset, k, seed=0):
    """k items of every class in every domain (all of them where fewer exist); deterministic by seed."""
    rng = np.random.default_rng(seed)
    keep = [i for _, indices in _groups(dataset, by_class=True).items() for i in rng.permutation(indices)[:k]]
    return dataset.subset(sorted(keep))


def fraction_sample(dataset, fraction, seed=0):
    """A `fraction` of the items of every domain, balanced over domains and nested across fractions.

    Each domain's items are put in one seeded order; a fraction takes the first round(fraction * n) of it, so
    the 10 % sample contains the 5 % sample for the same seed. Fraction 0 gives an empty set (zero-shot).
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    keep = []
    for domain, indices in _groups(dataset, by_class=False).items():
        order = np.random.default_rng([seed, sum(map(ord, domain))]).permutation(indices)
        keep.extend(order[:int(round(fraction * len(indices)))])
    return dataset.subset(sorted(keep))


def _groups(dataset, by_class):
    groups = {}
    for i, (domain, label) in enumerate(zip(dataset.domains, dataset.labels.tolist())):
        groups.setdefault((domain, label) if by_class else domain, []).append(i)
    return {key: np.array(v) for key, v in groups.items()}
