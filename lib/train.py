"""One fine-tuning loop for every method of the registry (lib.methods).

The loop takes a method object and never imports the registry: lib.methods imports this module (Trained, the
batch stream), so the dependency goes one way."""
import copy
import math
import random
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .checks import check_number
from .models import autocast, data_loader, default_num_workers, pick_device, rank_and_world


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


class GlobalBatches(torch.utils.data.Sampler):
    """Rank `rank`'s part, [rank::world], of shuffled full global batches of indices into n items, epoch after
    epoch, forever: a batch sampler, so that each rank's loader reads and decodes only its own share.

    The global batches are those of the loop the lab always had, `DataLoader(dataset, batch_size, shuffle=True,
    drop_last=True, generator=torch.Generator().manual_seed(seed))` iterated epoch after epoch: each epoch drew
    from that generator first its workers' base seed (DataLoader's iterator), then torch's RandomSampler its
    permutation (and one more, discarded, when the epoch ended), which is what happens here, so every seed keeps
    the batches of the committed results, whatever the number of workers or ranks (tests/test_loading.py)."""

    def __init__(self, n, batch_size, seed, rank=0, world=1, weights=None, skip=0):
        if batch_size > n:  # drop_last would leave no batch at all, and the loop would never yield
            raise ValueError(f"batch size {batch_size} is larger than the {n} training images; cap it first")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.skip = skip
        self.weights = None if weights is None else torch.tensor(np.asarray(weights, dtype=np.float64))

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        # Group-balanced data (e.g. WILDS, lib.data.wilds) carries per-item weights: an epoch is then n draws with
        # replacement, each item with probability proportional to its weight (WILDS's uniform_over_groups).
        order = (torch.utils.data.RandomSampler(range(self.n), generator=generator) if self.weights is None else
                 torch.utils.data.WeightedRandomSampler(self.weights, self.n, replacement=True, generator=generator))
        epoch = torch.utils.data.BatchSampler(order, self.batch_size, drop_last=True)
        drawn = 0
        while True:
            torch.empty((), dtype=torch.int64).random_(generator=generator)  # the iterator's base seed
            for batch in epoch:
                drawn += 1
                if drawn > self.skip:
                    yield batch[self.rank::self.world]


def _batches(dataset, batch_size, seed, num_workers=None, device="cpu", num_batches=math.inf, rank=0, world=1,
             skip=0):
    """Rank `rank`'s part of shuffled full global batches (GlobalBatches, the first `skip` left out) as (images,
    labels, indices), forever. num_workers: loader processes (None: lib.models.default_num_workers); num_batches:
    how many will be drawn, when known (a single one starts no worker)."""
    weights = (getattr(dataset, "metadata", None) or {}).get("weight")
    sampler = GlobalBatches(len(dataset), batch_size, seed, rank, world, weights, skip)
    if num_workers is None:
        num_workers = default_num_workers(dataset)
    # The loader's own generator only seeds its workers; giving it one keeps torch's global random state untouched.
    yield from data_loader(dataset, device, num_workers, num_batches, indexed=True, batch_sampler=sampler,
                           generator=torch.Generator().manual_seed(seed))


class _StepLoss(torch.nn.Module):
    """A method's loss as a module's forward, so that DistributedDataParallel sees the forward pass it wraps
    (methods call model.encode_image and encode_text themselves, which would bypass DDP's forward)."""

    def __init__(self, model, method):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, images, labels, indices):
        return self.method.loss(self.model, images, labels, indices)


def finetune(model, method, train_set, tokenizer, num_steps=None, seed=0, device="auto", progress=True,
             num_workers=None):
    """Fine-tune a copy of `model` on `train_set` (an ImageSet with the model's transform) with `method`.

    method: a Method, e.g. lib.methods.get_method("mms+bma", lam=0.3); num_steps, when given, overrides its own
    (and is recorded on it). Returns a Trained; the caller's model is never modified. A list of methods with one
    trajectory (Method.trajectory: the same method but for weight averages that only watch its steps, e.g. "ft",
    "ft+bma" and "ft+bma" at another beta) trains once and returns a list of Trained, one per method, each the
    one its own training would give. Methods in the list that take those steps only at first (Method.parts_from:
    "ce-swa" with its averaging phase takes "ce"'s steps until the phase starts) branch off where they part: the
    trunk's weights, optimizer state and torch's random state are copied there, and the branch takes only its own
    remaining steps (the batches it would have drawn: GlobalBatches skips the shared ones).

    num_workers: loader worker processes per rank (None: lib.models.default_num_workers; 0 loads in this process).
    The batches are the same whatever it is (GlobalBatches).

    Data-parallel under torch.distributed (torchrun; nccl on GPUs, gloo on the CPU): each rank loads its 1/world_size
    share of the global batch one process would draw, computes the loss on it, and torch's DistributedDataParallel
    averages the gradients (bucketed all-reduces that overlap the backward pass) before the method's hooks and
    clipping. For losses that are means over examples (ft, mms, ce, ...) a step is then the single-process step on
    the global batch, up to float rounding. The contrastive losses of flyp and arf gather the features of every rank
    (open_clip's gather_features), so they too see the global batch's negatives; each rank's loss is then the global
    one and DDP's mean of the gradients is the one-process gradient. The history is the loss averaged over ranks.
    """
    methods = method if isinstance(method, list) else [method]
    for m in methods:
        m.prompt_templates(train_set)  # recorded for every method, those that do not train included
    lead = next((m for m in methods if all(m.trajectory() in (o.trajectory(), o.parts_from()) for o in methods)),
                None)
    if lead is None:
        raise ValueError(f"{[m.name for m in methods]} do not take the same steps (Method.trajectory, "
                         f"Method.parts_from), so they cannot share a training: fine-tune them one by one.")
    for m in methods:
        if num_steps is not None:  # what runs is what the method records
            check_number(m.name, "num_steps", num_steps, m.defaults("RANGES")["num_steps"])
            m.hparams["num_steps"] = num_steps
    on_trunk = [m for m in methods if m.trajectory() == lead.trajectory()]
    trunk = lead.split()[0]  # the one whose hooks take the steps; the others' trunks are its twins
    num_steps = trunk.hparams["num_steps"]
    device = pick_device(device)
    set_seed(seed)
    model = copy.deepcopy(model).to(device)
    branches = {}
    for m in methods:
        if m not in on_trunk and m.trajectory() not in branches:
            branches[m.trajectory()] = _Branch(m, model)
    start = _random_state()  # the trunk draws what it would alone
    for branch in branches.values():
        branch.setup(tokenizer, train_set, num_steps, seed)
    _random_state(start)
    trunk.setup(model, tokenizer, train_set, num_steps=num_steps, seed=seed)
    watchers = {id(m): m.split()[1] for m in on_trunk}
    for watcher in sum(watchers.values(), []):
        watcher.start(model, train_set, num_steps)

    def part(step, optimizer):  # each branch takes the trunk's state where it parts from it
        for branch in branches.values():
            if branch.parting_step == step:
                branch.part(model, optimizer)
    history = []
    if trunk.trains and num_steps > 0:
        history = _take_steps(model, trunk, sum(watchers.values(), []), train_set, num_steps, seed, device, progress,
                              num_workers, name=" & ".join(m.name for m in on_trunk), at_step=part)
        for branch in branches.values():
            branch.history = history[:branch.parting_step] + branch.take_steps(
                train_set, num_steps, seed, device, progress, num_workers)
    model.eval()
    results = []
    for m in methods:
        if m in on_trunk:
            final = model
            for watcher in reversed(watchers[id(m)]):  # as the method's own finalize would hand the model inward
                final = watcher.averaged(final)
            trained = trunk.finalize(final, list(history))
        else:
            branch = branches[m.trajectory()]
            trained = branch.trunk.finalize(branch.model.eval(), list(branch.history))
        trained.method = m
        bad = [name for name, p in trained.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:  # e.g. the last step's update overflowed, or a weight average went wrong
            raise DivergedError(f"{m.name}: the weights it returns are not finite after {num_steps} steps (e.g. "
                                f"{bad[:3]}); {_likely_cause(m)}")
        results.append(trained)
    return results if isinstance(method, list) else results[0]


class _Branch:
    """Methods of one trajectory that take the trunk's first `parting_step` steps, then their own (finetune)."""

    def __init__(self, method, model):
        self.trunk, self.history = method, []  # no steps, no history: what its own training gives too
        self.model = copy.deepcopy(model)  # set up on the start, as its own training would be

    def setup(self, tokenizer, train_set, num_steps, seed):
        self.trunk.setup(self.model, tokenizer, train_set, num_steps=num_steps, seed=seed)

    @property
    def parting_step(self):  # known once set up
        return self.trunk.parting_step

    def part(self, model, optimizer):
        self.model.load_state_dict(model.state_dict())
        self.optimizer_state = copy.deepcopy(optimizer.state_dict())
        self.random_state = _random_state()

    def take_steps(self, train_set, num_steps, seed, device, progress, num_workers):
        _random_state(self.random_state)
        return _take_steps(self.model, self.trunk, [], train_set, num_steps, seed, device, progress, num_workers,
                           name=f"{self.trunk.name} from step {self.parting_step}", first_step=self.parting_step,
                           optimizer_state=self.optimizer_state)


def _random_state(state=None):
    """torch's random state (the CPU's and every GPU's), or set it to `state`."""
    if state is None:
        return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _take_steps(model, method, watchers, train_set, num_steps, seed, device, progress, num_workers, name,
                first_step=0, optimizer_state=None, at_step=None):
    """The loop: num_steps optimizer steps of `method` on `model` (in place), each watched by `watchers`. Returns
    the loss of every step. first_step and optimizer_state: resume there, with the optimizer's state then (the
    schedule and the batches are those of step first_step); at_step(steps_taken, optimizer) is called before each
    step and after the last."""
    named = method.trainable_parameters(model)
    trainable = {id(p) for _, p in named}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    optimizer = method.make_optimizer(named)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    scheduler = method.make_scheduler(optimizer, num_steps)
    with warnings.catch_warnings():  # the schedule moved to first_step, where the optimizer's state is
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
        for _ in range(first_step):
            scheduler.step()
    params = [p for _, p in named]
    rank, world = rank_and_world()
    batch_size = min(method.hparams["batch_size"], len(train_set))
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} does not split over {world} processes: set batch_size to a "
                         f"multiple of {world} (it is capped at the {len(train_set)} training images).")
    batches = _batches(train_set, batch_size, seed, num_workers, device, num_steps - first_step, rank, world,
                       first_step)
    train_mode(model)
    step_loss = _StepLoss(model, method)
    if world > 1:
        # Buffers are not broadcast at each forward: BatchNorm statistics stay frozen (train_mode), so no buffer
        # changes during training.
        step_loss = torch.nn.parallel.DistributedDataParallel(step_loss, broadcast_buffers=False)
    cuda = device.type == "cuda"
    history = []
    for step in tqdm(range(first_step, num_steps), desc=f"{name} (seed {seed})", disable=not progress or rank > 0,
                     leave=False):
        if at_step:
            at_step(step, optimizer)
        images, labels, indices = next(batches)
        with autocast(device):
            loss = step_loss(images.to(device, non_blocking=cuda), labels.to(device, non_blocking=cuda), indices)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:  # the global batch's loss, for the history (DDP has averaged the gradients)
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        method.before_clip(model)
        # The norm is needed for the guard even without clipping (an infinite bound leaves the gradients as they are).
        norm = torch.nn.utils.clip_grad_norm_(params, method.hparams["grad_clip"] or math.inf)
        loss_value, norm_value = torch.stack([loss.detach().float(), norm.float()]).tolist()  # one device sync
        if not math.isfinite(loss_value) or not math.isfinite(norm_value):
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            value = loss_value if what == "loss" else norm_value
            raise DivergedError(f"{name}: the {what} is {value} at step {step + 1} of {num_steps}; "
                                f"{_likely_cause(method)}")
        optimizer.step()
        scheduler.step()
        method.after_step(model, step)
        for watcher in watchers:
            watcher.observe(model, step)
        history.append(loss_value)
    if at_step:
        at_step(num_steps, optimizer)
    return history


class DivergedError(FloatingPointError):
    """A run that produced a NaN or infinite loss, gradient or weight: stopped, so that it is never stored."""


def _likely_cause(method):
    return (f"the run diverged, most likely from a learning rate too large for this model (lr="
            f"{method.hparams['lr']}; the papers use 1e-5 to 1e-4) or an extreme hyperparameter among "
            f"{ {k: v for k, v in method.hparams.items() if k != 'templates'} }: lower lr (or set grad_clip) and "
            f"run it again.")
