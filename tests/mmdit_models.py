"""Tiny random-weight SD3 and Flux pipelines built from configs (no downloads).

The CLIP tokenizer is conftest's; the T5 tokenizer is a real ``T5TokenizerFast`` over a small
sentencepiece-style Unigram vocabulary ("▁" word starts, an end token ``</s>``, no start token)
built with the ``tokenizers`` library, with "tiger" split into "▁ti" + "ger" to exercise
multi-token words.
"""

from __future__ import annotations

import torch

from conftest import SPLIT_WORDS, WHOLE_WORDS, _text_encoder

T5_LENGTH = 12  # max_sequence_length of the tiny pipelines


def build_t5_tokenizer(max_length: int = 64):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in WHOLE_WORDS]
    for word, (first, *rest) in SPLIT_WORDS.items():
        vocab.append(("▁" + first, -1.5))
        vocab += [(piece, -1.5) for piece in rest]
    vocab += [(c, -5.0) for c in ",.!?abcdefghijklmnopqrstuvwxyz"]
    model = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    model.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=max_length, extra_ids=0
    )


def _t5_encoder(tokenizer, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(4)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def _vae(channels: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[8, 8], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=channels, norm_num_groups=4, shift_factor=0.06, scaling_factor=1.5,
    ).eval()


def build_sd3(tokenizer, t5_tokenizer, cls=None, *, layers: int = 2, dual: bool = False, with_t5: bool = True):
    """A tiny SD3-shaped pipeline: 32x32 images, 16x16 latents, patch 2 -> 8x8 tokens; text =
    16 CLIP tokens + T5_LENGTH T5 tokens. ``dual``: SD3.5-style attn2 on the first block."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from attnctrl.pipelines import Prompt2PromptSD3Pipeline

    torch.manual_seed(5)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=32, dual_attention_layers=(0,) if dual else (), qk_norm="rms_norm" if dual else None,
    ).eval()
    cls = cls or Prompt2PromptSD3Pipeline
    pipe = cls(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4),
        text_encoder=_text_encoder(tokenizer, hidden=16, projection=True), tokenizer=tokenizer,
        text_encoder_2=_text_encoder(tokenizer, hidden=16, projection=True), tokenizer_2=tokenizer,
        text_encoder_3=_t5_encoder(t5_tokenizer) if with_t5 else None, tokenizer_3=t5_tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_flux(tokenizer, t5_tokenizer, cls=None, *, double: int = 2, single: int = 2):
    """A tiny Flux.1-dev-shaped pipeline (guidance embedding): 32x32 images, 16x16 latents packed
    2x2 -> 8x8 tokens; text = T5_LENGTH T5 tokens (CLIP gives the pooled vector)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from attnctrl.pipelines import Prompt2PromptFluxPipeline

    torch.manual_seed(6)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=double, num_single_layers=single, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    ).eval()
    cls = cls or Prompt2PromptFluxPipeline
    pipe = cls(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4), text_encoder=_text_encoder(tokenizer),
        tokenizer=tokenizer, text_encoder_2=_t5_encoder(t5_tokenizer), tokenizer_2=t5_tokenizer, transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
