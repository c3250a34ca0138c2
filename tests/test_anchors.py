"""Tests of lib.anchors: exact retrieval (torch and faiss), the text-embedding cache, captioners, anchor pairs."""
import csv
import re

import open_clip
import pytest
import torch

from lib import anchors
from lib.anchors import (FileCaptioner, ShapeWorldCaptioner, anchor_pairs, cached_text_embeddings, retrieve,
                         retrieve_anchors)
from lib.data import shapeworld
from lib.data.imageset import ImageSet


def random_rows(count, dim, seed, dtype=torch.float64):
    # float64 keeps a brute-force reference and a chunked search free of rounding ties.
    return torch.randn(count, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def brute_force(queries, candidates, k):
    return (queries @ candidates.T).argsort(dim=1, descending=True)[:, :k]


# ----------------------------------------------------------------------------------------------- retrieve
@pytest.mark.parametrize("n, m, k", [(1, 1, 1), (5, 40, 1), (37, 500, 7), (200, 3000, 25), (64, 100, 100)])
def test_retrieve_matches_brute_force(n, m, k):
    queries, candidates = random_rows(n, 16, seed=n), random_rows(m, 16, seed=m + 1)
    found = retrieve(queries, candidates, k, method="torch", batch_size=16, chunk_size=64)
    assert found.dtype == torch.long and found.shape == (n, k)
    assert torch.equal(found, brute_force(queries, candidates, k))


def test_chunked_torch_search_equals_one_big_matmul():
    queries, candidates = random_rows(53, 8, seed=0), random_rows(1000, 8, seed=1)
    whole = retrieve(queries, candidates, 10, method="torch", batch_size=53, chunk_size=1000)
    # Chunks smaller than k exercise the running merge while fewer than k candidates have been seen.
    for batch_size, chunk_size in [(7, 13), (1, 3), (100, 999)]:
        chunked = retrieve(queries, candidates, 10, method="torch", batch_size=batch_size, chunk_size=chunk_size)
        assert torch.equal(chunked, whole)


def test_faiss_and_torch_agree_on_float32_data():
    queries = random_rows(300, 32, seed=2, dtype=torch.float32)
    candidates = random_rows(20_000, 32, seed=3, dtype=torch.float32)
    with_faiss = retrieve(queries, candidates, 10, method="faiss")
    with_torch = retrieve(queries, candidates, 10, method="torch")
    assert with_faiss.dtype == torch.long
    assert torch.equal(with_faiss, with_torch)


def test_auto_uses_faiss_only_for_large_candidate_sets(monkeypatch):
    calls = []
    real_faiss = anchors._retrieve_faiss
    monkeypatch.setattr(anchors, "_retrieve_faiss", lambda *args: calls.append(len(args[1])) or real_faiss(*args))
    queries = random_rows(3, 4, seed=4, dtype=torch.float32)
    retrieve(queries, random_rows(anchors.FAISS_MIN_CANDIDATES, 4, seed=5, dtype=torch.float32), 2)
    assert calls == []
    large = random_rows(anchors.FAISS_MIN_CANDIDATES + 1, 4, seed=6, dtype=torch.float32)
    assert torch.equal(retrieve(queries, large, 2), brute_force(queries, large, 2))
    assert calls == [anchors.FAISS_MIN_CANDIDATES + 1]


def test_retrieve_accepts_numpy_and_no_queries():
    queries, candidates = random_rows(4, 6, seed=7), random_rows(30, 6, seed=8)
    assert torch.equal(retrieve(queries.numpy(), candidates.numpy(), 3), brute_force(queries, candidates, 3))
    assert retrieve(queries[:0], candidates, 3).shape == (0, 3)


@pytest.mark.parametrize("k, dims, method, message", [
    (0, (8, 8), "torch", "k must be between 1 and the number of candidates"),
    (11, (8, 8), "torch", r"number of candidates \(10\); got k=11"),
    (1, (8, 9), "torch", "Dimension mismatch: queries have dimension 8, candidates 9"),
    (1, (8, 8), "annoy", r"Unknown retrieval method 'annoy'; choose from \['auto', 'torch', 'faiss'\]"),
])
def test_retrieve_errors(k, dims, method, message):
    queries, candidates = random_rows(2, dims[0], seed=9), random_rows(10, dims[1], seed=10)
    with pytest.raises(ValueError, match=message):
        retrieve(queries, candidates, k, method=method)


def test_retrieve_rejects_vectors():
    with pytest.raises(ValueError, match="must be 2-D"):
        retrieve(torch.ones(8), torch.ones(10, 8), 1)


# ----------------------------------------------------------------------------------------------- cache
@pytest.fixture
def tiny_clip():
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=1, head_width=32),
        text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=2, layers=1))
    return model, open_clip.tokenizer.SimpleTokenizer(context_length=16)


def count_encodings(model):
    calls = []
    encode = model.encode_text
    model.encode_text = lambda tokens, normalize: calls.append(len(tokens)) or encode(tokens, normalize=normalize)
    return calls


def test_text_embeddings_are_normalized_batched_and_restore_training_mode(tiny_clip):
    model, tokenizer = tiny_clip
    calls = count_encodings(model)
    texts = [f"a photo of shape {i}." for i in range(5)]
    embeddings = cached_text_embeddings(model, tokenizer, texts, batch_size=2)
    assert calls == [2, 2, 1]
    assert embeddings.shape == (5, 32) and embeddings.dtype == torch.float32
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(5), atol=1e-5)
    assert model.training  # a fresh open_clip model is in training mode; the call must leave it so


def test_cache_is_reused_and_invalidated_by_text_weights_or_texts(tiny_clip, tmp_path):
    model, tokenizer = tiny_clip
    calls = count_encodings(model)
    texts, path = ["a red star.", "a blue ring on the left."], tmp_path / "cache" / "texts.pt"
    first = cached_text_embeddings(model, tokenizer, texts, cache_path=path)
    assert path.exists() and len(calls) == 1

    assert torch.equal(cached_text_embeddings(model, tokenizer, texts, cache_path=path), first)
    with torch.no_grad():  # encode_text never reads the image tower, so its weights do not matter
        model.visual.proj.add_(1.0)
    assert torch.equal(cached_text_embeddings(model, tokenizer, texts, cache_path=path), first)
    assert len(calls) == 1

    with torch.no_grad():
        model.ln_final.bias.add_(0.5)
    changed = cached_text_embeddings(model, tokenizer, texts, cache_path=path)
    assert len(calls) == 2 and not torch.allclose(changed, first)
    assert torch.equal(changed, cached_text_embeddings(model, tokenizer, texts))
    assert len(calls) == 2  # the same key again, without a file: served from memory

    cached_text_embeddings(model, tokenizer, texts[::-1], cache_path=path)
    assert len(calls) == 3


# ----------------------------------------------------------------------------------------------- captioners
FULL_DESCRIPTION = re.compile(r"a (\w+) of a (\w+) (\w+) (\w+) (.+) on a (\w+) background\.")


@pytest.fixture(scope="module")
def small_split():
    return shapeworld.make_split("anchors-test", domains=["photo", "sketch"], classes=["circle", "star", "ring"],
                                n_per_class=4, seed=0)


def test_noiseless_shapeworld_captions_are_the_ground_truth(small_split):
    assert ShapeWorldCaptioner()(small_split) == small_split.captions


def test_shapeworld_captioner_is_deterministic_by_seed(small_split):
    captions = ShapeWorldCaptioner(noise=0.5, seed=1)(small_split)
    assert captions == ShapeWorldCaptioner(noise=0.5, seed=1)(small_split)
    assert captions != ShapeWorldCaptioner(noise=0.5, seed=2)(small_split)
    assert captions != small_split.captions


def test_full_noise_replaces_every_attribute_word(small_split):
    for i, text in enumerate(ShapeWorldCaptioner(noise=1.0)(small_split)):
        domain, size, color, shape, position, background = FULL_DESCRIPTION.fullmatch(text).groups()
        truth = shapeworld.scene_attributes(small_split.scenes, i)
        said = dict(domain=domain, size=size, color=color, shape=shape, position=position, background=background)
        assert all(said[name] != truth[name] for name in truth), (text, truth)


def test_shapeworld_captioner_errors():
    with pytest.raises(ValueError, match="between 0 and 1"):
        ShapeWorldCaptioner(noise=1.5)
    without_scenes = ImageSet(images=["x.png"], labels=torch.tensor([0]), classnames=["cat"], domains=["photo"])
    with pytest.raises(ValueError, match="use FileCaptioner"):
        ShapeWorldCaptioner()(without_scenes)


def write_captions(path, rows):
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "caption"])
        writer.writerows(rows)


def images_on_disk(paths):
    return ImageSet(images=[str(p) for p in paths], labels=torch.zeros(len(paths), dtype=torch.long),
                    classnames=["dog"], domains=["photo"] * len(paths))


def test_file_captioner_matches_relative_and_absolute_paths(tmp_path):
    csv_path = tmp_path / "captions.csv"
    write_captions(csv_path, [("dog/a.jpg", "a dog, asleep."), (str(tmp_path / "dog" / "b.jpg"), "a dog running."),
                              ("dog/unused.jpg", "not asked for.")])
    dataset = images_on_disk([tmp_path / "dog" / "b.jpg", tmp_path / "dog" / "a.jpg"])
    assert FileCaptioner(csv_path)(dataset) == ["a dog running.", "a dog, asleep."]


def test_file_captioner_names_missing_images_and_bad_files(tmp_path, small_split):
    csv_path = tmp_path / "captions.csv"
    write_captions(csv_path, [("a.jpg", "a dog.")])
    with pytest.raises(ValueError, match=r"no caption for 1 of 2 images:\n.*missing\.jpg$"):
        FileCaptioner(csv_path)(images_on_disk([tmp_path / "a.jpg", tmp_path / "missing.jpg"]))
    with pytest.raises(TypeError, match="ShapeWorldCaptioner"):
        FileCaptioner(csv_path)(small_split)
    (tmp_path / "bad.csv").write_text("file,text\na.jpg,a dog.\n")
    with pytest.raises(ValueError, match="needs the columns 'path' and 'caption'"):
        FileCaptioner(tmp_path / "bad.csv")


# ----------------------------------------------------------------------------------------------- retrieved anchors
def test_anchor_pairs_draw_one_retrieved_neighbour_per_training_image():
    image_features = torch.nn.functional.normalize(random_rows(6, 8, seed=11, dtype=torch.float32), dim=1)
    text_features = torch.nn.functional.normalize(random_rows(40, 8, seed=12, dtype=torch.float32), dim=1)
    neighbours = retrieve_anchors(image_features, text_features, k=3)
    assert torch.equal(neighbours, brute_force(image_features, text_features, 3))

    candidates = ImageSet(images=torch.rand(40, 3, 4, 4), labels=torch.zeros(40, dtype=torch.long), classnames=["x"],
                          domains=["photo"] * 40, captions=[f"caption {i}" for i in range(40)])
    batch = anchor_pairs([4, 0, 4], neighbours, candidates, generator=torch.Generator().manual_seed(0))
    for row, chosen in zip([4, 0, 4], batch.indices):
        assert chosen in neighbours[row]
    assert torch.equal(batch.images, candidates.images[batch.indices])
    assert batch.captions == [f"caption {int(i)}" for i in batch.indices]

    again = anchor_pairs([4, 0, 4], neighbours, candidates, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.indices, batch.indices)
    draws = {int(anchor_pairs([0], neighbours, candidates, torch.Generator().manual_seed(seed)).indices)
             for seed in range(30)}
    assert draws == set(neighbours[0].tolist())  # every neighbour is used, not just the nearest
