"""SAFT: sparse fine-tuning of CLIP (Nguyen et al., ECCV 2024, arXiv 2407.03036).

SAFT updates only the top ``alpha`` fraction (0.1 % by default) of all parameters of both encoders,
chosen by the magnitude of the gradient averaged over the training set, and keeps every other entry
exactly at its pre-trained value. There is no official code; this module is one faithful reading:

    scores = parameter_scores(model, loss_fn, batches)       # |mean gradient| over the training set
    mask = saft_mask(scores, alpha=0.001)                    # one global threshold over all parameters
    optimizer = SparseAdamW(model.named_parameters(), mask, lr=1e-5, weight_decay=0.1)
    for batch in batches:
        loss_fn(model, batch).backward()
        mask_gradients(model.named_parameters(), mask)       # BEFORE clipping: the norm is the sparse one
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

Why an optimizer of its own: a gradient hook alone is not enough under AdamW, whose decoupled weight
decay still moves the masked-out weights; and a dense AdamW keeps two full copies of the model as
state, which is SAFT's known drawback. ``SparseAdamW`` keeps state only for the selected entries and
never writes the others.
"""

import math
import re
from collections.abc import Callable, Iterable, Mapping

import pandas as pd
import torch

from .losses import contrastive_loss
from .models import encode_text

SCORE_STRATEGIES = ("gradient", "fisher", "random", "magnitude")

# saft_mask streams over the scores in chunks of this many entries, so that its temporaries stay a few
# tens of MB however large the model is. Tests shrink it to exercise the chunk boundaries.
_CHUNK_SIZE = 1 << 22

# ----------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------

def parameter_scores(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, object], torch.Tensor],
    batches: Iterable,
    strategy: str = "gradient",
    params: Mapping[str, torch.nn.Parameter] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Score every entry of the given parameters; ``saft_mask`` keeps the largest |score|.

    strategy:
      "gradient"  |mean over batches of the gradient| (SAFT: average first, then the magnitude)
      "fisher"    mean over batches of the squared gradient (a diagonal empirical Fisher)
      "random"    uniform in [0, 1) from a torch.Generator seeded with ``seed``
      "magnitude" 1 / |w|, so that the largest score is the smallest weight (not -|w|: saft_mask ranks
                  by |score|, which would undo the sign). An exact zero scores inf; ties among those
                  are broken by position, like every tie in ``saft_mask``

    ``loss_fn(model, batch)`` returns a scalar loss; ``batches`` is only read by the gradient-based
    strategies. Put the model in the mode you want (train/eval) before calling. ``params`` defaults to
    every named parameter of the model; frozen ones are scored too (requires_grad is switched on for the
    duration and restored). Returns float32 CPU tensors shaped like the parameters, in ``params`` order.
    """
    if strategy not in SCORE_STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; known strategies: {', '.join(SCORE_STRATEGIES)}")
    if params is None:
        params = dict(model.named_parameters())

    if strategy == "random":
        generator = torch.Generator().manual_seed(seed)
        return {name: torch.rand(p.shape, generator=generator) for name, p in params.items()}
    if strategy == "magnitude":
        return {name: p.detach().float().abs().reciprocal().cpu() for name, p in params.items()}
    return _gradient_scores(model, loss_fn, batches, params, squared=(strategy == "fisher"))


def _gradient_scores(model, loss_fn, batches, params, squared):
    names, tensors = list(params), list(params.values())
    # Accumulate on the parameters' device in float32; move to the CPU once at the end.
    sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in tensors]
    was_trainable = [p.requires_grad for p in tensors]
    n_batches = 0
    try:
        for p in tensors:
            p.requires_grad_(True)
        for batch in batches:
            loss = loss_fn(model, batch)
            # autograd.grad leaves the model's .grad fields alone; a parameter the loss does not reach
            # has a zero gradient.
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            for total, grad in zip(sums, grads):
                if grad is not None:
                    grad = grad.float()
                    total.add_(grad * grad if squared else grad)
            n_batches += 1
    finally:
        for p, trainable in zip(tensors, was_trainable):
            p.requires_grad_(trainable)
    if n_batches == 0:
        raise ValueError("gradient-based scores need at least one batch; `batches` was empty")

    scores = {}
    for name, total in zip(names, sums):
        mean = total.div_(n_batches)
        scores[name] = (mean if squared else mean.abs_()).cpu()
    return scores


# ----------------------------------------------------------------------------------------------
# The mask
# ----------------------------------------------------------------------------------------------

def saft_mask(scores: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Select exactly floor(alpha * total) entries over all tensors together, the largest |score| first.

    Ties at the threshold are admitted in flat order: an earlier tensor (in ``scores`` order) before a
    later one, and within a tensor the smaller row-major index first. Scores are compared as float32
    and must all be on one device. Returns bool tensors shaped like the scores, on that device; they
    are views of one flat bool tensor (one allocation instead of hundreds).

    How, and why not torch.kthvalue/topk: on the CPU both copy the whole input (kthvalue clones it,
    topk builds (value, index) pairs: 16 bytes an entry); on 149.6M scores (ViT-B-16) they measured
    2.8x and 3.8x the scores' size in extra memory and 6-14 s here. Instead this is a radix select on
    the bit patterns of |score|, which order like the magnitudes: a histogram of the high 16 bits finds
    the bucket holding the k-th largest, a histogram of the low 16 bits inside that bucket finds its
    exact value, and a third pass writes the mask. All three stream over the scores in chunks, so the
    extra memory is a few chunk-sized buffers besides the mask itself, and nothing is sorted.
    """
    if not 0 < alpha <= 1:  # also rejects NaN
        raise ValueError(f"alpha is the fraction of parameters to train and must be in (0, 1]; got {alpha!r}")
    if not scores:
        raise ValueError("scores is empty")
    devices = {s.device for s in scores.values()}
    if len(devices) > 1:
        raise ValueError(f"scores must all be on one device; got {sorted(map(str, devices))}")
    total = sum(s.numel() for s in scores.values())
    n_select = math.floor(alpha * total)
    if n_select == 0:
        raise ValueError(
            f"alpha={alpha} selects floor({alpha} * {total}) = 0 of {total} entries; "
            f"use alpha >= {1 / total:.3g} to select at least one"
        )

    threshold_bits, n_above = _kth_largest_magnitude_bits(scores, n_select)
    ties_to_admit = n_select - n_above  # at least 1: the k-th largest entry itself sits at the threshold
    selected = torch.empty(total, dtype=torch.bool, device=devices.pop())
    for start, bits in _magnitude_bit_chunks(scores):
        chunk_selected = selected[start:start + bits.numel()]
        torch.gt(bits, threshold_bits, out=chunk_selected)
        if ties_to_admit > 0:
            tie_positions = torch.nonzero(bits == threshold_bits).squeeze(1)[:ties_to_admit]
            chunk_selected[tie_positions] = True
            ties_to_admit -= tie_positions.numel()

    parts = selected.split([s.numel() for s in scores.values()])
    return {name: part.view(score.shape) for (name, score), part in zip(scores.items(), parts)}


def _magnitude_bit_chunks(scores: Mapping[str, torch.Tensor]):
    """Yield (flat start, int32 bit patterns of |score| as float32) over all scores end to end.

    The scores are read as one flat sequence (dict order, row-major within a tensor) cut into chunks of
    _CHUNK_SIZE that run across tensor boundaries: a model has hundreds of small tensors, and a few
    chunk-sized operations cost far less than a few operations per tensor. The chunk is one reused
    buffer, valid until the next is requested. For a non-negative float32 the int32 reading of its
    bits orders exactly like its value: IEEE 754 puts the exponent above the mantissa, and the sign
    bit is 0.
    """
    total = sum(s.numel() for s in scores.values())
    device = next(iter(scores.values())).device
    buffer = torch.empty(min(_CHUNK_SIZE, total), dtype=torch.float32, device=device)
    chunk_start, filled = 0, 0
    for score in scores.values():
        flat = score.detach().reshape(-1)
        copied = 0
        while copied < flat.numel():
            n = min(buffer.numel() - filled, flat.numel() - copied)
            buffer[filled:filled + n].copy_(flat[copied:copied + n])
            filled, copied = filled + n, copied + n
            if filled == buffer.numel():
                yield chunk_start, buffer.abs_().view(torch.int32)
                chunk_start, filled = chunk_start + filled, 0
    if filled:
        yield chunk_start, buffer[:filled].abs_().view(torch.int32)


def _kth_largest_magnitude_bits(scores, k):
    """Bit pattern of the k-th largest |score| over all tensors, and how many entries lie strictly above it."""
    device = next(iter(scores.values())).device
    high_counts = torch.zeros(1 << 15, dtype=torch.int64, device=device)  # sign bit is 0: 15 high bits
    # A sum of magnitudes is NaN exactly when one of them is (inf + inf stays inf): one reduction per
    # chunk, where isnan().any() would also write a bool temporary.
    magnitude_sum = torch.zeros((), dtype=torch.float32, device=device)
    for _, bits in _magnitude_bit_chunks(scores):
        magnitude_sum += bits.view(torch.float32).sum()
        high_counts += torch.bincount(bits >> 16, minlength=1 << 15)
    if torch.isnan(magnitude_sum):
        raise ValueError("scores contain NaN; a NaN has no rank")
    high, n_above_high = _bucket_holding_kth_largest(high_counts, k)

    low_counts = torch.zeros(1 << 16, dtype=torch.int64, device=device)
    for _, bits in _magnitude_bit_chunks(scores):
        in_bucket = bits[(bits >> 16) == high]
        low_counts += torch.bincount(in_bucket & 0xFFFF, minlength=1 << 16)
    low, n_above_low = _bucket_holding_kth_largest(low_counts, k - n_above_high)

    return (high << 16) | low, n_above_high + n_above_low


def _bucket_holding_kth_largest(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """The bucket (histogram index) holding the k-th largest entry, and the count in buckets above it."""
    at_or_above = counts.flip(0).cumsum(0)  # at_or_above[j]: entries in buckets >= len - 1 - j
    j = int(torch.searchsorted(at_or_above, torch.tensor(k, device=counts.device)))
    bucket = counts.numel() - 1 - j
    return bucket, int(at_or_above[j] - counts[bucket])


# ----------------------------------------------------------------------------------------------
# Where the selected parameters are
# ----------------------------------------------------------------------------------------------

# Text-tower names of open_clip's CLIP ("text." is CustomTextCLIP's text tower).
_TEXT_PREFIXES = ("transformer.", "token_embedding", "positional_embedding", "ln_final", "text_projection", "text.")
_BLOCK_PATTERN = re.compile(r"^(?:visual\.|text\.)?transformer\.resblocks\.(\d+)\.")
# open_clip's ModifiedResNet (RN50, mini-CLIP 1): stages visual.layer1 ... visual.layer4 count as blocks 0 ... 3.
_STAGE_PATTERN = re.compile(r"^visual\.layer(\d+)\.")


def _encoder_and_block(name: str) -> tuple[str, int]:
    if name.startswith("visual."):
        encoder = "image"
    elif name.startswith(_TEXT_PREFIXES):
        encoder = "text"
    else:
        encoder = "other"  # e.g. logit_scale
    match = _BLOCK_PATTERN.match(name)
    if match:
        return encoder, int(match.group(1))
    stage = _STAGE_PATTERN.match(name)
    return encoder, int(stage.group(1)) - 1 if stage else -1


def per_layer_counts(mask: Mapping[str, torch.Tensor]) -> pd.DataFrame:
    """Selected entries per (encoder, residual block) of an open_clip CLIP model.

    Columns: encoder ("image", "text", "other"), block (the residual block index, -1 outside the
    blocks: embeddings, final norms, projections), count (selected entries), total (entries in that
    group). One row per (encoder, block), sorted by both.
    """
    rows = []
    for name, selected in mask.items():
        encoder, block = _encoder_and_block(name)
        rows.append((encoder, block, int(torch.count_nonzero(selected)), selected.numel()))
    table = pd.DataFrame(rows, columns=["encoder", "block", "count", "total"])
    return table.groupby(["encoder", "block"], as_index=False).sum().sort_values(["encoder", "block"], ignore_index=True)


def saft_pattern(counts: pd.DataFrame) -> dict:
    """The three facts of SAFT's per-layer picture (ViT-B/16 in the paper), read off a per_layer_counts
    table, so that a notebook can set a model's selection beside the paper's with numbers.

    Returns image and text (entries selected in each encoder), text_early_share (share of the text
    encoder's in-block selections that lie in the first half of its blocks) and image_late_share (share of
    the image encoder's in-block selections in the second half of its blocks). The paper reports
    text > image, selections concentrated in early text blocks and in late image blocks, i.e. both shares
    above one half. With an odd number of blocks the middle block counts for neither half.
    """
    def half_share(encoder, later):
        blocks = counts[(counts.encoder == encoder) & (counts.block >= 0)]
        if blocks.empty or blocks["count"].sum() == 0:
            return float("nan")
        num_blocks = int(blocks.block.max()) + 1
        half = blocks.block >= (num_blocks + 1) // 2 if later else blocks.block < num_blocks // 2
        return float(blocks.loc[half, "count"].sum() / blocks["count"].sum())

    total = counts.groupby("encoder")["count"].sum()
    return {"image": int(total.get("image", 0)), "text": int(total.get("text", 0)),
            "text_early_share": half_share("text", later=False), "image_late_share": half_share("image", later=True)}

def saft_pattern_report(counts: pd.DataFrame, who: str) -> str:
    """saft_pattern's three facts as lines of text, each with whether it agrees with the paper's picture."""
    facts = saft_pattern(counts)
    lines = [f"{who}: text encoder {facts['text']:,} entries, image encoder {facts['image']:,} "
             f"(paper: text > image: {'agrees' if facts['text'] > facts['image'] else 'does not agree'})"]
    for share, where in (("text_early_share", "text encoder, first half of the blocks"),
                         ("image_late_share", "image encoder, second half of the blocks")):
        verdict = "agrees" if facts[share] > 0.5 else "does not agree"
        lines.append(f"  {where}: {100 * facts[share]:.1f} % of its in-block selections ({verdict} with the paper)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Training only the selected entries
# ----------------------------------------------------------------------------------------------

def mask_gradients(named_params: Iterable[tuple[str, torch.Tensor]], mask: Mapping[str, torch.Tensor]) -> None:
    """Zero the gradient entries that the mask does not select, in place.

    Call it after backward() and BEFORE torch.nn.utils.clip_grad_norm_, so that the clipping norm is the
    norm of the sparse update rather than of the full gradient. SparseAdamW ignores unselected gradient
    entries anyway, so without clipping this call is not needed. On a GPU, move the mask there once
    (``{n: m.cuda() for n, m in mask.items()}``) to avoid a copy per step.
    """
    for name, param in named_params:
        if param.grad is not None:
            param.grad.masked_fill_(~mask[name].to(param.grad.device), 0)


class SparseAdamW(torch.optim.Optimizer):
    """AdamW that updates, and keeps moment estimates for, only the entries a mask selects.

    ``SparseAdamW(named_params, mask, lr, betas, eps, weight_decay)``: ``named_params`` is an iterable
    of (name, parameter) pairs, e.g. ``model.named_parameters()``, and ``mask`` maps every one of those
    names to a bool tensor of the parameter's shape (as ``saft_mask`` returns).

    For each parameter with k selected entries the state is a step count and 1-D exp_avg/exp_avg_sq of
    length k; the selected flat indices (int64) live in ``selected_indices``, outside ``state`` so that
    ``load_state_dict`` never casts them to float. Parameters with nothing selected get no state and are
    skipped. Decoupled weight decay applies to the selected entries only, and unselected entries are
    never written, so they stay bit-identical. With a mask of all True this is torch.optim.AdamW, step
    for step: same moment updates, bias correction and eps placement. The learning rate lives in
    ``param_groups[0]["lr"]``, so torch.optim.lr_scheduler works unchanged.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        mask: Mapping[str, torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        param_groups: list[dict] | None = None,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0; got {lr}, {eps}, {weight_decay}")
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"betas must be in [0, 1); got {betas}")
        named_params = list(named_params)
        missing = [name for name, _ in named_params if name not in mask]
        if missing:
            raise ValueError(f"mask has no entry for {len(missing)} parameter(s), e.g. {missing[:3]}")

        self.selected_indices: dict[torch.Tensor, torch.Tensor] = {}
        for name, param in named_params:
            if mask[name].shape != param.shape:
                raise ValueError(f"mask for {name} has shape {tuple(mask[name].shape)}, parameter {tuple(param.shape)}")
            if not param.is_contiguous():
                raise ValueError(f"{name} is not contiguous; its flat indices would not address it")
            indices = torch.nonzero(mask[name].reshape(-1)).squeeze(1).to(param.device)
            if indices.numel() > 0:
                self.selected_indices[param] = indices
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        # param_groups (torch's list of {"params": [...], "lr": ...}) keeps a base method's per-group settings;
        # it must hold the same parameters as named_params.
        super().__init__(param_groups or [param for _, param in named_params], defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                indices = self.selected_indices.get(param)
                if indices is None or param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("SparseAdamW does not take sparse gradients")
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros(indices.numel(), dtype=param.dtype, device=param.device)
                    state["exp_avg_sq"] = torch.zeros(indices.numel(), dtype=param.dtype, device=param.device)
                state["step"] += 1
                step, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]

                # The same operations, in the same order, as torch.optim.AdamW's single-tensor path, on
                # the gathered selected entries only.
                grad = param.grad.reshape(-1)[indices]
                values = param.view(-1)[indices]
                values.mul_(1 - lr * weight_decay)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = lr / (1 - beta1 ** step)
                bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                values.addcdiv_(exp_avg, denom, value=-step_size)
                param.view(-1).index_copy_(0, indices, values)
        return loss


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors; for SparseAdamW the selected-index tensors count too."""
    tensors = [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    if isinstance(optimizer, SparseAdamW):
        tensors += list(optimizer.selected_indices.values())
    return sum(t.numel() * t.element_size() for t in tensors)


def one_batch_scores(model: torch.nn.Module, tokenizer, images: torch.Tensor, prompts: list[str],
                     strategy: str = "gradient") -> dict[str, torch.Tensor]:
    """Scores from ONE small image-text batch under CLIP's symmetric InfoNCE (image i pairs with prompt i).

    Cheap enough for a CPU look at where a large model's selection falls (notebook 04 on ViT-B-16: four
    224 px images and four prompts); from random weights that shows the layout only, not what a pretrained
    model would select.
    """
    device = next(model.parameters()).device
    tokens = tokenizer(prompts).to(device)

    def loss_fn(model, batch):
        image_features = model.encode_image(batch.to(device), normalize=True)
        text_features = encode_text(model, tokens)
        return contrastive_loss(image_features, text_features, model.logit_scale.exp())

    return parameter_scores(model, loss_fn, [images], strategy=strategy)
