import math

import pytest
import torch

from lib import methods, models
from lib.data import shapeworld as sw
from lib.evaluate import evaluate
from lib.train import cosine_schedule, finetune

FAST = dict(num_steps=4, batch_size=16, warmup_steps=1)


@pytest.fixture(scope="module")
def setup():
    model, _, _ = models.load_clip("mini", device="cpu")
    train = sw.make_split("unit-train", domains=["photo"], classes=sw.BASE_CLASSES, n_per_class=4)
    return model, models.mini_tokenizer(), train.with_transform(models.mini_preprocess)


def test_cosine_schedule_closed_form():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=2.0)
    scheduler = cosine_schedule(optimizer, num_steps=10, warmup_steps=2)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [1.0, 2.0] + [2.0 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert seen == pytest.approx(expected)


def test_ft_trains_only_the_image_encoder_and_leaves_the_callers_model(setup):
    model, tokenizer, train = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = finetune(model, "ft", train, tokenizer, progress=False, lr=1e-3, **FAST)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    after = trained.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("visual.") for k in changed)
    assert len(trained.history) == FAST["num_steps"]


def test_seeds_make_runs_repeatable(setup):
    model, tokenizer, train = setup
    a = finetune(model, "ft", train, tokenizer, seed=1, progress=False, **FAST).history
    b = finetune(model, "ft", train, tokenizer, seed=1, progress=False, **FAST).history
    c = finetune(model, "ft", train, tokenizer, seed=2, progress=False, **FAST).history
    assert a == b and a != c


def test_ft_lowers_the_training_loss(setup):
    model, tokenizer, train = setup
    trained = finetune(model, "ft", train, tokenizer, progress=False, num_steps=30, batch_size=24, lr=1e-3)
    first, last = sum(trained.history[:5]) / 5, sum(trained.history[-5:]) / 5
    assert last < 0.7 * first


def test_zeroshot_returns_the_model_unchanged(setup):
    model, tokenizer, train = setup
    trained = finetune(model, "zeroshot", train, tokenizer, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.model.state_dict().values()))
    assert trained.history == [] and trained.head is None


def test_linear_probe_knows_only_its_classes(setup):
    model, tokenizer, train = setup
    trained = finetune(model, "lp", train, tokenizer, progress=False, C=1e4)
    results = evaluate(trained.model, tokenizer, train, groups={"base": list(sw.BASE_CLASSES)}, head=trained.head)
    assert results.accuracy.iloc[0] > 0.5  # logistic regression fits its own 24 training images
    with pytest.raises(KeyError, match="only the classes"):
        trained.head(torch.zeros(1, 128), ["ring"])


def test_registry_errors_name_what_is_known():
    with pytest.raises(ValueError, match="Unknown method 'sgd-magic'.*ft"):
        methods.get_method("sgd-magic")
    with pytest.raises(ValueError, match="Unknown hyperparameter"):
        methods.get_method("ft", learning_rate=1.0)
    with pytest.raises(ValueError, match="Unknown modifier"):
        methods.get_method("ft+teleport")


@pytest.mark.parametrize("name", sorted(methods.METHODS) + sorted(methods.ALIASES))
def test_every_registered_method_runs_a_few_steps(setup, name):
    """DomainBed's habit: every method of the registry trains on the tiny split and gives finite losses."""
    model, tokenizer, train = setup
    trained = finetune(model, name, train, tokenizer, progress=False, **FAST)
    assert all(math.isfinite(loss) for loss in trained.history)
    method = methods.get_method(name)
    assert len(trained.history) == (FAST["num_steps"] if method.trains else 0)
    results = evaluate(trained.model, tokenizer, train, groups={"base": list(sw.BASE_CLASSES)}, head=trained.head)
    assert 0 <= results.accuracy.iloc[0] <= 1
