"""SD3.5-medium- and Flux.1-dev-shaped pipelines with random weights, for benchmarks (no downloads).

The transformers have the published configs (depth may be cut with ``layers``, and is stated by the
caller); the text encoders are one-layer random CLIP / T5 models whose output widths match what the
transformers take (CLIP-L 768 + CLIP-G 1280 pooled, T5 4096), because the text encoders run once
per call and do not matter for the denoising cost. Tokenizers are built offline: a CLIP BPE
vocabulary from ``p2p.write_clip_vocab`` and a sentencepiece-style T5 vocabulary (``▁`` word starts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: SD3.5-medium's MM-DiT (24 joint blocks, 24 heads x 64, SD3.5's attn2 in blocks 0-12, RMS q/k norm).
SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
#: Flux.1-dev's transformer (19 double-stream + 38 single-stream blocks, 24 heads x 128, guidance embedding).
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)


def t5_tokenizer(words: list[str], max_length: int = 512) -> Any:
    """A ``T5TokenizerFast`` in which every word of ``words`` is one ``▁word`` piece."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in sorted(set(words))]
    vocab += [(c, -5.0) for c in ",.!?abcdefghijklmnopqrstuvwxyz"]
    model = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    model.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           model_max_length=max_length, extra_ids=0)


def _clip(tokenizer: Any, hidden: int, projection: int | None) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=1,
        num_attention_heads=hidden // 64, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=projection or hidden, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _t5(tokenizer: Any, d_model: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_ff=256, d_kv=64, num_layers=1, num_heads=4,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def _vae(channels: int) -> Any:
    from diffusers import AutoencoderKL

    # Never decoded in the benchmarks (output_type="latent"); four blocks for the factor 8.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=channels, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
        shift_factor=0.0609, scaling_factor=1.5305,
    ).eval()


def build_mmdit(family: str, words: list[str], folder: Path, *, layers: int | None = None, seed: int = 0) -> Any:
    """The stock ``StableDiffusion3Pipeline`` ("sd3") or ``FluxPipeline`` ("flux") of the published
    config, random weights; ``layers`` cuts the depth (SD3: joint blocks; Flux: double and single
    blocks each, in the published 1:2 ratio)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from p2p import write_clip_vocab  # noqa: E402

    vocab, merges = write_clip_vocab(folder, sorted(set(words)))
    clip_tok = CLIPTokenizer(str(vocab), str(merges), model_max_length=77)
    t5_tok = t5_tokenizer(words)
    torch.manual_seed(seed)
    if family == "sd3":
        config = dict(SD35_MEDIUM)
        if layers is not None:
            config["num_layers"] = layers
            config["dual_attention_layers"] = tuple(i for i in config["dual_attention_layers"] if i < layers)
        transformer = SD3Transformer2DModel(**config).eval()
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(16),
            text_encoder=_clip(clip_tok, 768, 768), tokenizer=clip_tok,
            text_encoder_2=_clip(clip_tok, 1280, 1280), tokenizer_2=clip_tok,
            text_encoder_3=_t5(t5_tok, 4096), tokenizer_3=t5_tok,
        )
    if family == "flux":
        config = dict(FLUX_DEV)
        if layers is not None:
            config["num_layers"], config["num_single_layers"] = layers, 2 * layers
        transformer = FluxTransformer2DModel(**config).eval()
        return FluxPipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
            vae=_vae(16), text_encoder=_clip(clip_tok, 768, None), tokenizer=clip_tok,
            text_encoder_2=_t5(t5_tok, 4096), tokenizer_2=t5_tok,
        )
    raise ValueError(f"unknown family {family!r}; use 'sd3' or 'flux'")
