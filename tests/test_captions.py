"""ARF's inputs made with real tools: captions from a CoCa captioner (python -m lib.captions), candidates from
webdataset shards, caption embeddings cached once."""
import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from lib import anchors, captions
from lib.data import load_benchmark
from lib.methods import get_method

# A CoCa of open_clip's design, shrunk so that building it and decoding a few captions take a second (random
# weights: the captions are gibberish; this checks the plumbing only).
TINY_COCA = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16,
                            "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
             "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                          "embed_cls": True, "output_tokens": True},
             "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                                "attn_pooler_heads": 2},
             "custom_text": True}


@pytest.fixture
def toy_folder(tmp_path):
    """A DomainBed-layout dataset 'Toy': 2 domains, 4 classes, 5 images each (8x8)."""
    for domain in ("d1", "d2"):
        for c, name in enumerate(("ant", "bee", "cat", "dog")):
            (tmp_path / "Toy" / domain / name).mkdir(parents=True)
            for i in range(5):
                Image.new("RGB", (8, 8), (40 * c, 40 * i, 0)).save(tmp_path / "Toy" / domain / name / f"{i}.png")
    return tmp_path


def test_captions_command_resumes_after_an_interruption_and_arf_reads_the_file(toy_folder, tmp_path,
                                                                               monkeypatch, random_mini_setup):
    pytest.importorskip("transformers")
    config = tmp_path / "tiny_coca.json"
    config.write_text(json.dumps(TINY_COCA))
    output = tmp_path / "out" / "captions.csv"
    train = load_benchmark("Toy", toy_folder, ["d1"], None, None).train
    assert len(train) == 8  # 4 of 5 images (the 20 % test split) of the 2 base classes

    class Interrupted(Exception):
        pass

    coca = captions.CocaCaptioner(str(config), None, "cpu", seq_len=6)
    calls = []

    def once_then_fail(images):
        if calls:
            raise Interrupted
        calls.append(len(images))
        return coca(images)
    with pytest.raises(Interrupted):
        captions.write_captions(train.images, output, once_then_fail, batch_size=3, progress=False)
    assert output.read_text().count("\n") == 1 + 3  # the header and the first batch, on disk

    seen = []
    original = captions.CocaCaptioner.__call__
    monkeypatch.setattr(captions.CocaCaptioner, "__call__", lambda self, images: seen.append(len(images))
                        or original(self, images))
    captions.main(["--dataset", "Toy", "--data-root", str(toy_folder), "--train-domains", "d1", "--output",
                   str(output), "--model", str(config), "--pretrained", "none", "--batch-size", "3", "--seq-len", "6",
                   "--device", "cpu"])
    assert sum(seen) == 5  # only the images the first run did not reach
    texts = anchors.FileCaptioner(output)(train)
    assert len(texts) == 8 and all(isinstance(t, str) for t in texts)
    model, tokenizer, _ = random_mini_setup
    from lib import models
    method = get_method("arf-cap", captions=str(output))
    method.setup(model, tokenizer, train.with_transform(models.mini_preprocess), num_steps=1, seed=0)
    assert method.captions == texts


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _png(red):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (red, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def shards(tmp_path):
    """Two webdataset shards as img2dataset writes them (plus samples that lack an image or a caption)."""
    folder = tmp_path / "cc3m"
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for key, red in (("000000000", 10), ("000000001", 20)):
            _add(tar, f"{key}.jpg", _png(red))
            _add(tar, f"{key}.txt", f"a web picture {red}".encode())
            _add(tar, f"{key}.json", b"{}")
        _add(tar, "000000002.txt", b"a caption without an image")
        _add(tar, "000000003.jpg", _png(30))
    with tarfile.open(folder / "00001.tar", "w") as tar:
        _add(tar, "000000004.png", _png(40))
        _add(tar, "000000004.txt", "a web picture 40 ünïcode".encode())
    return folder


def test_candidates_from_webdataset_shards(shards):
    corpus = anchors.CandidateCorpus.from_path(shards)
    assert corpus.captions == ["a web picture 10", "a web picture 20", "a web picture 40 ünïcode"]
    pairs = corpus.pairs([2, 0])
    assert pairs.captions == ["a web picture 40 ünïcode", "a web picture 10"]
    assert [pairs.load(i).getpixel((0, 0))[0] for i in range(2)] == [40, 10]
    with pytest.raises(FileNotFoundError, match="shards"):
        anchors.CandidateCorpus.from_path(shards / "missing.tar")


def test_a_second_run_reuses_the_cached_candidate_embeddings(shards, random_mini_setup, monkeypatch):
    from lib import models
    model, tokenizer, train = random_mini_setup
    calls = []
    encode = anchors.encode_text
    monkeypatch.setattr(anchors, "encode_text", lambda *args: calls.append(1) or encode(*args))
    embeddings = []
    for _ in range(2):
        anchors._RECENT_EMBEDDINGS.clear()  # a new process: only the disk cache is left
        method = get_method("arf-ret", candidates=str(shards), k=2)
        method.setup(model, tokenizer, train, num_steps=1, seed=0)
        embeddings.append(torch.load(shards / "lab-cache" / "text_embeddings.pt", weights_only=True)["embeddings"])
        if len(embeddings) == 1:
            first_calls = len(calls)
    assert first_calls > 0 and len(calls) == first_calls  # the second run encoded nothing
    assert torch.equal(*embeddings) and embeddings[0].shape[0] == 3
    assert method.neighbours.shape == (len(train), 2)
    assert len(models.mini_preprocess(method.anchor_set.load(0)).shape) == 3
