"""The baselines every notebook compares against: zero-shot CLIP, the linear probe, plain fine-tuning.

Notebook: 00_shapeworld_and_the_problem (the problem), then each paper notebook's reference rows.
Methods: `zeroshot`, `lp` (CLIP's linear-probe protocol), `ft` (the image encoder trained with cross-entropy
against the frozen text encoder's class embeddings), `lp-ft` (Kumar et al., ICLR 2022: a linear probe from the
zero-shot head, then everything fine-tuned from the probed head; the baseline of ARF's and SAFT's tables).
Primitives: lib.losses.cross_entropy_loss, lib.models.zeroshot_head. `FrozenTextMethod` is also the base of
CLIPood's `mms` (lib.methods.clipood); `LinearHeadTuning` of paper 2's `vision-only` (lib.methods.robust_ft).
"""
import torch
from sklearn.linear_model import LogisticRegression

from ..checks import Number
from ..losses import cross_entropy_loss
from ..models import encode_images, zeroshot_head
from ..train import Trained
from .base import Method, adamw, register


@register
class ZeroShot(Method):
    """No training: classify with the text embeddings of class-name prompts."""
    name = "zeroshot"
    trains = False


class LinearHead:
    """A linear classifier over image features for a fixed set of classes (no text, so no new classes); its rows
    are the classes of `class_ids` (ids in the benchmark, never names: CLIP's ImageNet names repeat)."""

    def __init__(self, weight, bias, class_ids):
        self.weight, self.bias = weight.float(), bias.float()
        self.row = {int(c): i for i, c in enumerate(class_ids)}

    def __call__(self, image_features, class_ids):
        missing = [c for c in class_ids if c not in self.row]
        if missing:
            raise KeyError(f"a linear head knows only the classes it was trained on; not the class ids {missing}")
        rows = [self.row[c] for c in class_ids]
        return image_features @ self.weight[rows].T + self.bias[rows]


@register
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
        ids = [train_set.ids[c] for c in classifier.classes_]
        self.head = LinearHead(torch.from_numpy(classifier.coef_), torch.from_numpy(classifier.intercept_), ids)

    def finalize(self, model, history):
        return Trained(model, self.head, history, self)


class FrozenTextMethod(Method):
    """Base for methods that train the image encoder against the frozen text encoder's class embeddings."""

    def setup(self, model, tokenizer, train_set, num_steps, seed):
        self.text_features = zeroshot_head(model, tokenizer, train_set.classnames,
                                           self.prompt_templates(train_set))
        self.scale = model.logit_scale.exp().item()


@register
class FineTune(FrozenTextMethod):
    """Plain fine-tuning: image encoder, cross-entropy on the model's scale * cosine to frozen class embeddings."""
    name = "ft"

    def loss(self, model, images, labels, indices):
        image_features = model.encode_image(images, normalize=True)
        return cross_entropy_loss(image_features, self.text_features, labels, self.scale)


class LinearHeadTuning(Method):
    """Base for methods that fine-tune the image encoder with a linear head over its L2-normalized features
    (cross-entropy, no text): the head is an nn.Linear attached to the training copy as the submodule named
    `head_name`, so the loop's optimizer, weight averaging and the returned model all carry it; it trains at
    `head_lr` on features multiplied by `feature_scale`, and the returned LinearHead folds the scale in.
    Subclasses say how the head starts (`initial_head`)."""
    head_name = "linear_head"
    HPARAMS = dict(head_lr=1e-2, feature_scale=10.0)
    RANGES = dict(head_lr=Number(0, low_open=True), feature_scale=Number(0, low_open=True))

    def initial_head(self, model, tokenizer, train_set, seed):
        """(weight [C, D], bias [C]) of the head before fine-tuning, on scaled features."""
        raise NotImplementedError

    def setup(self, model, tokenizer, train_set, num_steps, seed):
        device = next(model.parameters()).device
        weight, bias = self.initial_head(model, tokenizer, train_set, seed)
        head = torch.nn.utils.skip_init(torch.nn.Linear, weight.shape[1], weight.shape[0])  # no draw from the RNG
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias)
        setattr(model, self.head_name, head.to(device))
        self.class_ids = train_set.ids

    def trainable_parameters(self, model):
        return [(n, p) for n, p in model.named_parameters() if n.startswith(("visual.", f"{self.head_name}."))]

    def make_optimizer(self, named_parameters):
        head = [p for n, p in named_parameters if n.startswith(f"{self.head_name}.")]
        encoder = [p for n, p in named_parameters if not n.startswith(f"{self.head_name}.")]
        groups = [{"params": encoder}] + ([{"params": head, "lr": self.hparams["head_lr"]}] if head else [])
        return adamw(groups, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])

    def loss(self, model, images, labels, indices):
        image_features = model.encode_image(images, normalize=True)
        logits = getattr(model, self.head_name)(self.hparams["feature_scale"] * image_features)
        return torch.nn.functional.cross_entropy(logits.float(), labels)

    def finalize(self, model, history):
        head = getattr(model, self.head_name)
        weight = self.hparams["feature_scale"] * head.weight.detach().cpu()
        return Trained(model, LinearHead(weight, head.bias.detach().cpu(), self.class_ids), history, self)


def linear_probe(features, labels, weight, bias, C=1.0, iterations=500):
    """A multinomial logistic regression on fixed features, fitted from the given start (weight [K, D], bias [K]
    for K classes) by full-batch L-BFGS: LP-FT's first phase. C is scikit-learn's inverse regularization strength,
    which `lp` uses: the objective is scikit-learn's, C * summed cross-entropy + sum(weight ** 2) / 2, divided by
    C * N so that L-BFGS sees a mean. It has one minimum, so this probe is `lp`'s head, reached from the zero-shot
    start (the start only saves iterations). Returns (weight, bias)."""
    weight, bias = weight.clone().float().requires_grad_(), bias.clone().float().requires_grad_()
    features, labels = features.float(), labels.long()
    l2 = 1.0 / (2.0 * C * len(labels))
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(features @ weight.T + bias, labels) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


@register
class LinearProbeThenFineTune(LinearHeadTuning):
    """LP-FT (Kumar et al., ICLR 2022): first a linear probe on the frozen features, `lp`'s own (scikit-learn's
    regularized objective with the same C), fitted by `linear_probe` from the zero-shot head (the class-prompt
    embeddings times the model's logit scale, bias 0; as FLYP and wise-ft start it); then the image encoder and the
    probed head fine-tune together with cross-entropy at a smaller learning rate than ft's (our default lr: ft's /
    10; the paper leaves the values to each dataset). `probe` holds the first phase's (weight, bias).
    An unregularized probe (C very large) fits the training images' features exactly: its weights grow until the
    training logits are huge, so the second phase starts from a head that is overconfident everywhere."""
    name = "lp-ft"
    head_name = "lpft_head"
    HPARAMS = dict(lr=3e-5, head_lr=3e-5, feature_scale=1.0, C=1.0, probe_iterations=500)
    RANGES = dict(C=Number(0, low_open=True, why="the inverse regularization strength, as lp's"),
                  probe_iterations=Number(1, integer=True))

    def initial_head(self, model, tokenizer, train_set, seed):
        start = model.logit_scale.exp().item() * zeroshot_head(model, tokenizer, train_set.classnames,
                                                                self.prompt_templates(train_set)).cpu()
        features = self.hparams["feature_scale"] * encode_images(model, train_set).cpu()
        self.probe = linear_probe(features, train_set.labels, start, torch.zeros(len(start)), self.hparams["C"],
                                  self.hparams["probe_iterations"])
        return self.probe
