"""IR-Diffusion building blocks: masks, reposition geometry, routing tables, gating, metrics."""

from __future__ import annotations

from attnctrl.adapters import adapter_for

import pytest
import torch

from attnctrl.consistency import (
    Gating,
    IRDiffusion,
    binarise,
    bounding_box,
    group_labels,
    isolation_table,
    otsu_threshold,
    query_dropout,
    reference_table,
    reposition,
    resize_mask,
    resolve_overlaps,
)
from attnctrl.metrics import grid_positions, leakage, locality, reference_share

NEG = float("-inf")


def test_otsu_splits_two_levels():
    x = torch.cat([torch.full((30,), 0.1), torch.full((10,), 0.9)])
    t = otsu_threshold(x)
    assert 0.0 < t <= 1.0
    mask = binarise(x.reshape(8, 5))
    assert int(mask.sum()) == 10
    assert not binarise(torch.ones(3, 3)).any()


def test_bounding_box_and_resize_mask():
    m = torch.zeros(6, 8, dtype=torch.bool)
    m[1:3, 2:7] = True
    assert bounding_box(m) == (1, 2, 3, 7)
    assert bounding_box(torch.zeros(3, 3, dtype=torch.bool)) is None
    big = torch.zeros(16, 16, dtype=torch.bool)
    big[:8, :8] = True
    small = resize_mask(big, (4, 4))
    assert small[:2, :2].all() and not small[2:, :].any() and not small[:, 2:].any()


def test_resolve_overlaps_gives_the_token_to_the_smaller_mask():
    a = torch.zeros(4, 4, dtype=torch.bool)
    a[:, :3] = True
    b = torch.zeros(4, 4, dtype=torch.bool)
    b[:, 2] = True
    out = resolve_overlaps(torch.stack([a, b]))
    assert out[1, :, 2].all() and not out[0, :, 2].any()
    assert not (out[0] & out[1]).any()


def test_reposition_equal_boxes_is_identity_on_masked_tokens():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(3, 6, 6, generator=g)
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[1:4, 2:5] = True
    moved, moved_mask = reposition(features, mask, mask)
    assert torch.equal(moved_mask, mask)
    assert torch.equal(moved[:, mask], features[:, mask])
    assert torch.equal(moved[:, ~mask], torch.zeros_like(moved[:, ~mask]))


def test_reposition_geometry_per_axis_scaling():
    features = torch.arange(36, dtype=torch.float32).reshape(1, 6, 6)
    ref = torch.zeros(6, 6, dtype=torch.bool)
    ref[0:2, 0:2] = True  # 2x2 box at the top left
    target = torch.zeros(6, 6, dtype=torch.bool)
    target[2:6, 3:5] = True  # 4x2 box: y stretched x2, x unchanged (anisotropic, IR-Diffusion)
    moved, moved_mask = reposition(features, ref, target)
    assert torch.equal(moved_mask, target)
    expected = torch.tensor([[0.0, 1.0], [0.0, 1.0], [6.0, 7.0], [6.0, 7.0]])
    assert torch.equal(moved[0, 2:6, 3:5], expected)
    assert float(moved[0][~target].abs().sum()) == 0.0
    kept, kept_mask = reposition(features, ref, target, keep_aspect=True)
    # one scale min(4/2, 2/2) = 1: a 2x2 patch centred in the 4x2 box
    assert kept_mask.sum() == 4 and kept_mask[3:5, 3:5].all()
    assert torch.equal(kept[0, 3:5, 3:5], torch.tensor([[0.0, 1.0], [6.0, 7.0]]))


def test_reposition_empty_masks():
    features = torch.ones(2, 4, 4)
    ref = torch.zeros(4, 4, dtype=torch.bool)
    ref[0, 0] = True
    empty = torch.zeros(4, 4, dtype=torch.bool)
    moved, moved_mask = reposition(features, ref, empty)  # no target: the reference stays
    assert torch.equal(moved_mask, ref) and float(moved.sum()) == 2.0
    moved, moved_mask = reposition(features, empty, ref)  # no reference subject: nothing
    assert not moved_mask.any() and float(moved.abs().sum()) == 0.0


def test_tables():
    t = isolation_table(2)
    assert t.tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, NEG], [0.0, NEG, 0.0]]
    assert not torch.isinf(isolation_table(2, isolate=False)).any()
    r = reference_table(2, reference_bias=0.5)
    assert r.shape == (5, 6)
    assert r[1, 3] == 0.5 and r[2, 4] == 0.5  # kept subject i -> reference i
    assert torch.isneginf(r[1, 4]) and torch.isneginf(r[0, 3:]).all()  # other reference, background
    assert torch.isneginf(r[3, 3:]).all() and torch.isneginf(r[:, 5]).all()  # dropped queries; outside masks
    assert torch.equal(r[3, :3], r[1, :3])  # a dropped query is still isolated


def test_query_dropout_is_seeded_and_leaves_the_global_rng_alone():
    labels = torch.tensor([0, 1, 1, 1, 1, 2, 2, 2, 2, 0] * 20)
    state = torch.random.get_rng_state()
    a = query_dropout(labels, 2, 0.5, torch.Generator().manual_seed(3))
    b = query_dropout(labels, 2, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b)
    assert set(a[labels == 1].tolist()) <= {1, 3} and set(a[labels == 2].tolist()) <= {2, 4}
    assert torch.equal(a[labels == 0], labels[labels == 0])
    rate = float(((a == 3) | (a == 4)).sum()) / float((labels > 0).sum())
    assert 0.35 < rate < 0.65
    assert torch.equal(query_dropout(labels, 2, 0.0, torch.Generator().manual_seed(0)), labels)


def test_group_labels():
    masks = torch.tensor([[1, 0, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    assert group_labels(masks).tolist() == [1, 0, 2, 0]


def _sdxl_shaped_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(8, 16, 16), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 2, 2), cross_attention_dim=8,
    )


def test_sdxl_topology_and_default_gating():
    unet = _sdxl_shaped_unet()
    names = adapter_for(unet).self_attention_layers(unet)
    assert len(names) == 70
    assert sum(n.startswith("down_blocks") for n in names) == 24
    assert sum(n.startswith("mid_block") for n in names) == 10
    assert all(n.startswith("up_blocks") for n in names[34:])
    gated = Gating().blocks(unet)
    assert gated == names[36:] and len(gated) == 34
    # every name is a real processor
    assert set(names) <= set(unet.attn_processors)
    assert Gating(first_block=60, last_block=61).blocks(unet) == names[60:62]


def test_sd_gating_defaults_to_the_decoder(sd_pipe):
    names = adapter_for(sd_pipe.unet).self_attention_layers(sd_pipe.unet)
    gated = Gating().blocks(sd_pipe.unet)
    assert gated and all(n.startswith("up_blocks") for n in gated)
    assert gated == [n for n in names if n.startswith("up_blocks")]


def test_gating_steps_and_validation():
    g = Gating(start=0.2, end=0.6)
    assert [g.active(s, 10) for s in range(10)] == [False, False, True, True, True, True, False, False, False, False]
    assert all(Gating().active(s, 50) for s in range(50))
    with pytest.raises(ValueError):
        Gating(start=0.7, end=0.2)
    with pytest.raises(ValueError):
        IRDiffusion(reposition="warp")
    with pytest.raises(ValueError):
        IRDiffusion(dropout=1.5)


def test_metrics_on_hand_made_probabilities():
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0]])
    q = torch.tensor([[1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    k = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    L = leakage(probs, q, k)
    assert L.tolist() == [[0.75, 0.25], [0.0, 1.0]]
    assert reference_share(probs, q, k).tolist() == [0.75, 1.0]
    pos = grid_positions(2, 2)
    assert pos.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert locality(torch.eye(4), pos, pos) == 0.0
    assert locality(torch.tensor([[0.0, 0.0, 0.0, 1.0]]), pos[:1], pos) == pytest.approx(2**0.5)
