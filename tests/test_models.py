import json

import pytest
import torch
import torchvision.transforms.functional as TF

from lib import models
from lib.data import shapeworld as sw
from lib.evaluate import evaluate


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown model name 'ViT-Q-99'"):
        models.load_clip("ViT-Q-99")


def test_missing_mini_checkpoint_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="lib.pretrain"):
        models.load_clip("mini", pretrained=tmp_path / "nowhere.pt")


def test_missing_local_checkpoint_for_open_clip_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_clip("ViT-B-16", pretrained=str(tmp_path / "ViT-B-16-openai.pt"))


def test_device_auto_is_the_cpu_without_a_gpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert models.pick_device("auto").type == expected


def test_mini_preprocess_accepts_tensors_and_pil_alike():
    image = sw.make_split("pre", domains=["photo"], classes=["star"], n_per_class=1).images[0]
    from_tensor = models.mini_preprocess(image)
    from_pil = models.mini_preprocess(TF.to_pil_image(image))
    assert from_tensor.shape == (3, 32, 32)
    assert (from_tensor - from_pil).abs().max() < 0.02  # PIL rounds to 8 bits
    assert torch.allclose(from_tensor * 0.25 + 0.5, image)


def test_class_text_features_average_normalized_templates():
    torch.manual_seed(0)
    model = models.build_mini().eval()
    tokenizer = models.mini_tokenizer()
    templates = ("a photo of a {}.", "a sketch of a {}.")
    head = models.zeroshot_head(model, tokenizer, ["star", "ring"], templates)
    with torch.no_grad():
        for row, name in zip(head, ["star", "ring"]):
            single = [torch.nn.functional.normalize(
                model.encode_text(tokenizer([t.format(name)])), dim=-1)[0] for t in templates]
            expected = torch.nn.functional.normalize(torch.stack(single).mean(0), dim=0)
            assert torch.allclose(row, expected, atol=1e-5)
    assert torch.allclose(head.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_committed_mini_clip_has_zero_shot_ability():
    """The committed checkpoint loads offline and is far above chance on every domain (12 classes)."""
    model, preprocess, tokenizer = models.load_clip("mini", device="cpu")
    test = sw.make_split("test-models", n_per_class=6, seed=5).with_transform(preprocess)
    results = evaluate(model, tokenizer, test)
    chance = 1 / len(sw.CLASSES)
    assert (results.accuracy > 2 * chance).all(), results
    assert results.accuracy.mean() > 0.4
    info = models.mini_info()
    assert info["config"] == json.loads(json.dumps(models.MINI_CONFIG)) and "lib.pretrain" in info["command"]
