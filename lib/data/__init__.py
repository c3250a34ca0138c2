"""Data: ShapeWorld (embedded) and the papers' benchmarks on disk, behind one `load_benchmark`.

Each family of real layouts is a module with `load(data_root, dataset, ...)` -> Benchmark and `check(data_root,
dataset, train_domains)` (the cheap folder check lib.runner makes before training): folders (DomainBed), imagenet
(ImageNet and its variants), coop (CoOp's split files), wilds (the iWildCam and FMoW releases)."""
import inspect
from dataclasses import replace

import torch

from . import coop, folders, imagenet, shapeworld, wilds
from .benchmark import Benchmark, Classification, class_ids, templates_for
from .imageset import ImageSet

# Dataset name -> the module that reads it; any other name is read as a DomainBed-layout folder.
LOADERS = {"ImageNet": imagenet, **dict.fromkeys(coop.LAYOUTS, coop), **dict.fromkeys(wilds.FOLDERS, wilds)}
# The arguments every loader's `load` takes; the others are its own dataset options.
_COMMON = ("root", "dataset", "train_domains", "n_train_per_class", "n_test_per_class", "seed", "partial")


def loader(dataset):
    """The module that reads `dataset` from disk (LOADERS; DomainBed's folders for any other name)."""
    return LOADERS.get(dataset, folders)


def load_benchmark(dataset="shapeworld", data_root=None, train_domains=("photo",), n_train_per_class=32,
                   n_test_per_class=25, seed=0, partial=False, progress=True, cross_dataset=(), **options):
    """The benchmark of `dataset`: ShapeWorld, or a dataset on disk under data_root (LOADERS).

    ShapeWorld: n_train_per_class images per base class of the training domains; n_test_per_class images of
    every class in every domain, and as many per base class of the training domains for validation. On disk:
    n_train_per_class caps the training images per class (and domain) and n_test_per_class the test and
    validation images (None keeps all); partial=True allows a copy whose image counts differ from the release;
    options are the family's own (its module's `load`: e.g. protocol, class_folders, test_fraction, variants;
    WILDS's fraction and group_balanced).
    cross_dataset: CoOp datasets whose test images are added as test domains (with_cross_dataset). Every image
    the benchmark uses is decoded once, so a broken file is reported with its path before training.
    """
    train_domains = list(train_domains)
    if dataset == "shapeworld":
        if options:
            raise ValueError(f"ShapeWorld takes no dataset options; got {sorted(options)}.")
        base, new = list(shapeworld.BASE_CLASSES), list(shapeworld.NEW_CLASSES)
        ids = class_ids(shapeworld.CLASSES, base)
        train = shapeworld.make_split("train", train_domains, base, n_train_per_class, seed)
        test = shapeworld.make_split("test", shapeworld.DOMAINS, shapeworld.CLASSES, n_test_per_class, seed)
        validation = shapeworld.make_split("validation", train_domains, base, n_test_per_class, seed)
        train.class_ids, validation.class_ids = ids, ids
        return Benchmark(dataset, train, test, train_domains, list(shapeworld.DOMAINS), base, new, validation)
    if data_root is None:
        raise ValueError(f"dataset={dataset!r} is read from disk: set data_root to the folder that holds it "
                         f"(the README's real-tier section draws each layout), or use dataset='shapeworld'.")
    family = loader(dataset)
    accepted = sorted(set(inspect.signature(family.load).parameters) - set(_COMMON))
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"{dataset} takes no dataset option(s) {unknown}; its options are {accepted} (and "
                         f"partial, cross_dataset).")
    bench = family.load(data_root, dataset, train_domains, n_train_per_class, n_test_per_class, seed,
                        partial=partial, **options)
    if cross_dataset:
        bench = with_cross_dataset(bench, data_root, cross_dataset, n_test_per_class, seed, partial)
    for part in (bench.train, bench.test, bench.validation):
        if part is not None:
            folders.check_images(part, progress)
    return bench


def with_cross_dataset(bench, data_root, datasets, n_test_per_class=None, seed=0, partial=False):
    """bench with the test split of each of `datasets` (CoOp's, lib.data.coop) added as a test domain of that name:
    every class of it, its own prompt, in one more class group "cross-dataset" (ARF Table 2, SAFT Table 3: a model
    fine-tuned on ImageNet evaluated zero-shot on the others). The benchmark's own domains keep their classes."""
    unknown = [d for d in datasets if d not in coop.LAYOUTS]
    if unknown:
        raise ValueError(f"cross_dataset {unknown}: cross-dataset evaluation reads CoOp's datasets "
                         f"{sorted(coop.LAYOUTS)}.")
    test, plan = bench.test, bench.classification or Classification()
    own = list(range(len(test.classnames)))
    plan = replace(plan, classes={**{d: own for d in bench.domains}, **plan.classes}, templates=dict(plan.templates))
    images, labels, names, domains, added = list(test.images), [test.labels], list(test.classnames), \
        list(test.domains), []
    for name in datasets:
        other = coop.load(data_root, name, None, None, n_test_per_class, seed, partial, protocol="all").test
        ids = list(range(len(names), len(names) + len(other.classnames)))
        images += other.images
        labels.append(other.labels + len(names))
        names += other.classnames
        domains += other.domains
        plan.classes[name], plan.templates[name] = ids, (coop.PROMPTS[name],)
        added += ids
    test = replace(test, images=images, labels=torch.cat(labels), classnames=names, domains=domains)
    return replace(bench, test=test, domains=bench.domains + list(datasets), classification=plan,
                   class_groups={**bench.groups, "cross-dataset": added})
