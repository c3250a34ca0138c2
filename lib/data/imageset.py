"""ImageSet: the one dataset type of the project, for ShapeWorld tensors and for image files on disk."""
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image


@dataclass
class ImageSet(torch.utils.data.Dataset):
    """Labelled images with their domain (and a caption, when known).

    images is either a float tensor [N, 3, H, W] in [0, 1] (ShapeWorld) or a list of file paths (real data).
    transform maps one image (a tensor or a PIL image) to the model's input; set it with `with_transform`.
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
    metadata: dict = field(default=None, repr=False)

    def __len__(self):
        return len(self.labels)

    def load(self, i):
        if isinstance(self.images, torch.Tensor):
            return self.images[i]
        try:
            return Image.open(self.images[i]).convert("RGB")
        except OSError as error:  # PIL's messages (e.g. "Truncated File Read") do not say which file
            raise OSError(f"Cannot read image {self.images[i]}: {error}") from error

    def __getitem__(self, i):
        image = self.load(i)
        return (self.transform(image) if self.transform else image), self.labels[i]

    def with_transform(self, transform):
        return ImageSet(self.images, self.labels, self.classnames, self.domains, self.captions, self.scenes, transform,
                        self.metadata)

    def subset(self, indices):
        indices = np.asarray(indices, dtype=np.int64)
        images = self.images[torch.from_numpy(indices)] if isinstance(self.images, torch.Tensor) \
            else [self.images[i] for i in indices]
        scenes = {k: v[indices] for k, v in self.scenes.items()} if self.scenes is not None else None
        metadata = {k: np.asarray(v)[indices] for k, v in self.metadata.items()} if self.metadata is not None else None
        return ImageSet(images, self.labels[torch.from_numpy(indices)], self.classnames,
                        [self.domains[i] for i in indices],
                        [self.captions[i] for i in indices] if self.captions is not None else None,
                        scenes, self.transform, metadata)

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
