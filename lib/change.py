"""Where a method changes the model: per residual block of both towers, how far the weights moved and how much
the block's output changed, as tidy tables (issue 15's per-block picture; figure: lib.plots.change_figure).

- ``relative_weight_change(theta_0, theta)``: ||theta - theta_0|| / ||theta_0|| per (encoder, block).
- ``linear_cka(x, y)`` / ``gram_cka(gram_x, gram_y)``: linear centered kernel alignment (Kornblith et al., 2019).
- ``block_outputs(model, images, tokens)``: every block's output, captured with forward hooks.
- ``block_cka(model_0, model, images, tokens)`` and ``change_table(model_0, models, images, tokens)``.
- ``most_changed_blocks(table)``: per method and tower, the block that moved most and the one whose output
  changed most.

Blocks are grouped as lib.sparse.per_layer_counts groups parameters: ``visual.transformer.resblocks.{i}`` and
``transformer.resblocks.{i}`` for ViTs and the text tower, the stages ``visual.layer{i}`` (block i - 1) of a
ModifiedResNet image tower (mini-CLIP 1, RN50); block -1 is everything outside the blocks (embeddings, final
norms, projections, logit_scale under encoder "other").
"""
import re

import numpy as np
import pandas as pd
import torch

from .models import data_loader
from .sparse import _encoder_and_block

# The modules whose outputs are a block's output (the same blocks as _encoder_and_block's parameter groups).
_BLOCK_MODULE = re.compile(r"(?:visual\.|text\.)?transformer\.resblocks\.\d+|visual\.layer\d+")


def relative_weight_change(theta_0, theta):
    """||theta - theta_0|| / ||theta_0|| per (encoder, block), the norms over all floating entries of the group.

    theta_0 and theta map names to tensors (pass dict(model.named_parameters()) to leave buffers such as
    BatchNorm statistics out, as change_table does). Returns columns encoder, block, numel, relative_change;
    a group that did not move has exactly 0 (a moved group whose pre-trained entries are all 0 has inf)."""
    sums = {}
    for name, before in theta_0.items():
        if not before.is_floating_point():
            continue
        before = before.detach().double().cpu()
        after = theta[name].detach().double().cpu()
        if after.shape != before.shape:
            raise ValueError(f"shape mismatch for {name!r}: {tuple(before.shape)} and {tuple(after.shape)}")
        key = _encoder_and_block(name)
        moved, size, numel = sums.get(key, (0.0, 0.0, 0))
        sums[key] = (moved + float((after - before).pow(2).sum()), size + float(before.pow(2).sum()),
                     numel + before.numel())
    rows = []
    for (encoder, block), (moved, size, numel) in sorted(sums.items()):
        change = 0.0 if moved == 0 else (np.sqrt(moved) / np.sqrt(size) if size > 0 else np.inf)
        rows.append({"encoder": encoder, "block": block, "numel": numel, "relative_change": change})
    return pd.DataFrame(rows, columns=["encoder", "block", "numel", "relative_change"])


def linear_cka(x, y):
    """Linear CKA between representations x [n, p] and y [n, q] of the same n examples:
    ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centered Xc, Yc (Kornblith et al., 2019, eq. 5),
    in float64. 1 for x = y; invariant to orthogonal transforms and isotropic scaling of either side."""
    x, y = _centered(x), _centered(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same examples; got {x.shape[0]} and {y.shape[0]} rows")
    cross = (y.T @ x).pow(2).sum()
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()))


def gram_cka(gram_x, gram_y):
    """Linear CKA from the Gram matrices K = X X^T and L = Y Y^T [n, n]: <HKH, HLH>_F / (||HKH||_F ||HLH||_F),
    H the centering matrix. Equal to linear_cka(X, Y); what block_cka uses, since an n x n Gram matrix is small
    where a block's flattened output is not."""
    k, l_ = _double_centered(gram_x), _double_centered(gram_y)
    return float((k * l_).sum() / (k.norm() * l_.norm()))


def _centered(x):
    x = torch.as_tensor(x).detach().double()
    x = x[:, None] if x.ndim == 1 else x.flatten(1)
    return x - x.mean(dim=0, keepdim=True)


def _double_centered(gram):
    gram = torch.as_tensor(gram).detach().double()
    return gram - gram.mean(0, keepdim=True) - gram.mean(1, keepdim=True) + gram.mean()


@torch.no_grad()
def block_outputs(model, images=None, tokens=None, batch_size=256):
    """{(encoder, block): [N, F] float32 on the CPU}, each residual block's output captured by forward hooks.

    images: a dataset of (model input, label) (an ImageSet with the model's transform); each image's whole block
    output is flattened (all tokens, or all positions of a ResNet stage). tokens: a LongTensor of prompts
    (tokenizer(prompts)); our choice for text is each prompt's end-token position (the argmax token, where
    CLIP's text tower reads its features), since the positions after it are padding. Memory: N x tokens x width
    floats per block (ViT-B-16: 0.6 MB per image per block), so pass a few hundred images."""
    device = next(model.parameters()).device
    captured, handles = {}, []
    end_tokens = None if tokens is None else tokens.argmax(dim=-1)

    def hook_for(name, key):
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        batch_first = getattr(parent, "batch_first", True)

        def hook(module, inputs, output):
            output = output[0] if isinstance(output, tuple) else output
            if ".resblocks." in name and not batch_first:
                output = output.transpose(0, 1)  # [L, N, D] -> [N, L, D]
            if key[0] == "text":
                output = output[torch.arange(output.shape[0]), end_tokens.to(output.device)]
            captured.setdefault(key, []).append(output.flatten(1).float().cpu())
        return hook

    for name, module in model.named_modules():
        if _BLOCK_MODULE.fullmatch(name):
            key = _encoder_and_block(name + ".")
            if (key[0] == "image" and images is not None) or (key[0] == "text" and tokens is not None):
                handles.append(module.register_forward_hook(hook_for(name, key)))
    was_training = model.training
    model.eval()
    try:
        if images is not None:  # loader workers decode files (lib.models.data_loader)
            loader = data_loader(images, device, None, -(-len(images) // batch_size), batch_size=batch_size)
            for batch, _ in loader:
                model.encode_image(batch.to(device, non_blocking=device.type == "cuda"))
        if tokens is not None:
            model.encode_text(tokens.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {key: torch.cat(parts) for key, parts in sorted(captured.items())}


def block_grams(model, images=None, tokens=None, batch_size=256):
    """{(encoder, block): Gram matrix [N, N] float64} of block_outputs; what block_cka compares."""
    outputs = block_outputs(model, images, tokens, batch_size)
    grams = {}
    for key in list(outputs):
        features = outputs.pop(key).double()  # freed block by block
        grams[key] = features @ features.T
    return grams


def block_cka(model_0, model, images=None, tokens=None, batch_size=256, grams_0=None):
    """Linear CKA between each block's output in `model` and in `model_0` (the zero-shot model) on the same
    images (image tower) and prompts (text tower): columns encoder, block, cka; 1 means the block's output
    changed only by a rotation or a scale. grams_0: block_grams(model_0, ...) when already computed."""
    grams_0 = grams_0 if grams_0 is not None else block_grams(model_0, images, tokens, batch_size)
    grams = block_grams(model, images, tokens, batch_size)
    rows = [{"encoder": encoder, "block": block, "cka": gram_cka(grams_0[encoder, block], grams[encoder, block])}
            for encoder, block in grams_0]
    return pd.DataFrame(rows, columns=["encoder", "block", "cka"])


def change_table(model_0, models, images=None, tokens=None, batch_size=256, grams_0=None):
    """The per-block picture for several fine-tuned models: {label: model} against the zero-shot model_0.

    One row per (method, encoder, block), columns method, encoder, block, numel, relative_change (parameters
    only) and cka (NaN for block -1, which has no single output, and for a tower without images or tokens).
    The zero-shot outputs are computed once (or given: grams_0, block_grams(model_0, images, tokens))."""
    grams_0 = grams_0 if grams_0 is not None else block_grams(model_0, images, tokens, batch_size)
    theta_0 = {k: v.detach() for k, v in model_0.named_parameters()}
    tables = []
    for label, model in models.items():
        change = relative_weight_change(theta_0, dict(model.named_parameters()))
        cka = block_cka(model_0, model, images, tokens, batch_size, grams_0=grams_0)
        tables.append(change.merge(cka, on=["encoder", "block"], how="left").assign(method=label))
    table = pd.concat(tables, ignore_index=True)
    return table[["method", "encoder", "block", "numel", "relative_change", "cka"]]


# A relative change below this is float rounding (an average of identical float32 weights), not a move; a CKA
# within it of 1 is an unchanged output.
UNMOVED = 1e-6


def most_changed_blocks(table):
    """Per (method, encoder) of a change_table (several seeds are averaged): moved_block, the residual block
    with the largest relative weight change (NaN when no block moved by UNMOVED or more) and its
    relative_change, and changed_block, the block whose output has the lowest CKA with zero-shot (NaN when every
    output is unchanged), and that cka."""
    blocks = (table[table.block >= 0].groupby(["method", "encoder", "block"], sort=False)[["relative_change", "cka"]]
              .mean().reset_index())
    rows = []
    for (method, encoder), frame in blocks.groupby(["method", "encoder"], sort=False):
        moved = frame.loc[frame.relative_change.idxmax()]
        changed = frame.loc[frame.cka.idxmin()] if frame.cka.notna().any() else None
        if changed is not None and changed.cka > 1 - UNMOVED:
            changed = None
        rows.append({"method": method, "encoder": encoder,
                     "moved_block": moved.block if moved.relative_change >= UNMOVED else np.nan,
                     "relative_change": moved.relative_change,
                     "changed_block": np.nan if changed is None else changed.block,
                     "cka": frame.cka.min()})
    return pd.DataFrame(rows)
