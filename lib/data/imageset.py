"""ImageSet: the one dataset type of the project, for ShapeWorld tensors and for image files on disk."""
from dataclasses import dataclass, field

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
    """
    images: object
    labels: torch.Tensor
    classnames: list
    domains: list
    captions: list = None
    scenes: dict = None
    transform: object = field(default=None, repr=False)

    def __len__(self):
        return len(self.labels)

    def load(self, i):
        if isinstance(self.images, torch.Tensor):
            return self.images[i]
        try:
            with Image.open(self.images[i]) as image:
                return to_rgb(image)
        except (OSError, ValueError) as error:  # PIL's messages (e.g. "Truncated File Read") do not say which file
            raise OSError(f"Cannot read image {self.images[i]}: {error}") from error

    def __getitem__(self, i):
        image = self.load(i)
        return (self.transform(image) if self.transform else image), self.labels[i]

    def with_transform(self, transform):
        return ImageSet(self.images, self.labels, self.classnames, self.domains, self.captions, self.scenes, transform)

    def subset(self, indices):
        indices = np.asarray(indices, dtype=np.int64)
        images = self.images[torch.from_numpy(indices)] if isinstance(self.images, torch.Tensor) \
            else [self.images[i] for i in indices]
        scenes = {k: v[indices] for k, v in self.scenes.items()} if self.scenes is not None else None
        return ImageSet(images, self.labels[torch.from_numpy(indices)], self.classnames,
                        [self.domains[i] for i in indices],
                        [self.captions[i] for i in indices] if self.captions is not None else None,
                        scenes, self.transform)

    def where(self, domains=None, classes=None):
        """The items of the given domains and classes (labels keep indexing self.classnames)."""
        keep = [i for i in range(len(self))
                if (domains is None or self.domains[i] in domains)
                and (classes is None or self.classnames[self.labels[i]] in classes)]
        return self.subset(keep)

    def relabel(self, classes):
        """The items of `classes` only, with labels re-indexed into `classes` (e.g. new classes among themselves)."""
        part = self.where(classes=classes)
        part.labels = torch.tensor([list(classes).index(self.classnames[y]) for y in part.labels], dtype=torch.long)
        part.classnames = list(classes)
        return part
