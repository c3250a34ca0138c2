"""Data: ShapeWorld (embedded), DomainBed-layout folders and the WILDS releases (real), behind one `load_benchmark`."""
from dataclasses import dataclass

from . import folders, shapeworld, wilds
from .imageset import ImageSet


def templates_for(images):
    """The prompt templates that belong to an ImageSet: ShapeWorld's styles for ShapeWorld images (they carry
    their scenes), CLIP's ImageNet-style ensemble for images from folders. Methods and lib.evaluate use them
    unless given others, so the runner and the notebooks prompt the same data the same way."""
    from ..models import REAL_TEMPLATES, SHAPEWORLD_TEMPLATES  # models imports torch and open_clip: only when asked
    return SHAPEWORLD_TEMPLATES if images.scenes is not None else REAL_TEMPLATES


@dataclass
class Benchmark:
    """A fine-tuning problem: train on base classes of some domains, test on every domain and class group."""
    name: str
    train: ImageSet
    test: ImageSet
    train_domains: list
    domains: list
    base_classes: list
    new_classes: list
    # ID validation: base classes of the training domains, images not trained or tested on (temperature scaling,
    # choosing WiSE-FT's mixing coefficient). Empty when a folder dataset has no images left (n_train_per_class=None).
    validation: ImageSet = None
    # Metrics beyond accuracy that the dataset reports (lib.evaluate's METRICS names), e.g. WILDS's macro-F1.
    metrics: tuple = ()

    @property
    def templates(self):
        """The prompt templates of the data (templates_for); a method's `templates` hyperparameter overrides them."""
        return templates_for(self.train)

    @property
    def groups(self):
        """The class groups to evaluate, each among its own classes; an empty group (closed-set data) is left out."""
        return {name: classes for name, classes in (("base", self.base_classes), ("new", self.new_classes))
                if classes}

    def with_transform(self, transform):
        return Benchmark(self.name, self.train.with_transform(transform), self.test.with_transform(transform),
                         self.train_domains, self.domains, self.base_classes, self.new_classes,
                         None if self.validation is None else self.validation.with_transform(transform), self.metrics)


def load_benchmark(dataset="shapeworld", data_root=None, train_domains=("photo",), n_train_per_class=32,
                   n_test_per_class=25, test_fraction=0.2, seed=0, class_folders="error", partial=False,
                   progress=True, fraction=1.0, group_balanced=True):
    """The base-to-new and domain-shift benchmark the notebooks use.

    ShapeWorld: n_train_per_class images per base class of the training domains; n_test_per_class images of
    every class in every domain, and as many per base class of the training domains for validation. A DomainBed
    dataset under data_root: a per-(domain, class) train/test split (test_fraction), CoOp's base/new split of the
    sorted class names, and training on the base classes of train_domains (n_train_per_class caps the images per
    class and domain, and n_test_per_class the test and validation images per class and domain; None keeps
    all); validation takes the training images that the cap leaves out. The folders are checked as
    lib.data.folders.load_domainbed says (class_folders, partial), and every image the benchmark uses is decoded
    once, so that a broken file is reported with its path before training.
    WILDS "iWildCam" and "FMoW" (lib.data.wilds, data_root holding their release folders): train_domains must be
    ["id"]; fraction (of the training split) and group_balanced are theirs; the release's images are checked for
    presence only (hundreds of thousands of files).
    """
    train_domains = list(train_domains)
    if dataset in wilds.FOLDERS:
        if train_domains != ["id"]:
            raise ValueError(f"{dataset} trains on its ID training split: set train_domains to ['id'] (domains: "
                             f"'id' = ID test, 'ood' = OOD test); got {train_domains}.")
        if data_root is None:
            raise ValueError(f"{dataset} is read from disk: set data_root.\n{wilds.LAYOUT.format(root='data_root')}")
        train, validation, test = wilds.load(dataset, data_root, n_train_per_class, n_test_per_class, seed,
                                             fraction, group_balanced)
        classes = list(wilds.CLASSES[dataset])
        return Benchmark(dataset, train, test, ["id"], ["id", "ood"], classes, [], validation, wilds.METRICS[dataset])
    if fraction != 1.0 or not group_balanced:
        raise ValueError(f"fraction and group_balanced are options of the WILDS datasets {list(wilds.FOLDERS)}, "
                         f"not of {dataset!r}.")
    if dataset == "shapeworld":
        base, new = list(shapeworld.BASE_CLASSES), list(shapeworld.NEW_CLASSES)
        train = shapeworld.make_split("train", train_domains, base, n_train_per_class, seed)
        test = shapeworld.make_split("test", shapeworld.DOMAINS, shapeworld.CLASSES, n_test_per_class, seed)
        validation = shapeworld.make_split("validation", train_domains, base, n_test_per_class, seed)
        return Benchmark(dataset, train, test, train_domains, list(shapeworld.DOMAINS), base, new, validation)
    if data_root is None:
        raise ValueError(f"dataset={dataset!r} is read from disk: set data_root to the folder that holds "
                         f"{dataset}/<domain>/<class>/<image> (DomainBed layout), or use dataset='shapeworld'.")
    everything = folders.load_domainbed(data_root, dataset, class_folders=class_folders, partial=partial)
    missing = sorted(set(train_domains) - set(everything.domains))
    if missing:
        raise ValueError(f"train_domains {missing} are not domains of {dataset}; its domains are "
                         f"{sorted(set(everything.domains))}.")
    train_part, test = folders.train_test_split(everything, test_fraction, seed)
    base, new = folders.base_new_split(everything.classnames)
    pool = train_part.where(domains=train_domains, classes=base).relabel(base)
    train, validation = pool, pool.subset([])
    if n_train_per_class is not None:
        train = folders.k_shot(pool, n_train_per_class, seed)
        validation = folders.k_shot_rest(pool, n_train_per_class, seed)
    if n_test_per_class is not None:
        test = folders.k_shot(test, n_test_per_class, seed)
        validation = folders.k_shot(validation, n_test_per_class, seed)
    for part in (train, test, validation):
        folders.check_images(part, progress)
    return Benchmark(dataset, train, test, train_domains, sorted(set(everything.domains)), base, new, validation)
