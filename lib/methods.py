"""The registry of fine-tuning methods (DomainBed style): a method is a small object with default hparams.

A method says which parameters train, what the loss of a batch is, and what happens around the optimizer
step; lib.train.finetune runs every method with the same loop. Modifiers (averaging, sparsity) wrap any base
method, so names compose: "ft+bma", "mms+bma" (= "clipood"), "saft+mms+bma".

    >>> method = get_method("ft", lr=3e-5)
    >>> method.hparams["lr"]
    3e-05
"""
import math

import torch
import torch.distributed as dist
from open_clip.loss import gather_features
from sklearn.linear_model import LogisticRegression

from . import anchors
from .averaging import BetaMovingAverage, StochasticWeightAverage, beta_weights
from .checks import Number, check_number
from .losses import contrastive_loss, cross_entropy_loss, mms_loss
from .models import SHAPEWORLD_TEMPLATES, encode_images, encode_text, zeroshot_head
from .sparse import SCORE_STRATEGIES, SparseAdamW, parameter_scores, saft_mask
from .train import Trained, _batches, clamp_logit_scale, train_mode


class Method:
    """The interface. Subclasses override HPARAMS (merged along the class hierarchy) and the hooks they need."""
    name = "method"
    trains = True
    HPARAMS = dict(lr=1e-4, weight_decay=0.1, batch_size=64, num_steps=150, warmup_steps=10, grad_clip=1.0,
                   templates=SHAPEWORLD_TEMPLATES)
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

    @classmethod
    def defaults(cls, attribute="HPARAMS"):
        merged = {}
        for klass in reversed(cls.__mro__):
            merged.update(getattr(klass, attribute, {}))
        return merged

    def check_dataset(self, dataset):
        """Raise, before training, if the method cannot run on `dataset` (a benchmark name) as configured."""

    def setup(self, model, tokenizer, train_set, num_steps, seed):
        """Called once before training, on the copy of the model that will train."""

    def trainable_parameters(self, model):
        """[(name, parameter)] that the optimizer updates; the image encoder by default."""
        return [(n, p) for n, p in model.named_parameters() if n.startswith("visual.")]

    def make_optimizer(self, named_parameters):
        return torch.optim.AdamW([p for _, p in named_parameters], lr=self.hparams["lr"],
                                 weight_decay=self.hparams["weight_decay"])

    def loss(self, model, images, labels, indices):
        raise NotImplementedError

    def before_clip(self, model):
        """After backward, before gradient clipping (SAFT masks gradients here)."""

    def after_step(self, model, step):
        """After each optimizer step (weight averaging updates here)."""

    def finalize(self, model, history):
        return Trained(model, None, history, self)

    def __repr__(self):
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in self.hparams.items() if k != 'templates')})"


class ZeroShot(Method):
    """No training: classify with the text embeddings of class-name prompts."""
    name = "zeroshot"
    trains = False


class LinearHead:
    """A linear classifier over image features for a fixed set of classes (no text, so no new classes)."""

    def __init__(self, weight, bias, classnames):
        self.weight, self.bias, self.classnames = weight.float(), bias.float(), list(classnames)

    def __call__(self, image_features, classnames):
        missing = [c for c in classnames if c not in self.classnames]
        if missing:
            raise KeyError(f"a linear head knows only the classes it was trained on; not {missing}")
        rows = [self.classnames.index(c) for c in classnames]
        return image_features @ self.weight[rows].T + self.bias[rows]


class LinearProbe(Method):
    """CLIP's linear-probe protocol: logistic regression on frozen image features (scikit-learn)."""
    name = "lp"
    trains = False
    HPARAMS = dict(C=1.0, max_iter=1000)
    RANGES = dict(C=Number(0, low_open=True, why="the inverse regularization strength"),
                  max_iter=Number(1, integer=True))

    def setup(self, model, tokenizer, train_set, num_steps, seed):
        features = encode_images(model, train_set).numpy()
        classifier = LogisticRegression(C=self.hparams["C"], max_iter=self.hparams["max_iter"], random_state=seed)
        classifier.fit(features, train_set.labels.numpy())
        names = [train_set.classnames[c] for c in classifier.classes_]
        self.head = LinearHead(torch.from_numpy(classifier.coef_), torch.from_numpy(classifier.intercept_), names)

    def finalize(self, model, history):
        return Trained(model, self.head, history, self)


class FrozenTextMethod(Method):
    """Base for methods that train the image encoder against the frozen text encoder's class embeddings."""

    def setup(self, model, tokenizer, train_set, num_steps, seed):
        self.text_features = zeroshot_head(model, tokenizer, train_set.classnames, self.hparams["templates"])
        self.scale = model.logit_scale.exp().item()


class FineTune(FrozenTextMethod):
    """Plain fine-tuning: image encoder, cross-entropy on the model's scale * cosine to frozen class embeddings."""
    name = "ft"

    def loss(self, model, images, labels, indices):
        image_features = model.encode_image(images, normalize=True)
        return cross_entropy_loss(image_features, self.text_features, labels, self.scale)


class MarginMetricSoftmax(FrozenTextMethod):
    """CLIPood's MMS: cross-entropy with class-adaptive margins lam * (1 - cos(t_y, t_j)) at the model's own
    temperature (CLIPood's default: logit_scale.exp(), 100 for OpenAI's CLIPs); `scale` overrides it."""
    name = "mms"
    HPARAMS = dict(lam=0.3, scale=None)
    RANGES = dict(lam=Number(0, why="the margin weight: CLIPood uses 0.3, 0.1 in the wild; 0 is plain "
                                    "cross-entropy, the same loss as ft"),
                  scale=Number(0, low_open=True, none_ok=True,
                               why="the inverse temperature; None: the model's own logit_scale.exp()"))

    def loss(self, model, images, labels, indices):
        image_features = model.encode_image(images, normalize=True)
        scale = self.scale if self.hparams["scale"] is None else self.hparams["scale"]
        return mms_loss(image_features, self.text_features, labels, self.hparams["lam"], scale)


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
        for name, rule in self.MODIFIER_RANGES.items():
            check_number(self.name, name, self.hparams[name], rule)

    def check_dataset(self, dataset):
        self.base.check_dataset(dataset)

    def setup(self, model, tokenizer, train_set, num_steps, seed):
        self.base.setup(model, tokenizer, train_set, num_steps, seed)

    def trainable_parameters(self, model):
        return self.base.trainable_parameters(model)

    def make_optimizer(self, named_parameters):
        return self.base.make_optimizer(named_parameters)

    def loss(self, model, images, labels, indices):
        return self.base.loss(model, images, labels, indices)

    def before_clip(self, model):
        self.base.before_clip(model)

    def after_step(self, model, step):
        self.base.after_step(model, step)

    def finalize(self, model, history):
        return self.base.finalize(model, history)


class BetaAverage(Modifier):
    """CLIPood's BMA: the model returned is the Beta(beta, beta)-weighted mean of the zero-shot weights and
    every later state of the trajectory."""
    name = "bma"
    MODIFIER_HPARAMS = dict(beta=0.5)
    MODIFIER_RANGES = dict(beta=Number(0, low_open=True, why="the Beta(beta, beta) shape: CLIPood uses 0.5, 0.1 "
                                                             "for open classes"))

    def __init__(self, base, **hparams):
        super().__init__(base, **hparams)
        if self.hparams["num_steps"] >= 1:  # the weights of the planned trajectory must be defined (no underflow)
            beta_weights(self.hparams["num_steps"], self.hparams["beta"])

    def setup(self, model, tokenizer, train_set, num_steps, seed):
        super().setup(model, tokenizer, train_set, num_steps, seed)
        if int(num_steps) != num_steps or num_steps < 1:
            raise ValueError(f"bma: averages a trajectory of optimizer steps, so num_steps must be a positive "
                             f"integer; got {num_steps!r}")
        self.average = BetaMovingAverage(model, beta=self.hparams["beta"], total_steps=num_steps)

    def after_step(self, model, step):
        super().after_step(model, step)
        self.average.update(model)

    def finalize(self, model, history):
        trained = super().finalize(model, history)
        trained.model = self.average.module.eval()
        return trained


METHODS = {m.name: m for m in (ZeroShot, LinearProbe, FineTune, MarginMetricSoftmax)}
MODIFIERS = {m.name: m for m in (BetaAverage,)}
ALIASES = {"bma": "ft+bma", "clipood": "mms+bma"}


def register(cls, registry=None):
    """Add a method (or, with registry=MODIFIERS, a modifier) to the registry; usable as a decorator."""
    (METHODS if registry is None else registry)[cls.name] = cls
    return cls


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


class EndToEndCrossEntropy(Method):
    """End-to-end fine-tuning (paper 2, SAFT's base): cross-entropy on logit_scale * cos(image, class text),
    where the class embeddings come from the LIVE text encoder at every step (prompt ensembling over the
    templates, as in the zero-shot head), and both encoders and logit_scale train."""
    name = "ce"

    def setup(self, model, tokenizer, train_set, num_steps, seed):
        device = next(model.parameters()).device
        templates = self.hparams["templates"]
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


class SparseAdaptation(Modifier):
    """SAFT (arXiv 2407.03036): train only the top `alpha` fraction of the base method's trainable entries,
    ranked by |gradient of the base loss averaged over `score_batches` training batches| (or by the Fisher,
    random, or smallest-weight scores: `strategy`); every other entry stays bit-identical to its pre-trained
    value. `score_batches=None` averages over one pass of the training set (the paper's choice).

    The optimizer is lib.sparse.SparseAdamW (moments only for the selected entries; weight decay never touches
    the others) and gradients are masked before clipping, so the clipping norm is that of the sparse update.
    "saft" alone is "ce+saft": one global threshold over both encoders (and logit_scale)."""
    name = "saft"
    MODIFIER_HPARAMS = dict(alpha=0.001, strategy="gradient", score_batches=None)
    MODIFIER_RANGES = dict(
        alpha=Number(0, 1, low_open=True, why="the fraction of parameters that train; the paper uses 0.001"),
        score_batches=Number(1, integer=True, none_ok=True, why="None averages over one epoch"))

    def __init__(self, base, **hparams):
        super().__init__(base, **hparams)
        strategy = self.hparams["strategy"]
        if strategy not in SCORE_STRATEGIES:
            raise ValueError(f"saft: unknown strategy {strategy!r}; choose one of {list(SCORE_STRATEGIES)}")

    def setup(self, model, tokenizer, train_set, num_steps, seed):
        super().setup(model, tokenizer, train_set, num_steps, seed)
        self.mask = None  # candidates are all of the base's trainable parameters
        params = dict(self.trainable_parameters(model))
        batch_size = min(self.hparams["batch_size"], len(train_set))
        n_batches = self.hparams["score_batches"] or max(1, len(train_set) // batch_size)
        device = next(model.parameters()).device
        stream = _batches(train_set, batch_size, seed + 10_000, 0)
        batches = (next(stream) for _ in range(n_batches))

        def loss_fn(model, batch):
            images, labels, indices = batch
            return self.base.loss(model, images.to(device), labels.to(device), indices)

        was_training = model.training
        train_mode(model)  # the mode training will use (BatchNorm statistics frozen)
        self.scores = parameter_scores(model, loss_fn, batches, self.hparams["strategy"], params=params, seed=seed)
        model.train(was_training)
        self.mask = {name: m.to(params[name].device) for name, m in saft_mask(self.scores, self.hparams["alpha"]).items()}
        # Unselected entries as a ready mask (no negation per step); all-False tensors are not trained at all.
        self.unselected = {name: ~m for name, m in self.mask.items() if m.any() and not m.all()}

    def trainable_parameters(self, model):
        """Before setup, the candidates (the base's trainable parameters); after it, only those with selected
        entries: a tensor with none keeps requires_grad off, so backward skips it and clipping never sees it."""
        named = super().trainable_parameters(model)
        if getattr(self, "mask", None) is None:
            return named
        return [(name, p) for name, p in named if self.mask[name].any()]

    def make_optimizer(self, named_parameters):
        self.named = list(named_parameters)
        # The base's parameter groups (e.g. vision-only's head_lr), read off the optimizer it would build.
        groups = [{**group, "params": list(group["params"])}
                  for group in self.base.make_optimizer(self.named).param_groups]
        return SparseAdamW(self.named, self.mask, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"],
                           param_groups=groups)

    def before_clip(self, model):
        super().before_clip(model)
        for name, param in self.named:  # lib.sparse.mask_gradients with the negation done once
            if param.grad is not None and name in self.unselected:
                param.grad.masked_fill_(self.unselected[name], 0)


register(EndToEndCrossEntropy)
register(SparseAdaptation, MODIFIERS)
ALIASES["saft"] = "ce+saft"


class VisionOnly(Method):
    """Paper 2's vision-only baseline: the same image encoder with a randomly initialized linear head over its
    (L2-normalized) features, both trained with cross-entropy; no text at all, so new classes give NaN.

    The head is an nn.Linear attached to the fine-tuned copy as the submodule `vision_only_head`, so the loop's
    optimizer, weight averaging (e.g. "vision-only+swa") and the returned model all carry it. The head trains at
    `head_lr` on features multiplied by `feature_scale` (features have unit norm, so a randomly initialized head
    needs larger logits and a larger step than the encoder; the returned LinearHead folds the scale in)."""
    name = "vision-only"
    HPARAMS = dict(head_lr=1e-2, feature_scale=10.0)
    RANGES = dict(head_lr=Number(0, low_open=True), feature_scale=Number(0, low_open=True))

    def setup(self, model, tokenizer, train_set, num_steps, seed):
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(seed)
        head = torch.nn.Linear(model.visual.output_dim, len(train_set.classnames))
        with torch.no_grad():  # nn.Linear's default init, drawn from the run's own seed
            bound = 1 / head.in_features ** 0.5
            head.weight.uniform_(-bound, bound, generator=generator)
            head.bias.uniform_(-bound, bound, generator=generator)
        model.vision_only_head = head.to(device)
        self.classnames = list(train_set.classnames)

    def trainable_parameters(self, model):
        return [(n, p) for n, p in model.named_parameters() if n.startswith(("visual.", "vision_only_head."))]

    def make_optimizer(self, named_parameters):
        head = [p for n, p in named_parameters if n.startswith("vision_only_head.")]
        encoder = [p for n, p in named_parameters if not n.startswith("vision_only_head.")]
        groups = [{"params": encoder}] + ([{"params": head, "lr": self.hparams["head_lr"]}] if head else [])
        return torch.optim.AdamW(groups, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])

    def loss(self, model, images, labels, indices):
        image_features = model.encode_image(images, normalize=True)
        logits = model.vision_only_head(self.hparams["feature_scale"] * image_features)
        return torch.nn.functional.cross_entropy(logits.float(), labels)

    def finalize(self, model, history):
        head = model.vision_only_head
        weight = self.hparams["feature_scale"] * head.weight.detach().cpu()
        return Trained(model, LinearHead(weight, head.bias.detach().cpu(), self.classnames),
                       history, self)


class StochasticWeightAveraging(Modifier):
    """Paper 2's SWA: the model returned is the plain mean of the states at the ends of the periods of `swa_every`
    steps (epochs) that start at or after swa_start * T (T steps in all): the states after steps s = k * swa_every
    with (k - 1) * swa_every >= swa_start * T, i.e. once per epoch over the last (1 - swa_start) of training, as
    in the paper's code (22 epochs from 2/3: the last 7), starting from a copy (the zero-shot weights are
    not in the average). swa_every=None means one epoch of the training set (len // batch size steps), as in the
    paper's code; if no step qualifies, the final state is the average. The learning rate keeps the loop's
    cosine schedule (no SWALR constant phase: the loop owns one scheduler for every method). `swa_steps` lists
    the averaged steps."""
    name = "swa"
    MODIFIER_HPARAMS = dict(swa_start=0.5, swa_every=None)
    MODIFIER_RANGES = dict(
        swa_start=Number(0, 1, high_open=True, why="the fraction of training before averaging; the paper uses 0.5"),
        swa_every=Number(1, integer=True, none_ok=True, why="steps between averaged states; None is one epoch"))

    def setup(self, model, tokenizer, train_set, num_steps, seed):
        super().setup(model, tokenizer, train_set, num_steps, seed)
        start, every = self.hparams["swa_start"], self.hparams["swa_every"]
        if every is None:
            every = max(1, len(train_set) // max(1, min(self.hparams["batch_size"], len(train_set))))
        # The first period boundary at or after the start; rounded first, so that 0.7 * 10 counts as 7.
        first = math.ceil(round(start * num_steps / every, 9)) * every
        self.swa_steps = list(range(first + every, num_steps + 1, every)) or ([num_steps] if num_steps > 0 else [])
        self.average = StochasticWeightAverage(model)

    def after_step(self, model, step):
        super().after_step(model, step)
        if step + 1 in self.swa_steps:  # the loop's step is 0-based; s counts optimizer steps taken
            self.average.update(model)

    def finalize(self, model, history):
        self.live = super().finalize(model, history)  # the last state too, so "X" and "X+swa" can share a run
        if self.average.num_averaged == 0:  # no training happened (fraction 0 or num_steps 0)
            return self.live
        return super().finalize(self.average.module.eval(), history)


register(VisionOnly)
register(StochasticWeightAveraging, MODIFIERS)
ALIASES["ce-swa"] = "ce+swa"


class ContrastiveFineTune(Method):
    """FLYP (Goyal et al., 2023): fine-tune as CLIP was pretrained. Each training image is paired with a prompt
    of its class name (one of the templates, drawn per example) and the symmetric InfoNCE of the batch, at the
    model's own logit_scale, trains both encoders (and the scale). Two images of one class in a batch make their
    prompts duplicates that count as negatives: FLYP's choice, kept.

    ARF (Han et al., CVPR 2024) adds two contrastive anchor terms to the same batch, L = L_CL + cap_weight * L_Cap
    + ret_weight * L_Ret; `flyp` is ARF with both weights 0. ARF has no public code; our choices:
    - L_Cap (text-compensated anchors): the batch's own images against rich captions from a captioner
      (lib.anchors.ShapeWorldCaptioner(caption_noise) on ShapeWorld; the `captions` CSV through
      lib.anchors.FileCaptioner for real data), sharing the image features of L_CL.
    - L_Ret (retrieved anchors): before training, the frozen model embeds the candidate corpus's captions and each
      training image's k nearest captions are found by exact kNN (lib.anchors.retrieve); at every step each
      image among the first anchor_fraction of the batch brings one of its k neighbours, drawn at random, so a
      batch of B images has round(anchor_fraction * B) retrieved pairs. Default 0.5: on ShapeWorld, 0.5 and 1.0
      gave the same accuracy (one seed) and 0.5 makes a step about 30 % cheaper.
      `candidates` is a lib.anchors.CandidateCorpus, a CSV path, or None for ShapeWorld's candidate stream
      of `num_candidates` pairs.
    """
    name = "flyp"
    HPARAMS = dict(cap_weight=0.0, ret_weight=0.0, caption_noise=0.0, captions=None, candidates=None,
                   num_candidates=20_000, k=8, anchor_fraction=0.5)
    RANGES = dict(cap_weight=Number(0, why="the weight of the caption-anchor loss"),
                  ret_weight=Number(0, why="the weight of the retrieved-anchor loss"),
                  caption_noise=Number(0, 1, why="the chance of a wrong attribute word"),
                  num_candidates=Number(1, integer=True), k=Number(1, integer=True),
                  anchor_fraction=Number(0, 1, low_open=True, why="the share of a batch's images that bring a "
                                                                  "retrieved pair"))

    def check_dataset(self, dataset):
        """ShapeWorld brings its own captioner and candidate corpus; a folder dataset needs them as files."""
        if dataset == "shapeworld":
            return
        if self.hparams["cap_weight"] and not self.hparams["captions"]:
            raise ValueError(f"{self.name} on {dataset!r} needs a caption for every training image (its caption "
                             f"anchors): give --hparam captions=PATH.csv (columns path,caption), or set "
                             f"cap_weight=0 (e.g. the method 'arf-ret').")
        if self.hparams["ret_weight"] and self.hparams["candidates"] is None:
            raise ValueError(f"{self.name} on {dataset!r} needs a web-like candidate corpus to retrieve anchors "
                             f"from (ShapeWorld's would be silently wrong here): give --hparam "
                             f"candidates=PATH.csv (columns path,caption), or set ret_weight=0 (e.g. 'arf-cap').")

    def setup(self, model, tokenizer, train_set, num_steps, seed):
        self.check_dataset("shapeworld" if train_set.scenes is not None else "a folder dataset")
        device = next(model.parameters()).device
        self.tokenizer, self.device = tokenizer, device
        templates = self.hparams["templates"]
        self.prompts = [[t.format(c) for t in templates] for c in train_set.classnames]
        self.generator = torch.Generator().manual_seed(seed + 20_000)
        if self.hparams["cap_weight"]:
            captioner = (anchors.FileCaptioner(self.hparams["captions"]) if self.hparams["captions"]
                         else anchors.ShapeWorldCaptioner(self.hparams["caption_noise"], seed=seed))
            self.captions = captioner(train_set)
        if self.hparams["ret_weight"]:
            corpus = self.hparams["candidates"]
            if corpus is None:
                corpus = anchors.CandidateCorpus.shapeworld(self.hparams["num_candidates"])
            elif not isinstance(corpus, anchors.CandidateCorpus):
                corpus = anchors.CandidateCorpus.from_csv(corpus)
            text_features = anchors.cached_text_embeddings(model, tokenizer, corpus.captions, device=device)
            neighbours = anchors.retrieve_anchors(encode_images(model, train_set), text_features,
                                                  min(self.hparams["k"], len(corpus)))
            # Render or load only the pairs that were found; neighbours index into that subset.
            found, self.neighbours = neighbours.unique(return_inverse=True)
            self.anchor_set = corpus.pairs(found.numpy()).with_transform(train_set.transform)

    def trainable_parameters(self, model):
        return list(model.named_parameters())

    def _text(self, model, texts):
        return encode_text(model, self.tokenizer(texts).to(self.device))

    def loss(self, model, images, labels, indices):
        scale = model.logit_scale.exp()
        image_features = model.encode_image(images, normalize=True)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        # Draws are made for the global batch and sliced like it (lib.train gives rank r the items r::world), so that
        # N processes draw what one process draws.
        choice = torch.randint(len(self.hparams["templates"]), (len(labels) * world,), generator=self.generator)
        choice = choice[rank::world]
        prompts = [self.prompts[y][t] for y, t in zip(labels.tolist(), choice.tolist())]
        # A batch repeats few distinct prompts (classes x templates): encode each once, then index.
        distinct = sorted(set(prompts))
        rows = torch.tensor([distinct.index(p) for p in prompts], device=self.device)
        loss = _global_contrastive_loss(image_features, self._text(model, distinct)[rows], scale)
        if self.hparams["cap_weight"]:
            captions = [self.captions[i] for i in indices.tolist()]
            loss = loss + self.hparams["cap_weight"] * _global_contrastive_loss(
                image_features, self._text(model, captions), scale)
        if self.hparams["ret_weight"]:
            # The first `count` images of the global batch bring a pair; under N processes count is rounded up to a
            # multiple of N, so that every rank gathers as many pairs as the others.
            count = max(1, round(self.hparams["anchor_fraction"] * len(indices) * world))
            count = -(-count // world) * world
            columns = torch.randint(self.neighbours.shape[1], (count,), generator=self.generator)[rank::world]
            pairs = anchors.anchor_pairs(indices[:count // world], self.neighbours, self.anchor_set,
                                         columns=columns)
            anchor_features = model.encode_image(pairs.images.to(self.device), normalize=True)
            loss = loss + self.hparams["ret_weight"] * _global_contrastive_loss(
                anchor_features, self._text(model, pairs.captions), scale)
        return loss

    def after_step(self, model, step):
        clamp_logit_scale(model)  # the scale trains here, as in pretraining


def _global_contrastive_loss(image_features, text_features, scale):
    """contrastive_loss over the whole global batch under torch.distributed: open_clip's gather_features (with
    gradients, as its ClipLoss does) brings every rank's features, so each rank's negatives are the global batch's.
    Every rank then computes the same loss, and the gathered gradient of each rank's own features is world times
    its share; lib.train divides the all-reduced sum by world, so a step is the one-process step."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        image_features, text_features = gather_features(image_features, text_features, gather_with_grad=True,
                                                        rank=dist.get_rank(), world_size=dist.get_world_size())
    return contrastive_loss(image_features, text_features, scale)


class AnchorRobustFineTune(ContrastiveFineTune):
    """ARF: FLYP plus caption anchors and retrieved anchors (L_CL + L_Cap + L_Ret)."""
    name = "arf"
    HPARAMS = dict(cap_weight=1.0, ret_weight=1.0)


class CaptionAnchors(ContrastiveFineTune):
    """The ablation FLYP + caption anchors only (L_CL + L_Cap)."""
    name = "arf-cap"
    HPARAMS = dict(cap_weight=1.0)


class RetrievedAnchors(ContrastiveFineTune):
    """The ablation FLYP + retrieved anchors only (L_CL + L_Ret)."""
    name = "arf-ret"
    HPARAMS = dict(ret_weight=1.0)


for _method in (ContrastiveFineTune, AnchorRobustFineTune, CaptionAnchors, RetrievedAnchors):
    register(_method)


class ModelStock(Modifier):
    """Model Stock (Jang et al., ECCV 2024) as a modifier: the base method trains twice from the same pre-trained
    weights, with the run's seed and with seed + `stock_seed_offset`, and the returned model is
    lib.averaging.model_stock(pre-trained, first run, second run), a per-tensor t = 2cos/(1+cos) pull of the two
    runs' mean towards the pre-trained weights. "X+stock" costs two runs of X.

    Our choices: the second run is a nested lib.train.finetune of a fresh copy of the base method, started from
    finalize, so the loop stays one loop; the default offset 1000 keeps the partner seeds of a sweep over seeds
    0, 1, 2 apart from the sweep's own seeds. Put "stock" last ("mms+bma+stock"): a modifier after it would
    replace the merged model. `stock_ratios` (per tensor: name, cos, t) and `partner` (the second run's Trained)
    are kept for inspection. Methods that do not train, and vision-only (its head starts from a seed-dependent
    random draw, so the two runs would not share a start), are rejected."""
    name = "stock"
    MODIFIER_HPARAMS = dict(stock_seed_offset=1000)

    def __init__(self, base, **hparams):
        super().__init__(base, **hparams)
        root = base
        while isinstance(root, Modifier):
            root = root.base
        if not base.trains or isinstance(root, VisionOnly):
            raise ValueError(f"stock merges two fine-tuned runs from one shared start; {base.name!r} "
                             f"{'does not train' if not base.trains else 'starts each seed from a new random head'}.")
        offset = self.hparams["stock_seed_offset"]
        if isinstance(offset, bool) or not isinstance(offset, int) or offset == 0:
            raise ValueError(f"stock: stock_seed_offset must be a non-zero integer (the second run's seed is "
                             f"seed + offset); got {offset!r}")

    def setup(self, model, tokenizer, train_set, num_steps, seed):
        # The start both runs share: the pre-trained weights, before the base method touches the model.
        self.theta_0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.second_run = dict(train_set=train_set, tokenizer=tokenizer, num_steps=num_steps,
                               seed=seed + self.hparams["stock_seed_offset"])
        super().setup(model, tokenizer, train_set, num_steps, seed)

    def finalize(self, model, history):
        import copy  # imports here keep this addition self-contained at the end of the module

        from .averaging import model_stock, model_stock_ratios
        from .train import finetune
        first = super().finalize(model, history)
        start = copy.deepcopy(first.model)
        start.load_state_dict(self.theta_0)
        partner = get_method(self.base.name, **{k: v for k, v in self.hparams.items()
                                                 if k not in self.MODIFIER_HPARAMS})
        device = next(model.parameters()).device
        self.partner = finetune(start, partner, device=device, progress=False, **self.second_run)
        theta_a, theta_b = first.model.state_dict(), self.partner.model.state_dict()
        self.stock_ratios = model_stock_ratios(self.theta_0, theta_a, theta_b)
        first.model.load_state_dict(model_stock(self.theta_0, theta_a, theta_b))
        return first


register(ModelStock, MODIFIERS)
ALIASES["model-stock"] = "ft+stock"
