"""ImageSet: the one dataset type of the project, for ShapeWorld tensors and for image files on disk."""
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image


# Full scale of PIL's integer modes that convert("RGB") would clip at 255 (it casts, it does not rescale): 16-bit
# grey ("I;16*"; a 16-bit PNG may also open as 32-bit "I", holding the same 0-65535 values).
FULL_SCALE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def to_rgb(image):
    """An 8-bit RGB copy of a PIL image. 16-bit grey is rescaled to 0-255 (PIL's convert("RGB") would saturate
    every value above 255 to white) and float grey ("F") in [0, 1] too; values outside the mode's range (an "I"
    image beyond 16 bits, a float image outside [0, 1]) have no scale we can know, and are a ValueError."""
    if image.mode not in FULL_SCALE and image.mode != "F":
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)
    high = FULL_SCALE.get(image.mode, 1.0)
    if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= high):
        raise ValueError(f"a {image.mode} image with values in [{values.min():g}, {values.max():g}], outside "
                         f"[0, {high:g}]: its scale is unknown; convert it to 8-bit")
    return Image.fromarray(np.round(values * (255 / high)).astype(np.uint8), "L").convert("RGB")


@dataclass
class ImageSet(torch.utils.data.Dataset):
    """Labelled images with their domain (and a caption, when known).

    images is either a float tensor [N, 3, H, W] in [0, 1] (ShapeWorld) or a list of file paths (real data).
    transform maps one image (a tensor or a PIL image) to the model's input; set it with `with_transform`.
    Classes are identified by index, never by name (CLIP's ImageNet names repeat): labels index classnames, and
    class_ids[label] is the class's id in the benchmark's full class list (what a linear head trained on these
    images calls it; None: the label itself). border: {domain: pixels} cropped from every side of that domain's
    images when read (ObjectNet's 2-pixel frame, as wise-ft reads it).
    metadata: optional per-item values by name (numpy arrays), e.g. WILDS's "split" and "region" or "location",
    and "weight", the per-item sampling weight of group-balanced training (lib.train); subset keeps them.
    """
    images: object
    labels: torch.Tensor
    classnames: list
    domains: list
    captions: list = None
    scenes: dict = None
    transform: object = field(default=None, repr=False)
    class_ids: list = None
    border: dict = None
    metadata: dict = field(default=None, repr=False)

    def __len__(self):
        return len(self.labels)

    def load(self, i):
        if isinstance(self.images, torch.Tensor):
            return self.images[i]
        try:
            with Image.open(self.images[i]) as image:
                image = to_rgb(image)
        except (OSError, ValueError) as error:  # PIL's messages (e.g. "Truncated File Read") do not say which file
            raise OSError(f"Cannot read image {self.images[i]}: {error}") from error
        pixels = (self.border or {}).get(self.domains[i], 0)
        return image.crop((pixels, pixels, image.width - pixels, image.height - pixels)) if pixels else image

    def __getitem__(self, i):
        image = self.load(i)
        return (self.transform(image) if self.transform else image), self.labels[i]

    def with_transform(self, transform):
        return replace(self, transform=transform)

    @property
    def ids(self):
        """The id of every class of classnames in the benchmark's full class list."""
        return list(range(len(self.classnames))) if self.class_ids is None else list(self.class_ids)

    def subset(self, indices):
        indices = np.asarray(indices, dtype=np.int64)
        images = self.images[torch.from_numpy(indices)] if isinstance(self.images, torch.Tensor) \
            else [self.images[i] for i in indices]
        scenes = {k: v[indices] for k, v in self.scenes.items()} if self.scenes is not None else None
        return replace(self, images=images, labels=self.labels[torch.from_numpy(indices)],
                       domains=[self.domains[i] for i in indices],
                       captions=[self.captions[i] for i in indices] if self.captions is not None else None,
                       scenes=scenes, metadata=None if self.metadata is None else
                       {k: np.asarray(v)[indices] for k, v in self.metadata.items()})

    def where(self, domains=None, classes=None):
        """The items of the given domains and classes (labels, i.e. indices into classnames; they keep indexing
        self.classnames)."""
        classes = None if classes is None else set(int(c) for c in classes)
        keep = [i for i, (domain, label) in enumerate(zip(self.domains, self.labels.tolist()))
                if (domains is None or domain in domains) and (classes is None or label in classes)]
        return self.subset(keep)

    def relabel(self, classes):
        """The items of `classes` (labels) only, re-indexed into that list (e.g. new classes among themselves);
        class_ids keeps each class's id, so heads and evaluation still tell which class it is."""
        classes = [int(c) for c in classes]
        part = self.where(classes=classes)
        position = {c: i for i, c in enumerate(classes)}
        part.labels = torch.tensor([position[int(y)] for y in part.labels], dtype=torch.long)
        part.classnames = [self.classnames[c] for c in classes]
        part.class_ids = [self.ids[c] for c in classes]
        return part
