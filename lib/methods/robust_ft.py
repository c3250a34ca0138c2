"""Robust fine-tuning of vision-language models for domain generalization (arXiv 2311.02236): few-shot CLIP
fine-tuning against a vision-only model, with and without stochastic weight averaging.

Notebook: 02_robust_ft_swa. Methods: `ce` (end-to-end cross-entropy, both encoders and the scale train; also the
base of SAFT), `vision-only`, `swa` (a modifier), `ce-swa` (= "ce+swa"). Primitives: lib.losses.cross_entropy_loss,
lib.averaging.StochasticWeightAverage, lib.data.folders.fraction_sample (the data fractions of
lib.experiments.fraction_sweep).
"""
import math

import torch

from ..averaging import StochasticWeightAverage
from ..checks import Number
from ..losses import cross_entropy_loss
from ..models import encode_text
from .base import Method, Watcher, alias, register, trajectory_of
from .baselines import LinearHeadTuning


@register
class EndToEndCrossEntropy(Method):
    """End-to-end fine-tuning (paper 2, SAFT's base): cross-entropy on logit_scale * cos(image, class text),
    where the class embeddings come from the LIVE text encoder at every step (prompt ensembling over the
    templates, as in the zero-shot head), and both encoders and logit_scale train."""
    name = "ce"

    def setup(self, model, tokenizer, train_set, num_steps, seed):
        device = next(model.parameters()).device
        templates = self.prompt_templates(train_set)
        self.num_templates = len(templates)
        self.tokens = tokenizer([t.format(c) for c in train_set.classnames for t in templates]).to(device)

    def trainable_parameters(self, model):
        return list(model.named_parameters())

    def class_embeddings(self, model):
        features = encode_text(model, self.tokens)
        features = features.view(-1, self.num_templates, features.shape[-1]).mean(1)
        return torch.nn.functional.normalize(features, dim=-1)

    def loss(self, model, images, labels, indices):
        image_features = model.encode_image(images, normalize=True)
        return cross_entropy_loss(image_features, self.class_embeddings(model), labels, model.logit_scale.exp())


@register
class VisionOnly(LinearHeadTuning):
    """Paper 2's vision-only baseline: the same image encoder with a randomly initialized linear head over its
    (L2-normalized) features, both trained with cross-entropy; no text at all, so new classes give NaN. The head
    trains at `head_lr` on features multiplied by `feature_scale` (features have unit norm, so a randomly
    initialized head needs larger logits and a larger step than the encoder); see LinearHeadTuning."""
    name = "vision-only"
    seeded_start = True
    head_name = "vision_only_head"

    def initial_head(self, model, tokenizer, train_set, seed):
        generator = torch.Generator().manual_seed(seed)
        head = torch.nn.Linear(model.visual.output_dim, len(train_set.classnames))
        with torch.no_grad():  # nn.Linear's default init, drawn from the run's own seed
            bound = 1 / head.in_features ** 0.5
            head.weight.uniform_(-bound, bound, generator=generator)
            head.bias.uniform_(-bound, bound, generator=generator)
        return head.weight.detach(), head.bias.detach()


@register
class StochasticWeightAveraging(Watcher):
    """Paper 2's SWA: the model returned is the plain mean of the states at the ends of the periods of `swa_every`
    steps (epochs) that start at or after swa_start * T (T steps in all): the states after steps s = k * swa_every
    with (k - 1) * swa_every >= swa_start * T, i.e. once per epoch over the last (1 - swa_start) of training, as
    in the paper's code (22 epochs from 2/3: the last 7), starting from a copy (the zero-shot weights are
    not in the average). swa_every=None means one epoch of the training set (len // batch size steps), as in the
    paper's code; if no step qualifies, the final state is the average. `swa_steps` lists the averaged steps.

    The learning rate: swa_lr=None keeps the base method's schedule (a cosine decay to zero over the whole run, so
    the averaged states lie close together); SWA then only watches the base's steps (a Watcher), and "X" and "X+swa"
    train once together (lib.train.finetune given both). A number gives the paper's averaging phase (fmdg/_model.py): the base
    schedule stops where averaging starts, and torch's SWALR, stepped once per averaged period, moves the rate
    from its value there to swa_lr by a cosine anneal over swa_anneal periods (the paper: 10 epochs, or as many
    as it averages if fewer), then holds it. The paper averages 10 epochs, so its rate rises from 1e-6 (the
    base schedule's value after 20 epochs) towards swa_lr = 1e-4 for all of them and never holds. Until the phase
    starts (parting_step) "X+swa" takes X's steps (parts_from): lib.train.finetune given both trains X once and
    branches the phase off there.

    The default is the averaging phase at swa_lr = 1e-4, the paper's value, which is notebook 02's base rate and a
    third of the registry's: the states spread at the rate training ran at. The paper's ratio (ten times its base
    rate of 1e-5) would be 1e-3 in notebook 02; measured there (3 seeds, 40 steps), it cost OOD accuracy at 10 %
    of the data (-2.2 +/- 2.5 points against ce) where 1e-4 did not (+0.2 +/- 3.8)."""
    name = "swa"
    MODIFIER_HPARAMS = dict(swa_start=0.5, swa_every=None, swa_lr=1e-4, swa_anneal=10)
    MODIFIER_RANGES = dict(
        swa_start=Number(0, 1, high_open=True, why="the fraction of training before averaging; the paper uses 0.5"),
        swa_every=Number(1, integer=True, none_ok=True, why="steps between averaged states; None is one epoch"),
        swa_lr=Number(0, low_open=True, none_ok=True,
                      why="the learning rate of the averaging phase; None keeps the base schedule"),
        swa_anneal=Number(1, integer=True, why="averaged periods over which the rate moves to swa_lr"))

    @property
    def watches_only(self):  # the averaging phase changes the learning rate, so the steps
        return self.hparams["swa_lr"] is None

    def parts_from(self):
        if self.watches_only:
            return None  # it shares its base's whole trajectory
        trunk, watchers = self.base.split()
        return trajectory_of(trunk, [self, *watchers])

    @property
    def parting_step(self):  # until the phase starts, the base schedule and the base's steps
        return self.phase_start

    def start(self, model, train_set, num_steps):
        start, every = self.hparams["swa_start"], self.hparams["swa_every"]
        if every is None:
            every = max(1, len(train_set) // max(1, min(self.hparams["batch_size"], len(train_set))))
        # The first period boundary at or after the start; rounded first, so that 0.7 * 10 counts as 7.
        first = math.ceil(round(start * num_steps / every, 9)) * every
        self.swa_steps = list(range(first + every, num_steps + 1, every)) or ([num_steps] if num_steps > 0 else [])
        self.phase_start = max(0, self.swa_steps[0] - every) if self.swa_steps else num_steps
        self.average = StochasticWeightAverage(model)

    def make_scheduler(self, optimizer, num_steps):
        base = super().make_scheduler(optimizer, num_steps)
        if self.hparams["swa_lr"] is None:
            return base
        anneal = min(self.hparams["swa_anneal"], len(self.swa_steps))
        return _AveragingPhase(optimizer, base, self.phase_start, self.swa_steps, self.hparams["swa_lr"], anneal)

    def observe(self, model, step):
        if step + 1 in self.swa_steps:  # the loop's step is 0-based; s counts optimizer steps taken
            self.average.update(model)

    def averaged(self, model):
        if self.average.num_averaged == 0:  # no training happened (fraction 0 or num_steps 0)
            return model
        return self.average.module.eval()


class _AveragingPhase:
    """The base schedule until step `start`, then torch's SWALR stepped at the end of each averaged period (the
    loop steps a schedule after every optimizer step; the paper steps SWALR once per epoch)."""

    def __init__(self, optimizer, base, start, swa_steps, swa_lr, anneal):
        self.optimizer, self.base, self.start, self.swa_steps = optimizer, base, start, set(swa_steps)
        self.swa_lr, self.anneal, self.steps_taken = swa_lr, anneal, 0
        self.phase = self._swalr() if start == 0 else None

    def _swalr(self):  # anneals from the rate the base schedule has reached when it is built
        return torch.optim.swa_utils.SWALR(self.optimizer, self.swa_lr, anneal_epochs=self.anneal,
                                           anneal_strategy="cos")

    def step(self):
        self.steps_taken += 1
        if self.steps_taken <= self.start:
            self.base.step()
            if self.steps_taken == self.start:
                self.phase = self._swalr()
        if self.steps_taken in self.swa_steps:
            self.phase.step()


alias("ce-swa", "ce+swa")
