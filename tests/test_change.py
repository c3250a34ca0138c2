"""Where a method changes the model: relative weight change per block and linear CKA of block outputs."""
import numpy as np
import pandas as pd
import pytest
import torch

from lib.change import (block_cka, block_outputs, change_table, gram_cka, linear_cka, most_changed_blocks,
                        relative_weight_change)


def hsic_cka(x, y):
    """Brute force: HSIC(K, L) = tr(K H L H) / (n - 1)^2 with explicit centering matrix H and linear kernels."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h) / (n - 1) ** 2
    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def test_linear_cka_matches_the_hsic_formula():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 7, generator=generator)
    y = x[:, :5] @ torch.randn(5, 3, generator=generator) + 0.5 * torch.randn(40, 3, generator=generator)
    expected = hsic_cka(x, y)
    assert 0 < expected < 1
    assert linear_cka(x, y) == pytest.approx(expected)
    assert gram_cka(x @ x.T, y @ y.T) == pytest.approx(expected)
    assert linear_cka(x, x) == pytest.approx(1.0)


def test_linear_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(30, 6, generator=generator, dtype=torch.float64)
    y = torch.randn(30, 4, generator=generator, dtype=torch.float64) + x[:, :4]
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))
    reference = linear_cka(x, y)
    assert linear_cka(x @ rotation, y) == pytest.approx(reference)
    assert linear_cka(3.7 * x, 0.2 * y) == pytest.approx(reference)
    assert linear_cka(x @ rotation * 5.0, x) == pytest.approx(1.0)
    # ... but not to a non-isotropic scaling
    assert linear_cka(x * torch.tensor([10.0, 1, 1, 1, 1, 1], dtype=torch.float64), y) != pytest.approx(reference)


def test_relative_change_is_zero_when_unchanged_and_matches_a_hand_computation():
    theta_0 = {"visual.transformer.resblocks.0.attn.weight": torch.tensor([[3.0, 0.0], [0.0, 4.0]]),
               "visual.transformer.resblocks.0.attn.bias": torch.tensor([0.0, 0.0]),
               "visual.transformer.resblocks.1.mlp.weight": torch.tensor([1.0, 1.0]),
               "transformer.resblocks.0.mlp.weight": torch.tensor([2.0]),
               "visual.conv1.weight": torch.tensor([1.0]),
               "logit_scale": torch.tensor(4.0),
               "counter": torch.tensor(3)}
    unchanged = relative_weight_change(theta_0, {k: v.clone() for k, v in theta_0.items()})
    assert unchanged.relative_change.eq(0).all()
    assert set(zip(unchanged.encoder, unchanged.block)) == {("image", 0), ("image", 1), ("image", -1), ("text", 0),
                                                            ("other", -1)}
    theta = {k: v.clone() for k, v in theta_0.items()}
    theta["visual.transformer.resblocks.0.attn.bias"] += torch.tensor([1.0, 2.0])  # block 0: sqrt(5) / 5
    theta["transformer.resblocks.0.mlp.weight"] *= 1.5  # 1 / 2
    table = relative_weight_change(theta_0, theta).set_index(["encoder", "block"])
    assert table.loc[("image", 0), "relative_change"] == pytest.approx(np.sqrt(5) / 5)
    assert table.loc[("image", 0), "numel"] == 6
    assert table.loc[("text", 0), "relative_change"] == pytest.approx(0.5)
    assert table.loc[("image", 1), "relative_change"] == 0


@pytest.fixture(scope="module")
def vit():
    import open_clip
    torch.manual_seed(0)
    return open_clip.CLIP(embed_dim=16, vision_cfg=dict(image_size=16, patch_size=8, width=32, layers=2, head_width=16),
                          text_cfg=dict(context_length=12, vocab_size=100, width=32, heads=2, layers=3)).eval()


def test_block_outputs_of_a_vit_and_a_resnet(vit, one_intra_op_thread):
    images = torch.utils.data.TensorDataset(torch.randn(6, 3, 16, 16), torch.zeros(6))
    tokens = torch.tensor([[1, 5, 6, 99, 0, 0, 0, 0, 0, 0, 0, 0], [1, 7, 99, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    outputs = block_outputs(vit, images, tokens)
    assert sorted(outputs) == [("image", 0), ("image", 1), ("text", 0), ("text", 1), ("text", 2)]
    assert outputs["image", 0].shape == (6, 5 * 32)  # 4 patches + the class token, flattened
    assert outputs["text", 2].shape == (2, 32)  # the end token's features
    # the last text block's end-token output, through ln_final and the projection, is the text embedding
    text = vit.encode_text(tokens)
    torch.testing.assert_close(vit.ln_final(outputs["text", 2]) @ vit.text_projection, text, rtol=1e-4, atol=1e-5)
    import open_clip
    torch.manual_seed(0)  # mini-CLIP 1's ResNet image tower (the stages count as blocks)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=dict(image_size=32, layers=(1, 1, 1, 1), width=16),
                           text_cfg=dict(context_length=12, vocab_size=100, width=32, heads=2, layers=1)).eval()
    images = torch.utils.data.TensorDataset(torch.randn(6, 3, 32, 32), torch.zeros(6))
    resnet = block_outputs(model, images)
    assert sorted(resnet) == [("image", b) for b in range(4)]  # the stages layer1..layer4
    assert all(v.shape[0] == 6 for v in resnet.values())


def test_cka_is_one_for_the_same_model_and_the_table_covers_every_block(vit):
    import copy
    images = torch.utils.data.TensorDataset(torch.randn(10, 3, 16, 16), torch.zeros(10))
    tokens = torch.randint(1, 99, (5, 12))
    same = block_cka(vit, copy.deepcopy(vit), images, tokens)
    assert same.cka.to_numpy() == pytest.approx(1.0)
    moved = copy.deepcopy(vit)
    with torch.no_grad():
        moved.visual.transformer.resblocks[1].mlp.c_fc.weight.add_(torch.randn_like(
            moved.visual.transformer.resblocks[1].mlp.c_fc.weight))
    table = change_table(vit, {"same": copy.deepcopy(vit), "moved": moved}, images, tokens)
    assert list(table.columns) == ["method", "encoder", "block", "numel", "relative_change", "cka"]
    moved_rows = table[table.method == "moved"].set_index(["encoder", "block"])
    assert moved_rows.loc[("image", 1), "relative_change"] > 0 and moved_rows.loc[("image", 1), "cka"] < 1
    assert moved_rows.loc[("image", 0), "relative_change"] == 0
    assert moved_rows.loc[("image", 0), "cka"] == pytest.approx(1.0)
    assert moved_rows.loc[("text", 2), "cka"] == pytest.approx(1.0)
    assert np.isnan(moved_rows.loc[("image", -1), "cka"])
    assert table[table.method == "same"].relative_change.eq(0).all()


def test_change_figure_draws_both_towers(vit):
    import copy

    from lib import plots
    moved = copy.deepcopy(vit)
    with torch.no_grad():
        for name, parameter in moved.named_parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    images = torch.utils.data.TensorDataset(torch.randn(8, 3, 16, 16), torch.zeros(8))
    table = change_table(vit, {"ft": moved, "zeroshot": copy.deepcopy(vit)}, images, torch.randint(1, 99, (4, 12)))
    fig = plots.change_figure(table, title="per block")
    titles = [ax.get_title() for ax in fig.axes]
    assert "image encoder" in titles and "text encoder" in titles
    assert fig._suptitle.get_text() == "per block"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["ft", "zeroshot"]  # one legend for the figure
    assert "outside" in [t.get_text() for ax in fig.axes for t in ax.get_xticklabels()]  # parameters outside blocks
    assert "ResNet" not in " ".join(ax.get_xlabel() for ax in fig.axes)
    plots.plt.close(fig)


def test_sixteen_methods_get_sixteen_looks_and_shares_print_without_exponents():
    from lib import plots
    styles = plots._method_styles([f"method {i}" for i in range(16)])
    assert len({(tuple(s["color"]), s["marker"]) for s in styles.values()}) == 16
    assert len({tuple(s["color"]) for s in styles.values()}) == 16
    assert [plots._percent(v) for v in (100, 8.601, 0.032, 0.00031, 0)] == ["100%", "8.6%", "0.032%", "<0.001%", "0%"]


def test_most_changed_blocks_finds_the_block_that_moved_most_and_the_least_similar_output():
    rows = []
    for seed, jitter in ((0, 0.0), (1, 0.02)):
        for block, change, cka in ((-1, 0.9, np.nan), (0, 0.1, 0.95), (1, 0.3 + jitter, 0.7), (2, 0.2, 0.5)):
            rows.append({"method": "ft", "seed": seed, "encoder": "image", "block": block, "numel": 10,
                         "relative_change": change, "cka": cka})
        for block, rounding in ((0, 0.0), (1, 3e-8)):  # an average of identical float32 weights
            rows.append({"method": "ft", "seed": seed, "encoder": "text", "block": block, "numel": 10,
                         "relative_change": rounding, "cka": 1.0})
    summary = most_changed_blocks(pd.DataFrame(rows)).set_index("encoder")
    assert summary.loc["image", "moved_block"] == 1  # block -1 (embeddings) is not a block, though it moved most
    assert summary.loc["image", "relative_change"] == pytest.approx(0.31)
    assert summary.loc["image", "changed_block"] == 2 and summary.loc["image", "cka"] == pytest.approx(0.5)
    assert np.isnan(summary.loc["text", "moved_block"])  # nothing moved in the text tower
    assert np.isnan(summary.loc["text", "changed_block"]) and summary.loc["text", "cka"] == 1.0
