"""Model Stock: the per-tensor merge on constructed tensors with known angles, and the registry method."""
import math

import pytest
import torch

from lib.averaging import model_stock, model_stock_ratios


def with_angle(base_change, angle, length, generator):
    """A change of the given length at the given angle to base_change (in the plane of a random direction)."""
    unit = base_change.flatten() / base_change.norm()
    other = torch.randn(unit.numel(), generator=generator, dtype=unit.dtype)
    other = other - (other @ unit) * unit
    other = other / other.norm()
    return (length * (math.cos(angle) * unit + math.sin(angle) * other)).view_as(base_change)


def test_exact_merge_at_sixty_degrees():
    # Changes (2, 0) and (1, sqrt 3): equal lengths at 60 degrees, cos = 1/2, t = 2/3, mean change (1.5, sqrt3/2).
    theta_0 = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}
    theta_a = {"w": torch.tensor([3.0, 2.0], dtype=torch.float64)}
    theta_b = {"w": torch.tensor([2.0, 2.0 + math.sqrt(3)], dtype=torch.float64)}
    ratios = model_stock_ratios(theta_0, theta_a, theta_b)
    assert ratios.cos.item() == pytest.approx(0.5) and ratios.t.item() == pytest.approx(2 / 3)
    merged = model_stock(theta_0, theta_a, theta_b)["w"]
    torch.testing.assert_close(merged, torch.tensor([2.0, 2.0 + math.sqrt(3) / 3], dtype=torch.float64))


@pytest.mark.parametrize("degrees", [0, 30, 45, 60, 89])
def test_known_angle_in_many_dimensions(degrees):
    generator = torch.Generator().manual_seed(degrees)
    theta_0 = {"layer.weight": torch.randn(6, 5, generator=generator, dtype=torch.float64),
               "layer.bias": torch.randn(5, generator=generator, dtype=torch.float64)}
    theta_a, theta_b, expected = {}, {}, {}
    cos = math.cos(math.radians(degrees))
    t = 2 * cos / (1 + cos)
    for n, (name, w0) in enumerate(theta_0.items()):
        change_a = torch.randn(w0.shape, generator=generator, dtype=torch.float64)
        change_b = with_angle(change_a, math.radians(degrees), 0.5 + n, generator)  # unequal lengths too
        theta_a[name], theta_b[name] = w0 + change_a, w0 + change_b
        expected[name] = w0 + t * (change_a + change_b) / 2
    merged = model_stock(theta_0, theta_a, theta_b)
    for name in theta_0:
        torch.testing.assert_close(merged[name], expected[name])
    assert model_stock_ratios(theta_0, theta_a, theta_b).t.tolist() == pytest.approx([t, t])


def test_against_an_independent_formulation():
    # torch's cosine_similarity and the paper's form w_H = t * w_12 + (1 - t) * w_0, written out per tensor.
    generator = torch.Generator().manual_seed(7)
    shapes = {"a": (8, 3), "b": (4,), "c": (2, 2, 3)}
    theta_0 = {k: torch.randn(s, generator=generator) for k, s in shapes.items()}
    shared = {k: torch.randn(s, generator=generator) for k, s in shapes.items()}  # a common direction: cos > 0
    theta_a = {k: theta_0[k] + shared[k] + 0.7 * torch.randn(s, generator=generator) for k, s in shapes.items()}
    theta_b = {k: theta_0[k] + shared[k] + 0.7 * torch.randn(s, generator=generator) for k, s in shapes.items()}
    merged = model_stock(theta_0, theta_a, theta_b)
    for k in shapes:
        cos = torch.nn.functional.cosine_similarity((theta_a[k] - theta_0[k]).flatten(),
                                                    (theta_b[k] - theta_0[k]).flatten(), dim=0)
        t = 2 * cos / (1 + cos)
        w_12 = (theta_a[k] + theta_b[k]) / 2
        torch.testing.assert_close(merged[k], t * w_12 + (1 - t) * theta_0[k])


def test_limits_and_degenerate_tensors():
    w0 = torch.tensor([1.0, -1.0, 0.5])
    change = torch.tensor([0.2, 0.1, -0.3])
    theta_0 = {"same": w0, "orthogonal": w0, "unchanged": w0, "one_moved": w0, "opposite": w0,
               "step": torch.tensor(7), "mask": torch.tensor([True, False])}
    theta_a = {"same": w0 + change, "orthogonal": w0 + torch.tensor([1.0, 0, 0]), "unchanged": w0.clone(),
               "one_moved": w0 + change, "opposite": w0 + change, "step": torch.tensor(9),
               "mask": torch.tensor([False, True])}
    theta_b = {"same": w0 + change, "orthogonal": w0 + torch.tensor([0, 1.0, 0]), "unchanged": w0.clone(),
               "one_moved": w0.clone(), "opposite": w0 - change, "step": torch.tensor(11),
               "mask": torch.tensor([True, True])}
    merged = model_stock(theta_0, theta_a, theta_b)
    torch.testing.assert_close(merged["same"], w0 + change)  # cos 1, t 1: the fine-tuned weights
    for name in ("orthogonal", "unchanged", "one_moved", "opposite"):  # cos 0 (or clamped to 0): theta_0, no NaN
        torch.testing.assert_close(merged[name], w0)
    assert merged["step"].item() == 9 and merged["mask"].tolist() == [False, True]  # copied from theta_a
    assert not theta_a["unchanged"].data_ptr() == merged["unchanged"].data_ptr()


def test_mismatched_state_dicts_are_rejected():
    with pytest.raises(ValueError, match="same keys"):
        model_stock({"a": torch.zeros(2)}, {"a": torch.zeros(2)}, {"b": torch.zeros(2)})
    with pytest.raises(ValueError, match="shape mismatch"):
        model_stock({"a": torch.zeros(2)}, {"a": torch.zeros(3)}, {"a": torch.zeros(2)})


def test_stock_method_merges_two_seeds_of_its_base(random_mini_setup, one_intra_op_thread):
    from lib.methods import get_method
    from lib.train import finetune
    model, tokenizer, train = random_mini_setup
    hparams = dict(lr=1e-3, batch_size=8, warmup_steps=1)
    method = get_method("model-stock", stock_seed_offset=5, **hparams)
    merged = finetune(model, method, train, tokenizer, num_steps=3, seed=2, progress=False)
    first = finetune(model, get_method("ft", num_steps=3, **hparams),
                     train, tokenizer, seed=2, progress=False).model.state_dict()
    second = finetune(model, get_method("ft", num_steps=3, **hparams),
                      train, tokenizer, seed=7, progress=False).model.state_dict()
    expected = model_stock(model.state_dict(), first, second)
    for name, value in merged.model.state_dict().items():
        torch.testing.assert_close(value, expected[name])
    assert method.name == "model-stock" and len(merged.history) == 3
    ratios = method.stock_ratios.set_index("name").t
    assert ratios[[n for n in ratios.index if n.startswith("visual.")]].gt(0).any()
    assert ratios[[n for n in ratios.index if n.startswith("transformer.")]].eq(0).all()  # ft: frozen text tower
    # the caller's model is untouched, the partner run is kept
    assert not torch.equal(method.partner.model.state_dict()["visual.conv1.weight"], first["visual.conv1.weight"])


def test_stock_composes_and_validates():
    from lib.methods import get_method
    from lib.runner import expand, validate
    assert get_method("mms+bma+stock", beta=2.0, lr=1e-5).name == "mms+bma+stock"
    validate(expand({"methods": ["ft+stock", "model-stock", "ce+saft+stock"], "budget": "smoke"}))
    for name in ("lp+stock", "zeroshot+stock", "vision-only+stock"):
        with pytest.raises(ValueError, match="stock merges"):
            get_method(name)
    with pytest.raises(ValueError, match="stock_seed_offset"):
        get_method("ft+stock", stock_seed_offset=0)
