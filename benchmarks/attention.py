"""Efficient attention: one self-attention layer and one SD 1.5-shaped UNet step, against stock SDPA.

What it measures
----------------
``layer``: one self-attention layer (a diffusers ``Attention`` module: projections, attention,
output projection) on a square token grid of N tokens, batch 2 (the two CFG halves), 8 heads of
head dim 40 (SD 1.5's top level, 320 channels) and 64. Variants, each in its own child process
(:mod:`_common`), all from the same random weights and inputs:

* ``sdpa``       the baseline: diffusers' ``AttnProcessor2_0`` (PyTorch SDPA);
* ``agent``      :class:`attnctrl.AgentAttention` defaults (N/16 agents by ToMe bipartite matching,
                 merging included in the time);
* ``agent-pool`` the same with average-pooled agents;
* ``agentsd``    :meth:`attnctrl.AgentAttention.agentsd` (AgentSD's schedule) at an agent step: agents plus
                 ToMe's main merge at ratio 0.4; ``agentsd-late`` (layer only) at a late step: ToMe alone;
* ``proxy``      :class:`attnctrl.ProxyAttention` defaults (8x8 windows + one averaged proxy per window);
* ``grouped``    :class:`attnctrl.GroupedAttention`, 3x3 neighbourhood of groups, group size chosen
                 so that the allowed pairs are ~10% of N² (reported as "density");
* ``window``     :class:`attnctrl.WindowAttention` defaults (2x2 windows with a random shift).

``unet``: one denoiser forward of an SD 1.5-shaped ``UNet2DConditionModel`` (its published config,
random weights, fp32) at 1024² (a 128² latent, N = 16384 at the top level), batch 2, 77 text tokens.
Variants: ``sdpa`` (stock processors, the baseline), ``agent`` (``attnctrl.apply(unet,
AgentAttention())``, at a step where it is active), ``tomesd`` (``tomesd.apply_patch(unet)`` at its
defaults, ratio 0.5, with SDPA on: its known weak spot), ``window``, ``proxy``, ``grouped`` (top level).
``--model`` picks the denoiser (several allowed): ``sd15`` (the default), ``sdxl`` (SDXL base's UNet,
2.6 B parameters, 2048-wide text, ``text_time`` conditions; policies act on its highest level with
attention, latent/2), ``pixart`` (PixArt-alpha XL-2's ``PixArtTransformer2DModel``, 28 blocks, patch 2,
120 T5 tokens; AgentAttention and tomesd are UNet-only and are listed as n/a) or ``flux``
(Flux.1-dev's ``FluxTransformer2DModel`` dims: 24 heads x 128, 3072 wide, 4096-wide T5 input, guidance
embedding, RoPE axes (16, 56, 56); batch 1, as Flux is guidance-distilled; 512 T5 tokens; the policies
restrict the image->image part of joint attention, text keeps full attention). Its depth is
``--flux-blocks DOUBLE SINGLE`` (default Flux.1-dev's 19 double-stream and 38 single-stream blocks;
cut it on the CPU, where the full 12 B-parameter model does not fit, and say so with the numbers). ``--size`` takes several
sizes (a resolution sweep). Each row also gives "rel. diff vs sdpa": ||out - out_sdpa|| / ||out_sdpa||
of the step's output (the noise prediction) on the same inputs, the quality cost of the approximation
at the model level (random weights: indicative only).

Per variant: one warm-up call (skipped on the CPU for layers above 16384 tokens, where a call takes
minutes, and for the UNet with ``--no-unet-warmup``),
then ``--repeats`` timed calls (one for CPU layers above 16384 tokens and for steps at 4096² and above),
median reported; peak memory is the growth of the peak during the
timed calls over what is held after the warm-up (CPU ``VmHWM``; CUDA ``max_memory_allocated``; the
step table on CUDA also gives the absolute peak, weights included).

Processes: on the CPU every variant runs in its own child process (its peak RSS is its own). On CUDA
(``--isolate run``, the default there) one child runs all layer variants and one runs all steps,
building each model once and installing/removing the policies in turn (CUDA peaks are reset per
variant, so the numbers stay per variant), which saves a process start and a model build per row.
``--budget SECONDS``: measurements not started by then are reported as skipped; results are written
after each part, and a SIGTERM (e.g. from ``timeout``) writes what the children finished.
"max err" compares the layer's output with the baseline's on 16 query rows, which says how far the
approximation is from exact attention (not a correctness check of our kernels: the tests do that).

Targets (issue 6, this CPU): agent layer >= 3x faster than SDPA at N = 16384; UNet step >= 1.5x
faster at 1024² and faster than tomesd at its default ratio; grouped at 10% density >= 5x faster
than SDPA at N = 16384.

How to run
----------
::

    python benchmarks/attention.py                                   # everything (~40 min, 2 threads)
    python benchmarks/attention.py --part layer --tokens 4096 --no-write   # smoke test, a minute
    python benchmarks/attention.py --part unet --size 1024 --variants sdpa agent tomesd
    python benchmarks/attention.py --device cuda --dtype float16 --model sd15 sdxl pixart \
        --size 1024 2048 4096 --variants sdpa agent window proxy grouped --out DIR   # GPU sweep
    python benchmarks/attention.py --part unet --device cuda --dtype bfloat16 --model flux \
        --size 1024 2048 --variants sdpa window proxy grouped --out DIR        # Flux-shaped, full depth
    python benchmarks/attention.py --part unet --model flux --flux-blocks 1 2 --size 256 512 \
        --variants sdpa window proxy grouped --no-write                          # CPU: depth cut

``tomesd`` comes from PyPI (``pip install tomesd``; not a dependency of attnctrl; where it is not
installed its rows say so). Results: markdown tables on stdout, ``attention.md`` and ``attention.json``
(``attention-layer.*`` / ``attention-unet.*`` with ``--part``) in ``--out`` (default
``benchmarks/results``); progress on stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    PIXART_ALPHA_TRANSFORMER,
    SDXL_UNET,
    Memory,
    atomic_write,
    child_main,
    environment,
    fmt_gb,
    fmt_ratio,
    is_oom_error,
    markdown_table,
    median,
    resolve_device,
    run_child,
    synchronize,
)

RESULTS = Path(__file__).resolve().parent / "results"
HEADS = 8
BATCH = 2
SEED = 0
LAYER_VARIANTS = ("sdpa", "agent", "agent-pool", "agentsd", "agentsd-late", "proxy", "grouped", "window")
UNET_VARIANTS = ("sdpa", "agent", "agentsd", "tomesd", "window", "proxy", "grouped")
UNET_ONLY = ("agent", "agentsd", "tomesd")  # not for PixArt/Flux (attnctrl.apply refuses AgentAttention on DiTs)
MODELS = ("sd15", "sdxl", "pixart", "flux")
MODEL_NAMES = {"sd15": "SD 1.5-shaped UNet", "sdxl": "SDXL-shaped UNet", "pixart": "PixArt-α-shaped DiT",
               "flux": "Flux.1-dev-shaped MM-DiT"}
#: Flux.1-dev's transformer config (black-forest-labs/FLUX.1-dev, transformer/config.json); the depth
#: (num_layers double-stream, num_single_layers single-stream blocks) comes from --flux-blocks.
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
FLUX_TEXT_TOKENS = 512  # FluxPipeline's default max_sequence_length
TARGET_DENSITY = 0.10
CHECK_ROWS = 16
BIG_SIZE = 4096  # steps at this size and above: one timed call after the warm-up

# SD 1.5's published UNet config (runwayml/stable-diffusion-v1-5, unet/config.json).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
# --tiny-models (plumbing smoke tests only): the same topologies, narrow.
TINY = {
    "sd15": dict(SD15_UNET, block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, attention_head_dim=2),
    "sdxl": dict(SDXL_UNET, block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 4), cross_attention_dim=64,
                 transformer_layers_per_block=(1, 1, 2), addition_time_embed_dim=8, projection_class_embeddings_input_dim=80),
    "pixart": dict(PIXART_ALPHA_TRANSFORMER, num_attention_heads=2, attention_head_dim=24, num_layers=2,
                   cross_attention_dim=48, caption_channels=40),  # inner dim divisible by 3 (size conditions)
    "flux": dict(FLUX_DEV_TRANSFORMER, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32,
                 pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)),
}


# ---- policies ------------------------------------------------------------------------------------
def grouped_config(side: int) -> tuple[Any, float]:
    """The GroupedAttention (3x3 neighbourhood) whose density on a ``side``² grid is closest to 10%."""
    import attnctrl
    from attnctrl.policies.grouped import grouped_density

    best = None
    for group in range(2, side + 1):
        if side % group:  # whole groups only: partial edge groups compute padding
            continue
        config = attnctrl.GroupedAttention(group=group)
        density = grouped_density(side, side, config)
        if best is None or abs(density - TARGET_DENSITY) < abs(best[1] - TARGET_DENSITY):
            best = (config, density)
    assert best is not None
    return best


def policy(variant: str, side: int) -> tuple[Any, dict[str, Any]]:
    """(attnctrl config, extra facts for the table) of a variant."""
    import attnctrl

    if variant == "agent":
        return attnctrl.AgentAttention(), {}
    if variant == "agent-pool":
        return attnctrl.AgentAttention(agents="pool"), {}
    if variant in ("agentsd", "agentsd-late"):
        return attnctrl.AgentAttention.agentsd(), {}
    if variant == "proxy":
        return attnctrl.ProxyAttention(), {}
    if variant == "window":
        return attnctrl.WindowAttention(), {}
    if variant == "grouped":
        config, density = grouped_config(side)
        return config, {"density": density, "group": config.group}
    raise ValueError(variant)


def policy_side(model: str, latent: int) -> int:
    """Side of the token grid the policies act on: the highest level with self-attention (SD 1.5:
    the latent; SDXL: its first level has no attention, so latent/2; PixArt: latent / patch 2)."""
    return latent if model == "sd15" else latent // 2


# ---- child side ----------------------------------------------------------------------------------
def _timed(fn: Any, device: str, repeats: int, warmup: bool, memory: Memory) -> tuple[Any, float | None, list[float], int, int]:
    first_s = None
    if warmup:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        first_s = time.perf_counter() - t0
    base = memory.current()
    memory.reset_peak()
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return out, first_s, times, base, memory.peak()


def _exact_rows(attn: Any, x: Any, rows: Any) -> Any:
    """Full attention output of the layer at the query positions ``rows`` only: ``(B, len(rows), C)``."""
    import torch.nn.functional as F

    b, _, c = x.shape
    heads = attn.heads

    def split(t: Any) -> Any:
        return t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)

    q, k, v = split(attn.to_q(x[:, rows])), split(attn.to_k(x)), split(attn.to_v(x))
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale).transpose(1, 2).reshape(b, len(rows), c)
    return attn.to_out[1](attn.to_out[0](out))


def run_layer(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from attnctrl.processors.efficient import policy_state_for

    torch.set_num_threads(spec["threads"])
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    n, head_dim, variant = spec["tokens"], spec["head_dim"], spec["variant"]
    side = math.isqrt(n)
    channels = HEADS * head_dim
    torch.manual_seed(SEED)
    attn = Attention(query_dim=channels, heads=HEADS, dim_head=head_dim).to(device, dtype).eval()
    x = torch.randn(BATCH, n, channels, device=device, dtype=dtype)
    extra: dict[str, Any] = {}
    if variant == "sdpa":
        attn.set_processor(AttnProcessor2_0())
    else:
        config, extra = policy(variant, side)
        state, processor = policy_state_for(config, name="layer")
        # the layer is the top level of a side x side latent, at the first step of 50
        # agentsd-late: a step past the agent steps (ToMe alone)
        state.observe(torch.tensor(999), torch.zeros(1, 4, side, side), num_steps=50, step=30 if variant == "agentsd-late" else 0)
        attn.set_processor(processor)
    memory = Memory(device)
    # CPU: no warm-up above 16384 tokens (a call takes minutes); CUDA: always (first calls pick kernels)
    warmup = n <= 16384 or device.startswith("cuda")
    with torch.no_grad():
        out, first_s, times, base, peak = _timed(lambda: attn(x), device, spec["repeats"], warmup, memory)
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(SEED + 1))[:CHECK_ROWS]
        exact = _exact_rows(attn, x, rows)
    err = ((out[:, rows] - exact).float().norm() / exact.float().norm()).item()
    return {"variant": variant, "tokens": n, "head_dim": head_dim, "first_call_s": first_s, "times_s": times,
            "time_s": median(times), "peak_delta_bytes": peak - base, "rel_err": err, "loadavg_1min": os.getloadavg()[0],
            **extra}


def build_model(model: str, device: str, dtype: Any, tiny: bool = False, flux_blocks: Any = None) -> Any:
    """The denoiser of ``model`` (published config, random weights; built on ``device``); ``flux_blocks``
    ``(double, single)`` sets the Flux-shaped transformer's depth (None: Flux.1-dev's 19 and 38)."""
    import torch
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel

    config = TINY[model] if tiny else {"sd15": SD15_UNET, "sdxl": SDXL_UNET, "pixart": PIXART_ALPHA_TRANSFORMER,
                                       "flux": FLUX_DEV_TRANSFORMER}[model]
    if model == "flux" and flux_blocks is not None:
        config = dict(config, num_layers=int(flux_blocks[0]), num_single_layers=int(flux_blocks[1]))
    torch.manual_seed(SEED)
    cls = {"pixart": PixArtTransformer2DModel, "flux": FluxTransformer2DModel}.get(model, UNet2DConditionModel)
    if device.startswith("cuda"):  # initialising billions of parameters on the CPU takes longer than the step
        with torch.device(device):
            net = cls(**config)
    else:
        net = cls(**config)
    return net.to(device, dtype).eval()


def step_inputs(net: Any, model: str, size: int, device: str, dtype: Any) -> tuple[Any, Any]:
    """(args, kwargs) of one denoiser call at ``size``² with CFG batch 2, seeded."""
    import torch

    latent = size // 8
    g = torch.Generator().manual_seed(SEED)
    if model == "flux":  # guidance-distilled: batch 1; the 16-channel latent packed 2x2 -> 64 features per token
        side = latent // 2
        ids = torch.zeros(side, side, 3)
        ids[..., 1] = torch.arange(side)[:, None]
        ids[..., 2] = torch.arange(side)[None, :]
        return (), {
            "hidden_states": torch.randn(1, side * side, net.config.in_channels, generator=g).to(device, dtype),
            "encoder_hidden_states": torch.randn(1, FLUX_TEXT_TOKENS, net.config.joint_attention_dim, generator=g).to(device, dtype),
            "pooled_projections": torch.randn(1, net.config.pooled_projection_dim, generator=g).to(device, dtype),
            "timestep": torch.tensor([1.0], device=device, dtype=dtype),
            "guidance": torch.tensor([3.5], device=device, dtype=dtype),
            "img_ids": ids.reshape(-1, 3).to(device), "txt_ids": torch.zeros(FLUX_TEXT_TOKENS, 3, device=device),
        }
    sample = torch.randn(BATCH, 4, latent, latent, generator=g).to(device, dtype)
    if model == "pixart":
        width = net.config.caption_channels
        text = torch.randn(BATCH, 120, width, generator=g).to(device, dtype)
        cond = {"resolution": torch.tensor([[size, size]] * BATCH, device=device, dtype=dtype),
                "aspect_ratio": torch.tensor([[1.0]] * BATCH, device=device, dtype=dtype)}
        return (sample,), {"encoder_hidden_states": text, "timestep": torch.tensor([999] * BATCH, device=device),
                           "added_cond_kwargs": cond}
    text = torch.randn(BATCH, 77, net.config.cross_attention_dim, generator=g).to(device, dtype)
    kwargs: dict[str, Any] = {"encoder_hidden_states": text}
    if net.config.addition_embed_type == "text_time":
        pooled = net.add_embedding.linear_1.in_features - 6 * net.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(BATCH, pooled, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * BATCH, device=device, dtype=dtype),
        }
    return (sample, 999), kwargs


def run_step_on(net: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Time one denoiser step of ``spec['variant']`` on ``net`` (installed, then removed again)."""
    import torch

    import attnctrl

    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    variant, size, model = spec["variant"], spec["size"], spec.get("model", "sd15")
    latent = size // 8
    args, kwargs = step_inputs(net, model, size, device, dtype)
    extra: dict[str, Any] = {}
    undo = None
    if variant == "tomesd":
        import tomesd

        tomesd.apply_patch(net)  # defaults: ratio 0.5, max_downsample 1, 2x2 cells
        undo = lambda: tomesd.remove_patch(net)  # noqa: E731
    elif variant != "sdpa":
        config, extra = policy(variant, policy_side(model, latent))
        handle = attnctrl.apply(net, config)
        undo = handle.remove
    memory = Memory(device)
    try:
        with torch.no_grad():
            out, first_s, times, base, peak = _timed(
                lambda: net(*args, **kwargs).sample, device, spec["repeats"], spec["warmup"], memory
            )
    finally:
        if undo is not None:
            undo()
    if spec.get("output_file"):
        from safetensors.torch import save_file

        save_file({"out": out.float().cpu().contiguous()}, spec["output_file"])
    return {"variant": variant, "model": model, "size": size, "first_call_s": first_s, "times_s": times,
            "time_s": median(times), "peak_delta_bytes": peak - base, "peak_bytes": peak,
            "out_norm": out.float().norm().item(), "loadavg_1min": os.getloadavg()[0], **extra}


def run_unet(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    net = build_model(spec.get("model", "sd15"), spec["device"], getattr(torch, spec["dtype"]), spec.get("tiny", False),
                      spec.get("flux_blocks"))
    return run_step_on(net, spec)


def run_group(spec: dict[str, Any]) -> dict[str, Any]:
    """Several measurements in this one process (``--isolate run``): models built once, policies
    installed and removed in turn, progress written after each, stops at the deadline or when the
    parent is gone."""
    import gc

    import torch

    torch.set_num_threads(spec["threads"])
    parent = os.getppid()
    nets: dict[str, Any] = {}
    results: list[dict[str, Any]] = []
    for job in spec["jobs"]:
        key = _key(job)
        if os.getppid() != parent:
            break  # the parent was killed: nobody reads what comes next
        if spec.get("deadline") and time.time() > spec["deadline"]:
            results.append({**key, "status": "skipped", "message": "time budget spent"})
        else:
            started = time.perf_counter()
            try:
                if job["part"] == "layer":
                    r = run_layer(job)
                else:
                    model = job.get("model", "sd15")
                    if model not in nets:
                        nets[model] = build_model(model, job["device"], getattr(torch, job["dtype"]), job.get("tiny", False),
                                                  job.get("flux_blocks"))
                    r = run_step_on(nets[model], job)
                results.append({**key, **r, "status": "ok"})
            except Exception as err:  # noqa: BLE001 - one row each; OOM is reported as such
                status = "oom" if is_oom_error(err) else "error"
                results.append({**key, "status": status, "message": f"{type(err).__name__}: {str(err)[:300]}"})
                print(f"[{key}] {status}: {type(err).__name__}: {str(err)[:300]}", file=sys.stderr, flush=True)
            print(f"[{job['part']} {_label(job)}] {results[-1]['status']} in {time.perf_counter() - started:.1f} s",
                  file=sys.stderr, flush=True)
            gc.collect()
            if job["device"].startswith("cuda"):
                torch.cuda.empty_cache()
        atomic_write(spec["progress_file"], json.dumps(results))
    return {"results": results}


def run_variant(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("mode") == "group":
        return run_group(spec)
    return run_layer(spec) if spec["part"] == "layer" else run_unet(spec)


# ---- parent side ---------------------------------------------------------------------------------
def _key(job: dict[str, Any]) -> dict[str, Any]:
    if job["part"] == "layer":
        return {"tokens": job["tokens"], "head_dim": job["head_dim"], "variant": job["variant"]}
    return {"model": job.get("model", "sd15"), "size": job["size"], "variant": job["variant"]}


def _label(job: dict[str, Any]) -> str:
    if job["part"] == "layer":
        return f"N={job['tokens']} d={job['head_dim']} {job['variant']}"
    return f"{job.get('model', 'sd15')} {job['size']} {job['variant']}"


def _ratio(base: float | None, value: float | None) -> float | None:
    return None if base is None or value is None or value == 0 else base / value


def _status_text(r: dict[str, Any]) -> str:
    return r.get("status", "?") + (f": {r.get('message', '')[:60]}" if r.get("message") else "")


def layer_table(results: list[dict[str, Any]]) -> str:
    rows = []
    keyed = {(r["tokens"], r["head_dim"], r["variant"]): r for r in results}
    for r in results:
        base = keyed.get((r["tokens"], r["head_dim"], "sdpa"), {})
        ok = r.get("status") == "ok"
        base_ok = base.get("status") == "ok"
        facts = f"density {r['density']:.3f}, group {r['group']}" if "density" in r else ""
        rows.append([
            r["tokens"], r["head_dim"], r["variant"],
            f"{r['time_s']:.3f}" if ok and r["time_s"] >= 0.01 else f"{r['time_s'] * 1e3:.3f} ms" if ok else _status_text(r),
            fmt_ratio(_ratio(base.get("time_s"), r.get("time_s"))) if ok and base_ok else "—",
            fmt_gb(r["peak_delta_bytes"]) if ok else "—",
            fmt_ratio(r["peak_delta_bytes"] / base["peak_delta_bytes"]) if ok and base_ok and base["peak_delta_bytes"] > 0 else "—",
            f"{r['rel_err']:.3f}" if ok else "—",
            facts,
        ])
    return markdown_table(["N", "head dim", "variant", "time (s)", "speed-up vs sdpa", "peak Δ (GB)", "memory vs sdpa",
                           "rel. diff vs exact", "notes"], rows)


def unet_table(results: list[dict[str, Any]], *, cuda: bool = False) -> str:
    """One table per (model, size) group of rows, in the order they came."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r.get("model", "sd15"), r["size"]), []).append(r)
    show_model = len({m for m, _ in groups}) > 1 or any(m != "sd15" for m, _ in groups)
    show_size = len({s for _, s in groups}) > 1 or show_model
    with_tome = any(r["variant"] == "tomesd" and r.get("status") == "ok" for r in results)
    with_diff = any("rel_diff_vs_sdpa" in r for r in results)
    rows = []
    for (model, size), group in groups.items():
        base = next((r for r in group if r["variant"] == "sdpa" and r.get("status") == "ok"), {})
        tome = next((r for r in group if r["variant"] == "tomesd" and r.get("status") == "ok"), {})
        for r in group:
            ok = r.get("status") == "ok"
            t = r.get("time_s")
            row = ([model] if show_model else []) + ([f"{size}²"] if show_size else []) + [
                r["variant"],
                (f"{t:.1f}" if t >= 1 else f"{t:.3f}") if ok else _status_text(r),
                fmt_ratio(_ratio(base.get("time_s"), t)) if ok and base else "—",
            ]
            if with_tome:
                row.append(fmt_ratio(_ratio(tome.get("time_s"), t)) if ok and tome else "—")
            row.append(fmt_gb(r["peak_delta_bytes"]) if ok else "—")
            if cuda:
                row.append(fmt_gb(r.get("peak_bytes")) if ok else "—")
                row.append(fmt_ratio(_ratio(r.get("peak_bytes"), base.get("peak_bytes"))) if ok and base else "—")
            if with_diff:
                d = r.get("rel_diff_vs_sdpa")
                row.append("—" if d is None else f"{d:.3f}")
            row.append(f"density {r['density']:.3f}, group {r['group']}" if ok and "density" in r else "")
            rows.append(row)
    headers = (["model"] if show_model else []) + (["size"] if show_size else []) + [
        "variant", "time per step (s)", "speed-up vs sdpa"]
    if with_tome:
        headers.append("speed-up vs tomesd")
    headers.append("peak Δ (GB)")
    if cuda:
        headers += ["peak (GB)", "peak vs sdpa"]
    if with_diff:
        headers.append("rel. diff vs sdpa")
    headers.append("notes")
    return markdown_table(headers, rows)


def add_output_diffs(results: list[dict[str, Any]], files: dict[tuple[str, int, str], Path]) -> None:
    """rel. diff of each step output vs the sdpa output of the same (model, size), in place."""
    from safetensors.torch import load_file

    cache: dict[tuple[str, int], Any] = {}
    for r in results:
        key = (r.get("model", "sd15"), r["size"])
        path = files.get((*key, r["variant"]))
        base_path = files.get((*key, "sdpa"))
        if r.get("status") != "ok" or path is None or base_path is None or not path.exists() or not base_path.exists():
            continue
        if key not in cache:
            cache[key] = load_file(str(base_path))["out"]
        base = cache[key]
        out = load_file(str(path))["out"]
        r["rel_diff_vs_sdpa"] = float((out - base).norm() / base.norm().clamp_min(1e-12))


class Stopped(Exception):
    """SIGTERM/SIGINT: write what is finished and stop."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["layer", "unet", "all"], default="all",
                        help="unet: the denoiser step of --model (a UNet or PixArt's DiT)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536], help="layer sizes (squares)")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[40, 64])
    parser.add_argument("--layer-variants", nargs="+", choices=LAYER_VARIANTS, default=list(LAYER_VARIANTS))
    parser.add_argument("--model", nargs="+", choices=MODELS, default=["sd15"], help="denoisers of the step part (default sd15)")
    parser.add_argument("--size", type=int, nargs="+", default=[1024], help="image sizes of the step part (multiples of 64)")
    parser.add_argument("--variants", nargs="+", choices=UNET_VARIANTS, default=list(UNET_VARIANTS), help="step variants")
    parser.add_argument("--flux-blocks", type=int, nargs=2, default=None, metavar=("DOUBLE", "SINGLE"),
                        help="depth of the Flux-shaped transformer (default Flux.1-dev's 19 double, 38 single)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--unet-warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="one untimed UNet call first (--no-unet-warmup: time the first call; eager PyTorch on CPU "
                        "has little one-off cost, and a 1024² step takes minutes there)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--timeout", type=float, default=1800.0, help="per-child limit in seconds")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds: measurements not started by then are skipped (default: no limit)")
    parser.add_argument("--isolate", choices=["variant", "run"], default=None,
                        help="variant: a child process per measurement (default on CPU); run: one child per part, "
                        "models built once (default on CUDA)")
    parser.add_argument("--tiny-models", action="store_true", help=argparse.SUPPRESS)  # plumbing smoke tests
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args.child, run_variant)
    for n in args.tokens:
        if math.isqrt(n) ** 2 != n:
            raise SystemExit(f"--tokens: {n} is not a square grid")
    for size in args.size:
        if size % 64:
            raise SystemExit(f"--size: {size} is not a multiple of 64")
    device = resolve_device(args.device)
    if device == "cpu":
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    isolate = args.isolate or ("run" if device.startswith("cuda") else "variant")
    started = time.time()
    deadline = started + args.budget if args.budget else None
    common = {"device": device, "dtype": args.dtype, "repeats": args.repeats, "threads": args.threads,
              "tiny": args.tiny_models, "flux_blocks": args.flux_blocks}
    layer_results: list[dict[str, Any]] = []
    unet_results: list[dict[str, Any]] = []
    tome_installed = importlib.util.find_spec("tomesd") is not None

    layer_jobs = []
    if args.part in ("layer", "all"):
        for n in args.tokens:
            for head_dim in args.head_dims:
                for variant in args.layer_variants:
                    layer_jobs.append({**common, "part": "layer", "tokens": n, "head_dim": head_dim, "variant": variant,
                                       "repeats": 1 if n > 16384 and device == "cpu" else args.repeats})
    tmp = tempfile.TemporaryDirectory(prefix="attnctrl-bench-attn-")
    outputs: dict[tuple[str, int, str], Path] = {}
    unet_jobs, unet_fixed = [], []  # fixed: rows decided without running (n/a, not installed)
    if args.part in ("unet", "all"):
        for size in args.size:
            for model in args.model:
                for variant in args.variants:
                    key = {"model": model, "size": size, "variant": variant}
                    if model in ("pixart", "flux") and variant in UNET_ONLY:
                        unet_fixed.append({**key, "status": "n/a", "message": "UNet-only"})
                        continue
                    if variant == "tomesd" and not tome_installed:
                        unet_fixed.append({**key, "status": "skipped", "message": "tomesd not installed"})
                        continue
                    path = Path(tmp.name) / f"{model}-{size}-{variant}.safetensors"
                    outputs[(model, size, variant)] = path
                    unet_jobs.append({**common, "part": "unet", **key, "warmup": args.unet_warmup,
                                      "repeats": 1 if size >= BIG_SIZE else args.repeats, "output_file": str(path)})

    def stop(signum: int, frame: Any) -> None:
        raise Stopped(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    progress = {"file": None}

    def run_jobs(jobs: list[dict[str, Any]], sink: list[dict[str, Any]]) -> None:
        if isolate == "variant":
            for job in jobs:
                if deadline and time.time() > deadline:
                    sink.append({**_key(job), "status": "skipped", "message": "time budget spent"})
                    continue
                child = run_child(__file__, job, timeout_s=args.timeout)
                sink.append({**_key(job), **child.data, "status": child.status, "message": child.message})
                print(f"[{job['part']} {_label(job)}] {child.status} in {child.wall_s:.0f} s", file=sys.stderr, flush=True)
            return
        if not jobs:
            return
        progress["file"] = Path(tmp.name) / f"progress-{jobs[0]['part']}.json"
        spec = {**common, "mode": "group", "jobs": jobs, "deadline": deadline, "progress_file": str(progress["file"])}
        child = run_child(__file__, spec, timeout_s=args.timeout)
        done = child.data.get("results") or _read_progress(progress["file"])
        progress["file"] = None
        for job, r in zip(jobs, done):
            sink.append(r)
        for job in jobs[len(done):]:
            sink.append({**_key(job), "status": child.status if child.status != "ok" else "error",
                         "message": child.message or "not reached"})

    complete = False
    try:
        run_jobs(layer_jobs, layer_results)
        if layer_jobs:
            write_outputs(args, device, started, layer_results, unet_results, complete=False, isolate=isolate)
        run_jobs(unet_jobs, unet_results)
        unet_results = _ordered(unet_results + unet_fixed, args)
        add_output_diffs(unet_results, outputs)
        complete = True
    except (Stopped, KeyboardInterrupt) as err:
        print(f"stopped ({type(err).__name__} {err}): writing what is finished", file=sys.stderr, flush=True)
        if progress["file"] is not None:
            partial = _read_progress(progress["file"])
            (layer_results if partial and "tokens" in partial[0] else unet_results).extend(partial)
        unet_results = _ordered(unet_results + unet_fixed, args)
        add_output_diffs(unet_results, outputs)
    write_outputs(args, device, started, layer_results, unet_results, complete=complete, isolate=isolate)
    tmp.cleanup()
    return 0 if complete else 1


def _read_progress(path: Path | None) -> list[dict[str, Any]]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8")) if path else []
    except (OSError, ValueError):
        return []


def _ordered(results: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Step rows in (size, model, variant) order of the command line."""
    order = {(s, m, v): i for i, (s, m, v) in enumerate((s, m, v) for s in args.size for m in args.model for v in args.variants)}
    return sorted(results, key=lambda r: order.get((r["size"], r.get("model", "sd15"), r["variant"]), len(order)))


def write_outputs(args: argparse.Namespace, device: str, started: float, layer_results: list[dict[str, Any]],
                  unet_results: list[dict[str, Any]], *, complete: bool, isolate: str) -> None:
    sections = []
    if layer_results:
        sections.append(f"### One self-attention layer (batch {BATCH}, {HEADS} heads)\n\n" + layer_table(layer_results))
    if unet_results:
        models = sorted({r.get("model", "sd15") for r in unet_results}, key=MODELS.index)
        sizes = sorted({r["size"] for r in unet_results})
        if models == ["sd15"] and len(sizes) == 1:
            title = f"### One UNet step, SD 1.5-shaped UNet (random weights) at {sizes[0]}², batch {BATCH}"
        else:
            batch = f"batch {BATCH}" if "flux" not in models else f"batch {BATCH} (Flux: 1, guidance-distilled)"
            title = (f"### One denoiser step ({', '.join(MODEL_NAMES[m] for m in models)}; random weights) at "
                     f"{', '.join(f'{s}²' for s in sizes)}, {batch}")
        sections.append(title + "\n\n" + unet_table(unet_results, cuda=device.startswith("cuda")))
    if "flux" in {r.get("model") for r in unet_results}:
        blocks = args.flux_blocks or (FLUX_DEV_TRANSFORMER["num_layers"], FLUX_DEV_TRANSFORMER["num_single_layers"])
        cut = "" if args.flux_blocks is None else " (depth CUT from Flux.1-dev's 19 + 38)"
        sections.append(f"Flux-shaped transformer: {blocks[0]} double-stream + {blocks[1]} single-stream blocks{cut}, "
                        f"{FLUX_TEXT_TOKENS} T5 tokens; policies restrict image->image attention only, text keeps full attention.")
    env = environment(device)
    loads = [r["loadavg_1min"] for r in layer_results + unet_results if "loadavg_1min" in r]
    processes = ("each variant in its own process" if isolate == "variant"
                 else "one process per part, models built once, peaks reset per variant")
    notes = [
        f"Device {device}, {args.dtype}, {args.threads} torch thread(s), median of {args.repeats} timed call(s) after one "
        f"warm-up (layers above 16384 tokens on the CPU: 1 call, no warm-up; steps at {BIG_SIZE}² and above: 1 call; UNet: "
        f"{'one warm-up' if args.unet_warmup else 'no warm-up'}); {processes}; torch {env.get('torch')}; "
        f"{env.get('gpu', env.get('cpu', ''))}.",
        "speed-up: baseline time / variant time (higher is better). peak Δ: memory growth during the timed calls"
        + ("; peak: max_memory_allocated during the timed calls, weights included." if device.startswith("cuda") else "."),
    ]
    if layer_results:
        notes.append("rel. diff vs exact: ||out - exact|| / ||exact|| on 16 query rows: how far the approximation is from "
                     "full attention.")
    if any("rel_diff_vs_sdpa" in r for r in unet_results):
        notes.append("rel. diff vs sdpa: ||out - out_sdpa|| / ||out_sdpa|| of the whole step's output (random weights, so "
                     "indicative of the approximation's size, not of image quality).")
    if args.tiny_models:
        notes.append("--tiny-models: narrow stand-ins of the model configs (a plumbing smoke test; the times mean nothing).")
    if loads and max(loads) > (os.cpu_count() or 1):
        notes.append(f"The 1-minute load average reached {max(loads):.1f} on {os.cpu_count()} cores during the run: timings are noisy.")
    if not complete:
        notes.append("Partial results: the run was stopped or is still going.")
    markdown = ("## Efficient attention vs SDPA\n\n" + "\n\n".join(sections) + "\n\n" + "\n".join(f"- {x}" for x in notes)
                + f"\n\nCommand: `python benchmarks/attention.py {' '.join(sys.argv[1:])}`\n")
    if complete:
        print("\n\n".join(sections) + "\n")
        print("\n".join(f"- {x}" for x in notes))
    if not args.no_write:
        stem = "attention" if args.part == "all" else f"attention-{args.part}"
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out / f"{stem}.md", markdown)
        atomic_write(args.out / f"{stem}.json", json.dumps(
            {"command": sys.argv[1:], "environment": env, "layer": layer_results, "unet": unet_results, "notes": notes,
             "complete": complete, "elapsed_s": time.time() - started}, indent=2, default=str) + "\n")
        if complete:
            print(f"wrote {args.out / (stem + '.md')}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
