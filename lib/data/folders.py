"""Real datasets on disk: the DomainBed layout and its protocols, the CoOp base-to-new split, k-shot and
data-fraction samples."""
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .benchmark import Benchmark, Classification
from .files import IMAGE_SUFFIXES, image_files, subfolders, warn_skipped
from .imageset import ImageSet, to_rgb

LAYOUT = """Expected layout (DomainBed):
    {root}/
      {dataset}/
        <domain>/          e.g. art_painting, cartoon, photo, sketch for PACS
          <class>/         the same class folders in every domain
            <image>.jpg"""

# Images per domain of the DomainBed releases, and classes (the same in every domain); a copy that differs is
# partial or altered. From the datasets' papers (PACS: 9,991 images; VLCS: 10,729; OfficeHome: 15,588; DomainNet:
# 586,575). TerraIncognita's per-domain counts disagree between sources (DomainBed's table: 24,788 images in all),
# so only its domains and classes are checked.
PUBLISHED = {
    "PACS": dict(classes=7, images={"art_painting": 2048, "cartoon": 2344, "photo": 1670, "sketch": 3929}),
    "VLCS": dict(classes=5, images={"Caltech101": 1415, "LabelMe": 2656, "SUN09": 3282, "VOC2007": 3376}),
    "OfficeHome": dict(classes=65, images={"Art": 2427, "Clipart": 4365, "Product": 4439, "Real World": 4357}),
    "TerraIncognita": dict(classes=10, images=dict.fromkeys(["location_100", "location_38", "location_43",
                                                             "location_46"])),
    "DomainNet": dict(classes=345, images={"clipart": 48129, "infograph": 51605, "painting": 72266,
                                           "quickdraw": 172500, "real": 172947, "sketch": 69128}),
}


# protocol -> (how many of the n classes are base, whether base and new test images are classified among both).
PROTOCOLS = {
    "base-to-new": (lambda n: math.ceil(n / 2), False),  # CoOp: first ceil(n/2) labels; each group on its own
    "in-the-wild": (lambda n: n // 2, True),  # CLIPood: first floor(n/2) class keys; base and new among both
    "leave-one-domain-out": (lambda n: n, False),  # CLIPood Table 1, DomainBed: all classes, one held-out domain
    "domain-shift": (lambda n: n, False),  # ARF Table 1, DomainNet-Real: all classes, any train domains
}


def load(root, dataset, train_domains, n_train_per_class=None, n_test_per_class=None, seed=0, partial=False,
         protocol="base-to-new", test_fraction=0.2, class_folders="error"):
    """A DomainBed dataset as a Benchmark: a per-(domain, class) train/test split (test_fraction), then train on
    the base classes of train_domains (n_train_per_class caps the images per class and domain, n_test_per_class
    the test and validation images; None keeps all; validation takes the training images the cap leaves out).

    protocol (PROTOCOLS): "base-to-new" (base = the first half, rounded up, of the sorted class folders; each
    group classified among its own classes), "in-the-wild" (base = the first half rounded down; base and new test
    images classified among all classes, CLIPood's in-the-wild setting), "leave-one-domain-out" (every class is
    base; train_domains must be all domains but one, the target: average targets with
    lib.evaluate.leave_one_domain_out), "domain-shift" (every class is base, any train domains: ARF's
    DomainNet-Real column). The folders are checked as load_domainbed says (class_folders, partial).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {protocol!r} for a DomainBed dataset; choose one of {list(PROTOCOLS)}.")
    everything = load_domainbed(root, dataset, class_folders=class_folders, partial=partial)
    domains = sorted(set(everything.domains))
    missing = sorted(set(train_domains) - set(domains))
    if missing:
        raise ValueError(f"train_domains {missing} are not domains of {dataset}; its domains are {domains}.")
    if protocol == "leave-one-domain-out" and len(set(domains) - set(train_domains)) != 1:
        raise ValueError(f"protocol='leave-one-domain-out' trains on every domain but one: train_domains must be "
                         f"{len(domains) - 1} of {domains}; got {list(train_domains)}.")
    train_part, test = train_test_split(everything, test_fraction, seed)
    count, joint = PROTOCOLS[protocol]
    n = len(everything.classnames)
    base, new = list(range(count(n))), list(range(count(n), n))
    pool = train_part.where(domains=train_domains, classes=base).relabel(base)
    train, validation = pool, pool.subset([])
    if n_train_per_class is not None:
        train = k_shot(pool, n_train_per_class, seed)
        validation = k_shot_rest(pool, n_train_per_class, seed)
    if n_test_per_class is not None:
        test = k_shot(test, n_test_per_class, seed)
        validation = k_shot(validation, n_test_per_class, seed)
    names = everything.classnames
    groups = {"base": base, "new": new} if new else {"base": base}
    classification = Classification(among=dict.fromkeys(groups, base + new)) if joint else None
    return Benchmark(dataset, train, test, list(train_domains), domains, [names[c] for c in base],
                     [names[c] for c in new], validation, groups, classification)


def check(root, dataset, train_domains):
    """The cheap check before training: the dataset folder and a folder per train domain."""
    folder = Path(root) / dataset
    if not folder.is_dir():
        raise FileNotFoundError(f"No dataset folder {folder}: put {dataset} there in the DomainBed layout, or fix "
                                f"data_root / the dataset name.\n{LAYOUT.format(root=root, dataset=dataset)}")
    found = [p.name for p in subfolders(folder, warn=False)]  # loading says what it skips
    missing = [d for d in train_domains if d not in found]
    if missing:
        raise FileNotFoundError(f"{folder} has no folder for the train domain(s) {missing}; its domains are "
                                f"{found}: fix train_domains.")


def load_domainbed(root, dataset, domains=None, classes=None, class_folders="error", partial=False):
    """All images of `dataset` under root in the DomainBed layout, as an ImageSet of file paths.

    Class names are the sorted folder names with underscores read as spaces; labels index that sorted list.
    domains and classes restrict what is loaded (class names as in the folders or with spaces).
    Hidden and system entries (lib.data.files.is_system: ".*", "@*", "__MACOSX") are skipped at every level, with
    one warning that names them. Checked here: an empty class folder is an error; so are class folders that differ
    between the domains, unless class_folders="intersection" (keep the classes every domain has); and a dataset of
    PUBLISHED whose domains, classes or images per domain differ from the release is an error unless partial=True.
    """
    if class_folders not in ("error", "intersection"):
        raise ValueError(f"class_folders must be 'error' or 'intersection'; got {class_folders!r}")
    base = Path(root) / dataset
    layout = LAYOUT.format(root=root, dataset=dataset)
    if not base.is_dir():
        raise FileNotFoundError(f"No dataset folder {base}.\n{layout}")
    skipped = []  # hidden and system entries at every level, said in one warning
    found_domains = [p.name for p in subfolders(base, skipped=skipped)]
    if not found_domains:
        raise FileNotFoundError(f"{base} has no domain folders.\n{layout}")
    domains = list(domains) if domains is not None else found_domains
    missing = [d for d in domains if d not in found_domains]
    if missing:
        raise FileNotFoundError(f"{base} has no domain folder(s) {missing}; it has {found_domains}.\n{layout}")
    per_domain = {d: {p.name for p in subfolders(base / d, skipped=skipped)} for d in domains}
    folders = sorted(set.union(*per_domain.values()))
    common = sorted(set.intersection(*per_domain.values()))
    if folders != common and class_folders == "error":
        lacking = {d: sorted(set(folders) - names) for d, names in per_domain.items() if set(folders) - names}
        raise ValueError(f"The domains of {base} have different class folders (a merge would make classes that "
                         f"exist in some domains only): missing {lacking}. Fix the copy, or pass "
                         f"class_folders='intersection' (runner: --dataset-option class_folders=intersection) to "
                         f"keep the {len(common)} classes every domain has.")
    folders = common
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
    paths, labels, item_domains, empty = [], [], [], []
    for domain in domains:
        for label, folder in enumerate(folders):
            images = image_files(base / domain / folder, skipped=skipped)
            if not images:
                empty.append(f"{domain}/{folder}")
            paths.extend(map(str, images))
            labels.extend([label] * len(images))
            item_domains.extend([domain] * len(images))
    warn_skipped(base, skipped)
    if empty:
        raise FileNotFoundError(f"{len(empty)} class folder(s) of {base} have no images "
                                f"({sorted(IMAGE_SUFFIXES)}): {empty[:10]}{' ...' if len(empty) > 10 else ''}; a "
                                f"class with no images cannot be trained or tested: fill or remove them.")
    if dataset in PUBLISHED and not partial:
        _check_published(dataset, base, found_domains, len(folders), item_domains)
    return ImageSet(images=paths, labels=torch.tensor(labels), classnames=classnames, domains=item_domains)


def _check_published(dataset, base, found_domains, num_classes, item_domains):
    """Domains on disk, classes and the images of the loaded domains against the release (PUBLISHED)."""
    published = PUBLISHED[dataset]
    problems = []
    if sorted(found_domains) != sorted(published["images"]):
        problems.append(f"its domains are {sorted(found_domains)}, not {sorted(published['images'])}")
    if num_classes != published["classes"]:
        problems.append(f"{num_classes} classes, not {published['classes']}")
    for domain in sorted(set(item_domains) & set(published["images"])):
        expected, found = published["images"][domain], item_domains.count(domain)
        if expected is not None and found != expected:
            problems.append(f"{domain} has {found} images, not {expected}")
    if problems:
        raise ValueError(f"{base} does not match the published {dataset}: {'; '.join(problems)}. A partial or "
                         f"altered copy gives numbers that cannot be compared with the papers'; complete it, or "
                         f"pass partial=True (runner: --dataset-option partial=true) if it is intended.")


def check_images(dataset, progress=True):
    """Decode every image file of an ImageSet; raise one error that lists every file that cannot be read (all of
    them, with their paths), so that a truncated download fails before training, not in the middle of it."""
    if isinstance(dataset.images, torch.Tensor):
        return
    broken = []
    for path in tqdm(dataset.images, desc="checking images", disable=not progress, leave=False):
        try:
            with Image.open(path) as image:
                to_rgb(image)  # the whole file, as training reads it: verify() alone misses truncated data
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
            broken.append(f"{path}: {error}")
    if broken:
        shown = "\n  ".join(broken[:20]) + ("\n  ..." if len(broken) > 20 else "")
        raise OSError(f"{len(broken)} of {len(dataset.images)} images cannot be read (re-download or remove them):"
                      f"\n  {shown}")


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
    return dataset.subset(_k_shot_indices(dataset, k, seed))


def k_shot_rest(dataset, k, seed=0):
    """The items k_shot(dataset, k, seed) leaves out: a held-out pool (the few-shot validation set)."""
    keep = set(_k_shot_indices(dataset, k, seed))
    return dataset.subset([i for i in range(len(dataset)) if i not in keep])


def _k_shot_indices(dataset, k, seed):
    rng = np.random.default_rng(seed)
    return sorted(i for _, indices in _groups(dataset, by_class=True).items() for i in rng.permutation(indices)[:k])


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
