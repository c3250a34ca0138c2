"""Losses against independent, hand-written computations (explicit loops and log-sum-exp)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lib.losses import contrastive_loss, cross_entropy_loss, mms_loss, mms_margins


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture
def feats():
    image = _unit(6, 8, seed=0)
    text = _unit(4, 8, seed=1)
    labels = torch.tensor([0, 3, 1, 2, 3, 0])
    return image, text, labels


def _ce_loop(logit_rows, labels):
    """Mean over rows of logsumexp(z) - z_y, with the log-sum-exp written out."""
    total = 0.0
    for z, y in zip(logit_rows, labels):
        m = max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        total += lse - z[y]
    return total / len(labels)


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _mms_shifted_loop(image, text, labels, lam, scale):
    """CLIPood's form: logits of the (unrenormalized) shifted feature f - lam * t_y."""
    I, T = image.tolist(), text.tolist()
    rows = []
    for f, y in zip(I, labels.tolist()):
        shifted = [fi - lam * ti for fi, ti in zip(f, T[y])]
        rows.append([scale * _dot(shifted, t) for t in T])
    return _ce_loop(rows, labels.tolist())


def _mms_margin_loop(image, text, labels, lam, scale):
    """Additive-margin form: scale*cos(f, t_j) + scale*lam*(1 - cos(t_y, t_j))."""
    I, T = image.tolist(), text.tolist()
    rows = []
    for f, y in zip(I, labels.tolist()):
        rows.append([scale * _dot(f, t) + scale * lam * (1.0 - _dot(T[y], t)) for t in T])
    return _ce_loop(rows, labels.tolist())


def test_cross_entropy_matches_loop(feats):
    image, text, labels = feats
    rows = [[10.0 * _dot(f, t) for t in text.tolist()] for f in image.tolist()]
    got = cross_entropy_loss(image, text, labels, 10.0)
    assert got.ndim == 0
    assert got.item() == pytest.approx(_ce_loop(rows, labels.tolist()), rel=1e-10)


def test_cross_entropy_tensor_scale_gets_gradient(feats):
    image, text, labels = feats
    logit_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    loss = cross_entropy_loss(image, text, labels, logit_scale.exp())
    loss.backward()
    rows = [[(1 / 0.07) * _dot(f, t) for t in text.tolist()] for f in image.tolist()]
    assert loss.item() == pytest.approx(_ce_loop(rows, labels.tolist()), rel=1e-10)
    assert logit_scale.grad is not None and logit_scale.grad.abs() > 0


@pytest.mark.parametrize("lam,scale", [(0.3, 100.0), (0.1, 100.0), (0.5, 10.0), (1.0, 30.0)])
def test_mms_matches_both_hand_forms(feats, lam, scale):
    image, text, labels = feats
    got = mms_loss(image, text, labels, lam=lam, scale=scale).item()
    shifted = _mms_shifted_loop(image, text, labels, lam, scale)
    margin = _mms_margin_loop(image, text, labels, lam, scale)
    assert shifted == pytest.approx(margin, rel=1e-9)  # the two forms differ by a per-row constant
    assert got == pytest.approx(shifted, rel=1e-9)


def test_mms_default_hyperparameters(feats):
    image, text, labels = feats
    assert mms_loss(image, text, labels).item() == pytest.approx(
        _mms_shifted_loop(image, text, labels, 0.3, 100.0), rel=1e-9
    )


def test_mms_lam_zero_is_plain_ce(feats):
    image, text, labels = feats
    a = mms_loss(image, text, labels, lam=0.0, scale=50.0)
    b = cross_entropy_loss(image, text, labels, 50.0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_mms_margin_raises_loss_above_ce(feats):
    # Margins only ever push non-target logits up relative to the target, so the loss grows with lam.
    image, text, labels = feats
    losses = [mms_loss(image, text, labels, lam=lam, scale=20.0).item() for lam in (0.0, 0.1, 0.3, 0.6)]
    assert losses == sorted(losses) and losses[0] < losses[-1]


def test_mms_gradient_only_into_image_features_when_text_detached(feats):
    image, text, labels = feats
    image = image.clone().requires_grad_(True)
    text = text.clone().requires_grad_(True)
    loss = mms_loss(image, text.detach(), labels, lam=0.3, scale=100.0)
    loss.backward()
    assert text.grad is None
    assert image.grad is not None and image.grad.abs().sum() > 0
    # Analytic gradient w.r.t. f: scale/B * (softmax(z) - onehot(y)) @ T.
    with torch.no_grad():
        z = 100.0 * (image - 0.3 * text[labels]) @ text.T
        expected = 100.0 / len(labels) * (z.softmax(-1) - F.one_hot(labels, 4).double()) @ text
    torch.testing.assert_close(image.grad, expected, rtol=1e-9, atol=1e-12)


def test_mms_float32_and_scale_tensor(feats):
    image, text, labels = feats
    got = mms_loss(image.float(), text.float(), labels, lam=0.3, scale=torch.tensor(100.0))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_mms_shifted_loop(image, text, labels, 0.3, 100.0), rel=1e-5)


def test_mms_errors(feats):
    image, text, labels = feats
    with pytest.raises(ValueError, match="lam must be >= 0"):
        mms_loss(image, text, labels, lam=-0.1)
    with pytest.raises(ValueError, match="embedding dimension"):
        mms_loss(image, text[:, :5], labels)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
        mms_loss(image, text, torch.tensor([0, 1, 2, 3, 4, 0]))
    with pytest.raises(ValueError, match=r"labels must lie"):
        mms_loss(image, text, torch.tensor([0, 1, 2, -1, 0, 0]))
    with pytest.raises(ValueError, match="length B=6"):
        mms_loss(image, text, labels[:5])
    with pytest.raises(ValueError, match="integer class indices"):
        mms_loss(image, text, labels.double())
    with pytest.raises(ValueError, match="2-D"):
        mms_loss(image[0], text, labels[:1])


def test_mms_margins_matrix(feats):
    _, text, _ = feats
    m = mms_margins(text, 0.3)
    assert m.shape == (4, 4)
    T = text.tolist()
    for i in range(4):
        for j in range(4):
            assert m[i, j].item() == pytest.approx(0.3 * (1 - _dot(T[i], T[j])), abs=1e-12)
    torch.testing.assert_close(m.diagonal(), torch.zeros(4, dtype=m.dtype), rtol=0, atol=1e-12)
    torch.testing.assert_close(m, m.T)
    assert (m >= -1e-12).all()
    with pytest.raises(ValueError, match="lam must be >= 0"):
        mms_margins(text, -1.0)


def test_contrastive_matches_loop():
    image, text = _unit(5, 8, seed=2), _unit(5, 8, seed=3)
    scale = 14.0
    I, T = image.tolist(), text.tolist()
    rows = [[scale * _dot(f, t) for t in T] for f in I]  # image -> text
    cols = [[scale * _dot(f, t) for f in I] for t in T]  # text -> image
    targets = list(range(5))
    expected = 0.5 * (_ce_loop(rows, targets) + _ce_loop(cols, targets))
    got = contrastive_loss(image, text, scale)
    assert got.ndim == 0
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_contrastive_is_symmetric_and_gradients_reach_both_sides():
    image = _unit(4, 8, seed=4).requires_grad_(True)
    text = _unit(4, 8, seed=5).requires_grad_(True)
    scale = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
    loss = contrastive_loss(image, text, scale)
    torch.testing.assert_close(loss, contrastive_loss(text, image, scale))
    loss.backward()
    assert image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0 and scale.grad is not None


def test_contrastive_errors():
    with pytest.raises(ValueError, match="same batch size"):
        contrastive_loss(_unit(4, 8, seed=0), _unit(3, 8, seed=1), 10.0)
    with pytest.raises(ValueError, match="embedding dimension"):
        contrastive_loss(_unit(4, 8, seed=0), _unit(4, 6, seed=1), 10.0)
