"""Throughput of the lab's training step and data loader at ViT-B-16 scale (random weights, 224 px, fabricated
JPEGs of ImageNet size, about 500 x 375): images per second of

- a step of the lab's loop (lib.train.finetune) for each method asked (default `ft`), against a bare loop written
  here in a few lines with the same model, loss, optimizer, clipping and batches: their ratio is what the lab's
  loop costs or saves (1.0: nothing);
- the lab's loader (lib.train._batches: decode, open_clip's ViT-B-16 transform, collate) with 0 workers and with
  each worker count asked: their ratio is what the workers give.

Both steps read the same batches of images decoded once beforehand (held in memory), so the step ratio measures
the loop and not the decoding, which the loader figures measure apart. The two loops alternate within each repeat,
so that load changes on a shared machine hit them alike; a step is the time between two consecutive optimizer
steps (the first step of each run is dropped) and the figure is the median over all steps of all repeats. The
loader's figure is that of the second half of its batches (the workers' start-up and their first prefetched
batches left out): a stream, as in training. Loader runs with each worker count alternate too, `--repeats` times,
and each figure is their median. On a GPU the loader sends open_clip's images as 8-bit tensors and makes them float
on the device (lib.models.data_loader), so its figures there include that step.
On a GPU both loops run in bf16 autocast (lib.models.autocast) and the peak GPU memory of each is printed.

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/bench_throughput.py                 # CPU, ft, 0 and 2 workers
    PYTHONPATH=. python benchmarks/bench_throughput.py --device cuda --methods ft flyp --batch-size 128 --workers 8

The last line is `ratio lab/bare <x> loader <w>-workers/0-workers <y>`, x for the first method and w the largest
worker count (the CPU default: `ratio lab/bare <x> loader 2-workers/0-workers <y>`).
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lib import models
from lib.data.imageset import ImageSet
from lib.losses import contrastive_loss, cross_entropy_loss
from lib.methods import get_method
from lib.train import GlobalBatches, _batches, clamp_logit_scale, finetune, train_mode

CLASSES = [f"class {i}" for i in range(10)]
TEMPLATES = ("a photo of a {}.",)  # one template: flyp then encodes each class of a batch once, in both loops
LR, WEIGHT_DECAY, CLIP = 1e-5, 0.1, 1.0


def fabricate_jpegs(folder, count, seed=0):
    """`count` JPEGs of 500 x 375 pixels: smooth colour fields with noise, about the size of ImageNet's files."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        field = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(field).resize((500, 375), Image.BICUBIC)
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-24, 25, size=(375, 500, 3))
        path = Path(folder) / f"{i:05d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def image_set(images, transform=None):
    labels = torch.arange(len(images)) % len(CLASSES)
    return ImageSet(images, labels, CLASSES, ["photo"] * len(images), transform=transform)


def lab_steps(model, tokenizer, name, data, batch_size, steps, device):
    """Seconds per step of lib.train.finetune with method `name`, from consecutive after_step calls."""
    method = get_method(name, batch_size=batch_size, lr=LR, weight_decay=WEIGHT_DECAY, grad_clip=CLIP,
                        warmup_steps=0, templates=TEMPLATES)
    stamps = []
    after_step = method.after_step
    method.after_step = lambda model, step: (after_step(model, step), _synchronize(device),
                                             stamps.append(time.perf_counter()))
    finetune(model, method, data, tokenizer, num_steps=steps, seed=0, device=device, progress=False)
    return np.diff(stamps).tolist()


def bare_steps(model, tokenizer, name, data, batch_size, steps, device):
    """The same steps written plainly: the same model, loss, AdamW (fused, as lib.methods.base.adamw makes it on a
    CPU or a GPU), clipping and batches (GlobalBatches' first ones, from the same decoded images)."""
    import copy
    model = train_mode(copy.deepcopy(model).to(device))
    tokens = tokenizer([TEMPLATES[0].format(c) for c in CLASSES]).to(device)
    with torch.no_grad():
        text_features = models.encode_text(model, tokens).float()
    scale = model.logit_scale.exp().item()
    params = [p for n, p in model.named_parameters() if name == "flyp" or n.startswith("visual.")]
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in params))
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    batches = iter(GlobalBatches(len(data), batch_size, seed=0))
    stamps = []
    for _ in range(steps):
        index = next(batches)
        images = data.images[index].to(device, non_blocking=True)
        labels = data.labels[index].to(device, non_blocking=True)
        with models.autocast(device):
            features = model.encode_image(images, normalize=True)
            if name == "flyp":  # contrastive against the batch's class prompts; both towers and the scale train
                classes, rows = labels.unique(return_inverse=True)
                texts = models.encode_text(model, tokens[classes])[rows]
                loss = contrastive_loss(features, texts, model.logit_scale.exp())
            else:
                loss = cross_entropy_loss(features, text_features, labels, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        if name == "flyp":
            clamp_logit_scale(model)
        _synchronize(device)
        stamps.append(time.perf_counter())
    return np.diff(stamps).tolist()


def _synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def loader_rate(files, batch_size, batches, workers, device):
    """Images per second of the lab's training loader on JPEG files, over the second half of `batches` batches:
    the workers' start-up and the batches they prefetch at the start are left out, as in a long training run."""
    stream = _batches(files, batch_size, seed=0, num_workers=workers, device=device, num_batches=batches)
    stamps = []
    for _ in range(batches):
        next(stream)
        stamps.append(time.perf_counter())
    half = batches // 2
    return (batches - half) * batch_size / (stamps[-1] - stamps[half - 1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="ViT-B-16", help="an open_clip name (random weights), or mini")
    parser.add_argument("--methods", nargs="+", default=["ft"], choices=["ft", "flyp"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="steps per run (the first is dropped)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loader-batches", type=int, default=24)
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="worker counts compared with 0")
    args = parser.parse_args(argv)
    device = models.pick_device(args.device)
    model, preprocess, tokenizer = models.load_clip(args.model, device="cpu")
    with tempfile.TemporaryDirectory() as folder:
        # At most 256 distinct files, read over and over: each read is decoded again, as in training.
        paths = fabricate_jpegs(folder, min(256, args.batch_size * args.loader_batches))
        sizes = [Path(p).stat().st_size for p in paths]
        weights = "the committed weights" if args.model == "mini" else "random weights"
        print(f"{len(paths)} JPEGs of 500x375, {np.mean(sizes) / 1e3:.0f} KB on average; {args.model} ({weights}) "
              f"at {model.visual.image_size[0]} px on {device}, batch {args.batch_size}")
        files = image_set([paths[i % len(paths)] for i in range(args.batch_size * args.loader_batches)], preprocess)
        samples = {workers: [] for workers in [0, *args.workers]}
        for _ in range(args.repeats):
            for workers, measured in samples.items():
                measured.append(loader_rate(files, args.batch_size, args.loader_batches, workers, device))
        rates = {workers: statistics.median(measured) for workers, measured in samples.items()}
        for workers, rate in rates.items():
            print(f"loader, {workers} workers: {rate:.1f} images/s")
        # Decoded once, two batches' worth: the steps cycle over them, reading memory.
        decoded = image_set(torch.stack([preprocess(Image.open(paths[i % len(paths)]))
                                         for i in range(2 * args.batch_size)]))
    ratios = {}
    for name in args.methods:
        times = {"lab": [], "bare": []}
        peaks = {}
        for _ in range(args.repeats):
            for loop, steps in (("lab", lab_steps), ("bare", bare_steps)):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                times[loop] += steps(model, tokenizer, name, decoded, args.batch_size, args.steps, device)
                if device.type == "cuda":
                    peaks[loop] = torch.cuda.max_memory_allocated() / 2 ** 30
        rate = {loop: args.batch_size / statistics.median(t) for loop, t in times.items()}
        ratios[name] = rate["lab"] / rate["bare"]
        memory = "".join(f", peak GPU memory {loop} {peak:.1f} GiB" for loop, peak in peaks.items())
        print(f"{name}: lab {rate['lab']:.2f} images/s, bare {rate['bare']:.2f} images/s, ratio "
              f"{ratios[name]:.3f}{memory}")
    most = max(args.workers)
    print(f"ratio lab/bare {ratios[args.methods[0]]:.3f} loader {most}-workers/0-workers {rates[most] / rates[0]:.3f}")


if __name__ == "__main__":
    main()
