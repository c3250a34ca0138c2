"""Pretrain mini-CLIP contrastively on ShapeWorld's web corpus: `python -m lib.pretrain`.

The result, data/mini_clip.pt (fp16 weights) and data/mini_clip.json (config, command, zero-shot accuracy
per domain, time), is committed, so nobody has to run this unless they change the world or the model.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import shapeworld
from .losses import contrastive_loss
from .models import DATA_DIR, MINI_CONFIG, build_mini, encode_text, mini_preprocess, mini_tokenizer
from .train import clamp_logit_scale, cosine_schedule, set_seed

# ---------------------------------------------------------------- parameters (the committed checkpoint's)
CORPUS_SIZE = 40_000
NUM_STEPS = 2_800
BATCH_SIZE = 256
LR = 1e-3
WEIGHT_DECAY = 0.1
WARMUP_STEPS = 100
CAPTION_NOISE = 0.05
SEED = 0


def pretrain(corpus_size=CORPUS_SIZE, num_steps=NUM_STEPS, batch_size=BATCH_SIZE, lr=LR,
             weight_decay=WEIGHT_DECAY, warmup_steps=WARMUP_STEPS, caption_noise=CAPTION_NOISE, seed=SEED,
             progress=True):
    """A freshly initialized mini-CLIP trained with the CLIP loss; returns (model, loss history)."""
    set_seed(seed)
    corpus = shapeworld.web_corpus(corpus_size, seed=seed, stream="pretrain", noise=caption_noise)
    images = mini_preprocess(corpus.images)
    tokens = mini_tokenizer()(corpus.captions)
    model = build_mini().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98),
                                  eps=1e-6)
    scheduler = cosine_schedule(optimizer, num_steps, warmup_steps)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(corpus_size, generator=generator)
    history = []
    for step in tqdm(range(num_steps), desc="pretrain mini-CLIP", disable=not progress):
        start = (step * batch_size) % corpus_size
        if start + batch_size > corpus_size:
            order = torch.randperm(corpus_size, generator=generator)
            start = 0
        batch = order[start:start + batch_size]
        image_features = model.encode_image(images[batch], normalize=True)
        loss = contrastive_loss(image_features, encode_text(model, tokens[batch]), model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        clamp_logit_scale(model)
        history.append(loss.item())
    return model.eval(), history


def zeroshot_report(model, distractors, n_per_class=20, seed=1):
    """Zero-shot accuracy over all classes, per domain, on a held-out balanced split whose pictures have
    `distractors` small objects beside the labelled one (0: one object per picture), in every picture."""
    from .evaluate import evaluate  # avoid an import cycle for `python -m lib.pretrain`
    test = shapeworld.make_split("pretrain-check", n_per_class=n_per_class, seed=seed, distractors=distractors,
                                 clutter_share=1.0)
    results = evaluate(model, mini_tokenizer(), test.with_transform(mini_preprocess), groups={"all": test.classnames})
    return {row.domain: round(row.accuracy, 4) for row in results.itertuples()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-size", type=int, default=CORPUS_SIZE)
    parser.add_argument("--num-steps", type=int, default=NUM_STEPS)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=DATA_DIR / "mini_clip.pt")
    args = parser.parse_args(argv)
    started = time.time()
    model, history = pretrain(args.corpus_size, args.num_steps, args.batch_size, args.lr, seed=args.seed)
    minutes = (time.time() - started) / 60
    benchmark_accuracy = zeroshot_report(model, shapeworld.BENCHMARK_DISTRACTORS)
    single_object_accuracy = zeroshot_report(model, 0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {k: v.half() for k, v in model.state_dict().items()}, "config": MINI_CONFIG},
               args.out)
    info = {"config": MINI_CONFIG, "command": "python -m lib.pretrain " + " ".join(sys.argv[1:] if argv is None else argv),
            "corpus_size": args.corpus_size, "num_steps": args.num_steps, "batch_size": args.batch_size,
            "lr": args.lr, "seed": args.seed, "minutes": round(minutes, 1),
            "final_loss": round(sum(history[-50:]) / len(history[-50:]), 4),
            "zeroshot_accuracy_all_classes": benchmark_accuracy,
            "zeroshot_accuracy_all_classes_single_object": single_object_accuracy,
            "parameters": sum(p.numel() for p in model.parameters())}
    args.out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
