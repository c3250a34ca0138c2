"""Loading CLIP models (open_clip by name, or the project's own mini-CLIP), zero-shot heads, and the data loader
every loop of the lab uses (workers, pinned memory, evaluation sharded over ranks)."""
import contextlib
import importlib
import json
import os
import sys
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from tqdm.auto import tqdm


def _import_open_clip():
    """open_clip, imported without transformers unless that is imported already. open_clip imports transformers
    (4.5 s a process on a 2-core machine: 13.5 s instead of 9) only for Hugging Face text towers and CoCa's generate:
    the models here use neither, and with_transformers() gives it back to those that do."""
    if "open_clip" in sys.modules or "transformers" in sys.modules:
        return importlib.import_module("open_clip")
    sys.modules["transformers"] = None  # `import transformers` raises ImportError, which open_clip expects
    try:
        return importlib.import_module("open_clip")
    finally:
        del sys.modules["transformers"]


open_clip = _import_open_clip()


def with_transformers():
    """Give open_clip the transformers it was imported without (CoCa's generate, Hugging Face text towers need it):
    its two modules that import it are imported again. Nothing happens when transformers is not installed or open_clip
    has it already."""
    from open_clip import coca_model, hf_model
    if hf_model.transformers is None and importlib.util.find_spec("transformers") is not None:
        importlib.reload(hf_model)
        importlib.reload(coca_model)  # the CoCa class's methods read the reloaded module's names


DATA_DIR = Path(__file__).resolve().parent.parent / "data"
MINI_CHECKPOINT = DATA_DIR / "mini_clip.pt"
# mini-CLIP 2: open_clip's VisionTransformer (patches of 8 pixels: 16 tokens, the cheap route on a CPU) and
# its text transformer, so parameter names follow ViT-B-16's (visual.transformer.resblocks.{i}, ...).
MINI_CONFIG = dict(
    embed_dim=128,
    vision_cfg=dict(image_size=32, patch_size=8, width=128, layers=4, head_width=32),
    text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=2, layers=3),
)
MINI_MEAN, MINI_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
# As [3, 1, 1] tensors, made once: mini_preprocess runs per image in the loader, and torchvision's normalize, which
# builds and checks them at every call, took 40 of the 45 us it cost (the same float operations: sub, then div).
_MINI_MEAN, _MINI_STD = torch.tensor(MINI_MEAN).view(3, 1, 1), torch.tensor(MINI_STD).view(3, 1, 1)
# One template per ShapeWorld style, averaged: CLIP's prompt ensembling, with the domains kept out of the choice.
SHAPEWORLD_TEMPLATES = ("a photo of a {}.", "a sketch of a {}.", "a cartoon of a {}.", "a painting of a {}.")
REAL_TEMPLATES = ("a photo of a {}.", "a sketch of a {}.", "a painting of a {}.", "a cartoon of a {}.",
                  "a art of the {}.", "a photo of the large {}.", "a photo of the small {}.")


def pick_device(device="auto"):
    """The torch.device for "auto" (a GPU when there is one), "cpu", "cuda", "cuda:N" or "mps"; anything else, or
    a device this machine does not have, is a ValueError that says what there is (checked before any training)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    here = f"this machine has {gpus} CUDA GPU(s)" + (" and Apple's mps" if torch.backends.mps.is_available() else "")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        chosen = None
    if chosen is None or chosen.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"Unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps' ({here}).")
    if chosen.type == "cuda" and (chosen.index or 0) >= gpus or chosen.type == "mps" and \
            not torch.backends.mps.is_available():
        raise ValueError(f"Device {device!r} is not available: {here}. Use 'auto' or 'cpu'.")
    return chosen


def autocast(device):
    """bf16 autocast on a GPU; full precision on the CPU (bf16 matmuls there are slow and gain nothing)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def encode_text(model, tokens):
    """L2-normalized text features [N, D] of `tokens`: model.encode_text(tokens, normalize=True), faster.

    CLIP's text tower is causal and reads each prompt's features at its end token, the largest token id, so
    the padding after the longest prompt of the batch cannot change the result: the tokens, the positional
    embedding and the causal mask are cut there. Class prompts of 6-10 tokens padded to the context length
    (32 in mini-CLIP, 77 in OpenAI's CLIPs) then cost a fraction of the full length in every method that
    encodes text at each step (ce, flyp, arf, saft). The values agree with the uncut call up to float
    rounding (tests/test_models.py), and so do the gradients: the cut positions have none either way.
    Text towers of another kind (other pooling, no causal mask) run uncut.
    """
    length = int(tokens.argmax(dim=-1).max()) + 1
    if length >= tokens.shape[1] or not _reads_end_token_causally(model):
        return model.encode_text(tokens, normalize=True)
    cut = {"positional_embedding": model.positional_embedding[:length],
           "attn_mask": model.attn_mask[:length, :length]}
    # functional_call swaps the two tensors for this call only; the slice of the parameter is a view, so
    # its gradient reaches the full positional embedding. CLIP.forward(None, text) is encode_text(text, True).
    output = torch.func.functional_call(model, cut, (None, tokens[:, :length]))
    return output["text_features"] if isinstance(output, dict) else output[1]


def _reads_end_token_causally(model):
    return (isinstance(model, open_clip.CLIP) and getattr(model, "text_pool_type", None) == "argmax"
            and getattr(model, "attn_mask", None) is not None)


def build_mini():
    return open_clip.CLIP(**MINI_CONFIG)


def mini_tokenizer():
    return open_clip.tokenizer.SimpleTokenizer(context_length=MINI_CONFIG["text_cfg"]["context_length"])


def mini_preprocess(image):
    """A PIL image or a float tensor [3, H, W] in [0, 1] -> the mini-CLIP input [3, 32, 32]."""
    if not isinstance(image, torch.Tensor):
        image = TF.to_tensor(image.convert("RGB"))
    size = MINI_CONFIG["vision_cfg"]["image_size"]
    if image.shape[-2:] != (size, size):
        image = TF.resize(image, [size, size], antialias=True)
    return (image - _MINI_MEAN) / _MINI_STD


def _as_pil(image):
    return TF.to_pil_image(image) if isinstance(image, torch.Tensor) else image


class _TensorFriendly:
    """open_clip's transforms expect PIL images; ShapeWorld gives tensors. A class, not a closure, so that loader
    workers started by spawn (macOS, Windows) can unpickle it.

    open_clip's transform ends with ToTensor and Normalize (`splits`): the lab's loaders then run it in two halves,
    `decoded` in the workers (an 8-bit tensor: a quarter of the bytes to collate, pin and copy) and `finish` on the
    batch once it is on the device (ToTensor's scaling and Normalize: the same arithmetic, on the GPU)."""

    def __init__(self, preprocess):
        self.preprocess = preprocess
        steps = getattr(preprocess, "transforms", [])
        self.splits = len(steps) >= 2 and isinstance(steps[-2], T.ToTensor) and isinstance(steps[-1], T.Normalize)

    def __call__(self, image):
        return self.preprocess(_as_pil(image))

    def decoded(self, image):
        """The transform up to ToTensor: a uint8 tensor [3, H, W]."""
        image = _as_pil(image)
        for step in self.preprocess.transforms[:-2]:
            image = step(image)
        return TF.pil_to_tensor(image)

    def finish(self, images):
        """ToTensor's scaling and Normalize, on a batch of `decoded` images."""
        normalize = self.preprocess.transforms[-1]
        return TF.normalize(images.to(torch.get_default_dtype()).div(255), normalize.mean, normalize.std)


def load_clip(name, pretrained=None, device="auto", quick_gelu=None):
    """(model, preprocess, tokenizer) for "mini" or any open_clip model name, in eval mode on `device`.

    pretrained: for "mini", None loads the committed checkpoint and a path loads another one; for open_clip
    names, None gives random weights (seeded: the same on every call), a tag such as "openai" uses open_clip's
    cache (download it beforehand), and a path loads a local checkpoint file.
    quick_gelu: the activation of open_clip models (OpenAI's weights were trained with QuickGELU); None decides
    it from the weights (see quick_gelu_for), never from a file name.
    """
    device = pick_device(device)
    if name == "mini":
        model, preprocess, tokenizer = _load_mini(pretrained), mini_preprocess, mini_tokenizer()
    else:
        model, preprocess, tokenizer = _load_open_clip(name, pretrained, quick_gelu)
    return model.to(device).eval(), preprocess, tokenizer


def _load_mini(pretrained):
    path = Path(pretrained) if pretrained else MINI_CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(
            f"mini-CLIP checkpoint not found at {path}. It ships with the repository as data/mini_clip.pt; "
            "restore it with `git checkout data/mini_clip.pt` or rebuild it with `python -m lib.pretrain`.")
    model = build_mini()
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() for k, v in _mini_state_dict(checkpoint, path).items()})
    return model


def _mini_state_dict(checkpoint, path):
    """The state dict of a mini-CLIP checkpoint (lib.pretrain writes {"state_dict": ...}), or one error saying that
    `path` is something else."""
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        held = sorted(checkpoint)[:6] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path} is not a mini-CLIP checkpoint (lib.pretrain saves a dict with a 'state_dict'; this "
                         f"file holds {held}). For open_clip weights give the model's name (e.g. --model-name "
                         f"ViT-B-16); for mini leave pretrained unset to use data/mini_clip.pt.")
    _check_architecture(state, build_mini().state_dict(), "mini", path)
    return state


def _check_architecture(state, expected, name, path):
    """One error when the tensors of a checkpoint do not fit the model `name` (instead of torch's list of size
    mismatches, which reads like a broken download)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    common = set(state) & set(expected)
    wrong = sorted(k for k in common if tuple(state[k].shape) != tuple(expected[k].shape))
    if len(common) < len(expected) // 2 or wrong:
        detail = (f"e.g. {wrong[0]} is {list(state[wrong[0]].shape)} there and {list(expected[wrong[0]].shape)} in "
                  f"{name}" if wrong else f"only {len(common)} of {name}'s {len(expected)} tensors are in it")
        raise ValueError(f"Checkpoint {path} was saved from another architecture than {name!r} ({detail}). Give the "
                         f"model name it was saved from (--model-name / model_name), or the checkpoint of {name}.")


def check_model(name, pretrained=None):
    """Raise, before anything loads or trains, if `name` is not a model or `pretrained` is a checkpoint file that
    is missing or unreadable (lib.runner checks a grid with it)."""
    if name == "mini":
        if pretrained and not Path(pretrained).exists():
            raise FileNotFoundError(f"mini-CLIP checkpoint not found at {pretrained}; leave pretrained=None for the "
                                    f"committed data/mini_clip.pt.")
        if pretrained:
            _read_checkpoint(pretrained, "mini")
        return
    known = open_clip.list_models()
    if name not in known:
        close = [m for m in known if name.lower().replace("/", "-") in m.lower()][:8]
        raise ValueError(f"Unknown model name {name!r}. Use 'mini' or an open_clip name such as "
                         f"{close or ['ViT-B-16', 'ViT-B-32', 'RN50']} (open_clip.list_models() lists all).")
    if pretrained and Path(pretrained).suffix in {".pt", ".pth", ".bin", ".safetensors"} \
            and not Path(pretrained).exists():
        raise FileNotFoundError(f"Checkpoint file {pretrained} does not exist. Give the path of a local "
                                f"open_clip checkpoint for {name}, or a tag such as 'openai'.")
    if pretrained and Path(pretrained).is_file():
        _read_checkpoint(pretrained, name)
    elif pretrained:
        _check_tag_cached(name, pretrained)


def _check_tag_cached(name, tag):
    """Raise unless `tag` is one of open_clip's pretrained tags for `name` and its weights are already in the cache
    open_clip reads (the Hugging Face hub cache, or open_clip's own for URL downloads): nothing downloads at run time,
    and an offline machine fails here at once instead of retrying the hub."""
    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag not in tags:
        raise ValueError(f"{tag!r} is neither a file nor a pretrained tag of {name}; its tags are {tags or 'none'} "
                         f"(open_clip.list_pretrained_tags_by_model), or give a checkpoint file's path.")
    cfg = open_clip.get_pretrained_cfg(name, tag)
    download = (f"download them once on a machine with internet: python -c \"import open_clip; "
                f"open_clip.create_model_and_transforms('{name}', pretrained='{tag}')\" (and copy the cache), or "
                f"give the checkpoint file's path as pretrained")
    if cfg.get("hf_hub"):
        import huggingface_hub
        from huggingface_hub import constants
        repo_id, filename = os.path.split(cfg["hf_hub"])  # as open_clip.pretrained.download_pretrained reads it
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        names += [n.rsplit(".", 1)[0] + ".safetensors" for n in names if n.endswith((".bin", ".pth"))]
        if not any(isinstance(huggingface_hub.try_to_load_from_cache(repo_id, n), str) for n in names):
            raise FileNotFoundError(f"The weights of {name} {tag!r} are not in the Hugging Face hub cache, where "
                                    f"open_clip looks for them ({constants.HF_HUB_CACHE}/models--"
                                    f"{repo_id.replace('/', '--')}, file {names[0]}; HF_HOME or HF_HUB_CACHE move "
                                    f"it): {download}.")
    elif cfg.get("url"):
        target = Path("~/.cache/clip").expanduser() / Path(cfg["url"]).name
        if not target.is_file():
            raise FileNotFoundError(f"The weights of {name} {tag!r} are not in open_clip's cache ({target}): "
                                    f"{download}.")


def quick_gelu_for(name, pretrained):
    """Whether open_clip weights need QuickGELU (OpenAI's were trained with it; open_clip switches it on by itself
    only for the "openai" tag): a tag says so in open_clip's pretrained config; a file says so by being one of
    OpenAI's TorchScript releases or by a "quick_gelu" entry of its dict; anything else is GELU, open_clip's
    default (pass quick_gelu=True to load_clip for OpenAI weights saved as a plain state dict)."""
    if pretrained is None:
        return False
    if Path(pretrained).is_file():
        return _read_checkpoint(pretrained)["quick_gelu"]
    return bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))


def _read_checkpoint(path, name=None):
    """{"quick_gelu": bool} from a checkpoint file, or one clear error for a file torch cannot read (empty,
    truncated, random bytes) instead of an EOFError or torch's advice to turn weights_only off; given the model
    `name`, also one error when the file's tensors are another architecture's (shapes compared, no weights read)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), "pt") as file:
                return {"quick_gelu": (file.metadata() or {}).get("quick_gelu", "false").lower() == "true"}
        if zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
            return {"quick_gelu": True}  # a TorchScript archive: OpenAI's release format
        # mmap: the tensors are not read, so checking a ViT-B-16 file costs little
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:
        detail = (str(error).splitlines() or ["no details"])[0]
        raise ValueError(f"Checkpoint {path} cannot be read ({type(error).__name__}: {detail}); it is empty, "
                         f"truncated or not a torch checkpoint. Download it again, or give the path of an "
                         f"open_clip state dict saved with torch.save.") from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"Checkpoint {path} holds a {type(checkpoint).__name__}, not a state dict; save "
                         f"model.state_dict() with torch.save.")
    if name == "mini":
        _mini_state_dict(checkpoint, path)
    elif name is not None:
        state = checkpoint.get("state_dict", checkpoint)
        if isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()):
            with torch.device("meta"):  # shapes only: nothing is allocated or initialized
                expected = open_clip.create_model(name, device="meta").state_dict()
            _check_architecture(state, expected, name, path)
    return {"quick_gelu": bool(checkpoint.get("quick_gelu", False))}


def _load_open_clip(name, pretrained, quick_gelu=None):
    check_model(name, pretrained)
    if "hf_model_name" in (open_clip.get_model_config(name) or {}).get("text_cfg", {}):
        with_transformers()  # a Hugging Face text tower
    quick_gelu = quick_gelu_for(name, pretrained) if quick_gelu is None else bool(quick_gelu)
    try:
        # A seeded initialization, so that random weights are the same on every call and machine, in a forked
        # random state, so that loading a model leaves the caller's random numbers as they were.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, force_quick_gelu=quick_gelu)
    except Exception as error:  # open_clip reports a failed download in many ways
        raise RuntimeError(
            f"Could not load {name} with pretrained={pretrained!r}: {error}. Nothing is downloaded at run time "
            "unless open_clip can reach its hub; on an offline machine download the weights elsewhere and "
            "pass the checkpoint's path as `pretrained`.") from error
    return model, _TensorFriendly(preprocess), open_clip.get_tokenizer(name)


def mini_info():
    """The config, command and measurements that came with the committed mini-CLIP checkpoint."""
    return json.loads((DATA_DIR / "mini_clip.json").read_text())


def class_text_features(model, tokenizer, classnames, templates=SHAPEWORLD_TEMPLATES, device=None):
    """[C, D] class embeddings: each class's template embeddings normalized, averaged and renormalized.

    Differentiable: call under torch.no_grad() for a frozen zero-shot head.
    """
    device = device or next(model.parameters()).device
    prompts = [t.format(c) for c in classnames for t in templates]
    features = encode_text(model, tokenizer(prompts).to(device))
    features = features.view(len(classnames), len(templates), -1).mean(1)
    return torch.nn.functional.normalize(features, dim=-1)


@torch.no_grad()
def zeroshot_head(model, tokenizer, classnames, templates=SHAPEWORLD_TEMPLATES):
    was_training = model.training
    model.eval()
    features = class_text_features(model, tokenizer, classnames, templates)
    model.train(was_training)
    return features.float()


def rank_and_world():
    """(rank, world size) under torch.distributed, else (0, 1)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def default_num_workers(dataset):
    """Loader worker processes per rank when none are asked for: none for images held in memory as tensors
    (ShapeWorld: nothing to decode, and a worker would only add copies between processes); otherwise one per CPU
    this process may run on (os.sched_getaffinity, shared among the ranks of this machine under torchrun), less
    one for the training loop, at most 8 (decoding JPEGs at 224 px for one GPU needs about that many)."""
    if isinstance(getattr(dataset, "images", None), torch.Tensor):
        return 0
    from .parallel import cpus
    per_rank = cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(8, per_rank - 1))


class _Indexed(torch.utils.data.Dataset):
    """Yields (image, label, index): methods such as ARF need to know which training items are in a batch."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return image, label, i


class _Finished:
    """A DataLoader whose batches' images (their first element) are moved to `device` and finished there."""

    def __init__(self, loader, finish, device):
        self.loader, self.finish, self.device = loader, finish, device

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for images, *rest in self.loader:
            yield [self.finish(images.to(self.device, non_blocking=self.device.type == "cuda")), *rest]


def data_loader(dataset, device, num_workers, num_batches, indexed=False, **options):
    """torch's DataLoader as the lab's loops use it, over `dataset` (items (image, label); with `indexed`, (image,
    label, index)): `num_workers` processes decode (None: default_num_workers), each keeping two batches
    prefetched (torch's default) and living as long as the loader; pinned memory on CUDA, so that copies with
    non_blocking=True overlap the computation. Workers start only when there are at least two of the `num_batches`
    batches to load, and never more than there are batches: one batch gains nothing from a worker but its start-up.
    On an accelerator, an ImageSet with open_clip's transform is loaded as 8-bit images and each batch's images
    arrive on `device`, made float there (_TensorFriendly.finish): the same values as the transform's own. On the
    CPU the workers make them float themselves: that is where the CPU's work is spread, and a main process that
    computes between batches takes cores from them (its torch threads keep spinning after each operation:
    measured with 2 workers on 2 cores, the main process used 0.84 cores with the split and 0.14 without)."""
    if num_workers is None:
        num_workers = default_num_workers(dataset)
    num_workers = min(num_workers, num_batches) if num_batches > 1 else 0
    device = torch.device(device)
    transform = getattr(dataset, "transform", None)
    split = isinstance(transform, _TensorFriendly) and transform.splits and device.type != "cpu"
    if split:
        dataset = dataset.with_transform(transform.decoded)
    loader = torch.utils.data.DataLoader(_Indexed(dataset) if indexed else dataset, num_workers=num_workers,
                                         persistent_workers=num_workers > 0, pin_memory=device.type == "cuda",
                                         **options)
    return _Finished(loader, transform.finish, device) if split else loader


@torch.no_grad()
def encode_images(model, dataset, batch_size=512, progress=False, num_workers=None):
    """L2-normalized image features [N, D] (float32, on the CPU) of a dataset that yields (model input, label).

    Under torch.distributed each rank encodes one contiguous shard of the dataset and the shards are gathered, so
    every rank returns the features of all N images, in order (every rank must call it, as lib.runner's do).
    num_workers: loader worker processes (None: default_num_workers)."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    rank, world = rank_and_world()
    shard = torch.arange(len(dataset)).tensor_split(world)[rank].tolist()
    if num_workers is None:
        num_workers = default_num_workers(dataset)
    part = dataset
    if world > 1:  # an ImageSet's own subset keeps its transform visible to data_loader
        part = dataset.subset(shard) if hasattr(dataset, "subset") else torch.utils.data.Subset(dataset, shard)
    loader = data_loader(part, device, num_workers, -(-len(shard) // batch_size), batch_size=batch_size)
    was_training = model.training
    model.eval()
    features = []
    for images, _ in tqdm(loader, desc="encode images", disable=not progress, leave=False):
        with autocast(device):
            features.append(model.encode_image(images.to(device, non_blocking=cuda), normalize=True).float().cpu())
    model.train(was_training)
    if world > 1:
        shards = [None] * world
        dist.all_gather_object(shards, features)
        features = [batch for shard_features in shards for batch in shard_features]
    return torch.cat(features)
