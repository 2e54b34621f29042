"""Train the embedded shapes text-to-image model from scratch (CPU-friendly, resumable).

Phases (state kept in ``work_dir``, so ``resume=True`` continues where a run stopped):

1. ``vae``: an ``AutoencoderKL`` (64x64x3 -> 16x16x4) trained on rendered scenes (L1 + MSE + a small
   KL term; mostly on random 32x32 crops, which is 4x cheaper and enough for flat shapes), with
   optionally latent channel 0 made an occupancy channel shared by every colour
   (``occupancy_latent``, :func:`occupancy_latent_loss`).
2. ``encode``: the pre-rendered pool of scenes is encoded once (posterior mean); the latent
   ``scaling_factor`` is 1 / std of those latents and is stored in the VAE config.
3. ``unet``: a ``UNet2DConditionModel`` trained on the pre-encoded latents under a frozen,
   seeded random ``CLIPTextModel`` (v-prediction on a zero-terminal-SNR schedule, x0-error weight
   min(SNR, 5) + 1, half of each batch from t >= 700, 10% empty captions for classifier-free
   guidance, a grounding loss that keeps each object word's cross-attention on its object, AdamW
   with warmup + cosine decay, EMA weights).
4. ``export``: a stock Stable Diffusion folder (EMA weights, DDIM scheduler config, CLIP tokenizer)
   written atomically to ``out_dir``.

Deterministic for a given seed: the data and noise of step ``k`` are drawn from generators seeded by
(seed, phase, k), so a resumed run sees exactly what an uninterrupted run would. Checkpoints are
safetensors + JSON, written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import argparse

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import BACKGROUNDS, COLOURS, SHAPE_KINDS, SIZE_WORDS, caption, item_scene, object_masks, render_array
from .tokenizer import MODEL_MAX_LENGTH, build_tokenizer, write_vocab_files
from ...errors import InvalidOptionError

__all__ = [
    "train",
    "finetune_decoder",
    "export_checkpoint",
    "vae_config",
    "unet_config",
    "text_config",
    "scheduler_config",
    "object_token_positions",
    "grounding_loss",
    "object_loss_weights",
    "occupancy_latent_loss",
]

# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------


def vae_config() -> dict[str, Any]:
    """AutoencoderKL config: 64x64 RGB -> 16x16x4 (three levels, factor 4)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )


def unet_config() -> dict[str, Any]:
    """UNet2DConditionModel config: 16x16x4 latents, four levels (16, 8, 4, 2), cross-attention at 16x16,
    8x8, 4x4 and in the 2x2 mid block.

    The 2x2 bottleneck matters: with three levels (16 -> 4) the model learnt colour and shape but not
    position words ("on the left" and "on the right" gave the same layout from the same noise), since a
    convolutional UNet only learns absolute position from the borders, and at 2x2 every cell touches two.
    """
    return dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(48, 96, 112, 112),
        layers_per_block=1,
        norm_num_groups=16,
        cross_attention_dim=128,
        attention_head_dim=4,  # diffusers' legacy name: this is the number of heads
    )


#: Transformer layers of the (frozen, random) text encoder of a new run: none. See :func:`text_config`.
TEXT_ENCODER_LAYERS = 0


def text_config(tokenizer, layers: int = TEXT_ENCODER_LAYERS) -> dict[str, Any]:
    """CLIPTextConfig kwargs matching ``tokenizer``, with ``layers`` transformer layers.

    With no layers a token's feature is LayerNorm(token + position embedding): it does not depend
    on the other words. Prompt-to-Prompt needs that: a frozen random 3-layer encoder changed the
    "circle" of "a red circle" by 57% when "red" became "blue" (more than "circle" -> "square",
    42%), so a colour swap also swapped, in effect, the shape word and the layout with it.
    """
    if not isinstance(layers, int) or layers < 0:
        raise InvalidOptionError(f"text encoder layers must be an int >= 0, got {layers!r}")
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=128,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def scheduler_config(prediction_type: str = "v_prediction", zero_terminal_snr: bool | None = None) -> dict[str, Any]:
    """Noise schedule shared by training (DDPM) and the shipped DDIMScheduler.

    v-prediction on a zero-terminal-SNR schedule (Lin et al., 2023), sampled with "trailing" steps.
    On the usual scaled-linear schedule the noisiest training input still holds 7% of the image
    (alphas_cumprod[999] = 0.0047). For these big flat blobs that is enough to read the layout off
    x_t, so the model learnt to take the layout from the noise and the colour from the prompt: its
    x0 estimate at t=999 was the same for "on the left" and "on the right", and generation put
    objects wherever the initial noise leaned. With SNR 0 at t=999 the only source of the layout is
    the prompt. Zero SNR needs a v target (an epsilon model cannot recover x0 from pure noise).

    ``zero_terminal_snr`` defaults to True for v-prediction and must be False for epsilon.
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise InvalidOptionError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    if zero_terminal_snr is None:
        zero_terminal_snr = prediction_type == "v_prediction"
    if zero_terminal_snr and prediction_type != "v_prediction":
        raise InvalidOptionError("zero_terminal_snr=True needs prediction_type='v_prediction': at SNR 0 noise says nothing about x0")
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        rescale_betas_zero_snr=bool(zero_terminal_snr),
        timestep_spacing="trailing" if zero_terminal_snr else "leading",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,  # unused by "trailing" spacing; 1 keeps diffusers from warning about old configs
    )


#: Training timesteps at or above this count as "high noise" for :func:`sample_timesteps`.
HIGH_NOISE_START = 700


def sample_timesteps(batch_size: int, generator: torch.Generator, high_noise_fraction: float) -> torch.Tensor:
    """Training timesteps: uniform over [0, 1000), except that a ``high_noise_fraction`` share of
    the batch is drawn from [HIGH_NOISE_START, 1000) only.

    The layout (where the object is) is decided at high noise, and only the prompt can decide it
    there; colour and shape details are learnt at every level. Oversampling high noise spends more
    of the small budget on what the position words control.
    """
    t = torch.randint(0, 1000, (batch_size,), generator=generator)
    high = torch.randint(HIGH_NOISE_START, 1000, (batch_size,), generator=generator)
    pick = torch.rand(batch_size, generator=generator) < high_noise_fraction
    return torch.where(pick, high, t)


def loss_weight(snr: torch.Tensor, prediction_type: str, min_snr_gamma: float) -> torch.Tensor:
    """Per-sample weight of the squared error on the network's target.

    In terms of the x0 error both weightings are ``min(snr, gamma)`` (min-SNR-gamma), plus 1 for v:
    without it a v loss is weighted by ~snr at high noise, i.e. not at all at SNR 0, which is where
    a zero-terminal-SNR model must learn the layout from the prompt.
    """
    clamped = torch.clamp(snr, max=min_snr_gamma)
    if prediction_type == "v_prediction":
        return (clamped + 1.0) / (snr + 1.0)
    return clamped / snr


#: Default weight of the grounding loss (see :func:`grounding_loss`) for a new run.
GROUNDING_WEIGHT = 0.1

OCCUPANCY_LEVEL = 2.5
"""Latent channel 0 of a new run's VAE is pulled to ``+OCCUPANCY_LEVEL`` on cells inside an object
and to ``-OCCUPANCY_LEVEL`` on background cells (see :func:`occupancy_latent_loss`)."""
COLOUR_LATENT_BOUND = 1.0
"""... and channels 1-3 are kept within ``[-COLOUR_LATENT_BOUND, COLOUR_LATENT_BOUND]``."""


def occupancy_latent_loss(mean: torch.Tensor, occupancy: torch.Tensor) -> torch.Tensor:
    """Shape the VAE's latent so that "there is an object here" is one shared direction.

    With a free latent every colour is its own direction (red and blue objects were nearly
    orthogonal against their background), so from the same starting noise a colour word swap
    resolves the object's outline from a different projection of that noise and the edited object
    comes out another size and shape. Making channel 0 an occupancy channel that dominates the
    colour channels gives every colour the same outline-deciding direction; the colour is read
    from the smaller channels 1-3 late in sampling.

    ``mean``: the encoder's posterior mean, ``(B, 4, h, w)``. ``occupancy``: object coverage of
    each latent cell in [0, 1], ``(B, h, w)``. Cells at an object's edge (coverage 0.05-0.7) are
    left free, so the outline's sub-cell detail can still be encoded there.
    """
    occ = mean[:, 0]
    inside = (occupancy >= 0.7).float()
    outside = (occupancy <= 0.05).float()
    target = OCCUPANCY_LEVEL * (inside - outside)
    occ_term = ((occ - target).pow(2) * (inside + outside)).sum() / (inside + outside).sum().clamp_min(1.0)
    colour_term = F.relu(mean[:, 1:].abs() - COLOUR_LATENT_BOUND).pow(2).mean()
    return occ_term + colour_term

_SIZE_WORD_SET = frozenset(w for words in SIZE_WORDS.values() for w in words)


def object_token_positions(tokenizer: Any, scene: Any, text: str, word_lengths: dict[str, int] | None = None) -> list[list[int]]:
    """Token positions (in ``tokenizer(text).input_ids``, BOS at 0) of each object's words in ``text``.

    Returns one list per object of ``scene``, in ``scene.objects`` order: the colour word, the shape
    word after it (every sub-word token of it: "triangle" is "tri" + "angle") and a size word right
    before the colour. Two objects of a scene never share a colour, so the colour word names the
    object. Background colour words ("on a black background") are not object words. Empty lists
    for an empty caption. ``word_lengths`` caches the token count of each word across calls.
    """
    word_lengths = {} if word_lengths is None else word_lengths
    by_colour = {o.colour: k for k, o in enumerate(scene.objects)}
    out: list[list[int]] = [[] for _ in scene.objects]
    pos = 1  # after BOS
    words = text.split()
    spans = []
    for w in words:
        n = word_lengths.get(w)
        if n is None:
            n = word_lengths[w] = len(tokenizer(w, add_special_tokens=False).input_ids)
        spans.append((w, pos, pos + n))
        pos += n
    current: int | None = None
    for i, (w, a, b) in enumerate(spans):
        if w in by_colour:
            current = by_colour[w]
            out[current].extend(range(a, b))
            if i > 0 and spans[i - 1][0] in _SIZE_WORD_SET:
                out[current].extend(range(spans[i - 1][1], spans[i - 1][2]))
        elif w in SHAPE_KINDS and current is not None:
            out[current].extend(range(a, b))
            current = None
    return [sorted(p) for p in out]


def grounding_loss(probs: list[torch.Tensor], targets: torch.Tensor, supervised: torch.Tensor) -> torch.Tensor:
    """How far each object's words' cross-attention is from its object (0 when it is exactly there).

    ``probs``: per cross-attention layer, ``(B, h*w, L)`` attention probabilities averaged over heads,
    on square grids that divide ``targets``' grid. ``targets``: ``(B, L, S, S)`` coverage of the
    object each token names; ``supervised``: ``(B, L)`` bool, the tokens that name an object.
    ``M`` is the coverage pooled to the layer's grid and scaled to a maximum of 1 (a coarse grid
    rarely has a fully covered cell). Per layer, the mean of two terms:

    - token: ``(1 - sum(A * M) / sum(A))**2`` per supervised token, its share of attention outside
      its object (TokenCompose's token term, Wang et al., CVPR 2024);
    - pixel: ``(1 - sum_j A_j)**2`` per pixel, weighted by ``M``, where ``j`` runs over the words of
      the object at that pixel: an object's pixels should read their object's words, so that a
      word's value (what Prompt-to-Prompt's Replace swaps) decides what is drawn there.

    Averaged over layers. Layers coarser than 4x4 are skipped: one cell there covers a quarter of
    the image.
    """
    if not bool(supervised.any()):
        return targets.new_zeros(())
    size = targets.shape[-1]
    weight = supervised.to(targets.dtype)
    terms = []
    for p in probs:
        side = int(round(math.sqrt(p.shape[1])))
        if side < 4 or side * side != p.shape[1] or size % side:
            continue
        m = F.avg_pool2d(targets.flatten(0, 1)[:, None], size // side)[:, 0].view(*targets.shape[:2], side * side)
        m = m / m.amax(dim=-1, keepdim=True).clamp_min(1e-6)
        a = p.transpose(1, 2)  # (B, L, N)
        inside = (a * m).sum(-1) / a.sum(-1).clamp_min(1e-8)
        token = (((1 - inside) ** 2) * weight).sum() / weight.sum()
        own = (m > 0.5) & supervised[:, :, None]  # (B, L, N): token j names the object at pixel n
        mass = (a * own).sum(1)  # (B, N)
        cover = (m * weight[:, :, None]).amax(1)  # (B, N)
        pixel = (cover * (1 - mass) ** 2).sum() / cover.sum().clamp_min(1e-6)
        terms.append((token + pixel) / 2)
    if not terms:
        raise InvalidOptionError("no cross-attention layer has a square grid of at least 4x4 that divides the target grid")
    return torch.stack(terms).mean()


def cached_object_masks(scenes: Sequence[Any], index: int, grid: int, cache: dict[int, torch.Tensor]) -> torch.Tensor:
    """:func:`~attnctrl.models.shapes.object_masks` of pool scene ``scenes[index]`` on a ``grid`` x
    ``grid`` grid, ``(n_objects, grid, grid)``, rendered once per scene and kept in ``cache``."""
    if index not in cache:
        cache[index] = torch.from_numpy(object_masks(scenes[index], grid))
    return cache[index]


def object_loss_weights(scenes: Sequence[Any], idx: np.ndarray, grid: int, scene_masks: dict[int, torch.Tensor],
                        extra: float, device: torch.device) -> torch.Tensor:
    """Per-cell loss weights ``(B, grid, grid)`` for pool scenes ``scenes[idx]``: ``1 + extra`` on the
    cells any object covers, fading with its coverage, dilated by one cell so that the background
    right around an outline (a star's notches) counts as the outline; 1 elsewhere. ``scene_masks`` is
    the cache :func:`object_token_targets` shares. Both trainers (the UNet's denoising loss and the
    flow transformer's velocity loss) divide the weighted loss by the batch's mean weight, so the
    objects gain weight against the background without changing the loss's overall scale."""
    union = torch.stack([cached_object_masks(scenes, int(i), grid, scene_masks).sum(0).clamp(max=1.0) for i in idx]).to(device)
    near = F.max_pool2d(union[:, None], kernel_size=3, stride=1, padding=1)[:, 0]
    return 1.0 + extra * near


def object_token_targets(
    tokenizer: Any, scenes: Sequence[Any], idx: np.ndarray, texts: Sequence[str], grid: int,
    scene_masks: dict[int, torch.Tensor], word_lengths: dict[str, int], device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The grounding loss's and attention forcing's targets for a batch of pool scenes ``scenes[idx]``
    captioned ``texts`` (an empty caption has none): per token, the coverage of the object it names
    ``(B, L, grid, grid)``; whether it names one ``(B, L)`` bool; and 1 / the number of that object's
    words ``(B, L)``. ``scene_masks`` and ``word_lengths`` are caches the caller keeps across steps."""
    targets = torch.zeros(len(texts), MODEL_MAX_LENGTH, grid, grid)
    supervised = torch.zeros(len(texts), MODEL_MAX_LENGTH, dtype=torch.bool)
    token_share = torch.zeros(len(texts), MODEL_MAX_LENGTH)
    for b, (i, text) in enumerate(zip(idx, texts)):
        if not text:
            continue
        scene = scenes[int(i)]
        masks = cached_object_masks(scenes, int(i), grid, scene_masks)
        for k, positions in enumerate(object_token_positions(tokenizer, scene, text, word_lengths)):
            kept = [pos for pos in positions if pos < MODEL_MAX_LENGTH]
            for pos in kept:
                targets[b, pos] = masks[k]
                supervised[b, pos] = True
                token_share[b, pos] = 1.0 / len(kept)
    return targets.to(device), supervised.to(device), token_share.to(device)


def forced_attention(probs: torch.Tensor, targets: torch.Tensor, supervised: torch.Tensor, token_share: torch.Tensor) -> torch.Tensor:
    """Cross-attention probabilities with each object's words attended exactly where the object is.

    ``probs``: ``(B, heads, N, L)`` on a square grid of ``N`` cells that divides ``targets``' grid
    (other grids are returned unchanged). ``targets``/``supervised`` as in :func:`grounding_loss`;
    ``token_share``: ``(B, L)``, 1 / (number of words of the object a token names), 0 elsewhere.
    At a cell covered by objects to a fraction ``c`` (the coverage pooled to the grid and scaled to a
    maximum of 1, as in the grounding loss), each object's words share its coverage equally, and the
    remaining ``1 - c`` is the model's own attention over the words that name no object,
    renormalised. Gradients flow through that remainder.
    """
    batch, heads, cells, length = probs.shape
    side = int(round(math.sqrt(cells)))
    size = targets.shape[-1]
    if side < 4 or side * side != cells or size % side:
        return probs
    m = F.avg_pool2d(targets.flatten(0, 1)[:, None], size // side)[:, 0].view(batch, length, cells)
    m = m / m.amax(dim=-1, keepdim=True).clamp_min(1e-6) * supervised[:, :, None]
    objects = (m * token_share[:, :, None]).transpose(1, 2)  # (B, N, L)
    total = objects.sum(-1, keepdim=True)
    covered = total.clamp(max=1.0)
    objects = objects * (covered / total.clamp_min(1e-6))
    rest = probs * (~supervised)[:, None, None, :]
    rest = rest / rest.sum(-1, keepdim=True).clamp_min(1e-8)
    return (1 - covered)[:, None] * rest + objects[:, None]


@dataclass
class AttentionForcing:
    """What the training attention processors force in the current step (nothing when ``rows`` is
    None): :func:`forced_attention`'s inputs and the batch rows it applies to. The UNet's
    :class:`_RecordingCrossAttention` and the flow model's
    :class:`~attnctrl.models.shapes.train_flow.JointAttentionWithNullTokens` read it."""

    rows: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    supervised: torch.Tensor | None = None
    token_share: torch.Tensor | None = None


class _RecordingCrossAttention:
    """Cross-attention processor that computes softmax(QK^T) explicitly and keeps the head-averaged
    probabilities ``(B, N, L)`` in ``sink``; the output equals the stock processor's, except for the
    rows ``forcing`` names, whose probabilities are replaced by :func:`forced_attention`'s (the sink
    keeps the model's own)."""

    def __init__(self, sink: list[torch.Tensor], forcing: AttentionForcing | None = None) -> None:
        self.sink = sink
        self.forcing = forcing

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        if encoder_hidden_states is None or attention_mask is not None or attn.norm_cross or attn.group_norm is not None:
            raise InvalidOptionError("the recording processor handles only plain unmasked cross-attention")
        batch, tokens, _ = hidden_states.shape
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, None)
        self.sink.append(probs.view(batch, attn.heads, tokens, -1).mean(1))
        f = self.forcing
        if f is not None and f.rows is not None:
            per_head = probs.view(batch, attn.heads, tokens, -1)
            forced = forced_attention(per_head, f.targets, f.supervised, f.token_share)
            probs = torch.where(f.rows[:, None, None, None], forced, per_head).view_as(probs)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def _record_cross_attention(unet: Any, forcing: AttentionForcing | None = None) -> list[torch.Tensor]:
    """Put :class:`_RecordingCrossAttention` on every cross-attention of ``unet``; returns the sink."""
    sink: list[torch.Tensor] = []
    for name, module in unet.named_modules():
        if name.endswith("attn2") and hasattr(module, "set_processor"):
            module.set_processor(_RecordingCrossAttention(sink, forcing))
    return sink


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(time.strftime("%H:%M:%S ") + msg, file=sys.stderr)
    sys.stderr.flush()


def _atomic_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _atomic_save_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def _opt_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = opt.state_dict()
    flat = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            flat[f"{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return flat, sd["param_groups"]


def _opt_from_flat(opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    """Restore the moments saved by :func:`_opt_to_flat`. The param groups are the optimizer's own
    (the learning rate is recomputed every step and the other hyper-parameters are fixed)."""
    groups = opt.state_dict()["param_groups"]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


def _swap_dir(tmp: str, final: str) -> None:
    """Replace directory ``final`` by ``tmp`` (rename-based; ``final.old`` survives a crash)."""
    old = final + ".old"
    if os.path.isdir(old):
        shutil.rmtree(old)
    if os.path.isdir(final):
        os.rename(final, old)
    os.rename(tmp, final)
    if os.path.isdir(old):
        shutil.rmtree(old)


def _to_pixels(u8: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    return u8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def train(
    out_dir: str,
    *,
    work_dir: str = "runs/shapes",
    seed: int = 0,
    minutes: float = 120.0,
    vae_minutes: float = 10.0,
    max_steps: int | None = None,
    pool_size: int = 10_000,
    batch_size: int = 32,
    lr: float = 1e-3,
    warmup: int = 150,
    vae_batch_size: int = 16,
    vae_lr: float = 1.5e-3,
    vae_crop: int = 32,
    cond_drop: float = 0.1,
    ema_decay: float = 0.999,
    min_snr_gamma: float = 5.0,
    prediction_type: str = "v_prediction",
    zero_terminal_snr: bool | None = None,
    high_noise_fraction: float | None = None,
    train_text_encoder: bool | None = None,
    text_encoder_layers: int | None = None,
    grounding_weight: float | None = None,
    attention_forcing: float | None = None,
    attention_forcing_from: float | None = None,
    object_loss_weight: float | None = None,
    decoder_minutes: float = 0.0,
    decoder_splice: float = 0.0,
    occupancy_latent: bool | None = None,
    init_from: str | None = None,
    colour_weights: dict[str, float] | None = None,
    checkpoint_minutes: float = 5.0,
    resume: bool = False,
    device: str | None = None,
    threads: int | None = 2,
    log_every: int = 50,
) -> str:
    """Train the shapes model and write the diffusers folder to ``out_dir``; returns ``out_dir``.

    ``minutes`` is the total wall-clock budget over all runs of this ``work_dir`` (resumes included);
    ``vae_minutes`` of it go to the VAE. ``max_steps`` caps the UNet steps (default: as many as the
    time budget allows; the cosine schedule is planned from the throughput measured after 20 steps).

    ``attention_forcing_from`` (a fraction in [0, 1)) holds ``attention_forcing`` off until that share
    of the planned UNet steps is done, so the model learns to place objects by their position words
    before it is taught to draw where their words are attended. ``decoder_minutes`` of the budget
    fine-tune the VAE decoder (:func:`finetune_decoder`) once the pool is encoded, before the UNet,
    with ``decoder_splice`` of its steps on spliced latents (its ``splice_share``).

    ``init_from`` (a new run only) fine-tunes an exported shapes folder instead of training from
    scratch: its VAE (decoder included), text encoder, UNet, scaling factor, noise schedule and
    target are taken over, the VAE phase is skipped, and the UNet phase starts at step 0 with a fresh
    optimiser, warm-up, cosine schedule and EMA.

    ``object_loss_weight`` (``W`` >= 0) weights the denoising loss ``1 + W`` on the latent cells the
    objects cover and the cells around them (:func:`object_loss_weights`), normalised to mean 1 per
    batch, so thin parts of an outline and colours close to the background are not outweighed by the
    background. Default 0 for a new run; a resumed run keeps its checkpoint's unless given.

    ``colour_weights`` (``{"purple": 3.0}``) oversamples the pool scenes that hold an object of those
    colours in the UNet batches: a scene is drawn with probability proportional to the largest weight
    of its objects' colours (1 for colours not named). Recorded in ``state.json``; a resumed run keeps
    its checkpoint's unless given (``{}`` switches it off).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from tqdm.auto import tqdm
    from transformers import CLIPTextConfig, CLIPTextModel

    if threads and not torch.cuda.is_available():
        torch.set_num_threads(threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.makedirs(work_dir, exist_ok=True)
    ckpt = os.path.join(work_dir, "ckpt")
    state_path = os.path.join(ckpt, "state.json")
    t_start = time.time()

    if resume and not os.path.isdir(ckpt) and os.path.isdir(ckpt + ".old"):
        os.rename(ckpt + ".old", ckpt)
    if resume and os.path.exists(state_path):
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
        _log(f"resuming from {ckpt}: phase={state['phase']} vae_step={state['vae_step']} unet_step={state['unet_step']}")
    else:
        if os.path.isdir(ckpt):
            # a new run would overwrite the checkpoint in place; the user's trained steps must not be lost
            raise InvalidOptionError(
                f"{ckpt!r} has no state.json and cannot be resumed; move it away or use a new --work dir"
                if resume
                else f"{work_dir!r} already holds a checkpoint; pass --resume (resume=True) to continue it, "
                "or use a new --work dir for a new run"
            )
        state = dict(
            phase="vae", vae_step=0, vae_elapsed=0.0, unet_step=0, unet_elapsed=0.0, elapsed=0.0,
            planned_steps=max_steps, scaling_factor=None, seed=seed, pool_size=pool_size,
            batch_size=batch_size,
        )
        if init_from is not None:
            _start_from_model(init_from, ckpt, state, train_text_encoder=bool(train_text_encoder), text_encoder_layers=text_encoder_layers)
    if init_from is not None and os.path.abspath(init_from) != state.get("init_from"):
        raise InvalidOptionError(
            f"init_from={init_from!r} only starts a new run, and {work_dir!r} already holds one "
            f"(started from {state.get('init_from') or 'scratch'}); resume it without init_from or use a new --work dir"
        )
    if "prediction_type" not in state:
        # a run that has not trained its UNet yet takes the requested target; older ones used epsilon
        state["prediction_type"] = prediction_type if int(state.get("unet_step", 0)) == 0 else "epsilon"
    elif state["prediction_type"] != prediction_type:
        _log(f"continuing with the checkpoint's prediction_type={state['prediction_type']!r} (not {prediction_type!r})")
    prediction_type = str(state["prediction_type"])
    if "occupancy_latent" not in state:
        # VAEs trained before the switch existed have a free latent, as new runs do unless asked
        state["occupancy_latent"] = False if state["phase"] != "vae" or int(state["vae_step"]) > 0 else bool(occupancy_latent)
    if occupancy_latent is not None and bool(occupancy_latent) != bool(state["occupancy_latent"]):
        raise InvalidOptionError(
            f"this checkpoint's VAE was trained with occupancy_latent={state['occupancy_latent']}; the latent space "
            "cannot change on resume (start a new --work dir)"
        )
    occupancy_latent = bool(state["occupancy_latent"])
    if high_noise_fraction is not None and not 0.0 <= float(high_noise_fraction) <= 1.0:
        raise InvalidOptionError(f"high_noise_fraction must be in [0, 1], got {high_noise_fraction}")
    # the switches below: a run whose UNet has not started takes what was asked for; a checkpoint
    # from before a switch existed keeps what it was trained with until the switch is given
    started = int(state.get("unet_step", 0)) > 0
    if "zero_terminal_snr" not in state:
        # runs whose UNet has not started take the requested schedule; older ones used scaled-linear
        state["zero_terminal_snr"] = False if started else bool(scheduler_config(prediction_type, zero_terminal_snr)["rescale_betas_zero_snr"])
    if zero_terminal_snr is not None and bool(zero_terminal_snr) != bool(state["zero_terminal_snr"]):
        scheduler_config(prediction_type, zero_terminal_snr)  # validates the combination
        _log(f"switching the noise schedule to zero_terminal_snr={zero_terminal_snr} at UNet step {state['unet_step']}")
        state.setdefault("schedule_changes", []).append([int(state["unet_step"]), bool(zero_terminal_snr)])
        state["zero_terminal_snr"] = bool(zero_terminal_snr)
    zero_terminal_snr = bool(state["zero_terminal_snr"])
    if "high_noise_fraction" not in state:
        # older checkpoints sampled uniformly; new runs default to half the batch at high noise
        state["high_noise_fraction"] = 0.0 if started else (0.5 if high_noise_fraction is None else float(high_noise_fraction))
        state["high_noise_from_step"] = 0
    if high_noise_fraction is not None and float(high_noise_fraction) != float(state["high_noise_fraction"]):
        _log(f"high-noise share of the batch {state['high_noise_fraction']} -> {high_noise_fraction} from UNet step {state['unet_step']}")
        state["high_noise_fraction"] = float(high_noise_fraction)
        state["high_noise_from_step"] = int(state["unet_step"])
    high_noise_fraction = float(state["high_noise_fraction"])
    high_noise_from_step = int(state["high_noise_from_step"])
    reset_text_encoder = False
    if "train_text_encoder" not in state:
        # older checkpoints trained it jointly; new runs keep it frozen at its seeded random init
        state["train_text_encoder"] = True if started else bool(train_text_encoder)
    if train_text_encoder is not None and bool(train_text_encoder) != bool(state["train_text_encoder"]):
        if train_text_encoder:
            raise InvalidOptionError("a frozen text encoder cannot be switched to joint training on resume; start a new --work dir")
        _log(f"freezing the text encoder at its seeded random init from UNet step {state['unet_step']} (EMA restarts)")
        state["train_text_encoder"] = False
        state["text_encoder_frozen_at_step"] = int(state["unet_step"])
        state["ema_from_step"] = int(state["unet_step"])
        reset_text_encoder = True
    if text_encoder_layers is not None and (isinstance(text_encoder_layers, bool) or not isinstance(text_encoder_layers, int) or text_encoder_layers < 0):
        raise InvalidOptionError(f"text_encoder_layers must be an int >= 0, got {text_encoder_layers!r}")
    if "text_encoder_layers" not in state:
        # older checkpoints had a 3-layer encoder; new runs take TEXT_ENCODER_LAYERS
        state["text_encoder_layers"] = _text_encoder_layers(state) if started else (TEXT_ENCODER_LAYERS if text_encoder_layers is None else int(text_encoder_layers))
    if text_encoder_layers is not None and int(text_encoder_layers) != int(state["text_encoder_layers"]):
        _log(f"text encoder: {state['text_encoder_layers']} -> {text_encoder_layers} layers, re-initialised from its seed "
             f"at UNet step {state['unet_step']} (EMA restarts)")
        state.setdefault("text_encoder_layer_changes", []).append([int(state["unet_step"]), int(text_encoder_layers)])
        state["text_encoder_layers"] = int(text_encoder_layers)
        state["ema_from_step"] = int(state["unet_step"])
        reset_text_encoder = True
    text_encoder_layers = int(state["text_encoder_layers"])
    train_text_encoder = bool(state["train_text_encoder"])
    if grounding_weight is not None and not (math.isfinite(float(grounding_weight)) and float(grounding_weight) >= 0.0):
        raise InvalidOptionError(f"grounding_weight must be a finite number >= 0, got {grounding_weight}")
    if "grounding_weight" not in state:
        # older checkpoints had no grounding loss; new runs default to GROUNDING_WEIGHT
        state["grounding_weight"] = 0.0 if started else (GROUNDING_WEIGHT if grounding_weight is None else float(grounding_weight))
        state["grounding_from_step"] = 0
    if grounding_weight is not None and float(grounding_weight) != float(state["grounding_weight"]):
        _log(f"grounding loss weight {state['grounding_weight']} -> {grounding_weight} from UNet step {state['unet_step']}")
        state.setdefault("grounding_changes", []).append([int(state["unet_step"]), float(grounding_weight)])
        state["grounding_weight"] = float(grounding_weight)
        state["grounding_from_step"] = int(state["unet_step"])
    grounding_weight = float(state["grounding_weight"])
    if attention_forcing is not None and not 0.0 <= float(attention_forcing) <= 1.0:
        raise InvalidOptionError(f"attention_forcing must be in [0, 1], got {attention_forcing}")
    state.setdefault("attention_forcing", 0.0 if started or attention_forcing is None else float(attention_forcing))
    if attention_forcing is not None and float(attention_forcing) != float(state["attention_forcing"]):
        _log(f"attention forcing {state['attention_forcing']} -> {attention_forcing} from UNet step {state['unet_step']}")
        state.setdefault("attention_forcing_changes", []).append([int(state["unet_step"]), float(attention_forcing)])
        state["attention_forcing"] = float(attention_forcing)
    attention_forcing = float(state["attention_forcing"])
    if attention_forcing_from is not None and not 0.0 <= float(attention_forcing_from) < 1.0:
        raise InvalidOptionError(f"attention_forcing_from must be a fraction of the planned steps in [0, 1), got {attention_forcing_from}")
    if attention_forcing_from is not None and float(attention_forcing_from) > 0 and attention_forcing == 0.0:
        raise InvalidOptionError("attention_forcing_from only delays attention forcing; give attention_forcing > 0 as well")
    if attention_forcing_from is not None and float(attention_forcing_from) != float(state.get("attention_forcing_from", 0.0)):
        if started:
            raise InvalidOptionError(
                f"attention_forcing_from is fixed when the UNet phase starts (this run has {state.get('attention_forcing_from', 0.0)}); "
                "to switch forcing on part-way through a started run, resume it with attention_forcing instead"
            )
        state["attention_forcing_from"] = float(attention_forcing_from)
    state.setdefault("attention_forcing_from", 0.0)
    if object_loss_weight is not None and not (math.isfinite(float(object_loss_weight)) and float(object_loss_weight) >= 0.0):
        raise InvalidOptionError(f"object_loss_weight must be a finite number >= 0, got {object_loss_weight}")
    state.setdefault("object_loss_weight", 0.0 if started or object_loss_weight is None else float(object_loss_weight))
    if object_loss_weight is not None and float(object_loss_weight) != float(state["object_loss_weight"]):
        _log(f"object loss weight {state['object_loss_weight']} -> {object_loss_weight} from UNet step {state['unet_step']}")
        state.setdefault("object_loss_weight_changes", []).append([int(state["unet_step"]), float(object_loss_weight)])
        state["object_loss_weight"] = float(object_loss_weight)
    object_loss_weight = float(state["object_loss_weight"])
    if not (math.isfinite(float(decoder_minutes)) and float(decoder_minutes) >= 0.0):
        raise InvalidOptionError(f"decoder_minutes must be a finite number >= 0, got {decoder_minutes}")
    _require_share("decoder_splice", decoder_splice)
    if decoder_splice and not decoder_minutes:
        raise InvalidOptionError("decoder_splice only acts during the decoder fine-tune: give decoder_minutes > 0 as well")
    # the pixel term of grounding_loss joined the token term at this step (0 for new runs)
    state.setdefault("grounding_pixel_from_step", int(state["unet_step"]))
    if "pool_size" not in state:
        # checkpoints from before pool_size was recorded: trust the pre-encoded latents on disk
        found = [n for n in os.listdir(work_dir) if n.startswith(f"latents_{seed}_") and n.endswith(".safetensors")]
        state["pool_size"] = int(found[0][len(f"latents_{seed}_") : -len(".safetensors")]) if len(found) == 1 and state["phase"] != "vae" else pool_size
    if int(state["pool_size"]) != pool_size:
        _log(f"using the checkpoint's pool of {state['pool_size']} scenes (not {pool_size})")
        pool_size = int(state["pool_size"])
    if colour_weights is not None:
        for name, weight in colour_weights.items():
            if name not in COLOURS:
                raise InvalidOptionError(f"colour_weights: unknown colour {name!r}; use one of {list(COLOURS)}")
            if not (math.isfinite(float(weight)) and float(weight) > 0.0):
                raise InvalidOptionError(f"colour_weights: the weight of {name!r} must be a finite number > 0, got {weight}")
        new_weights = {str(k): float(v) for k, v in sorted(colour_weights.items())}
        if new_weights != state.get("colour_weights", {}):
            _log(f"colour oversampling {state.get('colour_weights', {})} -> {new_weights} from UNet step {state['unet_step']}")
            state.setdefault("colour_weight_changes", []).append([int(state["unet_step"]), new_weights])
            state["colour_weights"] = new_weights
    colour_weights = dict(state.get("colour_weights", {}))
    if resume and max_steps is not None and state["phase"] in ("unet", "export", "done") and max_steps > state["unet_step"]:
        # extend (or shorten) a finished/planned run: train on to max_steps
        state["planned_steps"] = max_steps
        state["phase"] = "unet"
    elapsed0 = float(state["elapsed"])

    def elapsed() -> float:
        return elapsed0 + (time.time() - t_start)

    budget = minutes * 60.0
    tok_dir = os.path.join(work_dir, "tokenizer_src")
    tokenizer = build_tokenizer(tok_dir)

    # -------- pool of scenes (deterministic) --------
    t0 = time.time()
    scenes = [item_scene(i, seed)[0] for i in range(pool_size)]
    _log(f"sampled {pool_size} scenes in {time.time() - t0:.1f}s")
    need_pixels = state["phase"] in ("vae", "encode")
    pool_u8 = None
    if need_pixels:
        t0 = time.time()
        pool_u8 = torch.from_numpy(np.stack([render_array(s, 64) for s in scenes]))
        _log(f"rendered {pool_size} images in {time.time() - t0:.1f}s")

    vae = AutoencoderKL(**vae_config()).to(dev)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config())
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(tokenizer, text_encoder_layers)))
    unet.to(dev)
    text_encoder.to(dev)
    n_params = {n: sum(p.numel() for p in m.parameters()) for n, m in [("vae", vae), ("unet", unet), ("text_encoder", text_encoder)]}
    _log(f"params: {n_params} (fp32 MB: {sum(n_params.values()) * 4 / 2**20:.1f}) device={dev}")

    if os.path.exists(os.path.join(ckpt, "vae.safetensors")):
        vae.load_state_dict(_load_tensors(os.path.join(ckpt, "vae.safetensors")))

    def save_ckpt(extra: dict[str, dict[str, torch.Tensor]], groups: list | None = None) -> None:
        tmp = ckpt + ".new"
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
        # carry over files from the previous checkpoint that this save does not rewrite
        if os.path.isdir(ckpt):
            for name in os.listdir(ckpt):
                if name.endswith(".safetensors") and name[: -len(".safetensors")] not in extra:
                    shutil.copy2(os.path.join(ckpt, name), os.path.join(tmp, name))
        for name, tensors in extra.items():
            _atomic_save_tensors(os.path.join(tmp, name + ".safetensors"), tensors)
        state["elapsed"] = elapsed()
        st = dict(state)
        if groups is not None:
            st["optimizer_param_groups"] = groups
        _atomic_json(os.path.join(tmp, "state.json"), st)
        _swap_dir(tmp, ckpt)

    # ================= phase 1: VAE =================
    if state["phase"] == "vae":
        vae.train()
        opt = torch.optim.AdamW(vae.parameters(), lr=vae_lr, weight_decay=0.0)
        if os.path.exists(os.path.join(ckpt, "vae_opt.safetensors")):
            _opt_from_flat(opt, _load_tensors(os.path.join(ckpt, "vae_opt.safetensors")))
        vae_budget = min(vae_minutes * 60.0, budget * 0.5)
        last_ck = time.time()
        t_phase = time.time()
        vae_el0 = float(state["vae_elapsed"])
        bar = tqdm(desc="vae", unit="step", initial=state["vae_step"], file=sys.stderr, mininterval=5.0)
        ema_loss = None
        while vae_el0 + (time.time() - t_phase) < vae_budget:
            step = state["vae_step"]
            rng = np.random.default_rng([seed, 1, step])
            idx_np = rng.integers(0, pool_size, vae_batch_size)
            idx = torch.from_numpy(idx_np)
            x = _to_pixels(pool_u8[idx])
            if vae_crop and step % 16 != 15:
                # crops (on the 4-pixel latent grid) that contain an object, so every sample teaches colours
                crops, cells = [], []
                for k, i in enumerate(idx_np):
                    sc = scenes[int(i)]
                    o = sc.objects[int(rng.integers(len(sc.objects)))]
                    cx, cy = (v * 64 for v in o.centre)
                    lo_x = int(np.clip(cx - vae_crop + 6, 0, 64 - vae_crop)) // 4
                    hi_x = int(np.clip(cx - 6, 0, 64 - vae_crop)) // 4
                    lo_y = int(np.clip(cy - vae_crop + 6, 0, 64 - vae_crop)) // 4
                    hi_y = int(np.clip(cy - 6, 0, 64 - vae_crop)) // 4
                    ox = 4 * int(rng.integers(min(lo_x, hi_x), max(lo_x, hi_x) + 1))
                    oy = 4 * int(rng.integers(min(lo_y, hi_y), max(lo_y, hi_y) + 1))
                    crops.append(x[k, :, oy : oy + vae_crop, ox : ox + vae_crop])
                    cells.append((oy // 4, ox // 4))
                x = torch.stack(crops)
            else:
                cells = [(0, 0)] * len(idx_np)
            b = (torch.stack([torch.tensor(BACKGROUNDS[scenes[int(i)].background], dtype=torch.float32) for i in idx_np]) / 127.5 - 1.0)[:, :, None, None]
            x, b = x.to(dev), b.to(dev)
            for g in opt.param_groups:
                g["lr"] = vae_lr * min(1.0, (step + 1) / 100)
            post = vae.encode(x).latent_dist
            g_noise = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + step)
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g_noise).to(dev)
            rec = vae.decode(z).sample
            # pixels of objects weigh 5x: they are few, and their colours are what matters
            w = 1.0 + 4.0 * ((x - b).abs().amax(dim=1, keepdim=True) > 0.1).float()
            rec_loss = (w * ((rec - x).abs() + (rec - x).pow(2))).mean() / w.mean()
            loss = rec_loss + 1e-6 * post.kl().mean()
            if occupancy_latent:
                h, w_cells = post.mean.shape[-2:]
                occ = torch.stack([
                    torch.from_numpy(object_masks(scenes[int(i)], 16).sum(0).clip(0.0, 1.0))[cy : cy + h, cx : cx + w_cells]
                    for i, (cy, cx) in zip(idx_np, cells)
                ]).to(dev)
                loss = loss + 0.1 * occupancy_latent_loss(post.mean, occ)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            state["vae_step"] = step + 1
            ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
            bar.update(1)
            if (step + 1) % log_every == 0:
                _log(f"vae step {step + 1} loss {ema_loss:.4f}")
            if time.time() - last_ck > checkpoint_minutes * 60.0:
                state["vae_elapsed"] = vae_el0 + (time.time() - t_phase)
                flat, groups = _opt_to_flat(opt)
                save_ckpt({"vae": vae.state_dict(), "vae_opt": flat}, groups)
                last_ck = time.time()
        bar.close()
        state["vae_elapsed"] = vae_el0 + (time.time() - t_phase)
        state["phase"] = "encode"
        save_ckpt({"vae": vae.state_dict()})
        _log(f"vae done: {state['vae_step']} steps in {state['vae_elapsed']:.0f}s")

    # ================= phase 2: encode the pool =================
    lat_path = os.path.join(work_dir, f"latents_{seed}_{pool_size}.safetensors")
    vae.eval()
    if state["phase"] == "encode" or not os.path.exists(lat_path):
        if pool_u8 is None:
            pool_u8 = torch.from_numpy(np.stack([render_array(s, 64) for s in scenes]))
        t0 = time.time()
        lats = []
        with torch.no_grad():
            for i in range(0, pool_size, 256):
                lats.append(vae.encode(_to_pixels(pool_u8[i : i + 256]).to(dev)).latent_dist.mean.cpu())
            lat = torch.cat(lats)
            # reconstruction quality on 256 pool images (full 64x64, posterior mean)
            x = _to_pixels(pool_u8[:256]).to(dev)
            rec = vae.decode(lat[:256].to(dev)).sample.clamp(-1, 1)
            mse = F.mse_loss((rec + 1) / 2, (x + 1) / 2).item()
            psnr = 10 * math.log10(1.0 / max(mse, 1e-12))
        from . import analyze

        ok = sum(
            sorted((d.colour, d.position) for d in analyze(r)) == sorted((o.colour, o.position) for o in sc.objects)
            for r, sc in zip(rec[:100].cpu(), scenes[:100])
        )
        state["vae_analyze_ok"] = ok / 100.0
        _log(f"VAE reconstructions: analyze() right on {ok}/100")
        mean, std = lat.mean().item(), lat.std().item()
        if state.get("init_from") is None:
            state["scaling_factor"] = 1.0 / std  # a fine-tuned model keeps the scale its UNet learnt
        state["latent_mean"] = mean
        state["vae_psnr"] = psnr
        _log(f"encoded pool in {time.time() - t0:.0f}s; latent mean {mean:.3f} std {std:.3f} -> scaling_factor {1 / std:.4f}; VAE PSNR {psnr:.2f} dB")
        _atomic_save_tensors(lat_path, {"latents": lat})
        state["phase"] = "unet"
        save_ckpt({})
    pool_u8 = None
    if state["phase"] == "unet" and decoder_minutes > 0 and _decoder_minutes_done(work_dir) < decoder_minutes:
        finetune_decoder(work_dir, seed=seed, minutes=decoder_minutes, splice_share=decoder_splice, threads=threads, device=device)
        save_ckpt({})  # records the time spent in the budget
    latents = _load_tensors(lat_path)["latents"].to(dev) * float(state["scaling_factor"])
    vae.register_to_config(scaling_factor=float(state["scaling_factor"]))

    # ================= phase 3: UNet (+ text encoder) =================
    # A text encoder trained jointly from scratch collapsed: the UNet first learnt colour words (at
    # every noise level), and the encoder then shrank every other distinction it was not yet
    # rewarded for ("square" vs "circle" 1.5% apart, against 23% at its random init). Frozen at
    # its seeded random init it keeps every word and word order apart, and the UNet's
    # cross-attention learns to read it.
    text_encoder.requires_grad_(train_text_encoder)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text_encoder else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2, betas=(0.9, 0.99))
    ema = [p.detach().clone() for p in params]
    if os.path.exists(os.path.join(ckpt, "unet.safetensors")):
        unet.load_state_dict(_load_tensors(os.path.join(ckpt, "unet.safetensors")))
        if not reset_text_encoder:
            text_encoder.load_state_dict(_load_tensors(os.path.join(ckpt, "text_encoder.safetensors")), strict=False)
            ema_sd = _load_tensors(os.path.join(ckpt, "ema.safetensors"))
            ema = [ema_sd[str(i)].to(dev) for i in range(len(params))]
            if os.path.exists(os.path.join(ckpt, "unet_opt.safetensors")):
                _opt_from_flat(opt, _load_tensors(os.path.join(ckpt, "unet_opt.safetensors")))
        else:
            ema = [p.detach().clone() for p in params]
    noise_sched = DDPMScheduler(
        **{k: v for k, v in scheduler_config(prediction_type, zero_terminal_snr).items() if k not in ("set_alpha_to_one", "steps_offset")}
    )
    alphas_cumprod = noise_sched.alphas_cumprod.to(dev)
    snr_all = alphas_cumprod / (1 - alphas_cumprod)

    def unet_ckpt() -> None:
        flat, groups = _opt_to_flat(opt)
        save_ckpt(
            {
                "unet": unet.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "ema": {str(i): e for i, e in enumerate(ema)},
                "unet_opt": flat,
            },
            groups,
        )

    forcing = AttentionForcing()
    attention_sink = _record_cross_attention(unet, forcing) if grounding_weight > 0 or attention_forcing > 0 else None
    grid = int(latents.shape[-1])
    scene_masks: dict[int, torch.Tensor] = {}
    word_lengths: dict[str, int] = {}

    def grounding_targets(idx_np: np.ndarray, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return object_token_targets(tokenizer, scenes, idx_np, texts, grid, scene_masks, word_lengths, dev)

    pool_probs = scene_sampling_probs(scenes, colour_weights) if colour_weights else None
    if state["phase"] == "unet":
        unet.train()
        text_encoder.train(train_text_encoder)
        reserve = 60.0  # seconds kept for the export
        last_ck = time.time()
        t_measure = None
        bar = tqdm(desc="unet", unit="step", initial=state["unet_step"], total=state["planned_steps"], file=sys.stderr, mininterval=10.0)
        ema_loss = ema_g = None
        while True:
            step = state["unet_step"]
            planned = state["planned_steps"]
            if planned is not None and step >= planned:
                break
            if elapsed() > budget - reserve:
                _log("time budget reached")
                break
            if step == state.get("measure_from", -1) + 20 and planned is None and t_measure is not None:
                per_step = (time.time() - t_measure) / 20.0
                left = budget - reserve - elapsed()
                state["planned_steps"] = planned = step + int(left / per_step)
                if max_steps is not None:
                    state["planned_steps"] = planned = min(planned, max_steps)
                bar.total = planned
                _log(f"{per_step:.3f}s/step ({batch_size / per_step:.1f} img/s) -> planning {planned} UNet steps")
                if attention_forcing > 0 and float(state["attention_forcing_from"]) > 0:
                    _log(f"attention forcing {attention_forcing} from UNet step {_forcing_start_step(state)}")
            if step == 5 and state.get("planned_steps") is None and t_measure is None:
                t_measure = time.time()
                state["measure_from"] = step
            if t_measure is None and state.get("planned_steps") is None and step > 5:
                t_measure = time.time()
                state["measure_from"] = step
            rng = np.random.default_rng([seed, 2, step])
            idx = rng.integers(0, pool_size, batch_size) if pool_probs is None else rng.choice(pool_size, batch_size, p=pool_probs)
            texts = ["" if rng.random() < cond_drop else caption(scenes[int(i)], rng) for i in idx]
            ids = tokenizer(texts, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True, return_tensors="pt").input_ids.to(dev)
            x0 = latents[torch.from_numpy(idx).to(dev)]
            g_noise = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + 7 + step)
            noise = torch.randn(x0.shape, generator=g_noise).to(dev)
            t = sample_timesteps(batch_size, g_noise, high_noise_fraction if step >= high_noise_from_step else 0.0).to(dev)
            noisy = noise_sched.add_noise(x0, noise, t)
            plan = planned or max(step + 1, warmup * 10)
            frac = min(1.0, max(0.0, (step - warmup) / max(1, plan - warmup)))
            cur_lr = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            for g in opt.param_groups:
                g["lr"] = cur_lr
            if train_text_encoder:
                hidden = text_encoder(ids)[0]
            else:
                with torch.no_grad():
                    hidden = text_encoder(ids)[0]
            token_maps = None
            if attention_sink is not None:
                attention_sink.clear()
                token_maps = grounding_targets(idx, texts)
                if attention_forcing > 0 and _forcing_active(state, step):
                    rows = torch.from_numpy(rng.random(batch_size) < attention_forcing) & token_maps[1].any(1).cpu()
                    if bool(rows.any()):
                        forcing.rows, forcing.targets, forcing.supervised, forcing.token_share = rows.to(dev), *token_maps
            pred = unet(noisy, t, hidden).sample
            forcing.rows = None
            target = noise_sched.get_velocity(x0, noise, t) if prediction_type == "v_prediction" else noise
            w = loss_weight(snr_all[t], prediction_type, min_snr_gamma)
            squared_error = (pred - target).pow(2)
            if object_loss_weight > 0:
                cell_weight = object_loss_weights(scenes, idx, grid, scene_masks, object_loss_weight, dev)
                loss = (w * (squared_error * cell_weight[:, None]).mean(dim=(1, 2, 3))).mean() / cell_weight.mean()
            else:
                loss = (w * squared_error.mean(dim=(1, 2, 3))).mean()
            g_loss = None
            if attention_sink is not None and grounding_weight > 0:
                g_loss = grounding_loss(attention_sink, *token_maps[:2])
                loss = loss + grounding_weight * g_loss
            if attention_sink is not None:
                attention_sink.clear()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            ema_step = step - int(state.get("ema_from_step", 0))
            d = min(ema_decay, (1 + ema_step) / (10 + ema_step))
            with torch.no_grad():
                torch._foreach_mul_(ema, d)
                torch._foreach_add_(ema, [p.detach() for p in params], alpha=1 - d)
            state["unet_step"] = step + 1
            ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
            if g_loss is not None:
                ema_g = g_loss.item() if ema_g is None else 0.98 * ema_g + 0.02 * g_loss.item()
            bar.update(1)
            if (step + 1) % log_every == 0:
                grounding = "" if ema_g is None else f" (grounding {ema_g:.4f})"
                _log(f"unet step {step + 1}/{planned} loss {ema_loss:.4f}{grounding} lr {cur_lr:.2e} elapsed {elapsed() / 60:.1f}min")
            if time.time() - last_ck > checkpoint_minutes * 60.0:
                unet_ckpt()
                last_ck = time.time()
        bar.close()
        state["phase"] = "export"
        unet_ckpt()

    # ================= phase 4: export =================
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    ft = os.path.join(work_dir, "vae_decoder_ft.safetensors")
    if os.path.exists(ft):  # decoder fine-tuned by finetune_decoder() (same encoder, same latents)
        vae.load_state_dict(_load_tensors(ft))
        _log(f"exporting with the fine-tuned decoder {ft}")
    _export(out_dir, vae, text_encoder, tokenizer, unet, _prediction_type(state), _zero_terminal_snr(state))
    state["phase"] = "done"
    save_ckpt({})
    _log(f"wrote {out_dir} ({_dir_mb(out_dir):.1f} MB); total {elapsed() / 60:.1f} min")
    return out_dir


def scene_sampling_probs(scenes: list[Any], colour_weights: dict[str, float]) -> np.ndarray:
    """Probability of drawing each pool scene for a UNet batch: proportional to the largest of
    ``colour_weights`` over the scene's objects' colours (1 for a colour not named)."""
    w = np.array([max(float(colour_weights.get(o.colour, 1.0)) for o in sc.objects) for sc in scenes], dtype=np.float64)
    return w / w.sum()


def _forcing_start_step(state: dict[str, Any]) -> int | None:
    """The UNet step attention forcing starts at: ``attention_forcing_from`` x the planned steps,
    0 when it is not delayed, None while a delayed start has no plan to measure from."""
    start = float(state.get("attention_forcing_from", 0.0))
    if start == 0.0:
        return 0
    planned = state.get("planned_steps")
    return None if planned is None else int(start * int(planned))


def _forcing_active(state: dict[str, Any], step: int) -> bool:
    start = _forcing_start_step(state)
    return start is not None and step >= start


def _require_share(name: str, value: float) -> None:
    if not (math.isfinite(float(value)) and 0.0 <= float(value) <= 1.0):
        raise InvalidOptionError(f"{name} must be a share in [0, 1], got {value}")


def _decoder_batch(
    rng: np.random.Generator,
    step: int,
    lat: torch.Tensor,
    pool_u8: torch.Tensor,
    bg: torch.Tensor,
    *,
    batch_size: int,
    crop: int,
    splice_share: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoder fine-tune batch from the pool: latents ``(B, C, h, w)``, target pixels
    ``(B, 3, 4h, 4w)`` in [-1, 1] and each pixel's background colour ``(B, 3, 4h, 4w)``.

    ``lat`` is ``(N, C, 16, 16)``, ``pool_u8`` ``(N, 64, 64, 3)`` and ``bg`` ``(N, 3)``. A spliced batch
    (drawn with probability ``splice_share``) is full size; otherwise the batch is a random
    ``crop`` x ``crop`` latent window, full size every 4th step.
    """
    idx = torch.from_numpy(rng.integers(0, lat.shape[0], batch_size))
    z = lat[idx]
    x = _to_pixels(pool_u8[idx])
    b = bg[idx][:, :, None, None].expand_as(x)
    if splice_share > 0.0 and rng.random() < splice_share:
        other = torch.from_numpy(rng.integers(0, lat.shape[0], batch_size))
        cut = _splice_masks(rng, batch_size, z.shape[-1])
        cut_px = cut.repeat_interleave(4, dim=-2).repeat_interleave(4, dim=-1)
        z = cut * z + (1.0 - cut) * lat[other]
        x = cut_px * x + (1.0 - cut_px) * _to_pixels(pool_u8[other])
        b = cut_px * b + (1.0 - cut_px) * bg[other][:, :, None, None]
    else:
        c = crop if (crop and step % 4 != 3) else z.shape[-1]
        oy, ox = (int(v) for v in rng.integers(0, z.shape[-1] - c + 1, 2))
        z = z[:, :, oy : oy + c, ox : ox + c]
        x = x[:, :, oy * 4 : (oy + c) * 4, ox * 4 : (ox + c) * 4]
        b = b[:, :, oy * 4 : (oy + c) * 4, ox * 4 : (ox + c) * 4]
    return z, x, b


def _splice_masks(rng: np.random.Generator, count: int, size: int) -> torch.Tensor:
    """(count, 1, size, size) float masks, each 1 inside one random axis-aligned rectangle whose
    sides are 3 to 9 latent pixels (clipped to ``size``) and 0 elsewhere."""
    masks = torch.zeros(count, 1, size, size)
    for k in range(count):
        h, w = (int(v) for v in rng.integers(3, min(9, size) + 1, 2))
        y0, x0 = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        masks[k, :, y0 : y0 + h, x0 : x0 + w] = 1.0
    return masks


def _decoder_minutes_done(work_dir: str) -> float:
    path = os.path.join(work_dir, "vae_decoder_ft.json")
    if not os.path.exists(path):
        return 0.0
    with open(path, encoding="utf-8") as f:
        return float(json.load(f)["elapsed"]) / 60.0


def finetune_decoder(
    work_dir: str = "runs/shapes",
    *,
    seed: int = 0,
    minutes: float = 20.0,
    batch_size: int = 16,
    lr: float = 5e-4,
    crop: int = 8,
    latent_noise: float = 0.1,
    object_weight: float = 4.0,
    splice_share: float = 0.0,
    threads: int | None = 2,
    checkpoint_minutes: float = 3.0,
    device: str | None = None,
) -> str:
    """Fine-tune only the VAE decoder (encoder frozen, so the latent space and the UNet are
    unaffected) on the pre-encoded pool; resumable. Writes ``work_dir/vae_decoder_ft.safetensors``
    (a full VAE state dict) which :func:`export_checkpoint` then prefers.

    Trains on random ``crop`` x ``crop`` latent crops (every 4th step the full 16x16), with Gaussian
    noise of ``latent_noise`` x the latent std added to the posterior mean (robustness to imperfect
    UNet samples), and pixels that are not background weighted ``1 + object_weight`` (colours of
    objects matter most).

    ``splice_share`` of the steps instead decode spliced latents: each sample is two pool scenes
    cut by a random rectangle (3 to 9 latent pixels a side), and its target is the same cut of their
    pixels. This teaches the decoder to keep each region's colours whatever the rest of the latent
    holds, which is what LocalBlend needs: it keeps the source latent outside its mask, and a
    decoder that mixes in global statistics repaints the kept background anyway.
    """
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    _require_share("splice_share", splice_share)

    if threads and not torch.cuda.is_available():
        torch.set_num_threads(threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = os.path.join(work_dir, "ckpt")
    lat_files = sorted(n for n in os.listdir(work_dir) if n.startswith(f"latents_{seed}_") and n.endswith(".safetensors"))
    if not lat_files:
        raise FileNotFoundError(f"no pre-encoded latents in {work_dir}; run train() past its encode phase first")
    lat_path = os.path.join(work_dir, lat_files[-1])
    lat = _load_tensors(lat_path)["latents"]
    pool_size = lat.shape[0]
    scenes = [item_scene(i, seed)[0] for i in range(pool_size)]
    pool_u8 = torch.from_numpy(np.stack([render_array(s_, 64) for s_ in scenes]))
    bg = torch.stack([torch.tensor(BACKGROUNDS[s_.background], dtype=torch.float32) for s_ in scenes]) / 127.5 - 1.0
    out_path = os.path.join(work_dir, "vae_decoder_ft.safetensors")
    opt_path = os.path.join(work_dir, "vae_decoder_ft_opt.safetensors")
    st_path = os.path.join(work_dir, "vae_decoder_ft.json")
    vae = AutoencoderKL(**vae_config())
    st = {"step": 0, "elapsed": 0.0}
    if os.path.exists(out_path) and os.path.exists(st_path):
        vae.load_state_dict(_load_tensors(out_path))
        with open(st_path, encoding="utf-8") as f:
            st = json.load(f)
    else:
        vae.load_state_dict(_load_tensors(os.path.join(ckpt, "vae.safetensors")))
    vae.to(dev).train()
    dec_params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p_ in vae.parameters():
        p_.requires_grad_(False)
    for p_ in dec_params:
        p_.requires_grad_(True)
    opt = torch.optim.AdamW(dec_params, lr=lr, weight_decay=0.0)
    if os.path.exists(opt_path):
        _opt_from_flat(opt, _load_tensors(opt_path))
    lat_std = float(lat.std())
    t0, last_ck = time.time(), time.time()
    el0 = float(st["elapsed"])
    bar = tqdm(desc="decoder", unit="step", initial=st["step"], file=sys.stderr, mininterval=10.0)
    ema_loss = None

    def save() -> None:
        st["elapsed"] = el0 + (time.time() - t0)
        flat, groups = _opt_to_flat(opt)
        _atomic_save_tensors(out_path, vae.state_dict())
        _atomic_save_tensors(opt_path, flat)
        _atomic_json(st_path, dict(st, optimizer_param_groups=groups, latents=lat_path, splice_share=float(splice_share)))

    while el0 + (time.time() - t0) < minutes * 60.0:
        step = st["step"]
        rng = np.random.default_rng([seed, 3, step])
        z, x, b = _decoder_batch(rng, step, lat, pool_u8, bg, batch_size=batch_size, crop=crop, splice_share=splice_share)
        g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + 11 + step)
        z = z + latent_noise * lat_std * torch.randn(z.shape, generator=g)
        z, x, b = z.to(dev), x.to(dev), b.to(dev)
        rec = vae.decode(z).sample
        w = 1.0 + object_weight * ((x - b).abs().amax(dim=1, keepdim=True) > 0.1).float()
        loss = (w * ((rec - x).abs() + (rec - x).pow(2))).mean() / w.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec_params, 1.0)
        opt.step()
        st["step"] = step + 1
        ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        bar.update(1)
        if (step + 1) % 50 == 0:
            _log(f"decoder step {step + 1} loss {ema_loss:.4f}")
        if time.time() - last_ck > checkpoint_minutes * 60.0:
            save()
            last_ck = time.time()
    bar.close()
    save()
    _log(f"decoder fine-tune: {st['step']} steps, {st['elapsed'] / 60:.1f} min -> {out_path}")
    return out_path


def _start_from_model(model_dir: str, ckpt: str, state: dict[str, Any], *, train_text_encoder: bool, text_encoder_layers: int | None) -> None:
    """Write a new run's first checkpoint from the exported shapes folder ``model_dir`` and set
    ``state`` to go on from it (encode the pool with its VAE, then train its UNet)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    model_dir = os.path.abspath(model_dir)
    try:
        with open(os.path.join(model_dir, "scheduler", "scheduler_config.json"), encoding="utf-8") as f:
            sched = json.load(f)
        vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
        text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    except (OSError, ValueError) as e:
        raise InvalidOptionError(f"init_from={model_dir!r} is not an exported shapes model folder ({e})") from e
    for name, model, expected in (("vae", vae, vae_config()), ("unet", unet, unet_config())):
        differs = sorted(k for k, v in expected.items() if _as_json(model.config.get(k)) != _as_json(v))
        if differs:
            raise InvalidOptionError(
                f"init_from={model_dir!r}: its {name} is not the shapes architecture this script trains (differs in {differs}); "
                "fine-tune only folders written by train-shapes"
            )
    layers = int(text_encoder.config.num_hidden_layers)
    if text_encoder_layers is not None and int(text_encoder_layers) != layers:
        raise InvalidOptionError(f"init_from={model_dir!r} has a {layers}-layer text encoder, not {text_encoder_layers}; leave text_encoder_layers unset")
    state.update(
        phase="encode", init_from=model_dir, prediction_type=str(sched.get("prediction_type", "epsilon")),
        zero_terminal_snr=bool(sched.get("rescale_betas_zero_snr", False)), text_encoder_layers=layers,
        train_text_encoder=train_text_encoder, scaling_factor=float(vae.config.scaling_factor),
    )
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text_encoder else [])
    tmp = ckpt + ".new"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, tensors in (
        ("vae", vae.state_dict()),
        ("unet", unet.state_dict()),
        ("text_encoder", text_encoder.state_dict()),
        ("ema", {str(i): p.detach() for i, p in enumerate(params)}),
    ):
        _atomic_save_tensors(os.path.join(tmp, name + ".safetensors"), {k: v.contiguous() for k, v in tensors.items()})
    _atomic_json(os.path.join(tmp, "state.json"), state)
    _swap_dir(tmp, ckpt)
    _log(f"starting from {model_dir}: {layers}-layer text encoder, {state['prediction_type']}, "
         f"zero_terminal_snr={state['zero_terminal_snr']}, scaling_factor {state['scaling_factor']:.4f}")


def _as_json(value: Any) -> Any:
    """A config value as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def _prediction_type(state: dict[str, Any]) -> str:
    """The target a checkpoint was trained on (checkpoints from before v-prediction: epsilon)."""
    return str(state.get("prediction_type", "epsilon"))


def _zero_terminal_snr(state: dict[str, Any]) -> bool:
    """Whether a checkpoint's noise schedule is zero-terminal-SNR (checkpoints from before it: no)."""
    return bool(state.get("zero_terminal_snr", False))


def _text_encoder_layers(state: dict[str, Any]) -> int:
    return int(state.get("text_encoder_layers", 3))  # checkpoints from before the switch had 3


def _dir_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs) / 2**20


def _export(out_dir: str, vae, text_encoder, tokenizer, unet, prediction_type: str, zero_terminal_snr: bool) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # training calls it with padding="max_length": a fast tokenizer keeps that in its state, and
        # a saved tokenizer.json would then pad every text a user tokenises to 32 tokens
        backend.no_padding()
        backend.no_truncation()
    pipe = StableDiffusionPipeline(
        vae=vae.eval().cpu(),
        text_encoder=text_encoder.eval().cpu(),
        tokenizer=tokenizer,
        unet=unet.eval().cpu(),
        scheduler=DDIMScheduler(**scheduler_config(prediction_type, zero_terminal_snr)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out_dir = os.path.abspath(out_dir)
    tmp = out_dir + ".tmp"
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    # vocab.json + merges.txt too, so the slow CLIPTokenizer of older transformers loads the folder
    write_vocab_files(os.path.join(tmp, "tokenizer"))
    _swap_dir(tmp, out_dir)


def export_checkpoint(work_dir: str, out_dir: str, *, use_ema: bool = True) -> str:
    """Write a diffusers folder from the latest checkpoint in ``work_dir`` (e.g. to sample mid-run).

    Uses ``work_dir/vae_decoder_ft.safetensors`` (from :func:`finetune_decoder`) when present."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    ckpt = os.path.join(work_dir, "ckpt")
    with open(os.path.join(ckpt, "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    tokenizer = build_tokenizer(os.path.join(out_dir + ".tok"))
    shutil.rmtree(out_dir + ".tok", ignore_errors=True)
    vae = AutoencoderKL(**vae_config())
    ft = os.path.join(work_dir, "vae_decoder_ft.safetensors")
    vae.load_state_dict(_load_tensors(ft if os.path.exists(ft) else os.path.join(ckpt, "vae.safetensors")))
    vae.register_to_config(scaling_factor=float(state["scaling_factor"]))
    unet = UNet2DConditionModel(**unet_config())
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(tokenizer, _text_encoder_layers(state))))
    unet.load_state_dict(_load_tensors(os.path.join(ckpt, "unet.safetensors")))
    text_encoder.load_state_dict(_load_tensors(os.path.join(ckpt, "text_encoder.safetensors")), strict=False)
    if use_ema:
        ema = _load_tensors(os.path.join(ckpt, "ema.safetensors"))
        # EMA entries: the UNet's parameters, then the text encoder's when it was trained
        params = list(unet.parameters()) + list(text_encoder.parameters())
        with torch.no_grad():
            for i, p in enumerate(params):
                if str(i) in ema:
                    p.copy_(ema[str(i)])
    _export(out_dir, vae, text_encoder, tokenizer, unet, _prediction_type(state), _zero_terminal_snr(state))
    return out_dir

_CLI_DOC = """Train attnctrl's embedded shapes model from scratch (resumable).

Example (two hours on a 2-core CPU):
    attnctrl train-shapes --out attnctrl/models/shapes/model --work runs/shapes --minutes 120
    attnctrl train-shapes --out attnctrl/models/shapes/model --work runs/shapes --minutes 120 --resume
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="attnctrl train-shapes", description=_CLI_DOC, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="attnctrl/models/shapes/model", help="diffusers folder to write")
    p.add_argument("--work", default="runs/shapes", help="work dir for checkpoints and latents")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=120.0, help="total wall-clock budget (over resumes)")
    p.add_argument("--vae-minutes", type=float, default=10.0)
    p.add_argument("--max-steps", type=int, default=None, help="cap on UNet steps")
    p.add_argument("--pool", type=int, default=10_000, help="number of pre-rendered scenes")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vae-batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prediction-type", choices=("v_prediction", "epsilon"), default="v_prediction",
                   help="UNet target (default v_prediction; a resumed run keeps its checkpoint's)")
    p.add_argument("--zero-terminal-snr", choices=("on", "off"), default=None,
                   help="noise schedule with SNR 0 at t=999 (default: on for v_prediction; a resumed run keeps "
                        "its checkpoint's unless this is given, and then switches from its current step)")
    p.add_argument("--high-noise-fraction", type=float, default=None,
                   help=f"share of each batch drawn from t >= {HIGH_NOISE_START} (default 0.5 for a new run; a resumed run "
                        "keeps its checkpoint's unless this is given)")
    p.add_argument("--text-encoder", choices=("frozen", "trained"), default=None,
                   help="keep the text encoder at its seeded random init (default for a new run) or train it with "
                        "the UNet; 'frozen' on a resumed jointly-trained run re-initialises and freezes it there")
    p.add_argument("--text-encoder-layers", type=int, default=None,
                   help=f"transformer layers of the text encoder (default {TEXT_ENCODER_LAYERS} for a new run: each token's "
                        "feature depends on that word and its position only); a different count on a resumed run "
                        "re-initialises the encoder from its seed there")
    p.add_argument("--grounding-weight", type=float, default=None,
                   help=f"weight of the loss that keeps each object word's cross-attention on its object (default "
                        f"{GROUNDING_WEIGHT} for a new run, 0 to switch it off; a resumed run keeps its checkpoint's unless "
                        "this is given)")
    p.add_argument("--attention-forcing", type=float, default=None, metavar="FRACTION",
                   help="share of captioned samples whose cross-attention maps are replaced by their objects' exact "
                        "masks, so the maps decide where objects are drawn (default 0; a resumed run keeps its "
                        "checkpoint's unless this is given)")
    p.add_argument("--attention-forcing-from", type=float, default=None, metavar="FRACTION",
                   help="hold --attention-forcing off until this share of the planned UNet steps is done (default 0; "
                        "fixed once the UNet phase starts)")
    p.add_argument("--object-loss-weight", type=float, default=None, metavar="W",
                   help="weight the denoising loss 1+W on the latent cells the objects cover and their border "
                        "(normalised to mean 1 per batch; default 0 for a new run; a resumed run keeps its "
                        "checkpoint's unless this is given)")
    p.add_argument("--decoder-minutes", type=float, default=0.0,
                   help="minutes of the budget that fine-tune the VAE decoder (encoder frozen) after the VAE phase, "
                        "before the UNet (default 0; same as a separate --finetune-decoder run)")
    p.add_argument("--decoder-splice", type=float, default=0.0, metavar="SHARE",
                   help="share of decoder fine-tune steps on two scenes' latents cut by a random rectangle, so a "
                        "region decodes the same whatever surrounds it (what LocalBlend needs; default 0)")
    p.add_argument("--occupancy-latent", choices=("on", "off"), default=None,
                   help="shape the VAE latent so channel 0 says where objects are, shared by every colour (default off; "
                        "fixed once the VAE has trained; see the README for what it changed)")
    p.add_argument("--init-from", default=None, metavar="MODEL_DIR",
                   help="start a new run from an exported shapes folder ('shapes': the shipped weights) and fine-tune "
                        "it: the VAE phase is skipped and the UNet phase starts at step 0 with a fresh optimiser and "
                        "schedule (use a new --work dir)")
    p.add_argument("--oversample", action="append", default=None, metavar="COLOUR=WEIGHT",
                   help="draw pool scenes with an object of COLOUR WEIGHT times as often in the UNet batches "
                        "(repeatable, e.g. --oversample purple=3; default none; a resumed run keeps its checkpoint's)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --work")
    p.add_argument("--export-checkpoint", action="store_true", help="only export --work's checkpoint to --out")
    p.add_argument("--finetune-decoder", type=float, default=None, metavar="MINUTES",
                   help="only fine-tune the VAE decoder on --work's pre-encoded latents for MINUTES (resumable)")
    a = p.parse_args(argv)
    try:
        colour_weights = _parse_oversample(a.oversample)
    except InvalidOptionError as exc:
        p.error(str(exc))
    if a.finetune_decoder is not None:
        finetune_decoder(a.work, seed=a.seed, minutes=a.finetune_decoder, splice_share=a.decoder_splice, threads=a.threads, device=a.device)
        return 0
    if a.export_checkpoint:
        export_checkpoint(a.work, a.out)
        return 0
    train(
        a.out,
        work_dir=a.work,
        seed=a.seed,
        minutes=a.minutes,
        vae_minutes=a.vae_minutes,
        max_steps=a.max_steps,
        pool_size=a.pool,
        batch_size=a.batch_size,
        lr=a.lr,
        warmup=a.warmup,
        vae_batch_size=a.vae_batch_size,
        checkpoint_minutes=a.checkpoint_minutes,
        resume=a.resume,
        device=a.device,
        threads=a.threads,
        prediction_type=a.prediction_type,
        zero_terminal_snr=None if a.zero_terminal_snr is None else a.zero_terminal_snr == "on",
        high_noise_fraction=a.high_noise_fraction,
        train_text_encoder=None if a.text_encoder is None else a.text_encoder == "trained",
        text_encoder_layers=a.text_encoder_layers,
        grounding_weight=a.grounding_weight,
        attention_forcing=a.attention_forcing,
        attention_forcing_from=a.attention_forcing_from,
        object_loss_weight=a.object_loss_weight,
        decoder_minutes=a.decoder_minutes,
        decoder_splice=a.decoder_splice,
        occupancy_latent=None if a.occupancy_latent is None else a.occupancy_latent == "on",
        init_from=resolve_model_folder(a.init_from),
        colour_weights=colour_weights,
    )
    return 0


def _parse_oversample(items: list[str] | None) -> dict[str, float] | None:
    if items is None:
        return None
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value) if sep else float("nan")
        except ValueError:
            out[name.strip()] = float("nan")
        if not sep or not math.isfinite(out[name.strip()]):
            raise InvalidOptionError(f"--oversample takes COLOUR=WEIGHT (e.g. purple=3), got {item!r}")
    return out


def resolve_model_folder(name: str | None) -> str | None:
    """A folder path, or an embedded model's name ("shapes", "shapes-flow") resolved to its folder."""
    if name in ("shapes", "shapes-flow"):
        from .. import SHAPES, SHAPES_FLOW

        return SHAPES if name == "shapes" else SHAPES_FLOW
    return name



if __name__ == "__main__":
    raise SystemExit(main())
