"""Prompt-to-Prompt cost: wall time and peak memory of a P2P edit versus plain SDPA generation.

What it measures
----------------
An SD 1.5-shaped pipeline (the real SD 1.5 UNet config, random weights, fixed seed), two prompts
(source + word swap), classifier-free guidance 7.5 (so every UNet call has 4 rows), DDIM, at each
``--sizes`` resolution, in one run. Variants, all from the same initial noise:

* ``plain``         the stock ``diffusers.StableDiffusionPipeline`` (default processor
                    ``AttnProcessor2_0`` = PyTorch SDPA) on the two prompts: the baseline;
* ``fused``         ``attnctrl.pipelines.Prompt2PromptPipeline`` with
                    ``Replace(blend=LocalBlend([src_word, edit_word]))`` (attention store on,
                    the default), edits folded into V and computed with fused kernels;
* ``materialised``  the same edit with ``materialise=True``: the explicit reference path that
                    builds every (N x M) probability matrix.

Each variant runs in its own child Python process (same seed, same model, same steps): build the
pipeline, record memory, one 1-step warm-up call, then ``--repeats`` timed calls; the reported
time is the median. Peak memory is the peak over warm-up and timed calls:

* CPU: peak resident set size (``VmHWM``, reset with ``/proc/self/clear_refs`` right after the
  model is built). Reported as the total (weights + activations) and as Δ, the growth over the
  RSS after model construction. The ratio vs plain is computed on both, like with like;
* CUDA: ``torch.cuda.max_memory_allocated`` (total) and the growth over ``memory_allocated``
  after model construction.

Targets (fused vs plain, at every size): time ≤ 1.10×, peak memory ≤ 1.15× (total peak; the Δ
ratio is shown too).

Out of memory: the materialised path needs the full self-attention probability matrix of the
highest-resolution layers, ``4 rows x 8 heads x N^2`` float32 with ``N = (H/8)(W/8)``, twice (scores
and probabilities live together), plus the model: ~8 GB at 512², ~73 GB at 1024². It is pre-checked against
``--max-gb`` and reported as "OOM (needs ~X GB)" without running it when it cannot fit. Variants
that do run get an address-space limit of ``--max-gb`` (+ runtime slack) on CPU, so a real OOM
raises inside the child and is reported the same way instead of taking the machine down.

What is left out, on purpose: the VAE decode (``output_type="latent"``) so the time is the text
encoding + denoising loop; the text encoder is a 2-layer random CLIPTextModel of width 768 (the
real one has 12 layers; it runs once per call on 4 x 77 tokens, well under 1% of the UNet time);
the tokenizer is a real ``CLIPTokenizer`` (max length 77) over a small vocabulary written offline.

How to run
----------
::

    python benchmarks/p2p.py                          # 512² (3 steps x 3 repeats) and 1024² (2 steps x 1)
    python benchmarks/p2p.py --threads 1 --repeats 2 1  # on a shared CPU machine (see below)
    python benchmarks/p2p.py --quick                  # smoke run: 64² and 128², 2 steps, 2-3 min on CPU
    python benchmarks/p2p.py --sizes 512 --steps 3 --repeats 3 --variants plain fused
    python benchmarks/p2p.py --device cuda --dtype fp16 --steps 20 --repeats 5

Results: a markdown table per size on stdout, ``benchmarks/results/p2p.md`` and
``benchmarks/results/p2p.json``. Progress goes to stderr.

How long it takes (2-core AMD EPYC VM, no GPU): one UNet step at 512² (4 rows) is ~52 s with one
torch thread, ~30 s with two on an idle machine; a 1024² step is ~190 s with two threads. Measured:
the 512² part with ``--threads 1 --repeats 2 1`` took 29 min (plain 6.5, fused 6.7, materialised
15.7: the materialised path is ~2.5x slower per step there); ``--sizes 1024 --steps 1 --threads 2``
took 13.5 min (materialised skipped by the pre-check). Each child also spends 12-25 s building the
860M-parameter UNet. ``--quick`` takes 2-3 minutes. ``--device cuda`` is untested so far (no GPU
was available when this was written).

Shared CPU machines: pass ``--threads 1`` whenever another process is busy. With two intra-op
threads, every parallel op waits for the core the other process holds (a 1.5 MB copy measured
8 ms instead of 0.06 ms), which penalises the fused path's extra small ops far beyond their real
cost and makes repeats vary by 50%. The table flags runs during which the load average exceeded
the core count, and shows the CPU-time ratio next to the wall-time ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    GB,
    GIB,
    Memory,
    atomic_write,
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
VARIANTS = ("plain", "fused", "materialised")
TIME_TARGET = 1.10
MEM_TARGET = 1.15
SEED = 0
GUIDANCE = 7.5
PROMPTS = ("a photo of a cat sitting on the grass", "a photo of a dog sitting on the grass")
BLEND_WORDS = ("cat", "dog")
# Address-space slack over --max-gb for a CPU child: the Python/torch runtime reserves virtual
# memory it never touches (thread stacks, allocator arenas, shared libraries).
AS_SLACK_BYTES = 2 * GIB

# The real Stable Diffusion 1.5 UNet config (runwayml/stable-diffusion-v1-5, unet/config.json).
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,  # diffusers' legacy name: 8 heads (head dim 40/80/160)
)
# The real SD 1.5 scheduler settings, as DDIM.
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)
TEXT_MAX_LENGTH = 77
TEXT_LAYERS = 2


# ---- the model (child side) --------------------------------------------------------------------
def _byte_chars() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE, in GPT-2/CLIP order (printable bytes first)."""
    order = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = [chr(b) for b in order]
    for b in range(256):
        if b not in order:
            chars.append(chr(256 + len(chars) - len(order)))
    return chars


def write_clip_vocab(folder: Path, words: list[str]) -> tuple[Path, Path]:
    """A CLIP BPE vocabulary (vocab.json + merges.txt) in which every word of ``words`` is one token."""
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            rule = f"{merged} {piece}"
            if rule not in merges:
                merges.append(rule)
            merged += piece
            vocab.setdefault(merged, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder / "vocab.json", folder / "merges.txt"


def build_pipeline(variant: str, device: str, dtype: Any, folder: Path) -> Any:
    """The SD 1.5-shaped pipeline of one variant, random weights from fixed seeds."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from attnctrl.pipelines import Prompt2PromptPipeline

    words = sorted({w for p in PROMPTS for w in p.split()})
    vocab, merges = write_clip_vocab(folder, words)
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=TEXT_MAX_LENGTH)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=12, max_position_embeddings=TEXT_MAX_LENGTH, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, projection_dim=768, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED + 1)
    text_encoder = CLIPTextModel(text_config).eval()
    torch.manual_seed(SEED + 2)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    torch.manual_seed(SEED + 3)
    # Never run (output_type="latent"); four blocks so that vae_scale_factor is SD's 8.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
    )
    cls = StableDiffusionPipeline if variant == "plain" else Prompt2PromptPipeline
    pipe = cls(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def run_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """Child body: build, warm up, time ``repeats`` calls, measure peak memory."""
    import torch

    import attnctrl

    variant, size, device = spec["variant"], spec["size"], spec["device"]
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[spec["dtype"]]
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    torch.set_grad_enabled(False)
    mem = Memory(device)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="attnctrl-bench-tok-") as tmp:
        pipe = build_pipeline(variant, device, dtype, Path(tmp))
    build_s = time.perf_counter() - t0
    synchronize(device)
    base = mem.current()
    mem.reset_peak()

    latent_hw = (size // 8, size // 8)
    noise = torch.randn((1, 4, *latent_hw), generator=torch.Generator("cpu").manual_seed(SEED)).to(device, dtype)
    edit = attnctrl.Replace(blend=attnctrl.LocalBlend(list(BLEND_WORDS)))

    def call(steps: int) -> torch.Tensor:
        common = dict(num_inference_steps=steps, guidance_scale=GUIDANCE, height=size, width=size, output_type="latent")
        if variant == "plain":
            return pipe(prompt=list(PROMPTS), latents=noise.repeat(len(PROMPTS), 1, 1, 1), **common).images
        return pipe(
            prompt=list(PROMPTS), edit=edit, materialise=(variant == "materialised"), latents=noise, **common
        ).images

    def log(msg: str) -> None:
        print(f"[{size}² {variant}] {msg}", file=sys.stderr, flush=True)

    log(f"built in {build_s:.1f} s, RSS/alloc {base / GB:.2f} GB; warm-up (1 step)")
    t = time.perf_counter()
    call(1)
    synchronize(device)
    warmup_s = time.perf_counter() - t
    log(f"warm-up {warmup_s:.1f} s")
    times, cpu_times = [], []
    load_before = os.getloadavg()[0]
    out = None
    for r in range(spec["repeats"]):
        synchronize(device)
        t, c = time.perf_counter(), time.process_time()
        out = call(spec["steps"])
        synchronize(device)
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
        log(f"repeat {r + 1}/{spec['repeats']}: {times[-1]:.1f} s wall, {cpu_times[-1]:.1f} s CPU ({spec['steps']} steps)")
    peak = mem.peak()
    result: dict[str, Any] = {
        "times_s": times,
        "time_s": median(times),
        "cpu_times_s": cpu_times,
        "cpu_s": median(cpu_times),
        "loadavg_1min": [load_before, os.getloadavg()[0]],
        "warmup_s": warmup_s,
        "build_s": build_s,
        "base_bytes": base,
        "peak_bytes": peak,
        "delta_bytes": max(0, peak - base),
        "peak_resettable": mem.peak_resettable,
        "finite": bool(torch.isfinite(out).all()),
        "threads": torch.get_num_threads(),
    }
    if spec.get("latents_out"):
        from safetensors.torch import save_file

        save_file({"latents": out.float().cpu().contiguous()}, spec["latents_out"])
    if spec.get("profile"):
        log("profiling one 1-step call")
        result["profile"] = profile_call(lambda: call(1), device)
    return result


def profile_call(call: Any, device: str) -> dict[str, Any]:
    """Where one call's time goes: attention processors (self/cross, by query count) and top ops.

    Runs after the measured calls (the profiler's own memory and time are not in the results).
    Processor timers synchronise on CUDA, so the profiled call is slower than the timed ones.
    """
    import collections

    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    from attnctrl.processors.p2p import PromptToPromptProcessor

    buckets: dict[str, float] = collections.defaultdict(float)
    counts: collections.Counter[str] = collections.Counter()
    originals = {cls: cls.__call__ for cls in (AttnProcessor2_0, PromptToPromptProcessor)}

    def timed(original: Any) -> Any:
        def wrapper(self: Any, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None, *a: Any, **k: Any) -> Any:
            synchronize(device)
            t = time.perf_counter()
            result = original(self, attn, hidden_states, encoder_hidden_states, *a, **k)
            synchronize(device)
            tokens = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[-1] * hidden_states.shape[-2]
            key = f"{'cross' if encoder_hidden_states is not None else 'self'}-attention N={tokens}"
            buckets[key] += time.perf_counter() - t
            counts[key] += 1
            return result
        return wrapper

    for cls, original in originals.items():
        cls.__call__ = timed(original)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        synchronize(device)
        t = time.perf_counter()
        with torch.profiler.profile(activities=activities) as prof:
            call()
        synchronize(device)
        total = time.perf_counter() - t
    finally:
        for cls, original in originals.items():
            cls.__call__ = original
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    return {
        "call_s": total,
        "processors_s": dict(sorted(buckets.items())),
        "processor_calls": dict(counts),
        "op_table": prof.key_averages().table(sort_by=sort, row_limit=20),
    }


# ---- the parent --------------------------------------------------------------------------------
def materialised_matrix_bytes(size: int, num_prompts: int = len(PROMPTS)) -> int:
    """One float32 self-attention probability matrix of the top UNet level: rows x heads x N^2."""
    n = (size // 8) ** 2
    rows = 2 * num_prompts  # classifier-free guidance
    return rows * 8 * n * n * 4


def materialised_needs_bytes(size: int, size_results: dict[str, dict[str, Any]]) -> int:
    """Estimated peak of the materialised path: the model (plain's RSS/allocation after
    construction, else 4 GB) plus two attention matrices (scores and probabilities coexist)."""
    base = size_results.get("plain", {}).get("base_bytes", 4 * GB)
    return int(base + 2 * materialised_matrix_bytes(size))


def _per_size(values: list[int], sizes: list[int], what: str) -> dict[int, int]:
    if len(values) > len(sizes):
        raise SystemExit(f"--{what}: {len(values)} values for {len(sizes)} sizes")
    values = values + [values[-1]] * (len(sizes) - len(values))
    return dict(zip(sizes, values))


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def evaluate(size_results: dict[str, dict[str, Any]]) -> None:
    """Add ratios vs plain and the target verdict to every variant's result (in place)."""
    plain = size_results.get("plain", {})
    ok_plain = plain.get("status") == "ok"
    for name, r in size_results.items():
        if r.get("status") != "ok" or not ok_plain:
            continue
        r["time_ratio"] = _ratio(r["time_s"], plain["time_s"])
        r["cpu_ratio"] = _ratio(r.get("cpu_s"), plain.get("cpu_s"))
        r["mem_ratio"] = _ratio(r["peak_bytes"], plain["peak_bytes"])
        r["mem_delta_ratio"] = _ratio(r["delta_bytes"], plain["delta_bytes"])
        if name == "fused":
            r["time_target_met"] = r["time_ratio"] <= TIME_TARGET
            r["mem_target_met"] = r["mem_ratio"] <= MEM_TARGET
            r["mem_delta_target_met"] = r["mem_delta_ratio"] is not None and r["mem_delta_ratio"] <= MEM_TARGET
            r["target_met"] = r["time_target_met"] and r["mem_target_met"]


def size_table(size: int, steps: int, repeats: int, size_results: dict[str, dict[str, Any]]) -> str:
    headers = [
        "variant", "time (s)", "time ratio vs plain", "CPU-time ratio", "peak mem (GB)", "mem ratio vs plain",
        "Δ mem over model (GB)", "Δ mem ratio", "target met?",
    ]
    rows = []
    for name, r in size_results.items():
        if r.get("status") != "ok":
            status = r.get("status")
            if status == "oom":
                text = f"OOM (needs ~{r['needs_gb']:.0f} GB)" if r.get("needs_gb") else "OOM"
                if r.get("skipped"):
                    text += " — pre-check, not run"
                elif r.get("message"):
                    text += f" — {r['message'][:60]}"
            else:
                text = f"{status}: {r.get('message', '')[:80]}"
            rows.append([name, text, "—", "—", "—", "—", "—", "—", "n/a"])
            continue
        if name == "fused":
            tm = "✓" if r.get("time_target_met") else "✗"
            mm = "✓" if r.get("mem_target_met") else "✗"
            dm = "✓" if r.get("mem_delta_target_met") else "✗"
            verdict = f"{'yes' if r.get('target_met') else 'NO'} (time {tm}, mem {mm}; Δ mem {dm})"
        else:
            verdict = "baseline" if name == "plain" else "reference (no target)"
        rows.append([
            name, f"{r['time_s']:.2f}", fmt_ratio(r.get("time_ratio")), fmt_ratio(r.get("cpu_ratio")), fmt_gb(r["peak_bytes"]),
            fmt_ratio(r.get("mem_ratio")), fmt_gb(r["delta_bytes"]), fmt_ratio(r.get("mem_delta_ratio")), verdict,
        ])
    title = f"### {size}×{size} (latent {size // 8}², {steps} steps, median of {repeats})"
    text = title + "\n\n" + markdown_table(headers, rows)
    loads = [x for r in size_results.values() for x in r.get("loadavg_1min", [])]
    cores = os.cpu_count() or 1
    if loads and max(loads) > cores + 0.5:
        text += (f"\n\nNote: other processes competed for the CPU (1-min load average up to {max(loads):.1f} on "
                 f"{cores} cores): wall times are noisy; the CPU-time ratio (process CPU time, all threads) is steadier.")
    return text


def compare_latents(files: dict[str, Path]) -> dict[str, float]:
    """Max |Δ| between the final latents of the variants (fused vs materialised, source rows vs plain)."""
    from safetensors.torch import load_file

    lat = {k: load_file(str(p))["latents"] for k, p in files.items() if p.exists()}
    out: dict[str, float] = {}
    if "fused" in lat and "materialised" in lat:
        scale = lat["materialised"].abs().max().clamp_min(1e-12)
        out["fused_vs_materialised_max_rel"] = float((lat["fused"] - lat["materialised"]).abs().max() / scale)
    if "plain" in lat and "fused" in lat:
        scale = lat["plain"][0].abs().max().clamp_min(1e-12)
        out["fused_source_vs_plain_max_rel"] = float((lat["fused"][0] - lat["plain"][0]).abs().max() / scale)
        out["fused_edit_vs_plain_max_rel"] = float((lat["fused"][1] - lat["plain"][1]).abs().max() / scale)
    return out


def profile_report(results: dict[str, Any]) -> str:
    """Markdown of the ``--profile`` data: processor time per layer kind, plain vs fused, and op tables."""
    parts = ["## Prompt-to-Prompt profile (one 1-step call per variant, after the timed runs)"]
    for size, data in results["sizes"].items():
        variants = {k: v["profile"] for k, v in data["variants"].items() if v.get("profile")}
        if not variants:
            continue
        keys = sorted({k for p in variants.values() for k in p["processors_s"]},
                      key=lambda k: (k.split()[0], -int(k.split("N=")[1])))
        rows = []
        for key in keys:
            row = [key, str(next((p["processor_calls"].get(key) for p in variants.values() if key in p["processor_calls"]), ""))]
            row += [f"{variants[v]['processors_s'].get(key, 0.0):.3f}" for v in variants]
            rows.append(row)
        rows.append(["all attention processors", ""] + [f"{sum(p['processors_s'].values()):.3f}" for p in variants.values()])
        rows.append(["whole call", ""] + [f"{p['call_s']:.3f}" for p in variants.values()])
        parts.append(f"### {size}×{size}: seconds per layer kind\n\n"
                     + markdown_table(["layers", "calls", *[f"{v} (s)" for v in variants]], rows))
        for v, p in variants.items():
            parts.append(f"#### {size}×{size} {v}: top ops\n\n```\n{p['op_table']}\n```")
    return "\n\n".join(parts) + "\n"


def write_outputs(
    results: dict[str, Any], tables: list[str], args: argparse.Namespace, device: str, wall: float, *, complete: bool
) -> None:
    """Write p2p.json and p2p.md (and p2p-profile.md with --profile); print the footer when complete."""
    fused = [s["variants"].get("fused", {}) for s in results["sizes"].values()]
    met = all(f.get("target_met") for f in fused) if fused and "fused" in args.variants else None
    results["wall_s"] = wall
    results["complete"] = complete
    results["all_targets_met"] = met
    env = results["environment"]
    threads = next((v["threads"] for d in results["sizes"].values() for v in d["variants"].values() if v.get("threads")),
                   args.threads or env["torch_threads"])
    results["setup"]["threads_per_variant"] = threads
    memory = ("peak RSS of a separate process per variant; Δ = growth over the RSS after model construction"
              if device == "cpu" else
              "torch.cuda.max_memory_allocated; Δ = growth over memory_allocated after model construction")
    machine = env.get("gpu") or env.get("cpu")
    header = (
        f"## Prompt-to-Prompt (Replace + LocalBlend) vs plain SDPA — {device}"
        f"{f' ({machine})' if machine else ''}, {args.dtype}\n\n"
        f"SD 1.5 UNet config (random weights), 2 prompts x CFG 7.5 = 4 rows, DDIM, VAE skipped. "
        f"Targets for fused: time ≤ {TIME_TARGET:.2f}×, peak memory ≤ {MEM_TARGET:.2f}× plain. "
        f"Peak memory: {memory}. "
        f"torch {env['torch']}, diffusers {env.get('diffusers')}, {threads} torch threads per variant process."
    )
    if complete:
        footer = f"Whole benchmark: {wall / 60:.1f} min. All targets met: {met}."
    else:
        done = ", ".join(f"{s}²" for s in results["sizes"])
        footer = f"Partial results ({done} done after {wall / 60:.1f} min); the run is still going or was stopped."
    md = "\n\n".join([header, *tables, footer]) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "p2p.json", json.dumps(results, indent=2, default=str) + "\n")
    atomic_write(args.out / "p2p.md", md)
    if args.profile:
        atomic_write(args.out / "p2p-profile.md", profile_report(results))
    if complete:
        print(footer)
        print(f"wrote {args.out / 'p2p.md'} and {args.out / 'p2p.json'}", file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes in pixels (default 512 1024)")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="denoising steps per size (default 3 2; last value repeats)")
    p.add_argument("--repeats", type=int, nargs="+", default=None, help="timed repeats per size, median reported (default 3 1)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--max-gb", type=float, default=None,
                   help="memory budget of one variant in GB (default: 75%% of RAM on CPU, the GPU's memory on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: torch's)")
    p.add_argument("--timeout", type=float, default=5400.0, help="seconds before a variant's child is killed")
    p.add_argument("--quick", action="store_true", help="smoke run: sizes 64 128, 2 steps, 1 repeat")
    p.add_argument("--profile", action="store_true",
                   help="also profile one 1-step call of plain and fused (processor timers + top ops) "
                        "into p2p-profile.md")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (p2p.json, p2p.md)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = args.sizes or [64, 128]
        args.steps = args.steps or [2]
        args.repeats = args.repeats or [1]
    args.sizes = args.sizes or [512, 1024]
    args.steps = args.steps or [3, 2]
    args.repeats = args.repeats or [3, 1]
    for s in args.sizes:
        if s % 64:
            p.error(f"--sizes: {s} is not a multiple of 64 (the SD 1.5 UNet downsamples the latent 3 times)")
    if "plain" not in args.variants:
        p.error("--variants must include plain (the baseline of every ratio)")
    args.variants = [v for v in VARIANTS if v in args.variants]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, run_variant)

    import torch

    device = resolve_device(args.device)
    if device == "cpu" and args.dtype == "fp16":
        print("warning: fp16 on CPU is slow and not what SD runs in on CPU; use fp32", file=sys.stderr)
    if args.max_gb is None:
        if device == "cuda":
            args.max_gb = round(torch.cuda.get_device_properties(0).total_memory / GB, 1)
        else:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            args.max_gb = round(0.75 * total / GB, 1)
    steps = _per_size(args.steps, args.sizes, "steps")
    repeats = _per_size(args.repeats, args.sizes, "repeats")
    script = Path(__file__).resolve()
    started = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "p2p",
        "issue": "P2P edit (Replace + LocalBlend) vs plain SDPA generation vs materialised reference",
        "targets": {"time_ratio_max": TIME_TARGET, "mem_ratio_max": MEM_TARGET},
        "setup": {
            "unet": "SD 1.5 config, random weights", "unet_config": SD15_UNET, "scheduler": "DDIM",
            "text_encoder": f"random CLIPTextModel, width 768, {TEXT_LAYERS} layers, max length {TEXT_MAX_LENGTH}",
            "vae": "skipped (output_type='latent')", "prompts": PROMPTS, "blend_words": BLEND_WORDS,
            "guidance_scale": GUIDANCE, "rows_per_unet_call": 2 * len(PROMPTS), "seed": SEED,
            "device": device, "dtype": args.dtype, "max_gb": args.max_gb,
            "memory": "CPU: peak RSS (VmHWM) per child process; CUDA: max_memory_allocated",
        },
        "environment": environment(device),
        "sizes": {},
    }
    tables = []
    with tempfile.TemporaryDirectory(prefix="attnctrl-bench-lat-") as tmp:
        for size in args.sizes:
            size_results: dict[str, dict[str, Any]] = {}
            latents: dict[str, Path] = {}
            for variant in args.variants:
                spec: dict[str, Any] = {
                    "variant": variant, "size": size, "device": device, "dtype": args.dtype,
                    "steps": steps[size], "repeats": repeats[size], "threads": args.threads,
                    "latents_out": str(Path(tmp) / f"{size}-{variant}.safetensors"),
                    "profile": args.profile and variant != "materialised",
                }
                if device == "cpu":
                    spec["address_space_limit_bytes"] = int(args.max_gb * GB + AS_SLACK_BYTES)
                if variant == "materialised":
                    matrix = materialised_matrix_bytes(size)
                    needs = materialised_needs_bytes(size, size_results)
                    if needs > args.max_gb * GB:
                        size_results[variant] = {
                            "status": "oom", "skipped": True, "needs_gb": needs / GB, "matrix_gb": matrix / GB,
                            "message": f"pre-check: one attention matrix is {matrix / GB:.1f} GB, "
                                       f"needs ~{needs / GB:.0f} GB > --max-gb {args.max_gb:g}",
                        }
                        print(f"[{size}² {variant}] skipped: {size_results[variant]['message']}", file=sys.stderr)
                        continue
                print(f"[{size}² {variant}] starting ({steps[size]} steps x {repeats[size]} repeats)", file=sys.stderr, flush=True)
                child = run_child(script, spec, timeout_s=args.timeout)
                r = dict(child.data)
                r.update(status=child.status, message=child.message, child_wall_s=child.wall_s)
                if variant == "materialised":
                    r["needs_gb"] = materialised_needs_bytes(size, size_results) / GB
                size_results[variant] = r
                latents[variant] = Path(spec["latents_out"])
                print(f"[{size}² {variant}] {child.status} in {child.wall_s:.0f} s {child.message}", file=sys.stderr, flush=True)
            evaluate(size_results)
            checks = compare_latents(latents)
            results["sizes"][str(size)] = {"steps": steps[size], "repeats": repeats[size], "variants": size_results, "checks": checks}
            table = size_table(size, steps[size], repeats[size], size_results)
            if checks:
                table += "\n\nfinal latents: " + ", ".join(f"{k} = {v:.2e}" for k, v in checks.items())
            tables.append(table)
            print("\n" + table + "\n", flush=True)
            # Results so far are on disk after every size: a run stopped later keeps them.
            write_outputs(results, tables, args, device, time.perf_counter() - started, complete=False)
    write_outputs(results, tables, args, device, time.perf_counter() - started, complete=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
