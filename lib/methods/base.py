"""The interface of a fine-tuning method, the modifiers that wrap one, and the registry (DomainBed style).

A method is a small object with default hyperparameters. It says which parameters train, what the loss of a batch
is, and what happens around the optimizer step; lib.train.finetune runs every method with the same loop.
Modifiers (averaging, sparsity, merging) wrap any base method, so names compose: "ft+bma", "mms+bma"
(= "clipood"), "mms+saft+bma". A weight average only watches its base's trajectory (a Watcher): "ft", "ft+bma" and
"ft+bma" at another beta take the same steps, and lib.train.finetune trains them once (Method.trajectory); a
method that takes another's first steps only (Method.parts_from: SWA's averaging phase) branches off its training.
Each paper's module (lib.methods.clipood, .robust_ft, .arf, .saft) registers its own methods, modifiers and aliases
with `register` and `alias`; lib.methods imports them all.

    >>> method = get_method("ft", lr=3e-5)
    >>> method.hparams["lr"]
    3e-05
"""
import json

import torch

from ..checks import Number, check_number, check_templates
from ..data import templates_for
from ..train import Trained, cosine_schedule


class Method:
    """The interface. Subclasses override HPARAMS (merged along the class hierarchy) and the hooks they need."""
    name = "method"
    trains = True
    # True when the start of training depends on the seed (e.g. a randomly initialized head), so two runs with
    # different seeds do not share a start (Model Stock needs one).
    seeded_start = False
    # templates=None: the prompt templates of the training data (lib.data.templates_for); set it to override.
    HPARAMS = dict(lr=3e-4, weight_decay=0.1, batch_size=64, num_steps=100, warmup_steps=10, grad_clip=1.0,
                   templates=None)
    # The values every numeric hyperparameter may take, checked when the method is built (merged like HPARAMS).
    RANGES = dict(lr=Number(0, low_open=True, why="the optimizer's step size"), weight_decay=Number(0),
                  batch_size=Number(1, integer=True), num_steps=Number(0, integer=True),
                  warmup_steps=Number(0, integer=True),
                  grad_clip=Number(0, why="the bound on the global gradient norm; 0 turns clipping off"))

    def __init__(self, **hparams):
        defaults = self.defaults()
        unknown = sorted(set(hparams) - set(defaults))
        if unknown:
            raise ValueError(f"Unknown hyperparameter(s) {unknown} for method {self.name!r}; "
                             f"it takes {sorted(defaults)}.")
        self.hparams = {**defaults, **hparams}
        for name, rule in self.defaults("RANGES").items():
            check_number(self.name, name, self.hparams[name], rule)
        if self.hparams["templates"] is not None:
            check_templates(self.name, self.hparams["templates"])

    @classmethod
    def defaults(cls, attribute="HPARAMS"):
        merged = {}
        for klass in reversed(cls.__mro__):
            merged.update(getattr(klass, attribute, {}))
        return merged

    def prompt_templates(self, train_set):
        """The templates of the class prompts: the hyperparameter when set, else the training data's. Recorded in
        hparams, so that evaluation uses the templates that trained and what ran is what the method records."""
        if self.hparams["templates"] is None:
            self.hparams["templates"] = templates_for(train_set)
        return self.hparams["templates"]

    def check_dataset(self, dataset):
        """Raise, before training, if the method cannot run on `dataset` (a benchmark name) as configured."""

    def setup(self, model, tokenizer, train_set, num_steps, seed):
        """Called once before training, on the copy of the model that will train."""

    def trainable_parameters(self, model):
        """[(name, parameter)] that the optimizer updates; the image encoder by default."""
        return [(n, p) for n, p in model.named_parameters() if n.startswith("visual.")]

    def make_optimizer(self, named_parameters):
        return adamw([p for _, p in named_parameters], lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])

    def make_scheduler(self, optimizer, num_steps):
        """The learning-rate schedule, stepped after every optimizer step: CLIP's linear warm-up and cosine decay,
        unless a method needs its own (SWA's averaging phase)."""
        return cosine_schedule(optimizer, num_steps, self.hparams["warmup_steps"])

    def loss(self, model, images, labels, indices):
        raise NotImplementedError

    def before_clip(self, model):
        """After backward, before gradient clipping (SAFT masks gradients here)."""

    def after_step(self, model, step):
        """After each optimizer step (weight averaging updates here)."""

    def finalize(self, model, history):
        return Trained(model, None, history, self)

    def split(self):
        """(trunk, watchers): the method that takes the steps, and the weight averages around it that only watch them
        (innermost first). A method that is no Watcher is its own trunk."""
        return self, []

    def trajectory(self):
        """What decides every step: the trunk's name and hyperparameters, the watchers' own left out. Methods with the
        same trajectory, trained with the same seed on the same data, take the same steps."""
        trunk, watchers = self.split()
        return trajectory_of(trunk, watchers)

    def parts_from(self):
        """The trajectory of the method whose first steps this one takes before taking its own (SWA with its
        averaging phase takes its base's steps until the phase starts), or None. After setup, `parting_step` is the
        number of steps they share; lib.train.finetune then trains the two once up to there."""
        return None

    def __repr__(self):
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in self.hparams.items() if k != 'templates')})"


class Modifier(Method):
    """Wraps a base method and adds behaviour around its steps; hyperparameters of both are accepted."""
    MODIFIER_HPARAMS = {}
    MODIFIER_RANGES = {}

    def __init__(self, base, **hparams):
        unknown = sorted(set(hparams) - set(self.MODIFIER_HPARAMS))
        if unknown:
            raise ValueError(f"Unknown hyperparameter(s) {unknown} for modifier {self.name!r}; "
                             f"it takes {sorted(self.MODIFIER_HPARAMS)}.")
        if not base.trains:
            raise ValueError(f"The modifier {self.name!r} acts on training steps, but {base.name!r} does not train "
                             f"(it has no optimizer steps); use it on a method that trains, e.g. "
                             f"'ft+{self.name}' or 'ce+{self.name}'.")
        self.base = base
        self.hparams = base.hparams  # one shared dict, so the base method sees every override too
        self.hparams.update({**self.MODIFIER_HPARAMS, **hparams})
        self.name = f"{base.name}+{self.name}"
        self.trains = base.trains
        self.seeded_start = base.seeded_start
        for name, rule in self.MODIFIER_RANGES.items():
            check_number(self.name, name, self.hparams[name], rule)
        if self.hparams["templates"] is not None:
            check_templates(self.name, self.hparams["templates"])

    def check_dataset(self, dataset):
        self.base.check_dataset(dataset)

    def setup(self, model, tokenizer, train_set, num_steps, seed):
        self.base.setup(model, tokenizer, train_set, num_steps, seed)

    def trainable_parameters(self, model):
        return self.base.trainable_parameters(model)

    def make_optimizer(self, named_parameters):
        return self.base.make_optimizer(named_parameters)

    def make_scheduler(self, optimizer, num_steps):
        return self.base.make_scheduler(optimizer, num_steps)

    def loss(self, model, images, labels, indices):
        return self.base.loss(model, images, labels, indices)

    def before_clip(self, model):
        self.base.before_clip(model)

    def after_step(self, model, step):
        self.base.after_step(model, step)

    def finalize(self, model, history):
        return self.base.finalize(model, history)


class Watcher(Modifier):
    """A modifier that only watches its base's trajectory, a weight average: it has no loss, optimizer or schedule
    of its own, so the base takes the same steps with it or without it, and one training serves the base and any
    number of watchers (lib.train.finetune given a list of methods). Subclasses define start, observe and averaged;
    one that changes the steps in some settings (SWA's averaging phase) says so in watches_only."""
    watches_only = True

    def start(self, model, train_set, num_steps):
        """Before the first step, after the base's setup."""

    def observe(self, model, step):
        """After each optimizer step, after the base's after_step."""

    def averaged(self, model):
        """The module to return in place of `model`, the final state."""
        return model

    def split(self):
        if not self.watches_only:
            return self, []
        trunk, watchers = self.base.split()
        return trunk, watchers + [self]

    def setup(self, model, tokenizer, train_set, num_steps, seed):
        super().setup(model, tokenizer, train_set, num_steps, seed)
        self.start(model, train_set, num_steps)

    def after_step(self, model, step):
        super().after_step(model, step)
        self.observe(model, step)

    def finalize(self, model, history):
        return super().finalize(self.averaged(model), history)


def trajectory_of(trunk, modifiers):
    """Method.trajectory of `trunk` with the hyperparameters of `modifiers` left out (its hparams dict is shared
    with the modifiers around it)."""
    own = {name for modifier in modifiers for name in modifier.MODIFIER_HPARAMS}
    return json.dumps([trunk.name, {k: v for k, v in trunk.hparams.items() if k not in own}], sort_keys=True,
                      default=str)


METHODS = {}
MODIFIERS = {}
ALIASES = {}


def adamw(params, lr, weight_decay):
    """torch.optim.AdamW, fused where torch has the fused kernel for every parameter's device (CPU and CUDA): the
    same update, in one pass over the weights instead of a dozen; on a 2-core CPU a step of mini-CLIP's optimizer
    takes a fifth of the time (benchmarks/bench_optimizer.py)."""
    tensors = [p for group in params for p in group["params"]] if isinstance(params[0], dict) else params
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in tensors)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def register(cls):
    """Add a method, or a modifier (a Modifier subclass), to the registry under cls.name; a class decorator."""
    (MODIFIERS if issubclass(cls, Modifier) else METHODS)[cls.name] = cls
    return cls


def alias(name, target):
    """A short name for a composed method, e.g. alias("clipood", "mms+bma")."""
    ALIASES[name] = target


def get_method(name, **hparams):
    """A method from its registry name; "a+b+c" is base method a wrapped by modifiers b then c."""
    parts = ALIASES.get(name, name).split("+")
    if parts[0] not in METHODS:
        raise ValueError(f"Unknown method {parts[0]!r}; known methods: {sorted(METHODS) + sorted(ALIASES)}"
                         + (f", modifiers usable after '+': {sorted(MODIFIERS)}" if MODIFIERS else ""))
    unknown = [p for p in parts[1:] if p not in MODIFIERS]
    if unknown:
        raise ValueError(f"Unknown modifier(s) {unknown} in {name!r}; known modifiers: {sorted(MODIFIERS)}")
    base_keys = set(METHODS[parts[0]].defaults())
    method = METHODS[parts[0]](**{k: v for k, v in hparams.items() if k in base_keys})
    rest = {k: v for k, v in hparams.items() if k not in base_keys}
    for part in parts[1:]:
        modifier = MODIFIERS[part]
        method = modifier(method, **{k: rest.pop(k) for k in list(rest) if k in modifier.MODIFIER_HPARAMS})
    if rest:
        raise ValueError(f"Unknown hyperparameter(s) {sorted(rest)} for method {name!r}; "
                         f"it takes {sorted(method.hparams)}.")
    if name in ALIASES:
        method.name = name
    return method
