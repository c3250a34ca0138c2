"""The baselines every notebook compares against: zero-shot CLIP, the linear probe, plain fine-tuning.

Notebook: 00_shapeworld_and_the_problem (the problem), then each paper notebook's reference rows.
Methods: `zeroshot`, `lp` (CLIP's linear-probe protocol), `ft` (the image encoder trained with cross-entropy
against the frozen text encoder's class embeddings). Primitives: lib.losses.cross_entropy_loss,
lib.models.zeroshot_head. `FrozenTextMethod` is also the base of CLIPood's `mms` (lib.methods.clipood).
"""
import torch
from sklearn.linear_model import LogisticRegression

from ..checks import Number
from ..losses import cross_entropy_loss
from ..models import encode_images, zeroshot_head
from ..train import Trained
from .base import Method, register


@register
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
        names = [train_set.classnames[c] for c in classifier.classes_]
        self.head = LinearHead(torch.from_numpy(classifier.coef_), torch.from_numpy(classifier.intercept_), names)

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
