"""Train the embedded flow-matching shapes model (``attnctrl.models.SHAPES_FLOW``): a tiny SD3-shaped MM-DiT.

The folder is a stock ``StableDiffusion3Pipeline`` (``SD3Transformer2DModel``,
``FlowMatchEulerDiscreteScheduler``, ``AutoencoderKL``, two ``CLIPTextModelWithProjection`` and their
tokenizers, and for T5 a stand-in whose output is exactly zero, :func:`null_text_encoder`: what the
pipeline does without T5, 256 zero tokens). Only the transformer is trained; everything else comes
from the shipped shapes model:

* VAE: the shapes model's VAE, unchanged; only its config's ``shift_factor`` (mean) and
  ``scaling_factor`` (1 / std) are set from the pre-encoded pool, as SD3's pipeline expects.
* text encoders: built from the shapes model's frozen CLIP text encoder (see
  :func:`text_encoders_from_shapes`): its token and position embeddings, rescaled to unit RMS,
  are the per-token features SD3 reads (``hidden_states[-2]``); encoder 2 sees them through a seeded
  random rotation; one seeded random CLIP layer + projection per encoder gives the pooled vector.

Phases (state in ``work_dir``; ``resume=True`` continues where a run stopped):

1. ``encode``: the deterministic pool of scenes is rendered and encoded once with the frozen VAE
   (posterior mean); shift = mean, scale = 1 / std.
2. ``transformer``: rectified flow, as ``FlowMatchEulerDiscreteScheduler`` integrates it:
   ``x_t = (1 - t) x0 + t noise`` with ``sigma = t`` and ``timestep = 1000 t``, target
   ``noise - x0``; ``t`` logit-normal (SD3) or uniform; 10% empty captions for classifier-free
   guidance; a grounding loss (:func:`attnctrl.models.shapes.train.grounding_loss`) on each
   block's image-to-word attention; AdamW, warm-up + cosine, EMA.
3. ``export``: the stock SD3 folder (EMA weights), written to a temporary folder and renamed.

The 256 zero "T5" tokens are identical in every block (SD3 gives text tokens no position, every op
but attention is per token, and identical queries attend identically), so in attention they act as
ONE token whose logit is raised by ``ln 256``. Training uses that one token
(:class:`JointAttentionWithNullTokens`), which is exact for the pipeline's default
``max_sequence_length=256`` and 3.6x cheaper than 288 text tokens.

Deterministic for a seed: step ``k``'s scenes, captions, noise and times come from generators seeded
by (seed, k), so a resumed run sees what an uninterrupted one would. Checkpoints are safetensors +
JSON in a temporary folder renamed into place.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import caption, item_scene, render_array
from .tokenizer import MODEL_MAX_LENGTH, write_vocab_files
from .train import (AttentionForcing, cached_object_masks, forced_attention, grounding_loss, object_loss_weights,
                    object_token_targets, resolve_model_folder)
from ...errors import InvalidOptionError
from ...io import atomic_write_bytes, write_json_atomic

__all__ = [
    "FlowModelConfig",
    "FlowTrainConfig",
    "JointAttentionWithNullTokens",
    "transformer_config",
    "text_encoders_from_shapes",
    "null_text_encoder",
    "encode_prompts",
    "sample_flow_times",
    "flow_matching_pair",
    "train_flow",
    "export_flow_checkpoint",
    "main",
]

#: Zero "T5" tokens the SD3 pipeline appends when ``text_encoder_3`` is None (its default
#: ``max_sequence_length``); the model is trained as if they were there.
NULL_TEXT_TOKENS = 256


@dataclass(frozen=True)
class FlowModelConfig:
    """Shape of the SD3 transformer (16x16x4 latents; ``patch_size`` 2 gives 8x8 image tokens)."""

    num_layers: int = 5
    num_attention_heads: int = 3
    attention_head_dim: int = 32
    patch_size: int = 2
    text_layer_width: int = 128
    """Intermediate size of the one random CLIP layer that makes each text encoder's pooled vector."""


@dataclass(frozen=True)
class FlowTrainConfig:
    """Hyper-parameters of a flow-matching run (fixed when the run starts; a resume keeps them)."""

    seed: int = 0
    pool_size: int = 10_000
    batch_size: int = 64
    lr: float = 6e-4
    warmup: int = 200
    weight_decay: float = 1e-2
    cond_drop: float = 0.1
    ema_decay: float = 0.999
    time_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    grounding_weight: float = 0.1
    attention_forcing: float = 0.0
    """Share of the captioned samples whose image-to-word attention is forced onto the objects
    (:class:`JointAttentionWithNullTokens`), so that the model draws an object where its words are
    attended: the map Prompt-to-Prompt's Replace hands from the source to the edit."""
    object_loss_weight: float = 0.0
    """Extra weight of the flow loss on the latent cells an object covers or borders (the objects'
    coverage on the latent grid, dilated by one cell): the weight there is ``1 + object_loss_weight``,
    1 elsewhere, normalised to a mean of 1 per batch. Raises the share of the loss that draws the
    outlines, which a plain mean lets the background outweigh most for thin shapes and for colours
    close to the background's."""
    null_text_tokens: int = NULL_TEXT_TOKENS

    def validate(self) -> None:
        if self.time_sampling not in ("logit_normal", "uniform"):
            raise InvalidOptionError(f"time_sampling must be 'logit_normal' or 'uniform', got {self.time_sampling!r}")
        for name in ("pool_size", "batch_size", "null_text_tokens"):
            if int(getattr(self, name)) < 1:
                raise InvalidOptionError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "ema_decay", "logit_std"):
            if not (math.isfinite(float(getattr(self, name))) and float(getattr(self, name)) > 0):
                raise InvalidOptionError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if not 0.0 <= self.cond_drop < 1.0:
            raise InvalidOptionError(f"cond_drop must be in [0, 1), got {self.cond_drop}")
        if not (math.isfinite(self.grounding_weight) and self.grounding_weight >= 0):
            raise InvalidOptionError(f"grounding_weight must be a finite number >= 0, got {self.grounding_weight}")
        if not 0.0 <= self.attention_forcing <= 1.0:
            raise InvalidOptionError(f"attention_forcing must be in [0, 1], got {self.attention_forcing}")
        if not (math.isfinite(self.object_loss_weight) and self.object_loss_weight >= 0):
            raise InvalidOptionError(f"object_loss_weight must be a finite number >= 0, got {self.object_loss_weight}")


def transformer_config(model: FlowModelConfig = FlowModelConfig()) -> dict[str, Any]:
    """``SD3Transformer2DModel`` kwargs: 4-channel 16x16 latents, two 128-wide CLIP encoders (joint
    dim 256 = their concatenated token features, pooled dim 256 = their concatenated projections)."""
    inner = model.num_attention_heads * model.attention_head_dim
    return dict(
        sample_size=16,
        patch_size=model.patch_size,
        in_channels=4,
        out_channels=4,
        num_layers=model.num_layers,
        attention_head_dim=model.attention_head_dim,
        num_attention_heads=model.num_attention_heads,
        joint_attention_dim=256,
        caption_projection_dim=inner,
        pooled_projection_dim=256,
        pos_embed_max_size=32 // model.patch_size,  # up to 128x128 images
        qk_norm="rms_norm",
    )


def scheduler_config(shift: float = 1.0) -> dict[str, Any]:
    """``FlowMatchEulerDiscreteScheduler`` kwargs of the exported folder."""
    return dict(num_train_timesteps=1000, shift=float(shift))


# ------------------------------------------------------------------------------------------------
# Text encoders from the shapes model's
# ------------------------------------------------------------------------------------------------


def text_encoders_from_shapes(shapes_dir: str, seed: int = 0, model: FlowModelConfig = FlowModelConfig()):
    """Two frozen ``CLIPTextModelWithProjection`` built from the shapes model's text encoder.

    SD3 reads ``hidden_states[-2]`` of each encoder as the per-token features: with ONE CLIP layer
    that is the embedding output, token + position embedding, so a word's feature depends on that
    word and its place only (what Prompt-to-Prompt word swaps need; the shapes model chose a
    0-layer encoder for the same reason). Those embeddings are the shapes encoder's, multiplied by
    one constant so the features have unit RMS (its random init has std 0.02, which a freshly
    initialised ``context_embedder`` would first have to learn to amplify). Encoder 2 gets the same
    embeddings turned by a seeded random orthogonal matrix. The layer and the projection (they make
    only the pooled vector) are seeded random. Returns ``(text_encoder, text_encoder_2)``.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    source = CLIPTextModel.from_pretrained(shapes_dir, subfolder="text_encoder")
    # transformers 5 puts the embeddings on the model itself, 4.x under .text_model
    src = getattr(source, "text_model", source).embeddings
    token = src.token_embedding.weight.detach()
    position = src.position_embedding.weight.detach()
    features = token[:, None, :] + position[None, :, :]
    gain = 1.0 / float(features.pow(2).mean().sqrt())
    base = source.config.to_dict()
    config = CLIPTextConfig(**{
        **{k: base[k] for k in ("vocab_size", "hidden_size", "num_attention_heads", "max_position_embeddings",
                                "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id", "layer_norm_eps")},
        "num_hidden_layers": 1,
        "intermediate_size": model.text_layer_width,
        "projection_dim": base["hidden_size"],
    })
    encoders = []
    for index in range(2):
        torch.manual_seed(seed * 7919 + 101 + index)
        encoder = CLIPTextModelWithProjection(config)
        rotation = torch.eye(token.shape[1])
        if index == 1:
            generator = torch.Generator().manual_seed(seed * 7919 + 211)
            rotation, _ = torch.linalg.qr(torch.randn(token.shape[1], token.shape[1], generator=generator))
        with torch.no_grad():
            emb = encoder.text_model.embeddings
            emb.token_embedding.weight.copy_(gain * token @ rotation)
            emb.position_embedding.weight.copy_(gain * position @ rotation)
        encoder.requires_grad_(False).eval()
        encoders.append(encoder)
    return encoders[0], encoders[1]


def null_text_encoder(vocab_size: int, width: int = 256, pad_token_id: int = 0):
    """A ``T5EncoderModel`` whose output is exactly zero, ``(B, L, width)`` for any input: no layers,
    and a final RMS norm with weight 0 (its embeddings are zero too: they carry nothing).

    It stands in for SD3's T5 encoder. The pipeline would give the same zeros with
    ``text_encoder_3=None``, but diffusers 0.42.1's ``from_pretrained`` only accepts a folder without
    it when the caller passes ``text_encoder_3=None, tokenizer_3=None``; with this 0.7 MB stand-in the
    stock loader needs no arguments and the model sees what it was trained on (256 zero tokens,
    ``max_sequence_length`` as usual)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=8, num_layers=0, num_heads=1,
                      pad_token_id=pad_token_id, eos_token_id=pad_token_id, decoder_start_token_id=pad_token_id)
    encoder = T5EncoderModel(config)
    with torch.no_grad():
        for p in encoder.parameters():
            p.zero_()
    return encoder.requires_grad_(False).eval()


def encode_prompts(tokenizer: Any, encoders: Sequence[Any], texts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``StableDiffusion3Pipeline.encode_prompt`` gives the transformer, without the T5 zeros:
    ``(B, 32, 256)`` token features (both CLIP encoders' ``hidden_states[-2]`` side by side) and
    ``(B, 256)`` pooled vectors."""
    ids = tokenizer(list(texts), padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    tokens, pooled = [], []
    with torch.no_grad():
        for encoder in encoders:
            out = encoder(ids, output_hidden_states=True)
            tokens.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
    return torch.cat(tokens, dim=-1), torch.cat(pooled, dim=-1)


# ------------------------------------------------------------------------------------------------
# Flow matching
# ------------------------------------------------------------------------------------------------


def sample_flow_times(batch_size: int, generator: torch.Generator, mode: str = "logit_normal",
                      mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Training times ``t`` in (0, 1), ``(B,)``: ``sigmoid(N(mean, std))`` (SD3's logit-normal, which
    spends most steps in the middle, where the layout and the colours are decided) or uniform."""
    if mode == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(batch_size, generator=generator))
    if mode == "uniform":
        return torch.rand(batch_size, generator=generator).clamp(1e-4, 1 - 1e-4)
    raise InvalidOptionError(f"time sampling must be 'logit_normal' or 'uniform', got {mode!r}")


def flow_matching_pair(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified-flow input and target, ``(B, C, H, W)`` each, for times ``t`` ``(B,)``.

    ``x_t = (1 - t) x0 + t noise`` is ``FlowMatchEulerDiscreteScheduler.scale_noise`` at ``sigma = t``,
    and its Euler step ``x + (sigma_next - sigma) * v`` integrates ``dx/dsigma = noise - x0``: the target.
    """
    tt = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - tt) * x0 + tt * noise, noise - x0


class JointAttentionWithNullTokens:
    """SD3 joint-attention processor for training: the LAST context token stands for
    ``null_tokens`` identical zero tokens (its attention logit is raised by ``ln null_tokens``), and
    each call appends to ``sink`` the head-averaged attention of the image tokens on the first
    ``word_tokens`` context tokens, renormalised over them: ``(B, N_image, word_tokens)``.

    With ``null_tokens`` copies of one key the softmax is the same as with one key whose logit is
    ``ln null_tokens`` higher, and the copies' outputs are identical, so the image outputs equal the
    stock processor's on the full sequence exactly.

    ``forcing`` (attention forcing): for the batch rows it names, the image queries' attention on the
    words keeps its total mass but is shared among the words as
    :func:`attnctrl.models.shapes.train.forced_attention` says (each object's words where the object
    is); image-to-image and image-to-null attention stay the model's own. The sink keeps the model's
    own maps."""

    def __init__(self, null_tokens: int, word_tokens: int, sink: list[torch.Tensor] | None = None,
                 forcing: AttentionForcing | None = None) -> None:
        if null_tokens < 1 or word_tokens < 1:
            raise InvalidOptionError(f"null_tokens and word_tokens must be >= 1, got {null_tokens}, {word_tokens}")
        self.log_null = math.log(null_tokens)
        self.word_tokens = word_tokens
        self.sink = sink
        self.forcing = forcing

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        if encoder_hidden_states is None or attention_mask is not None:
            raise InvalidOptionError("JointAttentionWithNullTokens handles only unmasked joint attention (SD3 blocks)")
        batch, n_image, _ = hidden_states.shape
        n_context = encoder_hidden_states.shape[1]
        heads = attn.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, x.shape[1], heads, -1).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        cq, ck, cv = (split(attn.add_q_proj(encoder_hidden_states)), split(attn.add_k_proj(encoder_hidden_states)),
                      split(attn.add_v_proj(encoder_hidden_states)))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.norm_added_q is not None:
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        # the (B, heads, N, N) tensors dominate a step at fine token grids: scale the queries, not the
        # logits, and bias only the null key's column
        logits = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-1, -2)
        logits[..., -1] += self.log_null
        probs = torch.softmax(logits, dim=-1)  # (B, heads, N, N)
        out = probs @ v
        words = slice(n_image, n_image + self.word_tokens)
        if self.sink is not None:
            mean_words = probs[:, :, :n_image, words].mean(1)
            self.sink.append(mean_words / mean_words.sum(-1, keepdim=True).clamp_min(1e-8))
        f = self.forcing
        if f is not None and f.rows is not None:
            # only the image rows' word columns change: add their change times the words' values
            t2i = probs[:, :, :n_image, words]
            mass = t2i.sum(-1, keepdim=True)
            forced = mass * forced_attention(t2i / mass.clamp_min(1e-8), f.targets, f.supervised, f.token_share)
            change = torch.where(f.rows[:, None, None, None], forced - t2i, torch.zeros_like(t2i))
            out = torch.cat([out[:, :, :n_image] + change @ v[:, :, words], out[:, :, n_image:]], dim=2)
        out = out.transpose(1, 2).reshape(batch, n_image + n_context, -1)
        image, context = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        image = attn.to_out[1](attn.to_out[0](image))
        return image, context


def _install_training_attention(transformer: Any, null_tokens: int, sink: list[torch.Tensor] | None,
                                forcing: AttentionForcing | None = None) -> None:
    for block in transformer.transformer_blocks:
        block.attn.set_processor(JointAttentionWithNullTokens(null_tokens, MODEL_MAX_LENGTH, sink, forcing))


# ------------------------------------------------------------------------------------------------
# Checkpoint helpers
# ------------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(time.strftime("%H:%M:%S ") + msg, file=sys.stderr, flush=True)


def _save_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))


def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW moments and step counts as flat tensors (safetensors holds no nested dicts)."""
    flat = {}
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            flat[f"{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return flat


def _restore_optimizer(opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def _replace_dir(tmp: str, final: str) -> None:
    """Put folder ``tmp`` at ``final`` by renames (``final.old`` survives a crash in between)."""
    old = final + ".old"
    if os.path.isdir(old):
        shutil.rmtree(old)
    if os.path.isdir(final):
        os.rename(final, old)
    os.rename(tmp, final)
    if os.path.isdir(old):
        shutil.rmtree(old)


def _dir_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs) / 2**20


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def _shapes_dir(shapes_dir: str | None) -> str:
    if shapes_dir is None:
        from .. import SHAPES

        return SHAPES
    return shapes_dir


def _encode_pool(vae: Any, scenes: list, device: torch.device) -> torch.Tensor:
    """Posterior means ``(P, 4, 16, 16)`` of the rendered pool (frozen VAE, batches of 256)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(scenes), 256):
            u8 = torch.from_numpy(np.stack([render_array(s, 64) for s in scenes[i : i + 256]]))
            pixels = u8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(device)
            out.append(vae.encode(pixels).latent_dist.mean.cpu())
    return torch.cat(out)


def train_flow(
    out_dir: str | None,
    *,
    work_dir: str = "runs/shapes-flow",
    config: FlowTrainConfig = FlowTrainConfig(),
    model: FlowModelConfig = FlowModelConfig(),
    minutes: float = 80.0,
    max_steps: int | None = None,
    stop_at_step: int | None = None,
    shapes_dir: str | None = None,
    resume: bool = False,
    checkpoint_minutes: float = 5.0,
    log_every: int = 50,
    threads: int | None = 1,
    device: str | None = None,
    init_from: str | None = None,
    init_patch_size: int | None = None,
) -> str:
    """Train the flow-matching shapes transformer in ``work_dir`` and export it to ``out_dir``.

    ``minutes``: the wall-clock budget over all runs of ``work_dir``; the number of steps is planned
    from the throughput of the first steps (``max_steps`` caps it, or fixes it). ``stop_at_step``
    checkpoints and returns at that step without exporting (a planned interruption; resume with the
    same ``max_steps``). ``shapes_dir``: the shapes folder whose VAE, text encoder and tokenizer are
    reused (default: the shipped one). ``config``/``model`` of a resumed run are the checkpoint's.
    ``init_from`` (a new run only): an exported flow shapes folder to fine-tune. Its transformer's
    weights (and EMA) are the start, with a fresh optimiser and schedule; its text encoders and its
    VAE's ``shift_factor``/``scaling_factor`` are kept, so the export is the same pipeline with new
    transformer weights; ``model`` is read from its transformer config. ``init_patch_size`` (with
    ``init_from``): fine-tune at this finer patch size, starting from
    :func:`repatched_transformer_state` of the folder's transformer.
    Returns ``out_dir`` (or ``work_dir`` when stopped early or ``out_dir`` is None).
    """
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTokenizer

    if threads and (device is None or device == "cpu"):
        torch.set_num_threads(int(threads))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes_dir = _shapes_dir(shapes_dir)
    ckpt = os.path.join(work_dir, "ckpt")
    state_path = os.path.join(ckpt, "state.json")
    t_start = time.time()
    if resume and not os.path.isdir(ckpt) and os.path.isdir(ckpt + ".old"):
        os.rename(ckpt + ".old", ckpt)
    if resume and os.path.exists(state_path):
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
        config = FlowTrainConfig(**state["config"])
        model = FlowModelConfig(**state["model"])
        _log(f"resuming {work_dir}: phase={state['phase']} step={state['step']}")
        if max_steps is not None and state["phase"] in ("transformer", "export", "done") and max_steps != state["planned_steps"]:
            state["planned_steps"] = int(max_steps)
            state["phase"] = "transformer" if max_steps > state["step"] else state["phase"]
    else:
        if os.path.isdir(ckpt):
            raise InvalidOptionError(
                f"{work_dir!r} already holds a checkpoint; pass --resume (resume=True) to continue it, or use a new --work dir"
            )
        config.validate()
        state = dict(phase="encode", step=0, elapsed=0.0, planned_steps=max_steps, config=asdict(config),
                     model=asdict(model), shapes_dir=os.path.abspath(shapes_dir))
        if init_from is not None:
            state.update(_start_from_flow_model(init_from, init_patch_size))
            model = FlowModelConfig(**state["model"])
    if init_patch_size is not None and init_from is None:
        raise InvalidOptionError("init_patch_size re-patches an init_from folder's transformer; give init_from too")
    if init_from is not None and state.get("init_from") != os.path.abspath(init_from):
        raise InvalidOptionError(
            f"init_from={init_from!r} only starts a new run, and {work_dir!r} already holds one "
            f"(started from {state.get('init_from') or 'scratch'}); resume it without init_from or use a new --work dir"
        )
    elapsed0 = float(state["elapsed"])

    def elapsed() -> float:
        return elapsed0 + (time.time() - t_start)

    seed, pool_size, batch_size = config.seed, config.pool_size, config.batch_size
    tokenizer = CLIPTokenizer.from_pretrained(shapes_dir, subfolder="tokenizer")
    text_encoders = [e.to(dev) for e in _run_text_encoders(state, config, model)]
    t0 = time.time()
    scenes = [item_scene(i, seed)[0] for i in range(pool_size)]
    _log(f"sampled {pool_size} scenes in {time.time() - t0:.1f}s")

    # ---------------- phase 1: encode the pool with the frozen VAE ----------------
    lat_path = os.path.join(work_dir, f"latents_{seed}_{pool_size}.safetensors")
    if state["phase"] == "encode" or not os.path.exists(lat_path):
        vae = AutoencoderKL.from_pretrained(shapes_dir, subfolder="vae").to(dev).eval()
        t0 = time.time()
        lat = _encode_pool(vae, scenes, dev)
        if state.get("init_from") is None:  # a fine-tune keeps the normalisation its transformer learnt
            state["shift_factor"] = float(lat.mean())
            state["scaling_factor"] = float(1.0 / lat.std())
        _save_tensors(lat_path, {"latents": lat})
        _log(f"encoded {pool_size} scenes in {time.time() - t0:.0f}s: shift_factor {state['shift_factor']:.4f} "
             f"scaling_factor {state['scaling_factor']:.4f}")
        if state["phase"] == "encode":
            state["phase"] = "transformer"
        os.makedirs(ckpt, exist_ok=True)
        write_json_atomic(state, state_path)
        del vae
    latents = ((_load_tensors(lat_path)["latents"] - state["shift_factor"]) * state["scaling_factor"]).to(dev)

    # ---------------- phase 2: the transformer ----------------
    torch.manual_seed(seed + 2)
    transformer = SD3Transformer2DModel(**transformer_config(model)).to(dev)
    params = [p for p in transformer.parameters()]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.99))
    ema = [p.detach().clone() for p in params]
    if os.path.exists(os.path.join(ckpt, "transformer.safetensors")):
        transformer.load_state_dict(_load_tensors(os.path.join(ckpt, "transformer.safetensors")))
        ema_sd = _load_tensors(os.path.join(ckpt, "ema.safetensors"))
        ema = [ema_sd[str(i)].to(dev) for i in range(len(params))]
        _restore_optimizer(opt, _load_tensors(os.path.join(ckpt, "optimizer.safetensors")))
    elif state.get("init_from") is not None:
        start = SD3Transformer2DModel.from_pretrained(state["init_from"], subfolder="transformer")
        start_state = start.state_dict()
        if int(start.config.patch_size) != model.patch_size:
            start_state = repatched_transformer_state(start_state, int(start.config.patch_size), model.patch_size)
        transformer.load_state_dict(start_state)
        ema = [p.detach().clone() for p in params]
        del start

    def save_checkpoint() -> None:
        state["elapsed"] = elapsed()
        tmp = ckpt + ".new"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        _save_tensors(os.path.join(tmp, "transformer.safetensors"), transformer.state_dict())
        _save_tensors(os.path.join(tmp, "ema.safetensors"), {str(i): e for i, e in enumerate(ema)})
        _save_tensors(os.path.join(tmp, "optimizer.safetensors"), _optimizer_tensors(opt))
        write_json_atomic(state, os.path.join(tmp, "state.json"))
        _replace_dir(tmp, ckpt)

    sink: list[torch.Tensor] = []
    forcing = AttentionForcing()
    wants_maps = config.grounding_weight > 0 or config.attention_forcing > 0
    _install_training_attention(transformer, config.null_text_tokens, sink if wants_maps else None, forcing)
    grid = int(latents.shape[-1])
    scene_masks: dict[int, torch.Tensor] = {}
    word_lengths: dict[str, int] = {}

    budget = minutes * 60.0
    reserve = 60.0  # seconds kept for the export
    if state["phase"] == "transformer":
        transformer.train()
        last_checkpoint = time.time()
        t_measure: float | None = None
        measure_from = state["step"] + 5
        smooth_loss = smooth_grounding = None
        while True:
            step = int(state["step"])
            planned = state["planned_steps"]
            if planned is not None and step >= planned:
                break
            if stop_at_step is not None and step >= stop_at_step:
                save_checkpoint()
                _log(f"stopped at step {step} (stop_at_step); resume to continue")
                return work_dir
            if elapsed() > budget - reserve:
                _log("time budget reached")
                break
            if planned is None and step == measure_from:
                t_measure = time.time()
            if planned is None and t_measure is not None and step == measure_from + 20:
                per_step = (time.time() - t_measure) / 20.0
                planned = step + int((budget - reserve - elapsed()) / per_step)
                if max_steps is not None:
                    planned = min(planned, max_steps)
                state["planned_steps"] = planned
                _log(f"{per_step:.3f}s/step ({batch_size / per_step:.0f} img/s) -> planning {planned} steps")
            rng = np.random.default_rng([seed, 3, step])
            idx = rng.integers(0, pool_size, batch_size)
            texts = ["" if rng.random() < config.cond_drop else caption(scenes[int(i)], rng) for i in idx]
            words, pooled = encode_prompts(tokenizer, text_encoders, texts, dev)
            null = torch.zeros(batch_size, 1, words.shape[-1], device=dev)  # the T5 stand-in
            context = torch.cat([words, null], dim=1)
            generator = torch.Generator().manual_seed(seed * 1_000_003 + 17 + step)
            noise = torch.randn((batch_size, *latents.shape[1:]), generator=generator).to(dev)
            t = sample_flow_times(batch_size, generator, config.time_sampling, config.logit_mean, config.logit_std).to(dev)
            x0 = latents[torch.from_numpy(idx).to(dev)]
            noisy, target = flow_matching_pair(x0, noise, t)
            plan = planned or max(step + 1, config.warmup * 10)
            frac = min(1.0, max(0.0, (step - config.warmup) / max(1, plan - config.warmup)))
            lr = config.lr * min(1.0, (step + 1) / config.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            for group in opt.param_groups:
                group["lr"] = lr
            sink.clear()
            token_maps = object_token_targets(tokenizer, scenes, idx, texts, grid, scene_masks, word_lengths, dev) if wants_maps else None
            if config.attention_forcing > 0:
                rows = torch.from_numpy(rng.random(batch_size) < config.attention_forcing) & token_maps[1].any(1).cpu()
                if bool(rows.any()):
                    forcing.rows, forcing.targets, forcing.supervised, forcing.token_share = rows.to(dev), *token_maps
            pred = transformer(noisy, context, pooled, t * 1000.0).sample
            forcing.rows = None
            squared_error = (pred - target).pow(2)
            flow_loss = squared_error.mean()
            if config.object_loss_weight > 0:
                weight = object_loss_weights(scenes, idx, grid, scene_masks, config.object_loss_weight, dev)
                loss = (squared_error * weight[:, None]).mean() / weight.mean()
            else:
                loss = flow_loss
            g_loss = None
            if config.grounding_weight > 0:
                g_loss = grounding_loss(sink, *token_maps[:2])
                loss = loss + config.grounding_weight * g_loss
            sink.clear()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_mul_(ema, decay)
                torch._foreach_add_(ema, [p.detach() for p in params], alpha=1 - decay)
            state["step"] = step + 1
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr or resume from the last checkpoint")
            smooth_loss = flow_loss.item() if smooth_loss is None else 0.98 * smooth_loss + 0.02 * flow_loss.item()
            if g_loss is not None:
                smooth_grounding = g_loss.item() if smooth_grounding is None else 0.98 * smooth_grounding + 0.02 * g_loss.item()
            state["last_loss"] = smooth_loss
            if (step + 1) % log_every == 0:
                extra = "" if smooth_grounding is None else f" grounding {smooth_grounding:.4f}"
                _log(f"step {step + 1}/{planned} flow loss {smooth_loss:.4f}{extra} lr {lr:.2e} elapsed {elapsed() / 60:.1f} min")
            if time.time() - last_checkpoint > checkpoint_minutes * 60.0:
                save_checkpoint()
                last_checkpoint = time.time()
        state["phase"] = "export"
        save_checkpoint()

    if out_dir is None:
        return work_dir
    export_flow_checkpoint(work_dir, out_dir)
    state["phase"] = "done"
    state["elapsed"] = elapsed()
    write_json_atomic(state, state_path)
    _log(f"wrote {out_dir} ({_dir_mb(out_dir):.1f} MB); total {elapsed() / 60:.1f} min, {state['step']} steps")
    return out_dir


def repatched_transformer_state(state: dict[str, torch.Tensor], old_patch: int, new_patch: int) -> dict[str, torch.Tensor]:
    """``state`` (an ``SD3Transformer2DModel`` state dict of patch size ``old_patch``) for patch size
    ``new_patch``, which must divide it: a warm start for a finer token grid.

    Only the patch embedding, its positions and the output projection change shape; the blocks are
    kept. A new token's embedding kernel is the sum of the old kernel over the sub-blocks it tiles (so
    a flat region embeds as before), the output projection is the old one averaged over them, and each
    new token's sincos position is the old grid's continuous coordinate of its centre, so the blocks
    see the layout they were trained on."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed_from_grid

    if new_patch < 1 or old_patch % new_patch:
        raise InvalidOptionError(f"patch size {new_patch} does not divide the start's patch size {old_patch}; "
                                 "a re-patched warm start only makes the token grid finer")
    ratio = old_patch // new_patch
    out = dict(state)
    kernel = state["pos_embed.proj.weight"]  # (dim, channels, P, P)
    dim, channels = kernel.shape[:2]
    out["pos_embed.proj.weight"] = kernel.reshape(dim, channels, ratio, new_patch, ratio, new_patch).sum(dim=(2, 4))
    proj = state["proj_out.weight"]  # (P*P*C, dim), rows ordered (row in patch, column in patch, channel)
    proj_bias = state["proj_out.bias"]
    out_channels = proj.shape[0] // (old_patch * old_patch)

    def shrink(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(ratio, new_patch, ratio, new_patch, out_channels, *t.shape[1:])
        return t.mean(dim=(0, 2)).reshape(new_patch * new_patch * out_channels, *t.shape[5:])

    out["proj_out.weight"], out["proj_out.bias"] = shrink(proj), shrink(proj_bias)
    old_side = int(round(math.sqrt(state["pos_embed.pos_embed"].shape[1])))
    side = old_side * ratio
    # old grid: max-grid token k sits at coordinate k * base / side_old = k / 2 (base = sample_size / P)
    centre = (new_patch * torch.arange(side, dtype=torch.float64) + (new_patch - old_patch) / 2) / old_patch
    coords = (centre / 2.0).float()
    grid = torch.stack(torch.meshgrid(coords, coords, indexing="xy"), dim=0).reshape(2, 1, side, side)
    out["pos_embed.pos_embed"] = get_2d_sincos_pos_embed_from_grid(dim, grid, output_type="pt").float().unsqueeze(0)
    return out


def _start_from_flow_model(model_dir: str, patch_size: int | None = None) -> dict[str, Any]:
    """State entries of a run that fine-tunes the exported flow shapes folder ``model_dir``
    (``patch_size``: re-patch its transformer to that finer token grid first)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    model_dir = os.path.abspath(model_dir)
    try:
        transformer_cfg = SD3Transformer2DModel.load_config(model_dir, subfolder="transformer")
        vae_cfg = AutoencoderKL.load_config(model_dir, subfolder="vae")
        text_cfg = CLIPTextModelWithProjection.config_class.from_pretrained(model_dir, subfolder="text_encoder")
    except (OSError, ValueError) as e:
        raise InvalidOptionError(f"init_from={model_dir!r} is not an exported flow shapes folder ({e})") from e
    model = FlowModelConfig(
        num_layers=int(transformer_cfg["num_layers"]), num_attention_heads=int(transformer_cfg["num_attention_heads"]),
        attention_head_dim=int(transformer_cfg["attention_head_dim"]), patch_size=int(transformer_cfg["patch_size"]),
        text_layer_width=int(text_cfg.intermediate_size),
    )
    expected = transformer_config(model)
    differs = sorted(k for k, v in expected.items() if transformer_cfg.get(k) != v)
    if differs or vae_cfg.get("shift_factor") is None:
        raise InvalidOptionError(
            f"init_from={model_dir!r} is not a flow shapes folder written by train-shapes --flow "
            f"(differs in {differs or ['vae shift_factor']}); fine-tune only such folders"
        )
    if patch_size is not None and patch_size != model.patch_size:
        if patch_size < 1 or model.patch_size % patch_size:
            raise InvalidOptionError(f"patch_size={patch_size} must divide the start's patch size {model.patch_size} "
                                     "(a re-patched fine-tune only makes the token grid finer)")
        model = FlowModelConfig(**{**asdict(model), "patch_size": int(patch_size)})
    return dict(init_from=model_dir, model=asdict(model), shift_factor=float(vae_cfg["shift_factor"]),
                scaling_factor=float(vae_cfg["scaling_factor"]))


def _run_text_encoders(state: dict[str, Any], config: FlowTrainConfig, model: FlowModelConfig):
    """The run's two frozen CLIP encoders: a fine-tune's are its start folder's, exactly."""
    if state.get("init_from") is None:
        return text_encoders_from_shapes(state["shapes_dir"], config.seed, model)
    from transformers import CLIPTextModelWithProjection

    return tuple(CLIPTextModelWithProjection.from_pretrained(state["init_from"], subfolder=name).requires_grad_(False).eval()
                 for name in ("text_encoder", "text_encoder_2"))


def export_flow_checkpoint(work_dir: str, out_dir: str, *, use_ema: bool = True, shift: float | None = None) -> str:
    """Write the stock SD3 folder for ``work_dir``'s latest checkpoint to ``out_dir`` (atomically).

    ``shift``: the exported scheduler's shift (default: the checkpoint's ``export_shift``, else 1.0)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    ckpt = os.path.join(work_dir, "ckpt")
    try:
        with open(os.path.join(ckpt, "state.json"), encoding="utf-8") as f:
            state = json.load(f)
    except OSError as e:
        raise InvalidOptionError(f"{work_dir!r} holds no flow-matching checkpoint ({e}); train one with train-shapes --flow") from e
    if not os.path.exists(os.path.join(ckpt, "transformer.safetensors")):
        raise InvalidOptionError(f"{work_dir!r} has not trained its transformer yet; nothing to export")
    config = FlowTrainConfig(**state["config"])
    model = FlowModelConfig(**state["model"])
    shapes_dir = state["shapes_dir"]
    transformer = SD3Transformer2DModel(**transformer_config(model))
    transformer.load_state_dict(_load_tensors(os.path.join(ckpt, "transformer.safetensors")))
    if use_ema:
        ema = _load_tensors(os.path.join(ckpt, "ema.safetensors"))
        with torch.no_grad():
            for i, p in enumerate(transformer.parameters()):
                p.copy_(ema[str(i)])
    vae = AutoencoderKL.from_pretrained(shapes_dir, subfolder="vae")
    vae.register_to_config(shift_factor=float(state["shift_factor"]), scaling_factor=float(state["scaling_factor"]))
    text_encoder, text_encoder_2 = _run_text_encoders(state, config, model)
    tokenizer = CLIPTokenizer.from_pretrained(shapes_dir, subfolder="tokenizer")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config(shift if shift is not None else state.get("export_shift", 1.0))),
        vae=vae.eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=null_text_encoder(len(tokenizer), 256, tokenizer.pad_token_id),
        tokenizer_3=tokenizer,
    )
    out_dir = os.path.abspath(out_dir)
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        write_vocab_files(os.path.join(tmp, name))  # the slow CLIPTokenizer of older transformers reads these
    _replace_dir(tmp, out_dir)
    return out_dir


_CLI_DOC = """Train attnctrl's embedded flow-matching shapes model (SD3-shaped, resumable).

Reuses the shipped shapes model's VAE, text encoder and tokenizer; trains the transformer only.
Example (80 minutes on one CPU core):
    attnctrl train-shapes --flow --out attnctrl/models/shapes/flow_model --work runs/shapes-flow --minutes 80
    attnctrl train-shapes --flow --out attnctrl/models/shapes/flow_model --work runs/shapes-flow --minutes 80 --resume
"""


def main(argv: list[str] | None = None) -> int:
    """``attnctrl train-shapes --flow`` (and ``scripts/train_shapes.py --flow``)."""
    p = argparse.ArgumentParser(prog="attnctrl train-shapes --flow", description=_CLI_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="attnctrl/models/shapes/flow_model", help="diffusers folder to write")
    p.add_argument("--work", default="runs/shapes-flow", help="work dir for checkpoints and latents")
    p.add_argument("--minutes", type=float, default=80.0, help="total wall-clock budget (over resumes)")
    p.add_argument("--max-steps", type=int, default=None, help="cap on transformer steps (default: what the budget allows)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--shapes-model", default=None, help="shapes folder whose VAE/text encoder/tokenizer are reused (default: the shipped one)")
    defaults = FlowTrainConfig()
    for f in fields(FlowTrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)), default=None,
                       help=f"(new runs; default {getattr(defaults, f.name)})")
    model_defaults = FlowModelConfig()
    for f in fields(FlowModelConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=int, default=None,
                       help=f"transformer shape (new runs; default {getattr(model_defaults, f.name)})")
    p.add_argument("--init-from", default=None, metavar="MODEL_DIR",
                   help="start a new run from an exported flow shapes folder ('shapes-flow': the shipped weights) and "
                        "fine-tune its transformer with a fresh optimiser and schedule (use a new --work dir); with "
                        "--patch-size P (a divisor of its own) it is re-patched to that finer token grid first")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --work")
    p.add_argument("--export-checkpoint", action="store_true", help="only export --work's checkpoint to --out")
    p.add_argument("--shift", type=float, default=None, help="scheduler shift written by --export-checkpoint (default 1.0)")
    a = p.parse_args(argv)
    if a.export_checkpoint:
        export_flow_checkpoint(a.work, a.out, shift=a.shift)
        return 0
    shape_options = [f.name for f in fields(FlowModelConfig) if getattr(a, f.name) is not None]
    init_patch_size = None
    if a.init_from is not None:
        init_patch_size = a.patch_size
        shape_options = [n for n in shape_options if n != "patch_size"]
        if shape_options:
            raise InvalidOptionError(f"--init-from fine-tunes its folder's transformer as it is (only a finer --patch-size "
                                     f"may be given); drop {', '.join('--' + n.replace('_', '-') for n in shape_options)}")
    config = FlowTrainConfig(**{f.name: getattr(a, f.name) for f in fields(FlowTrainConfig) if getattr(a, f.name) is not None})
    model = FlowModelConfig(**{f.name: getattr(a, f.name) for f in fields(FlowModelConfig) if getattr(a, f.name) is not None})
    train_flow(a.out, work_dir=a.work, config=config, model=model, minutes=a.minutes, max_steps=a.max_steps,
               shapes_dir=a.shapes_model, resume=a.resume, checkpoint_minutes=a.checkpoint_minutes,
               log_every=a.log_every, threads=a.threads, device=a.device, init_from=resolve_model_folder(a.init_from), init_patch_size=init_patch_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
