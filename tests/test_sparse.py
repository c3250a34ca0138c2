"""Tests for lib.sparse (SAFT): scores, the global mask, per-layer counts and the sparse optimizer."""

import copy
import io
import math

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import lib.sparse as sparse
from lib.sparse import (
    SparseAdamW,
    mask_gradients,
    parameter_scores,
    per_layer_counts,
    saft_mask,
    saft_pattern,
    saft_pattern_report,
    state_bytes,
)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # see conftest.py


def random_scores(sizes, seed=0, distinct_values=None):
    """Signed scores of the given shapes; with distinct_values, drawn from few integers so ties abound."""
    generator = torch.Generator().manual_seed(seed)
    scores = {}
    for i, shape in enumerate(sizes):
        if distinct_values is None:
            scores[f"p{i}"] = torch.randn(shape, generator=generator)
        else:
            half = distinct_values // 2
            scores[f"p{i}"] = torch.randint(-half, half + 1, shape, generator=generator).float()
    return scores


def reference_mask(scores, alpha):
    """Brute force: a full stable sort of all |score| (ties keep flat order), first floor(alpha * n) kept."""
    flat = torch.cat([s.reshape(-1).float().abs() for s in scores.values()])
    n_select = math.floor(alpha * flat.numel())
    order = torch.sort(flat, descending=True, stable=True).indices
    selected = torch.zeros(flat.numel(), dtype=torch.bool)
    selected[order[:n_select]] = True
    parts = selected.split([s.numel() for s in scores.values()])
    return {name: part.view(s.shape) for (name, s), part in zip(scores.items(), parts)}


def n_selected(mask):
    return sum(int(m.count_nonzero()) for m in mask.values())


def tiny_clip(seed=0):
    torch.manual_seed(seed)
    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
        text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=2, layers=2),
    )


def clip_batches(n_batches, batch_size=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch_size, 3, 32, 32, generator=generator),
         torch.randint(1, 1000, (batch_size, 16), generator=generator))
        for _ in range(n_batches)
    ]


def clip_loss(model, batch):
    """Symmetric InfoNCE: every parameter of both towers and logit_scale gets a gradient."""
    images, tokens = batch
    image_features = model.encode_image(images, normalize=True)
    text_features = model.encode_text(tokens, normalize=True)
    logits = model.logit_scale.exp() * image_features @ text_features.T
    labels = torch.arange(len(images))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


# ----------------------------------------------------------------------------------------------
# saft_mask
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes", [[(7,)], [(3, 5), (11,), (2, 2, 2)], [(1000,), (37, 13), (1,)]])
@pytest.mark.parametrize("alpha", [0.001, 0.01, 0.1, 0.33, 0.5, 0.999, 1.0])
def test_mask_count_is_exactly_floor_alpha_total(sizes, alpha):
    scores = random_scores(sizes)
    total = sum(s.numel() for s in scores.values())
    if math.floor(alpha * total) == 0:
        with pytest.raises(ValueError, match="larger|at least one"):
            saft_mask(scores, alpha)
        return
    mask = saft_mask(scores, alpha)
    assert list(mask) == list(scores)
    assert all(m.dtype == torch.bool and m.shape == scores[name].shape for name, m in mask.items())
    assert n_selected(mask) == math.floor(alpha * total)


@pytest.mark.parametrize("chunk_size", [7, 1 << 22])
@pytest.mark.parametrize("seed", range(3))
def test_mask_matches_full_sort_reference_with_ties(monkeypatch, chunk_size, seed):
    # A tiny chunk size makes ties and selections straddle chunk and tensor boundaries.
    monkeypatch.setattr(sparse, "_CHUNK_SIZE", chunk_size)
    scores = random_scores([(40,), (6, 7), (3,), (5, 5, 2)], seed=seed, distinct_values=7)
    for alpha in (0.05, 0.2, 0.5, 0.77, 1.0):
        mask = saft_mask(scores, alpha)
        expected = reference_mask(scores, alpha)
        for name in scores:
            assert torch.equal(mask[name], expected[name]), (alpha, name)


def test_mask_order_every_selected_at_least_every_unselected():
    scores = random_scores([(300,), (20, 30), (7,)], seed=1)
    mask = saft_mask(scores, 0.1)
    selected = torch.cat([s[m].abs() for s, m in zip(scores.values(), mask.values())])
    unselected = torch.cat([s[~m].abs() for s, m in zip(scores.values(), mask.values())])
    assert selected.min() >= unselected.max()


def test_ties_are_broken_by_dict_order_then_flat_index():
    # Signs do not matter: -2 and 2 tie. Four entries tie at |2|; the two earliest in flat order win.
    scores = {"a": torch.tensor([[1.0, -2.0], [5.0, 0.0]]), "b": torch.tensor([2.0, -2.0, 2.0])}
    mask = saft_mask(scores, 3 / 7)
    assert mask["a"].tolist() == [[False, True], [True, False]]
    assert mask["b"].tolist() == [True, False, False]
    # Same values, other dict order: now "b" comes first and takes both remaining places.
    swapped = saft_mask({"b": scores["b"], "a": scores["a"]}, 3 / 7)
    assert swapped["b"].tolist() == [True, True, False]
    assert swapped["a"].tolist() == [[False, False], [True, False]]


def test_mask_handles_zeros_infinities_subnormals_and_float16():
    values = torch.tensor([0.0, -0.0, float("inf"), 1e-45, -float("inf"), 3.0, 1e-40, 65504.0])
    scores = {"x": values, "y": values.half()}  # in float16 the two tiny values become zeros
    for alpha in (3 / 16, 5 / 16, 11 / 16, 1.0):
        mask, expected = saft_mask(scores, alpha), reference_mask(scores, alpha)
        assert torch.equal(mask["x"], expected["x"]) and torch.equal(mask["y"], expected["y"]), alpha


def test_mask_rejects_nan_scores():
    with pytest.raises(ValueError, match="NaN"):
        saft_mask({"x": torch.tensor([1.0, float("nan"), 2.0])}, 0.5)


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5, float("nan")])
def test_alpha_outside_unit_interval_is_rejected(alpha):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        saft_mask(random_scores([(10,)]), alpha)


def test_alpha_too_small_for_the_model_says_so():
    with pytest.raises(ValueError, match="select at least one"):
        saft_mask(random_scores([(10,)]), 0.05)


def test_alpha_one_selects_everything():
    mask = saft_mask(random_scores([(4, 4), (9,)], distinct_values=3), 1.0)
    assert all(m.all() for m in mask.values())


# ----------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------

def linear_setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    batches = [(torch.randn(6, 5), torch.randint(0, 2, (6,))) for _ in range(3)]
    return model, batches, lambda m, batch: F.cross_entropy(m(batch[0]), batch[1])


def per_batch_gradients(model, batches, loss_fn):
    gradients = []
    for batch in batches:
        model.zero_grad()
        loss_fn(model, batch).backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters()})
    model.zero_grad()
    return gradients


def test_gradient_scores_are_magnitude_of_mean_gradient():
    model, batches, loss_fn = linear_setup()
    by_hand = per_batch_gradients(model, batches, loss_fn)
    scores = parameter_scores(model, loss_fn, batches, strategy="gradient")
    assert list(scores) == [name for name, _ in model.named_parameters()]
    for name, score in scores.items():
        expected = torch.stack([g[name] for g in by_hand]).mean(0).abs()
        assert score.dtype == torch.float32 and score.device.type == "cpu"
        torch.testing.assert_close(score, expected, rtol=1e-6, atol=1e-7)
    # Averaging before taking the magnitude differs from averaging magnitudes, and this data shows it.
    assert any(not torch.allclose(scores[n], torch.stack([g[n].abs() for g in by_hand]).mean(0)) for n in scores)


def test_fisher_scores_are_mean_squared_gradient_and_params_restrict_and_restore():
    model, batches, loss_fn = linear_setup()
    model[0].weight.requires_grad_(False)  # a frozen parameter is still scored, and stays frozen
    by_hand = per_batch_gradients(copy.deepcopy(model).requires_grad_(True), batches, loss_fn)
    chosen = {"0.weight": model[0].weight, "2.bias": model[2].bias}
    scores = parameter_scores(model, loss_fn, batches, strategy="fisher", params=chosen)
    assert list(scores) == ["0.weight", "2.bias"]
    for name, score in scores.items():
        expected = torch.stack([g[name] ** 2 for g in by_hand]).mean(0)
        torch.testing.assert_close(score, expected, rtol=1e-6, atol=1e-9)
    assert not model[0].weight.requires_grad and model[2].bias.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_random_scores_are_seeded_and_magnitude_scores_pick_the_smallest_weights():
    model, batches, loss_fn = linear_setup()
    first = parameter_scores(model, loss_fn, batches, strategy="random", seed=3)
    again = parameter_scores(model, loss_fn, [], strategy="random", seed=3)
    other = parameter_scores(model, loss_fn, [], strategy="random", seed=4)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first)

    mask = saft_mask(parameter_scores(model, loss_fn, [], strategy="magnitude"), 0.25)
    weights = dict(model.named_parameters())
    chosen = torch.cat([weights[n][m].abs() for n, m in mask.items()])
    others = torch.cat([weights[n][~m].abs() for n, m in mask.items()])
    assert chosen.max() <= others.min()


def test_unknown_strategy_lists_the_known_ones():
    model, batches, loss_fn = linear_setup()
    with pytest.raises(ValueError, match="gradient, fisher, random, magnitude"):
        parameter_scores(model, loss_fn, batches, strategy="hessian")


def test_gradient_scores_need_batches():
    model, _, loss_fn = linear_setup()
    with pytest.raises(ValueError, match="at least one batch"):
        parameter_scores(model, loss_fn, [], strategy="gradient")


# ----------------------------------------------------------------------------------------------
# per_layer_counts
# ----------------------------------------------------------------------------------------------

def test_per_layer_counts_on_tiny_clip():
    model = tiny_clip()
    params = dict(model.named_parameters())
    mask = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in params.items()}
    for name in mask:
        if name.startswith("visual.transformer.resblocks.1."):
            mask[name][...] = True
    mask["token_embedding.weight"].view(-1)[:5] = True
    mask["transformer.resblocks.0.mlp.c_fc.weight"].view(-1)[:7] = True
    mask["logit_scale"][...] = True

    table = per_layer_counts(mask)
    assert list(table.columns) == ["encoder", "block", "count", "total"]
    assert list(zip(table.encoder, table.block)) == [
        ("image", -1), ("image", 0), ("image", 1), ("other", -1), ("text", -1), ("text", 0), ("text", 1)]
    rows = {(e, b): (c, t) for e, b, c, t in table.itertuples(index=False)}
    image_block_1 = sum(p.numel() for n, p in params.items() if n.startswith("visual.transformer.resblocks.1."))
    assert rows[("image", 1)] == (image_block_1, image_block_1)
    assert rows[("image", 0)][0] == 0 and rows[("image", -1)][0] == 0
    assert rows[("text", -1)][0] == 5 and rows[("text", 0)][0] == 7 and rows[("other", -1)] == (1, 1)
    text_outside_blocks = sum(p.numel() for n, p in params.items()
                              if not n.startswith("visual.") and "resblocks" not in n and n != "logit_scale")
    assert rows[("text", -1)][1] == text_outside_blocks
    assert table["count"].sum() == n_selected(mask)
    assert table["total"].sum() == sum(p.numel() for p in params.values())


# ----------------------------------------------------------------------------------------------
# SparseAdamW
# ----------------------------------------------------------------------------------------------

def train(model, optimizer, batches, mask=None, clip_norm=None, scheduler=None):
    for batch in batches:
        optimizer.zero_grad()
        clip_loss(model, batch).backward()
        if mask is not None:
            mask_gradients(model.named_parameters(), mask)
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def test_unselected_entries_stay_bit_identical_with_weight_decay_and_clipping():
    model = tiny_clip()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = saft_mask(parameter_scores(model, clip_loss, clip_batches(2), strategy="gradient"), 0.01)
    optimizer = SparseAdamW(model.named_parameters(), mask, lr=1e-3, weight_decay=0.1)
    train(model, optimizer, clip_batches(10, seed=1), mask=mask, clip_norm=0.01)

    n_changed = 0
    for name, p in model.named_parameters():
        assert torch.equal(p.detach()[~mask[name]], before[name][~mask[name]]), name
        n_changed += int((p.detach() != before[name]).count_nonzero())
    assert n_changed > 0.9 * n_selected(mask)


def test_mask_gradients_zeroes_unselected_entries_so_clipping_sees_the_sparse_norm():
    model = tiny_clip()
    mask = saft_mask(parameter_scores(model, None, [], strategy="random"), 0.001)
    clip_loss(model, clip_batches(1)[0]).backward()
    sparse_norm = torch.linalg.vector_norm(torch.cat([p.grad[mask[n]] for n, p in model.named_parameters()]))
    mask_gradients(model.named_parameters(), mask)
    assert all(not p.grad[~mask[n]].any() for n, p in model.named_parameters())
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-9)
    torch.testing.assert_close(norm, sparse_norm)


def test_alpha_one_reproduces_dense_adamw_step_for_step_with_a_scheduler():
    dense_model, sparse_model = tiny_clip(), tiny_clip()
    mask = saft_mask(parameter_scores(sparse_model, None, [], strategy="random"), 1.0)
    settings = dict(lr=1e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    dense = torch.optim.AdamW(dense_model.parameters(), foreach=False, **settings)
    sparse_optimizer = SparseAdamW(sparse_model.named_parameters(), mask, **settings)
    dense_schedule = torch.optim.lr_scheduler.StepLR(dense, step_size=2, gamma=0.5)
    sparse_schedule = torch.optim.lr_scheduler.StepLR(sparse_optimizer, step_size=2, gamma=0.5)
    initial = {n: p.detach().clone() for n, p in dense_model.named_parameters()}

    for step, batch in enumerate(clip_batches(5, seed=2)):
        train(dense_model, dense, [batch], scheduler=dense_schedule)
        train(sparse_model, sparse_optimizer, [batch], scheduler=sparse_schedule)
        for (name, d), s in zip(dense_model.named_parameters(), sparse_model.parameters()):
            torch.testing.assert_close(s, d, rtol=0, atol=1e-6, msg=f"step {step}: {name}")
    assert sparse_optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.25)
    moved = max((p.detach() - initial[n]).abs().max() for n, p in dense_model.named_parameters())
    assert moved > 1e-3


def test_sparse_state_is_tiny_and_only_for_parameters_with_selected_entries():
    model = tiny_clip()
    mask = saft_mask(parameter_scores(model, None, [], strategy="random"), 0.001)
    sparse_optimizer = SparseAdamW(model.named_parameters(), mask)
    train(model, sparse_optimizer, clip_batches(1))
    dense_model = tiny_clip()
    dense = torch.optim.AdamW(dense_model.parameters())
    train(dense_model, dense, clip_batches(1))

    for name, p in model.named_parameters():
        n = int(mask[name].count_nonzero())
        if n == 0:
            assert p not in sparse_optimizer.state and p not in sparse_optimizer.selected_indices
        else:
            state = sparse_optimizer.state[p]
            assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (n,)
            assert sparse_optimizer.selected_indices[p].shape == (n,)
    assert any(int(m.count_nonzero()) == 0 for m in mask.values())
    index_bytes = sum(i.numel() * i.element_size() for i in sparse_optimizer.selected_indices.values())
    assert state_bytes(sparse_optimizer) == index_bytes + 2 * 4 * n_selected(mask)
    assert state_bytes(sparse_optimizer) < 0.02 * state_bytes(dense)


def test_sparse_adamw_rejects_a_mask_that_misses_parameters():
    model = tiny_clip()
    mask = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    del mask["logit_scale"]
    with pytest.raises(ValueError, match="logit_scale"):
        SparseAdamW(model.named_parameters(), mask)


def test_saved_and_loaded_optimizer_trains_on_identically():
    model = tiny_clip()
    mask = saft_mask(parameter_scores(model, None, [], strategy="random"), 0.01)
    optimizer = SparseAdamW(model.named_parameters(), mask, lr=1e-3)
    train(model, optimizer, clip_batches(1))
    checkpoint = io.BytesIO()
    torch.save(optimizer.state_dict(), checkpoint)
    checkpoint.seek(0)
    resumed_model = copy.deepcopy(model)
    resumed = SparseAdamW(resumed_model.named_parameters(), mask, lr=1e-3)
    resumed.load_state_dict(torch.load(checkpoint))
    batch = clip_batches(1, seed=5)
    train(model, optimizer, batch)
    train(resumed_model, resumed, batch)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_saft_pattern_reads_the_papers_three_facts_off_the_counts():
    counts = pd.DataFrame({"encoder": ["image"] * 4 + ["text"] * 4 + ["other"],
                           "block": [-1, 0, 1, 2, -1, 0, 1, 2, -1],
                           "count": [5, 1, 7, 2, 0, 6, 2, 4, 3], "total": [100] * 9})
    pattern = saft_pattern(counts)
    # Three image blocks: block 0 is the first half, block 1 neither, block 2 the second half.
    assert pattern == {"image": 15, "text": 12, "text_early_share": 6 / 12, "image_late_share": 2 / 10}
    empty_text = counts.assign(count=np.where(counts.encoder == "text", 0, counts["count"]))
    assert np.isnan(saft_pattern(empty_text)["text_early_share"])
    report = saft_pattern_report(counts, "toy").splitlines()
    assert report[0] == "toy: text encoder 12 entries, image encoder 15 (paper: text > image: does not agree)"
    assert "50.0 % of its in-block selections (does not agree" in report[1]  # a half is not a majority
    assert "20.0 % of its in-block selections (does not agree" in report[2]
    flipped = counts.assign(count=[0, 0, 0, 9, 0, 6, 2, 0, 3])
    assert [line.endswith("agrees with the paper)") for line in saft_pattern_report(flipped, "x").splitlines()[1:]] \
        == [True, True]
