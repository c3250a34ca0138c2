"""CLIPood (Shu et al., ICML 2023, arXiv 2302.00864): Margin Metric Softmax and Beta Moving Average.

Notebook: 01_clipood. Methods: `mms` (a method), `bma` (a modifier; "bma" alone is "ft+bma"), `clipood`
(= "mms+bma"). Primitives: lib.losses.mms_loss (and mms_margins for the figure), lib.averaging.BetaMovingAverage
and beta_weights.
"""
from ..averaging import BetaMovingAverage, beta_weights
from ..checks import Number
from ..losses import mms_loss
from .base import Watcher, alias, register
from .baselines import FrozenTextMethod


@register
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


@register
class BetaAverage(Watcher):
    """CLIPood's BMA: the model returned is the Beta(beta, beta)-weighted mean of the zero-shot weights and
    every later state of the trajectory (all parameters, a head of the base method's included)."""
    name = "bma"
    MODIFIER_HPARAMS = dict(beta=0.5)
    MODIFIER_RANGES = dict(beta=Number(0, low_open=True, why="the Beta(beta, beta) shape: CLIPood uses 0.5, 0.1 "
                                                             "for open classes"))

    def __init__(self, base, **hparams):
        super().__init__(base, **hparams)
        if self.hparams["num_steps"] >= 1:  # the weights of the planned trajectory must be defined (no underflow)
            beta_weights(self.hparams["num_steps"], self.hparams["beta"])

    def start(self, model, train_set, num_steps):
        if int(num_steps) != num_steps or num_steps < 1:
            raise ValueError(f"bma: averages a trajectory of optimizer steps, so num_steps must be a positive "
                             f"integer; got {num_steps!r}")
        self.average = BetaMovingAverage(model, beta=self.hparams["beta"], total_steps=num_steps)

    def observe(self, model, step):
        self.average.update(model)

    def averaged(self, model):
        return self.average.module.eval()


alias("bma", "ft+bma")
alias("clipood", "mms+bma")
