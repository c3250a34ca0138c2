"""Anchors for ARF (Han et al., "Anchor-based Robust Finetuning of Vision-Language Models", CVPR 2024).

ARF fine-tunes CLIP contrastively (FLYP) and adds two kinds of anchors that keep the open-vocabulary
feature space in place:

- text-compensated anchors: each training image paired with a rich caption of itself (not just its class
  prompt), used in a contrastive term L_Cap. Here a *captioner* produces those captions.
- retrieved anchors: image-text pairs from a web-like candidate corpus that are nearest to the training
  images, used in a contrastive term L_Ret. Here `retrieve_anchors` finds them once, before training, and
  `anchor_pairs` hands a training loop one neighbour per training image of a batch.

ARF has no public code, so every choice below that the paper leaves open is ours and is stated where it is
made: the captioner (ground-truth scene descriptions for ShapeWorld; for real data a caption file, which
`python -m lib.captions` writes with a pretrained captioner), neighbours searched in the candidates' text
embeddings, computed once with the frozen pre-trained model, and one of the k neighbours sampled per training
image and step.

Exact kNN (`retrieve`) runs either as chunked torch matmuls or with faiss.IndexFlatIP; both are exact.
Embeddings of candidate captions can be cached on disk (`cached_text_embeddings`); the cache is keyed by the
texts and by the text tower's weights, so a stale file is never used.
"""
import csv
import functools
import glob
import hashlib
import os
import tarfile
from typing import NamedTuple, Protocol

import numpy as np
import torch

from .data import shapeworld
from .models import encode_text

RETRIEVAL_METHODS = ("auto", "torch", "faiss")
# Above this many candidates (on the CPU) faiss's search beats chunked torch matmuls + topk by up to 2x on the
# lab's CPUs; below it both are quick, and torch needs no copy of the candidates into an index.
FAISS_MIN_CANDIDATES = 50_000
FAISS_CANDIDATE_BLOCK = 16_384


# ----------------------------------------------------------------------------------------------- retrieval
def retrieve(queries, candidates, k, method="auto", batch_size=4096, chunk_size=16_384):
    """Indices [N, k] (a CPU LongTensor) of the k candidates with the largest dot product with each query, best first.

    queries [N, D] and candidates [M, D] are tensors (or arrays); for cosine similarity pass L2-normalized rows.
    The search is exact. Ties are broken arbitrarily, so two methods may order equal scores differently.

    method:
      "torch": query batches of `batch_size` against candidate chunks of `chunk_size`, keeping a running top-k,
               so memory stays at batch_size x chunk_size scores (256 MB of float32 by default) however many
               candidates there are. Runs on the queries' device (a GPU if they live there).
      "faiss": faiss.IndexFlatIP (exact inner product, float32, on the CPU).
      "auto":  faiss for more than FAISS_MIN_CANDIDATES candidates on the CPU, torch otherwise (and always
               torch for GPU queries, where a matmul beats a copy to the CPU).
    """
    queries, candidates = torch.as_tensor(queries), torch.as_tensor(candidates)
    _check_retrieval_inputs(queries, candidates, k, method)
    if method == "auto":
        large = len(candidates) > FAISS_MIN_CANDIDATES
        method = "faiss" if large and not queries.is_cuda else "torch"
    if len(queries) == 0:
        return torch.empty((0, k), dtype=torch.long)
    if method == "faiss":
        return _retrieve_faiss(queries, candidates, k)
    return _retrieve_torch(queries, candidates, k, batch_size, chunk_size)


def _check_retrieval_inputs(queries, candidates, k, method):
    if method not in RETRIEVAL_METHODS:
        raise ValueError(f"Unknown retrieval method {method!r}; choose from {list(RETRIEVAL_METHODS)}.")
    if queries.ndim != 2 or candidates.ndim != 2:
        raise ValueError(f"queries and candidates must be 2-D [count, dim]; got shapes {tuple(queries.shape)} "
                         f"and {tuple(candidates.shape)}.")
    if queries.shape[1] != candidates.shape[1]:
        raise ValueError(f"Dimension mismatch: queries have dimension {queries.shape[1]}, candidates "
                         f"{candidates.shape[1]}; embed both with the same model.")
    if not 1 <= k <= len(candidates):
        raise ValueError(f"k must be between 1 and the number of candidates ({len(candidates)}); got k={k}.")


def _retrieve_torch(queries, candidates, k, batch_size, chunk_size):
    dtype = torch.promote_types(queries.dtype, candidates.dtype)
    neighbours = []
    with torch.no_grad():
        for start in range(0, len(queries), batch_size):
            batch = queries[start:start + batch_size].to(dtype)
            best_scores = torch.empty((len(batch), 0), dtype=dtype, device=batch.device)
            best_indices = torch.empty((len(batch), 0), dtype=torch.long, device=batch.device)
            for offset in range(0, len(candidates), chunk_size):
                chunk = candidates[offset:offset + chunk_size].to(batch.device, dtype)
                scores, indices = (batch @ chunk.T).topk(min(k, len(chunk)), dim=1)
                # Merge this chunk's top-k into the running top-k: the best k of the union of two top-k lists
                # is the top-k of everything seen so far.
                scores = torch.cat([best_scores, scores], dim=1)
                indices = torch.cat([best_indices, indices + offset], dim=1)
                best_scores, position = scores.topk(min(k, scores.shape[1]), dim=1)
                best_indices = indices.gather(1, position)
            neighbours.append(best_indices.cpu())
    return torch.cat(neighbours)


def _retrieve_faiss(queries, candidates, k):
    import faiss  # imported here so the torch path works where faiss is not installed

    def as_float32(x):
        return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)

    index = faiss.IndexFlatIP(candidates.shape[1])
    index.add(as_float32(candidates))
    # faiss multiplies query blocks by blocks of 1,024 candidates by default; blocks of 16,384 make fewer, larger
    # BLAS calls (about 40 % faster for 10,000 x 200,000 on a 2-core test machine). The setting is global: restore it.
    default_block = faiss.cvar.distance_compute_blas_database_bs
    faiss.cvar.distance_compute_blas_database_bs = FAISS_CANDIDATE_BLOCK
    try:
        _, indices = index.search(as_float32(queries), k)
    finally:
        faiss.cvar.distance_compute_blas_database_bs = default_block
    return torch.from_numpy(indices).long()


# ----------------------------------------------------------------------------------------------- embeddings
def cache_folder():
    """Where the lab caches what it computes once (ShapeWorld's candidate embeddings): $LAB_CACHE, else
    ~/.cache/robust-clip-lab. Every file there is keyed by what made it, so a stale one is computed again."""
    return os.environ.get("LAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "robust-clip-lab")


def cached_text_embeddings(model, tokenizer, texts, cache_path=None, batch_size=256, device=None):
    """L2-normalized text embeddings [len(texts), D] (float32, CPU) of `texts`, optionally cached on disk.

    Texts are encoded in batches with lib.models.encode_text, in eval mode (so dropout cannot make the
    embeddings random) and without gradients; the model's training flag is restored.
    device is where the tokens go; None means the device of the model's parameters.

    The last few results are also kept in memory under the same key (runs of a sweep share one corpus).
    With cache_path, the file stores the embeddings with a key: a hash of the texts and of every parameter and
    buffer outside the image tower (names starting with "visual."), which encode_text never reads. A file whose
    key differs (other texts, or a text tower with different weights) is recomputed and overwritten, so a stale
    cache is never used, while fine-tuning only the image encoder keeps the cache valid.
    """
    texts = list(texts)
    key = _cache_key(model, texts)
    if key in _RECENT_EMBEDDINGS:
        return _RECENT_EMBEDDINGS[key]
    if cache_path is not None and os.path.exists(cache_path):
        cached = torch.load(cache_path, weights_only=True)
        if cached["key"] == key:
            return cached["embeddings"]

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            embeddings = torch.cat([
                encode_text(model, tokenizer(texts[start:start + batch_size]).to(device)).float().cpu()
                for start in range(0, len(texts), batch_size)])
    finally:
        model.train(was_training)

    if cache_path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        # Written aside, then renamed: runs side by side may read the file while another process writes it.
        partial = f"{cache_path}.{os.getpid()}.partial"
        torch.save({"key": key, "embeddings": embeddings}, partial)
        os.replace(partial, cache_path)
    _remember(key, embeddings)
    return embeddings


_RECENT_EMBEDDINGS = {}  # key -> embeddings, so a sweep of runs from one pre-trained model embeds its corpus once


def _remember(key, embeddings, keep=4):
    _RECENT_EMBEDDINGS[key] = embeddings
    while len(_RECENT_EMBEDDINGS) > keep:
        _RECENT_EMBEDDINGS.pop(next(iter(_RECENT_EMBEDDINGS)))


def _cache_key(model, texts):
    """A hex digest of the texts and of the text side of the model's weights (names, shapes, dtypes, bytes)."""
    digest = hashlib.blake2b(digest_size=20)
    for text in texts:
        digest.update(text.encode() + b"\0")  # the separator keeps ["ab", "c"] apart from ["a", "bc"]
    for name, tensor in model.state_dict().items():
        if name.startswith("visual."):
            continue
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        # Viewed as bytes so that any dtype (bfloat16 included, which numpy lacks) hashes the same way.
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- captioners
class Captioner(Protocol):
    """Anything that gives one caption per image of an ImageSet: `captions = captioner(dataset)`."""

    def __call__(self, dataset) -> list[str]: ...


class ShapeWorldCaptioner:
    """A perfect captioner for ShapeWorld, optionally with random word errors.

    It never looks at pixels: it reads the generator's ground truth (dataset.scenes) and writes the full
    description "a {domain} of a {size} {color} {shape} {position} on a {background} background." With
    noise=0 it is exactly the split's own caption. `noise` is the chance that each attribute word (all six,
    the class name and the domain included) is replaced by a wrong one, drawn uniformly among the others.

    Unlike a learned captioner (ARF used BLIP-2), whose errors concentrate on hard or unusual images, these
    errors are independent of the image. Deterministic given seed and the dataset.
    """

    def __init__(self, noise=0.0, seed=0):
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise is a probability, between 0 and 1; got {noise}.")
        self.noise, self.seed = noise, seed

    def __call__(self, dataset):
        if dataset.scenes is None:
            raise ValueError("ShapeWorldCaptioner needs a ShapeWorld ImageSet (with .scenes); for images on disk "
                             "use FileCaptioner with a CSV of captions.")
        scenes = self._with_word_errors(dataset.scenes)
        return [shapeworld.caption(scenes, i) for i in range(len(dataset))]

    def _with_word_errors(self, scenes):
        rng = np.random.default_rng(self.seed)
        noisy = dict(scenes)
        count = len(scenes["shape"])
        for name, words in shapeworld.ATTRIBUTES.items():
            replaced = rng.uniform(size=count) < self.noise
            shift = rng.integers(1, len(words), size=count)  # never 0, so a replaced word is always a wrong one
            noisy[name] = np.where(replaced, (scenes[name] + shift) % len(words), scenes[name])
        return noisy


class FileCaptioner:
    """Captions read from a CSV file with columns `path,caption`, for an ImageSet of image files.

    A row matches an image when both paths point at the same file name after making them absolute; relative
    paths in the CSV are taken relative to the CSV's folder (so a caption file can live beside its dataset),
    relative image paths relative to the working directory. Every image needs a caption; extra rows are ignored.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(self.path))
        with open(self.path, newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            if not {"path", "caption"} <= set(reader.fieldnames or ()):
                raise ValueError(f"{self.path} needs the columns 'path' and 'caption'; found {reader.fieldnames}.")
            self.captions = {os.path.abspath(os.path.join(folder, row["path"])): row["caption"] for row in reader}

    def __call__(self, dataset):
        if isinstance(dataset.images, torch.Tensor):
            raise TypeError("FileCaptioner matches captions by image file path, but this ImageSet holds a tensor "
                            "of images; for ShapeWorld use ShapeWorldCaptioner.")
        paths = [os.path.abspath(p) for p in dataset.images]
        missing = [p for p in paths if p not in self.captions]
        if missing:
            shown = "\n  ".join(missing[:10]) + ("\n  ..." if len(missing) > 10 else "")
            raise ValueError(f"{self.path} has no caption for {len(missing)} of {len(paths)} images:\n  {shown}")
        return [self.captions[p] for p in paths]


# ----------------------------------------------------------------------------------------------- candidates
class CandidateCorpus:
    """A web-like corpus of image-text pairs to retrieve anchors from: every caption up front (retrieval
    searches caption embeddings), images only for the pairs that are found (`pairs`).

    ShapeWorld: `CandidateCorpus.shapeworld(n)`, the web corpus stream "candidates", disjoint from mini-CLIP's
    pretraining stream. Real data: `CandidateCorpus.from_csv(path)`, a CSV with columns `path,caption` (relative
    paths are taken relative to the CSV's folder), e.g. a folder of web images with their alt-text; or
    `CandidateCorpus.from_webdataset(shards)`, tar shards as img2dataset writes them (CC3M, ARF's corpus);
    `from_path` takes either. A corpus read from disk has a cache folder: its caption embeddings are stored
    there once (cache_path, cached_text_embeddings) and reused by the next run with the same text tower.
    """

    def __init__(self, captions, make_pairs, cache_dir=None, cache_name="text_embeddings.pt"):
        self.captions = list(captions)
        self._make_pairs = make_pairs
        self._last_pairs = None  # (indices, ImageSet): the runs of a sweep retrieve the same pairs
        self.cache_path = None if cache_dir is None else os.path.join(cache_dir, cache_name)

    def __len__(self):
        return len(self.captions)

    def pairs(self, indices):
        """An ImageSet of the pairs at `indices` (in that order), with their captions. The last one is kept and
        returned again for the same indices: the frozen model and the training set decide what retrieval finds, so
        every seed of a sweep asks for the same pairs, and rendering ShapeWorld's took 4 s of each ARF run."""
        indices = np.asarray(indices, dtype=np.int64)
        if self._last_pairs is None or not np.array_equal(self._last_pairs[0], indices):
            self._last_pairs = indices, self._make_pairs(indices)
        return self._last_pairs[1]

    @classmethod
    def shapeworld(cls, n=20_000, seed=0, noise=0.05, classes=None):
        """The first n pairs of the "candidates" stream; with `classes` (class names), only those among them whose
        every object, main and distractors, is of one of these classes (a control without other classes). Made once
        per process for each setting (writing 20,000 captions takes 1.5 s), so the runs of a sweep share it."""
        return _shapeworld_corpus(n, seed, noise, None if classes is None else tuple(classes), cache_folder())

    @classmethod
    def from_path(cls, path, cache_dir=None):
        """A corpus from a CSV file (from_csv) or from webdataset shards: a folder of .tar files, or one .tar."""
        path = os.fspath(path)
        if path.endswith(".csv"):
            return cls.from_csv(path, cache_dir)
        shards = sorted(glob.glob(os.path.join(path, "*.tar"))) if os.path.isdir(path) else [path]
        return cls.from_webdataset(shards, cache_dir)

    @classmethod
    def from_webdataset(cls, shards, cache_dir=None):
        """Image-text pairs from webdataset tar shards (img2dataset's output: <key>.jpg or .png or .webp beside
        <key>.txt, the caption). Read with Python's tarfile, which needs no new dependency, reads the headers of a
        shard without decoding anything, and can later extract single members; the `webdataset` package streams
        samples, which suits training but not retrieval's random access. Samples without an image or a caption
        are skipped. The images of the pairs found are extracted once into cache_dir/images (default: a
        folder lab-cache beside the first shard)."""
        shards = [os.fspath(s) for s in shards]
        missing = [s for s in shards if not os.path.isfile(s)]
        if not shards or missing:
            raise FileNotFoundError(f"No webdataset shards at {missing or 'the path given'}: give a folder of .tar "
                                    f"shards as img2dataset writes them (<key>.jpg + <key>.txt), or a CSV.")
        cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(shards[0])), "lab-cache")
        captions, members = [], []
        for shard in shards:
            with tarfile.open(shard) as tar:
                samples = {}
                for member in tar.getmembers():
                    folder, name = os.path.split(member.name)
                    key, _, extension = name.partition(".")  # webdataset's rule: the key ends at the first dot
                    samples.setdefault(os.path.join(folder, key), {})[extension.lower()] = member
                for files in samples.values():
                    image = next((files[e] for e in WEB_IMAGE_EXTENSIONS if e in files), None)
                    if image is not None and "txt" in files:
                        captions.append(tar.extractfile(files["txt"]).read().decode("utf-8").strip())
                        members.append((shard, image.name))
        if not captions:
            raise ValueError(f"The shards {shards[:3]} hold no image-caption pairs (<key>.jpg + <key>.txt).")

        def make_pairs(idx):
            from .data.imageset import ImageSet
            paths = [_extracted(*members[i], cache_dir) for i in idx]
            return ImageSet(paths, torch.zeros(len(idx), dtype=torch.long), ["anchor"], ["web"] * len(idx),
                            [captions[i] for i in idx])
        return cls(captions, make_pairs, cache_dir)

    @classmethod
    def from_csv(cls, path, cache_dir=None):
        from .data.imageset import ImageSet
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No candidate corpus at {path}: give a CSV with columns 'path,caption' (image "
                                    f"paths relative to the CSV's folder), one row per web image-text pair.")
        folder = os.path.dirname(os.path.abspath(path))
        with open(path, newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            if not {"path", "caption"} <= set(reader.fieldnames or ()):
                raise ValueError(f"{path} needs the columns 'path' and 'caption'; found {reader.fieldnames}.")
            rows = [(os.path.join(folder, row["path"]), row["caption"]) for row in reader]
        if not rows:
            raise ValueError(f"{path} lists no image-text pairs.")
        images, captions = zip(*rows)

        def make_pairs(idx):
            return ImageSet([images[i] for i in idx], torch.zeros(len(idx), dtype=torch.long), ["anchor"],
                            ["web"] * len(idx), [captions[i] for i in idx])
        return cls(captions, make_pairs, cache_dir or os.path.join(folder, "lab-cache"))


WEB_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@functools.lru_cache(maxsize=4)
def _shapeworld_corpus(n, seed, noise, classes, cache_dir):
    scenes, captions = shapeworld.web_captions(n, seed, stream="candidates", noise=noise)
    if classes is not None:
        allowed = np.append(np.isin(shapeworld.CLASSES, list(classes)), True)  # index -1: no distractor
        keep = np.flatnonzero(allowed[scenes["shape"]] & allowed[scenes["distractor_shape"]].all(axis=1))
        scenes, captions = shapeworld.subset_scenes(scenes, keep), [captions[i] for i in keep]
    # Embedding 20,000 captions takes 10-15 s on a CPU, in every process that retrieves: they are cached in the
    # lab's cache folder, one file per corpus (the control's differs), keyed by the texts and the weights.
    name = f"shapeworld-candidates-{n}-{seed}-{noise}-{'all' if classes is None else '-'.join(classes)}.pt"
    return CandidateCorpus(captions, lambda idx: shapeworld.render_corpus(shapeworld.subset_scenes(scenes, idx),
                                                                          [captions[i] for i in idx]), cache_dir, name)


def _extracted(shard, member, cache_dir):
    """The path of a shard's member extracted under cache_dir/images (extracted on first use)."""
    target = os.path.join(cache_dir, "images", os.path.basename(shard), member)
    if not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with tarfile.open(shard) as tar:
            data = tar.extractfile(member).read()
        with open(target + ".tmp", "wb") as file:
            file.write(data)
        os.replace(target + ".tmp", target)
    return target


# ----------------------------------------------------------------------------------------------- retrieved anchors
def retrieve_anchors(image_features, candidate_text_features, k, method="auto"):
    """Indices [N, k] of the candidates whose caption embeddings are nearest to each training image.

    As in ARF, the training images' embeddings are the queries and the candidates' TEXT embeddings the
    searched set (cross-modal: the captions say what a pair is about, and CLIP aligns the two modalities).
    Our choice: compute both once with the frozen pre-trained model, before fine-tuning, so the anchors stay
    fixed while the model moves. Pass L2-normalized features, so dot products are cosine similarities.
    """
    return retrieve(image_features, candidate_text_features, k, method=method)


class AnchorBatch(NamedTuple):
    """Retrieved anchor pairs for a batch: candidate indices [B], images [B, ...] and their captions."""
    indices: torch.Tensor
    images: torch.Tensor
    captions: list


def anchor_pairs(train_indices, neighbours, candidate_set, generator=None, columns=None):
    """One retrieved image-text pair per training image of a batch, for the L_Ret contrastive term.

    train_indices are the batch's indices into the training set, neighbours the [N_train, k] result of
    `retrieve_anchors`. Our choice: for each training image, one of its k neighbours is drawn uniformly with
    `generator` (a torch.Generator, for reproducible runs), so over the epochs every neighbour is used while a
    batch keeps one anchor per image. Images come through candidate_set's transform, like training images.
    columns, when given, are the drawn neighbour columns (one per training image) instead of drawing them.
    """
    train_indices = torch.as_tensor(train_indices, dtype=torch.long)
    column = torch.randint(neighbours.shape[1], (len(train_indices),), generator=generator) if columns is None \
        else torch.as_tensor(columns, dtype=torch.long)
    chosen = neighbours[train_indices, column]
    images = [candidate_set[int(i)][0] for i in chosen]
    if not all(isinstance(image, torch.Tensor) for image in images):
        raise TypeError("candidate_set returns PIL images; give it the model's preprocessing first: "
                        "candidate_set.with_transform(preprocess).")
    return AnchorBatch(chosen, torch.stack(images), [candidate_set.captions[int(i)] for i in chosen])
