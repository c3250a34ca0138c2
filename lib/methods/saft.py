"""SAFT (Sony AI, ECCV 2024, arXiv 2407.03036): sparse fine-tuning. Only the top alpha of all trainable entries,
ranked by the magnitude of the loss gradient averaged over the training set, are updated; every other entry keeps
its pre-trained value exactly.

Notebook: 04_saft. Modifier: `saft` (any base method; "saft" alone is "ce+saft", with `ce` from
lib.methods.robust_ft). Primitives: lib.sparse.parameter_scores, saft_mask, SparseAdamW (and mask_gradients,
per_layer_counts for the figures).
"""
from ..checks import Number
from ..sparse import SCORE_STRATEGIES, SparseAdamW, parameter_scores, saft_mask
from ..train import _batches, train_mode
from .base import Modifier, alias, register


@register
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


alias("saft", "ce+saft")
