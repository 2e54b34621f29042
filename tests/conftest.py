"""Tiny random-weight Stable Diffusion and SDXL pipelines built from configs (no downloads).

The tokenizer is a real CLIPTokenizer over a small vocabulary written into a temporary folder;
some words are split into several tokens ("tiger" -> "ti" + "ger", "bicycle" -> "bi" + "cycle",
"watermelon" -> "water" + "melon") to exercise multi-token word handling.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one thread is fastest (and robust when the machine is shared).
torch.set_num_threads(1)

WHOLE_WORDS = (
    "a an the photo of cat dog lion car red blue green pink big small sitting running on in at "
    "grass beach street with and bike painting house tree smiling fried croutons"
).split()
SPLIT_WORDS = {"tiger": ("ti", "ger"), "bicycle": ("bi", "cycle"), "watermelon": ("water", "melon")}
MAX_LENGTH = 16


def write_tokenizer(folder: Path) -> Path:
    from attnctrl.models.shapes.tokenizer import write_vocab_files

    write_vocab_files(str(folder), WHOLE_WORDS, split=SPLIT_WORDS)
    return folder


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"), model_max_length=MAX_LENGTH)


@pytest.fixture(scope="session")
def t5_tokenizer():
    """The tiny T5 tokenizer of the MM-DiT test pipelines (``mmdit_models``)."""
    from mmdit_models import build_t5_tokenizer

    return build_t5_tokenizer()


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )


def _vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[8, 8], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4, norm_num_groups=4,
    )


def _text_encoder(tokenizer, hidden: int = 32, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden, intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=MAX_LENGTH,
        projection_dim=32, hidden_act="gelu",
    )
    torch.manual_seed(1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def build_sd(tokenizer, cls=None):
    """A tiny SD 1.x-shaped pipeline: 32x32 images, 16x16 latents, cross-attention at 16x16 and 8x8."""
    from diffusers import UNet2DConditionModel

    from attnctrl.pipelines import Prompt2PromptPipeline

    torch.manual_seed(2)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
    )
    cls = cls or Prompt2PromptPipeline
    pipe = cls(
        vae=_vae(), text_encoder=_text_encoder(tokenizer), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_sdxl(tokenizer, cls=None):
    """A tiny SDXL-shaped pipeline (two text encoders, text_time conditioning)."""
    from diffusers import UNet2DConditionModel

    from attnctrl.pipelines import Prompt2PromptXLPipeline

    torch.manual_seed(3)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1, 2),
        projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=8,
    )
    cls = cls or Prompt2PromptXLPipeline
    pipe = cls(
        vae=_vae(), text_encoder=_text_encoder(tokenizer), text_encoder_2=_text_encoder(tokenizer, projection=True),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet.eval(), scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def sd_pipe(tokenizer):
    return build_sd(tokenizer)


@pytest.fixture(scope="session")
def sdxl_pipe(tokenizer):
    return build_sdxl(tokenizer)
