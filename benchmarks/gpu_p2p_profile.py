"""Prompt-to-Prompt cost on a GPU in one process: time and peak memory of every variant against
the stock SDPA pipeline, plus a launch/sync profile of one step (where the time goes).

The SD 1.5-shaped pipeline of ``benchmarks/p2p.py`` (real UNet config, random weights, CFG 7.5, two
prompts: 4 UNet rows), or with ``--model sd3`` / ``--model flux`` an SD3.5-medium- / Flux.1-dev-shaped
MM-DiT (published configs, random weights, ``--layers`` cuts the depth; ``benchmarks/_mmdit_shapes.py``),
built directly on the device (seconds instead of the ~20 s of a CPU
init) and shared by every variant, so a whole size sweep fits in a short device call:

* ``plain``   the stock ``StableDiffusionPipeline`` (``AttnProcessor2_0``): the baseline;
* ``fused``   ``Prompt2PromptPipeline`` with ``Replace(blend=LocalBlend([...]))``, automatic kernels;
* ``kernel``  the same edit with ``backend="sdpa"`` forced: text-key calls run the V-folded kernel
              path (attention + probability columns + a second attention) instead of explicit
              few-key probabilities, i.e. the path before the few-keys change.

Timing: median of ``--repeats`` calls of ``--steps`` steps after a 2-step warm-up, synchronised.
Memory: the peak over the timed calls (total, weights included) and its growth over the memory after
the build: CUDA ``torch.cuda.max_memory_allocated``; CPU the process's peak resident set size
(``VmHWM``, reset before each variant's timed calls; memory the allocator kept from an earlier
variant counts for the later one, so a later variant never reads below it). Profile (first size only): ``torch.profiler`` over a 2-step
call of each variant: CUDA kernel launches, synchronisations and device-to-host copies per step,
and the top operators by host time.

Usage (device machine): ``python benchmarks/gpu_p2p_profile.py --out OUT_DIR``
CPU smoke run: ``python benchmarks/gpu_p2p_profile.py --device cpu --dtype fp32 --sizes 64 --steps 2 --repeats 1``
MM-DiT on a GPU (issue 23's target: fused <= 1.10x time and memory at 1024²):
``python benchmarks/gpu_p2p_profile.py --model sd3 --sizes 1024 --steps 28`` (and ``--model flux``)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Memory  # noqa: E402
from p2p import BLEND_WORDS, GUIDANCE, PROMPTS, SEED, build_pipeline  # noqa: E402

VARIANTS = ("plain", "fused", "kernel")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _call(pipes: dict[str, Any], variant: str, size: int, steps: int, device: str, dtype: torch.dtype) -> None:
    import attnctrl

    common = dict(num_inference_steps=steps, height=size, width=size, output_type="latent")
    if pipes["family"] != "sd15":
        # MM-DiT: noise from a generator (the P2P pipeline shares it across prompts itself);
        # SD3 guides with a CFG batch, Flux.1-dev is guidance-distilled (no CFG batch).
        common.update(guidance_scale=7.0 if pipes["family"] == "sd3" else 3.5,
                      generator=torch.Generator("cpu").manual_seed(SEED), max_sequence_length=128)
        if variant == "plain":
            pipes["plain"](prompt=list(PROMPTS), **common)
            return
        if variant == "kernel":
            raise ValueError("the forced kernel path is a UNet comparison (few-keys vs V-folded text calls)")
        pipes["p2p"](prompt=list(PROMPTS), edit=attnctrl.Replace(blend=attnctrl.LocalBlend(list(BLEND_WORDS))), **common)
        return
    noise = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator("cpu").manual_seed(SEED)).to(device, dtype)
    common["guidance_scale"] = GUIDANCE
    if variant == "plain":
        pipes["plain"](prompt=list(PROMPTS), latents=noise.repeat(len(PROMPTS), 1, 1, 1), **common)
        return
    edit = attnctrl.Replace(blend=attnctrl.LocalBlend(list(BLEND_WORDS)))
    backend = "sdpa" if variant == "kernel" else None
    pipes["p2p"](prompt=list(PROMPTS), edit=edit, latents=noise, backend=backend, **common)


def _profile(pipes: dict[str, Any], variant: str, size: int, device: str, dtype: torch.dtype) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    steps = 2
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        _call(pipes, variant, size, steps, device, dtype)
        _sync(device)
    events = prof.key_averages()
    count = {e.key: e.count for e in events}

    def per_step(*names: str) -> float:
        return round(sum(count.get(n, 0) for n in names) / steps, 1)

    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {
        "launches_per_step": per_step("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"),
        "syncs_per_step": per_step("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"),
        "d2h_copies_per_step": per_step("cudaMemcpyAsync", "cudaMemcpy"),
        "aten_ops_per_step": round(sum(e.count for e in events if e.key.startswith("aten::")) / steps, 1),
        "top_host_ops": [(e.key, e.count, round(e.self_cpu_time_total / 1e3 / steps, 2)) for e in top],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype = args.device, {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, torch.device(device):
        if args.model == "sd15":
            plain = build_pipeline("plain", device, dtype, Path(tmp))
        else:
            from _mmdit_shapes import build_mmdit

            words = sorted({w for p in PROMPTS for w in p.split()})
            plain = build_mmdit(args.model, words, Path(tmp), layers=args.layers).to(device=device, dtype=dtype)
            plain.set_progress_bar_config(disable=True)
    from attnctrl.pipelines import Prompt2PromptFluxPipeline, Prompt2PromptPipeline, Prompt2PromptSD3Pipeline

    cls = {"sd15": Prompt2PromptPipeline, "sd3": Prompt2PromptSD3Pipeline, "flux": Prompt2PromptFluxPipeline}[args.model]
    pipes = {"plain": plain, "p2p": cls(**plain.components), "family": args.model}
    pipes["p2p"].set_progress_bar_config(disable=True)
    _sync(device)
    memory = Memory(device)
    base = memory.current()
    depth = "" if args.model == "sd15" or args.layers is None else f", depth cut to {args.layers}"
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": args.dtype,
                               "model": {"sd15": "SD 1.5-shaped UNet", "sd3": "SD3.5-medium-shaped MM-DiT",
                                         "flux": "Flux.1-dev-shaped MM-DiT"}[args.model] + depth,
                               "build_s": round(time.perf_counter() - t0, 1), "sizes": {}}
    print(f"built in {results['build_s']} s", file=sys.stderr, flush=True)
    deadline = time.perf_counter() + args.budget if args.budget else None
    for i, size in enumerate(args.sizes):
        steps, repeats = args.steps[min(i, len(args.steps) - 1)], args.repeats[min(i, len(args.repeats) - 1)]
        row: dict[str, Any] = {"steps": steps, "repeats": repeats, "variants": {}}
        results["sizes"][size] = row
        for variant in args.variants:
            if deadline is not None and time.perf_counter() > deadline:
                row["variants"][variant] = {"status": "skipped: budget spent"}
                continue
            try:
                _call(pipes, variant, size, 2, device, dtype)  # warm-up (kernel choice, tuning, caches)
                _sync(device)
                memory.reset_peak()
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    _call(pipes, variant, size, steps, device, dtype)
                    _sync(device)
                    times.append(time.perf_counter() - t)
                row["variants"][variant] = {"status": "ok", "seconds": round(statistics.median(times), 4),
                                            "peak_gb": round(memory.peak() / 1e9, 3),
                                            "peak_delta_gb": round((memory.peak() - base) / 1e9, 3)}
            except torch.cuda.OutOfMemoryError as err:
                row["variants"][variant] = {"status": f"OOM: {str(err)[:120]}"}
                torch.cuda.empty_cache()
            except Exception as err:  # noqa: BLE001 - reported in the table
                row["variants"][variant] = {"status": f"{type(err).__name__}: {str(err)[:300]}"}
            print(f"[{size}² {variant}] {row['variants'][variant]}", file=sys.stderr, flush=True)
        if i == 0 and args.profile:
            row["profile"] = {}
            for variant in args.variants:
                try:
                    row["profile"][variant] = _profile(pipes, variant, size, device, dtype)
                except Exception as err:  # noqa: BLE001
                    row["profile"][variant] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    return results


def table(results: dict[str, Any]) -> str:
    lines = [f"## Prompt-to-Prompt on {results['device']} ({results['dtype']}, one process, {results['model']}, 2 prompts)", "",
             "| size | steps | variant | time (s) | time vs plain | peak (GB) | peak vs plain | Δ peak (GB) | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size, row in results["sizes"].items():
        plain = row["variants"].get("plain", {})
        for variant, r in row["variants"].items():
            if r.get("status") != "ok":
                lines.append(f"| {size}² | {row['steps']} | {variant} | — | — | — | — | — | {r.get('status')} |")
                continue
            t_ratio = r["seconds"] / plain["seconds"] if plain.get("status") == "ok" else float("nan")
            m_ratio = r["peak_gb"] / plain["peak_gb"] if plain.get("status") == "ok" and plain["peak_gb"] else float("nan")
            lines.append(f"| {size}² | {row['steps']} | {variant} | {r['seconds']:.3f} | {t_ratio:.2f}× | {r['peak_gb']:.2f} | "
                         f"{m_ratio:.2f}× | {r['peak_delta_gb']:.2f} | ok |")
    for size, row in results["sizes"].items():
        for variant, prof in (row.get("profile") or {}).items():
            lines += ["", f"### Profile of {variant} at {size}² (per denoising step)", ""]
            if "error" in prof:
                lines.append(f"profile failed: {prof['error']}")
                continue
            lines.append(f"kernel launches {prof['launches_per_step']}, synchronisations {prof['syncs_per_step']}, "
                         f"memcpy calls {prof['d2h_copies_per_step']}, aten ops {prof['aten_ops_per_step']}")
            lines += ["", "| op (top by host time) | calls (2 steps) | host ms per step |", "|---|---|---|"]
            lines += [f"| {k} | {c} | {ms} |" for k, c, ms in prof["top_host_ops"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--steps", type=int, nargs="+", default=[20, 10, 5])
    p.add_argument("--repeats", type=int, nargs="+", default=[3, 2, 1])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                   help="default: plain fused kernel (sd15), plain fused (sd3, flux)")
    p.add_argument("--model", choices=("sd15", "sd3", "flux"), default="sd15",
                   help="SD 1.5-shaped UNet, SD3.5-medium- or Flux.1-dev-shaped MM-DiT (published configs, random weights)")
    p.add_argument("--layers", type=int, default=None, help="MM-DiT only: cut the depth to this many blocks (stated in the table)")
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--budget", type=float, default=None, help="seconds; variants not started by then are skipped")
    p.add_argument("--out", type=Path, default=None, help="folder for p2p_profile.md / p2p_profile.json")
    args = p.parse_args(argv)
    if args.variants is None:
        args.variants = list(VARIANTS) if args.model == "sd15" else ["plain", "fused"]
    if "plain" not in args.variants:
        p.error("--variants must include plain (the baseline)")
    results = run(args)
    text = table(results)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "p2p_profile.md").write_text(text, encoding="utf-8")
        (args.out / "p2p_profile.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
