import json
import subprocess
import sys
from pathlib import Path

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
    # bit for bit torchvision's normalize, which it replaces for speed: the committed results stay those of before
    images = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(models.mini_preprocess(x), TF.normalize(x, models.MINI_MEAN, models.MINI_STD))
               for x in images)


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


def _text_features_and_gradients(encode, model, tokens):
    model.zero_grad(set_to_none=True)
    features = encode(model, tokens)
    (features * torch.linspace(-1, 1, features.numel()).view_as(features)).sum().backward()
    return features.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_encode_text_cuts_the_padding_without_changing_features_or_gradients():
    torch.manual_seed(0)
    model = models.build_mini()
    tokenizer = models.mini_tokenizer()
    tokens = tokenizer(["a photo of a star.", "a painting of a small red triangle in the grass."])
    length = int(tokens.argmax(-1).max()) + 1  # up to the last end token
    assert length < tokens.shape[1]  # there is padding to cut

    calls = []
    model.transformer.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[1]))
    cut, cut_grads = _text_features_and_gradients(models.encode_text, model, tokens)
    full, full_grads = _text_features_and_gradients(lambda m, t: m.encode_text(t, normalize=True), model, tokens)
    assert calls == [length, tokens.shape[1]]  # the cut really ran shorter
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-6)
    assert cut_grads.keys() == full_grads.keys()
    for name, full_grad in full_grads.items():  # float rounding is relative to each tensor's largest entry
        atol = 1e-5 * float(full_grad.abs().max())
        torch.testing.assert_close(cut_grads[name], full_grad, rtol=1e-4, atol=atol, msg=name)
    beyond_last_prompt = full_grads["positional_embedding"][length:]
    assert beyond_last_prompt.abs().max() == 0  # why cutting is exact: those positions reach nothing
    assert model.positional_embedding.shape[0] == tokens.shape[1]  # the model itself is left whole


def test_encode_text_runs_other_text_towers_uncut():
    torch.manual_seed(0)
    model = models.build_mini()
    model.text_pool_type = "last"  # pooling that reads the padding: cutting would change the result
    tokens = models.mini_tokenizer()(["a photo of a star."])
    torch.testing.assert_close(models.encode_text(model, tokens), model.encode_text(tokens, normalize=True),
                               rtol=0, atol=0)


def test_random_open_clip_weights_are_seeded_and_leave_the_callers_random_state_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = models.load_clip("ViT-B-32", None, "cpu")[0].state_dict()
    assert torch.equal(torch.rand(3), expected_next)
    torch.manual_seed(7)  # another caller state: the same weights
    second = models.load_clip("ViT-B-32", None, "cpu")[0].state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_quick_gelu_comes_from_the_weights_never_from_the_file_name(tmp_path, monkeypatch):
    with torch.device("meta"):  # ViT-B-16's tensors, each one stored value broadcast (a tiny file)
        shapes = models.open_clip.create_model("ViT-B-16", device="meta").state_dict()
    state = {name: torch.zeros(()).expand(tensor.shape) for name, tensor in shapes.items()}
    plain = tmp_path / "ViT-B-16-openai.pt"  # "openai" in the name, but a plain state dict says nothing
    torch.save(state, plain)
    assert models.quick_gelu_for("ViT-B-16", str(plain)) is False
    marked = tmp_path / "mine.pt"
    torch.save({**state, "quick_gelu": True}, marked)
    assert models.quick_gelu_for("ViT-B-16", str(marked)) is True
    assert models.quick_gelu_for("ViT-B-16", "openai") is True  # open_clip's pretrained config says so
    assert models.quick_gelu_for("ViT-B-16", "laion2b_s34b_b88k") is False
    assert models.quick_gelu_for("ViT-B-16", None) is False
    seen = {}

    def fake_create(name, pretrained=None, force_quick_gelu=False):
        seen.update(name=name, quick_gelu=force_quick_gelu)
        raise RuntimeError("stop before building")
    monkeypatch.setattr(models.open_clip, "create_model_and_transforms", fake_create)
    for pretrained, option, expected in ((plain, None, False), (plain, True, True), (marked, None, True)):
        with pytest.raises(RuntimeError, match="stop before building"):
            models.load_clip("ViT-B-16", pretrained=str(pretrained), quick_gelu=option)
        assert seen["quick_gelu"] is expected


@pytest.mark.parametrize("content", [b"", b"\x8a\x01 random bytes, not a checkpoint \x00" * 10])
def test_a_corrupt_checkpoint_gives_one_clear_error(tmp_path, content):
    path = tmp_path / "ViT-B-16.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"Checkpoint .*ViT-B-16.pt cannot be read .*empty, truncated or not a "
                                         r"torch checkpoint"):
        models.load_clip("ViT-B-16", pretrained=str(path))


def test_importing_the_lab_leaves_transformers_out_until_a_model_needs_it():
    """open_clip would import transformers (seconds per process); lib.models keeps it out, and with_transformers()
    gives open_clip what CoCa's generate needs."""
    pytest.importorskip("transformers")
    script = ("import sys, lib.models as m; from open_clip import coca_model; "
              "print('transformers' in sys.modules, coca_model._has_transformers); "
              "m.with_transformers(); print('transformers' in sys.modules, coca_model._has_transformers)")
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).resolve().parent.parent).stdout.split()
    assert shown == ["False", "False", "True", "True"]
