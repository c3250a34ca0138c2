"""Benchmark: what a run trains on and how its test images are classified; `templates_for`, the data's prompts."""
from dataclasses import dataclass, field, replace

from .imageset import ImageSet


def templates_for(images):
    """The prompt templates that belong to an ImageSet: ShapeWorld's styles for ShapeWorld images (they carry
    their scenes), CLIP's ImageNet-style ensemble for images from folders. Methods and lib.evaluate use them
    unless given others, so the runner and the notebooks prompt the same data the same way."""
    from ..models import REAL_TEMPLATES, SHAPEWORLD_TEMPLATES  # models imports torch and open_clip: only when asked
    return SHAPEWORLD_TEMPLATES if images.scenes is not None else REAL_TEMPLATES


@dataclass
class Classification:
    """How test images are classified when not every image among every class of its group (lib.evaluate).

    classes: {domain: class ids}: that domain's images are classified among these only (ImageNet-A and -R: 200
    classes; ObjectNet: its 113; a cross-dataset domain: its own classes). columns: {class id: ids}: the class's
    logit is the max over these classes' logits (an ObjectNet class over the ImageNet classes it maps to; a
    text head prompts those, a linear head reads their columns). templates: {domain: prompt templates} for the
    text head (a cross-dataset domain's own prompts). among: {group: class ids}: the group's images are
    classified among these instead of the group's own classes (CLIPood in the wild: base and new among both)."""
    classes: dict = field(default_factory=dict)
    columns: dict = field(default_factory=dict)
    templates: dict = field(default_factory=dict)
    among: dict = field(default_factory=dict)


@dataclass
class Benchmark:
    """A fine-tuning problem: train on base classes of some domains, test on every domain and class group.

    base_classes and new_classes name the groups (for reading); class_groups holds them as class ids, indices
    into test.classnames, which is what evaluation uses (None: the names looked up, when they are unique)."""
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
    class_groups: dict = None
    classification: Classification = None
    prompts: tuple = None  # the data's own prompt templates (CoOp's per-dataset prompt); None: templates_for
    # Metrics beyond accuracy that the dataset reports (lib.evaluate's METRICS names), e.g. WILDS's macro-F1.
    metrics: tuple = ()

    @property
    def templates(self):
        """The prompt templates of the data; a method's `templates` hyperparameter overrides them."""
        return tuple(self.prompts) if self.prompts is not None else templates_for(self.train)

    @property
    def groups(self):
        """{group: class ids}: what lib.evaluate.evaluate takes."""
        if self.class_groups is not None:
            return self.class_groups
        return {"base": class_ids(self.test.classnames, self.base_classes),
                "new": class_ids(self.test.classnames, self.new_classes)}

    def with_transform(self, transform):
        return replace(self, train=self.train.with_transform(transform), test=self.test.with_transform(transform),
                       validation=None if self.validation is None else self.validation.with_transform(transform))


def class_ids(classnames, classes, what="classes"):
    """Class ids (indices into classnames) from a list of ids, or of names where a name is unique (ShapeWorld's,
    DomainBed's folders); a name that two classes share (CLIP's "missile", "sunglasses") is an error."""
    ids = []
    for c in classes:
        if isinstance(c, str):
            matches = [i for i, name in enumerate(classnames) if name == c]
            if not matches:
                raise ValueError(f"{what}: the dataset does not have a class {c!r}; its classes are "
                                 f"{list(classnames)[:20]}{' ...' if len(classnames) > 20 else ''}.")
            if len(matches) > 1:
                raise ValueError(f"{what}: {len(matches)} classes are named {c!r} (ids {matches}); give class ids "
                                 f"(indices into the class list) instead of names.")
            ids.append(matches[0])
        elif not 0 <= int(c) < len(classnames):
            raise ValueError(f"{what}: class id {c} is not one of the {len(classnames)} classes.")
        else:
            ids.append(int(c))
    return ids
