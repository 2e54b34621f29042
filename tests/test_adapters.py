"""Model adapters: processor names in call order, levels, token grids, patch sizes, by structure."""

from __future__ import annotations

import pytest

from attnctrl.adapters import DiTAdapter, UNetAdapter, adapter_for
from attnctrl.errors import UnsupportedModelError


def test_unet_adapter_on_sd_and_sdxl_shapes(sd_pipe, sdxl_pipe):
    for pipe, top in ((sd_pipe, 0), (sdxl_pipe, 1)):  # SDXL has no attention at the latent resolution
        unet = pipe.unet
        adapter = adapter_for(unet)
        assert isinstance(adapter, UNetAdapter)
        names = adapter.self_attention_layers(unet)
        processors = set(unet.attn_processors)
        assert names and set(names) <= processors
        assert {n for n in processors if n.endswith("attn1.processor")} == set(names)
        # call order: down blocks, then the mid block, then up blocks
        order = [n.split(".")[0] for n in names]
        assert order == sorted(order, key=["down_blocks", "mid_block", "up_blocks"].index)
        levels = {n: adapter.level(unet, n) for n in names}
        assert min(levels.values()) == top
        for n in names:
            assert adapter.level_factor(unet, n) == 2 ** levels[n]
        assert adapter.patch_size(unet) == 1
        assert adapter.token_grid(unet, (16, 12), 16 * 12) == (16, 12)
        assert adapter.token_grid(unet, (15, 9), 8 * 5) == (8, 5)  # ceiling halving
        assert adapter.token_grid(unet, (16, 16), 7) is None


def test_dit_adapter():
    from diffusers import PixArtTransformer2DModel

    dit = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
        patch_size=2, cross_attention_dim=16, caption_channels=16, norm_type="ada_norm_single", num_embeds_ada_norm=1000,
    )
    adapter = adapter_for(dit)
    assert isinstance(adapter, DiTAdapter)
    assert adapter.self_attention_layers(dit) == [f"transformer_blocks.{i}.attn1.processor" for i in range(2)]
    assert adapter.level(dit, "transformer_blocks.1.attn1.processor") == 0
    assert adapter.patch_size(dit) == 2
    assert adapter.token_grid(dit, (16, 8), 32) == (8, 4)


def test_unknown_models_are_refused_with_the_supported_families():
    with pytest.raises(UnsupportedModelError, match="UNet2DConditionModel.*PixArt|PixArt.*UNet2DConditionModel"):
        adapter_for(object())
