# The environment every test run sets (quick budgets, figures and cache elsewhere) is in the root conftest.py.
import math

import pytest
import torch


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


# ------------------------------------------------------------------------ fabricated WILDS releases
# Rows of a fabricated FMoW v1.1 (split in the release, timestamp, country) and the WILDS split each must get:
# timestamps on both sides of 2013 and 2016, a row in no split, and a sequestered ("seq") row.
FMOW_ROWS = [("train", "2012-12-31T23:59:59Z", "USA", "train"), ("train", "2011-06-01T10:00:00Z", "FRA", "train"),
             ("train", "2010-03-01T00:00:00Z", "KEN", "train"), ("train", "2009-03-01T00:00:00Z", "XXX", "train"),
             ("train", "2013-01-01T00:00:00Z", "USA", None), ("seq", "2012-01-01T00:00:00Z", "USA", None),
             ("val", "2012-05-05T00:00:00Z", "FRA", "id_val"), ("val", "2013-01-01T00:00:00Z", "KEN", "val"),
             ("val", "2016-02-01T00:00:00Z", "USA", None), ("test", "2012-07-07T00:00:00Z", "KEN", "id_test"),
             ("test", "2011-07-07T00:00:00Z", "USA", "id_test"), ("test", "2014-07-07T00:00:00Z", "FRA", None),
             ("test", "2016-01-01T00:00:00Z", "USA", "test"), ("test", "2017-09-09T00:00:00Z", "FRA", "test"),
             ("test", "2017-12-31T23:00:00Z", "XXX", "test"), ("test", "2016-05-05T00:00:00Z", "KEN", "test")]
FMOW_REGIONS = {"USA": "Americas", "FRA": "Europe", "KEN": "Africa"}


def _tiny_png(path, red):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (red % 256, red // 256, 0)).save(path)


def make_wilds_copy(root, train_per_class=1):
    """A tiny fabricated copy of both WILDS releases under root (8x8 images). FMoW: FMOW_ROWS, then one train row
    per class (2010, alternating countries); the red and green channels of rgb_img_<i>.png encode i. iWildCam
    (metadata.csv): train_per_class train images of each of the 182 labels at locations 0-2, three images of each
    other split (OOD ones at locations 3-4); every file name is <split>_<label>_<location>_<n>.jpg (the truth)."""
    import pandas as pd
    from lib.data import wilds
    fmow = root / "fmow_v1.1"
    rows = [dict(split=s, timestamp=t, country_code=c, category=wilds.FMOW_CATEGORIES[i % 62])
            for i, (s, t, c, _) in enumerate(FMOW_ROWS)]
    countries = list(FMOW_REGIONS)
    rows += [dict(split="train", timestamp="2010-01-01T00:00:00Z", country_code=countries[(label + k) % 3],
                  category=wilds.FMOW_CATEGORIES[label]) for label in range(62) for k in range(train_per_class)]
    for i in range(len(rows)):
        _tiny_png(fmow / "images" / f"rgb_img_{i}.png", i)
    pd.DataFrame(rows).to_csv(fmow / "rgb_metadata.csv", index=False)
    pd.DataFrame({"alpha-3": list(FMOW_REGIONS), "region": list(FMOW_REGIONS.values())}).to_csv(
        fmow / "country_code_mapping.csv", index=False)
    (fmow / "RELEASE_v1.1.txt").write_text("fabricated\n")
    iwildcam = root / "iwildcam_v2.0"
    records = []
    for split in ("train", "val", "test", "id_val", "id_test"):
        for label in ([label for label in range(182) for _ in range(train_per_class)] if split == "train"
                      else [0, 5, 181]):
            location = label % 3 if split.startswith(("train", "id")) else 3 + label % 2
            name = f"{split}_{label}_{location}_{len(records)}.jpg"
            _tiny_png(iwildcam / "train" / name, label)
            records.append(dict(split=split, filename=name, y=label, location_remapped=location,
                                location=location + 100,
                                sequence_remapped=len(records), datetime="2013-05-05 10:00:00.000",
                                category_id=3 * label + 1))
    pd.DataFrame(records).to_csv(iwildcam / "metadata.csv", index=False)
    (iwildcam / "RELEASE_v2.0.txt").write_text("fabricated\n")
    return root
