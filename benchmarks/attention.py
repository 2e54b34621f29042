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

Per variant: one warm-up call (skipped for layers above 16384 tokens, where a call takes minutes,
and for the UNet with ``--no-unet-warmup``),
then ``--repeats`` timed calls, median reported; peak memory is the growth of the peak during the
timed calls over what is held after the warm-up (CPU ``VmHWM``; CUDA ``max_memory_allocated``).
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

``tomesd`` comes from PyPI (``pip install tomesd``; not a dependency of attnctrl). Results: markdown
tables on stdout, ``benchmarks/results/attention.md`` and ``attention.json`` (``attention-layer.*`` /
``attention-unet.*`` with ``--part``); progress on stderr.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    Memory,
    child_main,
    environment,
    fmt_gb,
    fmt_ratio,
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
TARGET_DENSITY = 0.10
CHECK_ROWS = 16

# SD 1.5's published UNet config (runwayml/stable-diffusion-v1-5, unet/config.json).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)


# ---- policies ------------------------------------------------------------------------------------
def grouped_config(side: int) -> tuple[Any, float]:
    """The GroupedAttention (3x3 neighbourhood) whose density on a ``side``² grid is closest to 10%."""
    import attnctrl
    from attnctrl.efficient import grouped_density

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
    with torch.no_grad():
        out, first_s, times, base, peak = _timed(lambda: attn(x), device, spec["repeats"], n <= 16384, memory)
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(SEED + 1))[:CHECK_ROWS]
        exact = _exact_rows(attn, x, rows)
    err = ((out[:, rows] - exact).norm() / exact.norm()).item()
    return {"variant": variant, "tokens": n, "head_dim": head_dim, "first_call_s": first_s, "times_s": times,
            "time_s": median(times), "peak_delta_bytes": peak - base, "rel_err": err, "loadavg_1min": os.getloadavg()[0],
            **extra}


def run_unet(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from diffusers import UNet2DConditionModel

    import attnctrl

    torch.set_num_threads(spec["threads"])
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    variant, latent = spec["variant"], spec["size"] // 8
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(**SD15_UNET).to(device, dtype).eval()
    sample = torch.randn(BATCH, 4, latent, latent, device=device, dtype=dtype)
    text = torch.randn(BATCH, 77, 768, device=device, dtype=dtype)
    extra: dict[str, Any] = {}
    if variant == "tomesd":
        import tomesd

        tomesd.apply_patch(unet)  # defaults: ratio 0.5, max_downsample 1, 2x2 cells
    elif variant != "sdpa":
        config, extra = policy(variant, latent)
        attnctrl.apply(unet, config)
    memory = Memory(device)
    with torch.no_grad():
        out, first_s, times, base, peak = _timed(
            lambda: unet(sample, 999, encoder_hidden_states=text).sample, device, spec["repeats"], spec["warmup"], memory
        )
    return {"variant": variant, "size": spec["size"], "first_call_s": first_s, "times_s": times, "time_s": median(times),
            "peak_delta_bytes": peak - base, "out_norm": out.float().norm().item(), "loadavg_1min": os.getloadavg()[0],
            **extra}


def run_variant(spec: dict[str, Any]) -> dict[str, Any]:
    return run_layer(spec) if spec["part"] == "layer" else run_unet(spec)


# ---- parent side ---------------------------------------------------------------------------------
def _ratio(base: float | None, value: float | None) -> float | None:
    return None if base is None or value is None or value == 0 else base / value


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
            f"{r['time_s']:.3f}" if ok else r.get("status", "?") + (f": {r.get('message', '')[:60]}" if r.get("message") else ""),
            fmt_ratio(_ratio(base.get("time_s"), r.get("time_s"))) if ok and base_ok else "—",
            fmt_gb(r["peak_delta_bytes"]) if ok else "—",
            fmt_ratio(r["peak_delta_bytes"] / base["peak_delta_bytes"]) if ok and base_ok and base["peak_delta_bytes"] > 0 else "—",
            f"{r['rel_err']:.3f}" if ok else "—",
            facts,
        ])
    return markdown_table(["N", "head dim", "variant", "time (s)", "speed-up vs sdpa", "peak Δ (GB)", "memory vs sdpa",
                           "rel. diff vs exact", "notes"], rows)


def unet_table(results: list[dict[str, Any]]) -> str:
    base = next((r for r in results if r["variant"] == "sdpa" and r.get("status") == "ok"), {})
    tome = next((r for r in results if r["variant"] == "tomesd" and r.get("status") == "ok"), {})
    rows = []
    for r in results:
        ok = r.get("status") == "ok"
        rows.append([
            r["variant"],
            f"{r['time_s']:.1f}" if ok else r.get("status", "?") + (f": {r.get('message', '')[:60]}" if r.get("message") else ""),
            fmt_ratio(_ratio(base.get("time_s"), r.get("time_s"))) if ok and base else "—",
            fmt_ratio(_ratio(tome.get("time_s"), r.get("time_s"))) if ok and tome else "—",
            fmt_gb(r["peak_delta_bytes"]) if ok else "—",
        ])
    return markdown_table(["variant", "time per step (s)", "speed-up vs sdpa", "speed-up vs tomesd", "peak Δ (GB)"], rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["layer", "unet", "all"], default="all")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536], help="layer sizes (squares)")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[40, 64])
    parser.add_argument("--layer-variants", nargs="+", choices=LAYER_VARIANTS, default=list(LAYER_VARIANTS))
    parser.add_argument("--size", type=int, default=1024, help="UNet image size (multiple of 64)")
    parser.add_argument("--variants", nargs="+", choices=UNET_VARIANTS, default=list(UNET_VARIANTS), help="UNet variants")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--unet-warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="one untimed UNet call first (--no-unet-warmup: time the first call; eager PyTorch on CPU "
                        "has little one-off cost, and a 1024² step takes minutes there)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--timeout", type=float, default=1800.0, help="per-variant limit in seconds")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args.child, run_variant)
    for n in args.tokens:
        if math.isqrt(n) ** 2 != n:
            raise SystemExit(f"--tokens: {n} is not a square grid")
    device = resolve_device(args.device)
    if device == "cpu":
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    started = time.time()
    common = {"device": device, "dtype": args.dtype, "repeats": args.repeats, "threads": args.threads}
    layer_results: list[dict[str, Any]] = []
    unet_results: list[dict[str, Any]] = []
    sections = []
    if args.part in ("layer", "all"):
        for n in args.tokens:
            for head_dim in args.head_dims:
                for variant in args.layer_variants:
                    spec = {**common, "part": "layer", "tokens": n, "head_dim": head_dim, "variant": variant,
                            "repeats": 1 if n > 16384 else args.repeats}
                    child = run_child(__file__, spec, timeout_s=args.timeout)
                    layer_results.append({"tokens": n, "head_dim": head_dim, "variant": variant, **child.data,
                                          "status": child.status, "message": child.message})
                    print(f"[layer N={n} d={head_dim} {variant}] {child.status} in {child.wall_s:.0f} s", file=sys.stderr, flush=True)
        sections.append(f"### One self-attention layer (batch {BATCH}, {HEADS} heads)\n\n" + layer_table(layer_results))
        print(sections[-1] + "\n", flush=True)
    if args.part in ("unet", "all"):
        for variant in args.variants:
            spec = {**common, "part": "unet", "size": args.size, "variant": variant, "warmup": args.unet_warmup}
            child = run_child(__file__, spec, timeout_s=args.timeout)
            unet_results.append({"variant": variant, **child.data, "status": child.status, "message": child.message})
            print(f"[unet {args.size} {variant}] {child.status} in {child.wall_s:.0f} s", file=sys.stderr, flush=True)
        sections.append(f"### One UNet step, SD 1.5-shaped UNet (random weights) at {args.size}², batch {BATCH}\n\n"
                        + unet_table(unet_results))
        print(sections[-1] + "\n", flush=True)
    env = environment(device)
    loads = [r["loadavg_1min"] for r in layer_results + unet_results if "loadavg_1min" in r]
    notes = [
        f"Device {device}, {args.dtype}, {args.threads} torch thread(s), median of {args.repeats} timed call(s) after one "
        f"warm-up (layers above 16384 tokens: 1 call, no warm-up; UNet: "
        f"{'one warm-up' if args.unet_warmup else 'no warm-up'}); torch {env.get('torch')}; {env.get('cpu', env.get('gpu', ''))}.",
        "speed-up: baseline time / variant time (higher is better). peak Δ: memory growth during the timed calls.",
        "rel. diff vs exact: ||out - exact|| / ||exact|| on 16 query rows: how far the approximation is from full attention.",
    ]
    if loads and max(loads) > (os.cpu_count() or 1):
        notes.append(f"The 1-minute load average reached {max(loads):.1f} on {os.cpu_count()} cores during the run: timings are noisy.")
    markdown = ("## Efficient attention vs SDPA\n\n" + "\n\n".join(sections) + "\n\n" + "\n".join(f"- {x}" for x in notes)
                + f"\n\nCommand: `python benchmarks/attention.py {' '.join(sys.argv[1:])}`\n")
    print("\n".join(f"- {x}" for x in notes))
    if not args.no_write:
        from attnctrl.io import atomic_write_bytes, write_json_atomic

        stem = "attention" if args.part == "all" else f"attention-{args.part}"
        atomic_write_bytes(RESULTS / f"{stem}.md", markdown.encode("utf-8"))
        write_json_atomic({"command": sys.argv[1:], "environment": env, "layer": layer_results, "unet": unet_results,
                           "notes": notes, "elapsed_s": time.time() - started}, RESULTS / f"{stem}.json")
        print(f"wrote {RESULTS / (stem + '.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
