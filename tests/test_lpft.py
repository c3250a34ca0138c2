"""LP-FT (lib.methods.baselines): the first phase is a linear probe started from the zero-shot head; the second
fine-tunes the image encoder and that head together, at a smaller learning rate than ft."""
import math

import torch
from sklearn.linear_model import LogisticRegression

from lib import methods
from lib.models import encode_images, zeroshot_head
from lib.train import finetune


def _loss(features, labels, weight, bias):
    return torch.nn.functional.cross_entropy(features @ weight.T + bias, labels)


def test_the_first_phase_is_lps_probe_reached_from_the_zero_shot_head(random_mini_setup, one_intra_op_thread):
    model, tokenizer, train = random_mini_setup
    probed = finetune(model, methods.get_method("lp-ft", batch_size=8), train, tokenizer, num_steps=0,
                      progress=False)
    weight, bias = probed.method.probe
    features = encode_images(model, train)
    start = model.logit_scale.exp().item() * zeroshot_head(model, tokenizer, train.classnames,
                                                           probed.method.hparams["templates"])
    zero = torch.zeros(len(start))
    assert _loss(features, train.labels, weight, bias) < _loss(features, train.labels, start, zero)
    # The same regularized problem solved by another solver from another start (scikit-learn from zeros, as lp
    # fits it): the same weights, and the same probabilities (the biases are equal up to a shift of all classes).
    reference = LogisticRegression(C=probed.method.hparams["C"], tol=1e-10, max_iter=10_000)
    reference.fit(features.double().numpy(), train.labels.numpy())
    torch.testing.assert_close(weight.double(), torch.from_numpy(reference.coef_), atol=2e-4, rtol=1e-3)
    torch.testing.assert_close((features @ weight.T + bias).softmax(1).double(),
                               torch.from_numpy(reference.predict_proba(features.double().numpy())), atol=1e-4, rtol=0)
    ids = list(range(len(train.classnames)))  # the returned head is the probe (no fine-tuning steps)
    torch.testing.assert_close(probed.head(features, ids), features @ weight.T + bias)


def test_lp_ft_fine_tunes_the_encoder_and_head_and_differs_from_ft(random_mini_setup, one_intra_op_thread):
    model, tokenizer, train = random_mini_setup
    lpft, ft = methods.get_method("lp-ft", batch_size=8), methods.get_method("ft", batch_size=8)
    assert lpft.hparams["lr"] < ft.hparams["lr"]
    tuned = finetune(model, lpft, train, tokenizer, num_steps=3, progress=False)
    plain = finetune(model, ft, train, tokenizer, num_steps=3, progress=False)
    features = encode_images(tuned.model, train)
    ids = list(range(len(train.classnames)))
    moved = [n for n, p in tuned.model.named_parameters() if n.startswith("visual.")
             and not torch.equal(p, dict(model.named_parameters())[n])]
    assert moved and plain.head is None and tuned.head is not None
    assert not torch.equal(tuned.model.lpft_head.weight, lpft.probe[0].to(tuned.model.lpft_head.weight))
    assert not torch.allclose(encode_images(plain.model, train), features)
    assert torch.isfinite(tuned.head(features, ids)).all() and math.isfinite(tuned.history[-1])
