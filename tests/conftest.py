import math
import os
import tempfile

import pytest
import torch

# Before any notebook kernel starts (nbval, papermill): quick budgets, and figures away from figures/.
os.environ.setdefault("LAB_BUDGET", "smoke")
os.environ.setdefault("LAB_FIGURES", tempfile.mkdtemp(prefix="lab-figures-"))
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """For modules of tiny models: a second torch thread only adds waiting, badly so on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def random_mini_setup():
    """(model, tokenizer, train): a randomly initialized mini-CLIP (quick to build, and any gradient is real),
    its tokenizer, and 24 photos of the base classes with the model's transform."""
    from lib import models
    from lib.data import shapeworld
    torch.manual_seed(0)
    model = models.build_mini().eval()
    train = shapeworld.make_split("unit-train", domains=["photo"], classes=shapeworld.BASE_CLASSES, n_per_class=4)
    return model, models.mini_tokenizer(), train.with_transform(models.mini_preprocess)


class FixedFeatures(torch.nn.Module):
    """A 'model' whose image features are its inputs (normalized) and whose logit scale is known, so that
    evaluation and calibration can be checked by hand."""

    def __init__(self, scale=10.0):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(scale)))

    def encode_image(self, images, normalize=True):
        return torch.nn.functional.normalize(images, dim=-1)


@pytest.fixture
def fixed_features():
    """FixedFeatures, the class: call it (with a scale) for a model."""
    return FixedFeatures
