"""Losses on CLIP features.

Every function here is pure: it takes already L2-normalized features (images ``[B, D]``,
texts ``[C, D]`` or ``[B, D]``) and returns a scalar mean loss. Encoding, normalization and
the choice of which encoder trains are the caller's business (see ``lib.train``).

- ``cross_entropy_loss``: plain fine-tuning on ``scale * cos`` (paper 2, WiSE-FT, SAFT).
- ``mms_loss`` / ``mms_margins``: CLIPood's Margin Metric Softmax.
- ``contrastive_loss``: the symmetric InfoNCE of CLIP pretraining and FLYP / ARF.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["cross_entropy_loss", "mms_loss", "mms_margins", "contrastive_loss"]


def _check_features(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    if image_features.ndim != 2 or text_features.ndim != 2:
        raise ValueError(
            "expected 2-D features, image_features [B, D] and text_features [C, D]; got shapes "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            "image and text features must share the embedding dimension D: image_features is "
            f"{tuple(image_features.shape)}, text_features is {tuple(text_features.shape)}"
        )


def _check_labels(labels: torch.Tensor, batch_size: int, num_classes: int) -> None:
    if labels.ndim != 1 or labels.shape[0] != batch_size:
        raise ValueError(
            f"labels must be a 1-D tensor of length B={batch_size}; got shape {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices; got dtype {labels.dtype}")
    # Checked here because indexing text_features[labels] on a GPU would fail with an
    # opaque device-side assert instead.
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}] (C={num_classes} text features); got range "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )


def cross_entropy_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    labels: torch.Tensor,
    scale: float | torch.Tensor,
) -> torch.Tensor:
    """Mean cross entropy on ``scale * image_features @ text_features.T``.

    ``scale`` may be a float or a 0-dim tensor such as ``model.logit_scale.exp()``, in which
    case the gradient also reaches the temperature (paper 2 trains it).
    """
    _check_features(image_features, text_features)
    _check_labels(labels, image_features.shape[0], text_features.shape[0])
    logits = scale * image_features @ text_features.T
    return F.cross_entropy(logits, labels)


def mms_margins(text_features: torch.Tensor, lam: float) -> torch.Tensor:
    """The ``[C, C]`` matrix of MMS margins ``lam * (1 - cos(t_i, t_j))`` (row = true class).

    Unscaled, for plotting: the margin added to logit ``j`` of an example of class ``i`` is
    ``scale * margins[i, j]``; it is zero on the diagonal and largest for dissimilar classes.
    """
    if lam < 0:
        raise ValueError(f"MMS margin weight lam must be >= 0 (CLIPood uses 0.3 or 0.1); got {lam}")
    if text_features.ndim != 2:
        raise ValueError(f"text_features must be [C, D]; got shape {tuple(text_features.shape)}")
    return lam * (1.0 - text_features @ text_features.T)


def mms_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    labels: torch.Tensor,
    lam: float = 0.3,
    scale: float | torch.Tensor = 100.0,
) -> torch.Tensor:
    """CLIPood's Margin Metric Softmax: mean cross entropy with class-adaptive margins.

    As in CLIPood's public code, the image feature is shifted away from its own class
    text, ``f - lam * t_y`` (not renormalized), so the logits are
    ``scale * cos(f, t_j) - scale * lam * cos(t_y, t_j)``. Up to a per-row constant
    (``scale * lam``) that is the additive-margin form
    ``scale * cos(f, t_j) + scale * lam * (1 - cos(t_y, t_j))``: a non-target class gets a larger
    margin the further its text embedding is from the true class's, and the cross entropy is
    identical. ``lam = 0`` gives plain cross entropy. ``scale`` is the inverse temperature:
    CLIPood's code uses the model's own ``logit_scale.exp()`` by default (100 for OpenAI's CLIPs,
    not for others), which is what the ``mms`` method passes; 100 here is only the function's
    default. Pass ``text_features`` detached (frozen text encoder) so only the image side trains.
    """
    if lam < 0:
        raise ValueError(f"MMS margin weight lam must be >= 0 (CLIPood uses 0.3 or 0.1); got {lam}")
    _check_features(image_features, text_features)
    _check_labels(labels, image_features.shape[0], text_features.shape[0])
    # Shift-then-project (CLIPood's form) rather than adding the margin matrix: one [B, C]
    # matmul, and no [C, C] matrix, which matters for ImageNet-sized C.
    shifted = image_features - lam * text_features[labels]
    logits = scale * shifted @ text_features.T
    return F.cross_entropy(logits, labels)


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    scale: float | torch.Tensor,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP pretraining, FLYP): row ``i`` of each side is the other's positive.

    The mean of the image-to-text and text-to-image cross entropies of
    ``scale * image_features @ text_features.T`` with targets ``arange(B)``. In FLYP the texts
    are class-name prompts, so a batch with two images of one class has a duplicate text that
    counts as a negative; that is FLYP's choice, kept here.
    """
    _check_features(image_features, text_features)
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(
            "contrastive_loss needs paired features with the same batch size: got "
            f"{image_features.shape[0]} images and {text_features.shape[0]} texts"
        )
    logits = scale * image_features @ text_features.T
    targets = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
