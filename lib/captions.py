"""Captions for ARF's caption anchors, made by a pretrained captioner: `python -m lib.captions`.

ARF (Han et al., CVPR 2024) captions every fine-tuning image with BLIP-2 (its Table 4: BLIP-2 a little above BLIP).
The default captioner here is open_clip's CoCa (open_clip is already a dependency): coca_ViT-B-32 or coca_ViT-L-14
with weights the user has (e.g. --pretrained mscoco_finetuned_laion2b_s13b_b90k from open_clip's cache, or a
checkpoint file); BLIP-2 through transformers is the option --captioner blip2. CoCa's `generate` needs
`transformers` below 4.56 (open_clip imports its BeamSearchScorer, which later versions removed): the `captions`
extra of pyproject.toml.

The file written is what lib.methods.arf reads (hparam captions=PATH, lib.anchors.FileCaptioner): a CSV with
columns path,caption, one row per training image, paths relative to the CSV's folder. Resumable: rows are
appended and flushed batch by batch, and a run skips the images the file has, so an interrupted run continues
where it stopped. Which images: the training set of lib.data.load_benchmark for the dataset, options and training
domains given, as a run of the runner loads it.

    python -m lib.captions --dataset DomainNet --data-root DIR --train-domains real --output captions.csv \\
        --model coca_ViT-L-14 --pretrained mscoco_finetuned_laion2b_s13b_b90k
"""
import argparse
import csv
import os
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from .notebooks import parse_value


class CocaCaptioner:
    """Captions from an open_clip CoCa model: model_name is a registered name (coca_ViT-B-32, coca_ViT-L-14) or the
    path of an open_clip model config (JSON; e.g. a tiny one for tests); pretrained as open_clip takes it (None:
    random weights, for plumbing checks only). Decoding: open_clip's generate (beam search by default)."""

    def __init__(self, model_name="coca_ViT-B-32", pretrained=None, device="auto", seq_len=30,
                 generation_type="beam_search"):
        import open_clip
        import torch

        from .models import pick_device, with_transformers
        with_transformers()  # generate decodes with transformers' beam search
        if str(model_name).endswith(".json"):
            open_clip.add_model_config(Path(model_name))
            model_name = Path(model_name).stem
        self.device = pick_device(device)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
        self.model = self.model.to(self.device).eval()
        self.seq_len, self.generation_type = seq_len, generation_type
        self.torch, self.decode = torch, open_clip.decode

    def __call__(self, images):
        batch = self.torch.stack([self.preprocess(image) for image in images]).to(self.device)
        with self.torch.no_grad():
            tokens = self.model.generate(batch, seq_len=self.seq_len, generation_type=self.generation_type)
        return [self.decode(t).split("<end_of_text>")[0].replace("<start_of_text>", "").strip() for t in tokens]


class Blip2Captioner:
    """Captions from BLIP-2 through transformers (ARF's captioner): `model` is a local folder or a name already in
    the Hugging Face cache (local_files_only: nothing downloads at run time)."""

    def __init__(self, model="Salesforce/blip2-opt-2.7b", device="auto", max_new_tokens=30):
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        from .models import pick_device
        self.device = pick_device(device)
        self.processor = Blip2Processor.from_pretrained(model, local_files_only=True)
        self.model = Blip2ForConditionalGeneration.from_pretrained(model, local_files_only=True).to(self.device)
        self.max_new_tokens = max_new_tokens

    def __call__(self, images):
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        tokens = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return [text.strip() for text in self.processor.batch_decode(tokens, skip_special_tokens=True)]


def write_captions(images, output, captioner, batch_size=16, progress=True):
    """Append a caption for every image path of `images` that `output` (a CSV path,caption) lacks; returns how many
    were written. Each batch is flushed to disk before the next starts."""
    output = Path(output)
    folder = output.resolve().parent
    done = set()
    if output.exists():
        with open(output, newline="", encoding="utf-8") as file:
            done = {os.path.abspath(folder / row["path"]) for row in csv.DictReader(file)}
    todo = [p for p in dict.fromkeys(images) if os.path.abspath(p) not in done]
    output.parent.mkdir(parents=True, exist_ok=True)
    new = not output.exists() or output.stat().st_size == 0
    with open(output, "a", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        if new:
            writer.writerow(["path", "caption"])
        for start in tqdm(range(0, len(todo), batch_size), desc="captions", disable=not progress):
            paths = todo[start:start + batch_size]
            captions = captioner([Image.open(p).convert("RGB") for p in paths])
            writer.writerows((os.path.relpath(os.path.abspath(p), folder), c) for p, c in zip(paths, captions))
            file.flush()
    return len(todo)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="a dataset name of lib.data.load_benchmark")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--train-domains", nargs="+", required=True)
    parser.add_argument("--dataset-option", action="append", default=[], metavar="NAME=VALUE",
                        help="an option of lib.data.load_benchmark, as the runner's")
    parser.add_argument("--n-train-per-class", type=int, help="the runner's cap (default: every training image)")
    parser.add_argument("--output", required=True, type=Path, help="the captions CSV (appended to when it exists)")
    parser.add_argument("--captioner", choices=["coca", "blip2"], default="coca")
    parser.add_argument("--model", help="coca: an open_clip CoCa name or config JSON (default coca_ViT-B-32); "
                                        "blip2: a local folder or cached name (default Salesforce/blip2-opt-2.7b)")
    parser.add_argument("--pretrained", help="coca: open_clip weights (a tag or a file); none = random weights")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=30, help="coca: the longest caption, in tokens")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    from .data import load_benchmark
    options = {}
    for item in args.dataset_option:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--dataset-option takes NAME=VALUE; got {item!r}")
        options[name] = parse_value(value)
    bench = load_benchmark(args.dataset, args.data_root, args.train_domains, args.n_train_per_class, None,
                           **options)
    if not isinstance(bench.train.images, list):
        parser.error(f"{args.dataset} has no image files to caption (ShapeWorld brings its own captions).")
    if args.captioner == "coca":
        pretrained = None if args.pretrained in (None, "none") else args.pretrained
        captioner = CocaCaptioner(args.model or "coca_ViT-B-32", pretrained, args.device, args.seq_len)
    else:
        captioner = Blip2Captioner(args.model or "Salesforce/blip2-opt-2.7b", args.device)
    written = write_captions(bench.train.images, args.output, captioner, args.batch_size)
    print(f"{args.output}: {written} new captions ({len(set(bench.train.images))} training images)")


if __name__ == "__main__":
    main()
