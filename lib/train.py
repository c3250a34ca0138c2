"""One fine-tuning loop for every method of the registry (lib.methods).

The loop takes a method object and never imports the registry: lib.methods imports this module (Trained, the
batch stream), so the dependency goes one way."""
import copy
import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .checks import check_number
from .models import autocast, pick_device


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_schedule(optimizer, num_steps, warmup_steps=0):
    """Linear warm-up, then cosine decay to zero: the schedule of CLIP and of the papers' code."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, num_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clamp_logit_scale(model):
    """CLIP's clamp of the learned temperature, after each step that trains it: a scale above 100 destabilizes
    contrastive training."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))


@dataclass
class Trained:
    """What fine-tuning returns: the model to evaluate, an optional non-text head, and the loss history."""
    model: torch.nn.Module
    head: object = None  # None: classify with the model's own text embeddings of the class names
    history: list = field(default_factory=list)
    method: object = None


def train_mode(model):
    """Training mode with BatchNorm statistics frozen at their pretrained values (mini-CLIP and the RN CLIPs
    have BatchNorm): fine-tuning then changes the weights only, so weight averaging, WiSE-FT and SAFT's
    "everything else stays pre-trained" hold for the whole model."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    return model


class _Indexed(torch.utils.data.Dataset):
    """Yields (image, label, index): methods such as ARF need to know which training items are in a batch."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return image, label, i


def _batches(dataset, batch_size, seed, num_workers):
    """Shuffled full batches of (images, labels, indices), epoch after epoch, forever."""
    if batch_size > len(dataset):  # drop_last would leave no batch at all, and the loop below would never yield
        raise ValueError(f"batch size {batch_size} is larger than the {len(dataset)} training images; cap it first")
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(_Indexed(dataset), batch_size=batch_size,
                                         shuffle=True, drop_last=True, generator=generator,
                                         num_workers=num_workers, persistent_workers=num_workers > 0)
    while True:
        yield from loader


def finetune(model, method, train_set, tokenizer, num_steps=None, seed=0, device="auto", progress=True,
             num_workers=0):
    """Fine-tune a copy of `model` on `train_set` (an ImageSet with the model's transform) with `method`.

    method: a Method, e.g. lib.methods.get_method("mms+bma", lam=0.3); num_steps, when given, overrides its own
    (and is recorded on it). Returns a Trained; the caller's model is never modified.

    Data-parallel under torch.distributed (torchrun; nccl on GPUs, gloo on the CPU): every rank draws the same
    global batch, computes the loss on its 1/world_size share, and gradients are averaged across ranks before the
    method's hooks and clipping. For losses that are means over examples (ft, mms, ce, ...) a step is then the
    single-process step on the global batch, up to float rounding. The contrastive losses of flyp and arf gather
    the features of every rank (open_clip's gather_features), so they too see the global batch's negatives.
    """
    if num_steps is not None:  # what runs is what the method records
        check_number(method.name, "num_steps", num_steps, method.defaults("RANGES")["num_steps"])
        method.hparams["num_steps"] = num_steps
    num_steps = method.hparams["num_steps"]
    device = pick_device(device)
    set_seed(seed)
    model = copy.deepcopy(model).to(device)
    method.prompt_templates(train_set)  # recorded for every method, those that do not train included
    method.setup(model, tokenizer, train_set, num_steps=num_steps, seed=seed)
    if not method.trains or num_steps == 0:
        return method.finalize(model.eval(), [])

    named = method.trainable_parameters(model)
    trainable = {id(p) for _, p in named}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    optimizer = method.make_optimizer(named)
    scheduler = method.make_scheduler(optimizer, num_steps)
    params = [p for _, p in named]
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    batch_size = min(method.hparams["batch_size"], len(train_set))
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} does not split over {world} processes: set batch_size to a "
                         f"multiple of {world} (it is capped at the {len(train_set)} training images).")
    batches = _batches(train_set, batch_size, seed, num_workers)
    history = []
    train_mode(model)
    for step in tqdm(range(num_steps), desc=f"{method.name} (seed {seed})", disable=not progress or rank > 0,
                     leave=False):
        images, labels, indices = (part[rank::world] for part in next(batches))
        with autocast(device):
            loss = method.loss(model, images.to(device), labels.to(device), indices)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            loss = _average_over_ranks(loss.detach(), [p.grad for p in params if p.grad is not None])
        method.before_clip(model)
        # The norm is needed for the guard even without clipping (an infinite bound leaves the gradients as they are).
        norm = torch.nn.utils.clip_grad_norm_(params, method.hparams["grad_clip"] or math.inf)
        loss_value, norm_value = torch.stack([loss.detach().float(), norm.float()]).tolist()  # one device sync
        if not math.isfinite(loss_value) or not math.isfinite(norm_value):
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            value = loss_value if what == "loss" else norm_value
            raise DivergedError(f"{method.name}: the {what} is {value} at step {step + 1} of {num_steps}; "
                                f"{_likely_cause(method)}")
        optimizer.step()
        scheduler.step()
        method.after_step(model, step)
        history.append(loss_value)
    trained = method.finalize(model.eval(), history)
    bad = [name for name, p in trained.model.named_parameters() if not torch.isfinite(p).all()]
    if bad:  # e.g. the last step's update overflowed, or a weight average went wrong
        raise DivergedError(f"{method.name}: the weights it returns are not finite after {num_steps} steps (e.g. "
                            f"{bad[:3]}); {_likely_cause(method)}")
    return trained


class DivergedError(FloatingPointError):
    """A run that produced a NaN or infinite loss, gradient or weight: stopped, so that it is never stored."""


def _likely_cause(method):
    return (f"the run diverged, most likely from a learning rate too large for this model (lr="
            f"{method.hparams['lr']}; the papers use 1e-5 to 1e-4) or an extreme hyperparameter among "
            f"{ {k: v for k, v in method.hparams.items() if k != 'templates'} }: lower lr (or set grad_clip) and "
            f"run it again.")


def _average_over_ranks(loss, grads):
    """Average the gradients (in place) and the loss over all ranks, in one all_reduce of one flat buffer (one
    message instead of one per tensor, as DDP's buckets); returns the averaged loss."""
    tensors = [loss.reshape(1), *grads]
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        tensor.copy_(part.view_as(tensor))
    return loss
