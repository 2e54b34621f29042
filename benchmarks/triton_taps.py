"""The Triton backend where it is meant to win: attention plus a few probability columns ("taps").

What it measures
----------------
One attention call of ``B=2, H=8, D=64`` (fp16 by default) on ``N`` tokens (``--sizes``, default
4096, 16384, 65536), per size and variant, timed with ``triton.testing.do_bench`` (median of
repeated calls after warm-up; L2 flushed between calls), plus the peak of
``torch.cuda.max_memory_allocated`` during one call above what the inputs hold:

* ``taps``: output and the probabilities of ``C=8`` key columns (``--taps``) in one call.
  Baseline ``sdpa+probs``: the sdpa backend's ``forward_with_probs`` (flash SDPA for the output,
  then a chunked pass over every score row for the normaliser of the selected columns).
  ``triton taps``: our fused one-pass kernel (``attention_with_probs(..., backend="triton")``);
  ``triton 2-pass``: the same backend forced to its two-pass path (forward storing the row
  log-sum-exp, then a column kernel), to show what fusing saves.
* ``dense``: plain attention. Baseline ``sdpa`` (PyTorch's flash kernel); ``triton``: our kernel
  (tuned). Automatic selection leaves this case to sdpa.
* ``routed``: GRAT-style grouped attention, a 3x3 neighbourhood of square groups (group side =
  grid side / 8, ~12% of the pairs allowed) in group-major token order. Baseline ``sdpa routed``
  (the sdpa backend: chunked materialised mask); ``flex`` (compiled FlexAttention) and
  ``triton routed`` (our block-sparse kernel). Automatic selection leaves routings to flex.

"max err" compares each variant's output (and probabilities) with its baseline's.

Target (issue: H200, fp16, B=2, H=8, D=64): ``triton taps`` >= 1.3x faster than ``sdpa+probs`` at
N = 16384. The first triton call of each shape tunes the block sizes (not timed: do_bench warms up;
``--no-tune`` uses the default tiles). Results are written after every size (``--out``), so a run
cut short by a time limit keeps the sizes it finished; the target size runs first.

How to run
----------
::

    python benchmarks/triton_taps.py                          # CUDA: all sizes, a few minutes
    python benchmarks/triton_taps.py --sizes 16384 --parts taps dense --no-two-pass --no-tune   # ~30 s
    python benchmarks/triton_taps.py --sizes 16384 --out benchmarks/results
    python benchmarks/triton_taps.py --interpret               # CPU smoke check, tiny sizes, interpreter

Without a CUDA device it exits with a message, unless ``--interpret`` runs tiny sizes (N=64, 144) in
the Triton interpreter on CPU (float32), which checks the script and the kernels end to end but
times nothing meaningful. ``--out DIR`` writes ``DIR/triton_taps.json`` and ``DIR/triton_taps.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

HEADS = 8
BATCH = 2
HEAD_DIM = 64
TAPS = 8
TARGET_N = 16384
TARGET_SPEEDUP = 1.3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="token counts N, run in this order (perfect squares; default 16384 4096 65536: the target first)")
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--heads", type=int, default=HEADS)
    p.add_argument("--head-dim", type=int, default=HEAD_DIM)
    p.add_argument("--taps", type=int, default=TAPS, help="selected key columns (default 8)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--parts", nargs="+", default=["taps", "dense", "routed"], choices=["taps", "dense", "routed"])
    p.add_argument("--no-two-pass", action="store_true", help="skip the 'triton 2-pass' variant")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench repetition budget per variant (ms)")
    p.add_argument("--no-tune", action="store_true", help="triton: the candidate table's default tiles, no timing pick")
    p.add_argument("--out", type=Path, default=None, help="write triton_taps.json and triton_taps.md there")
    p.add_argument("--interpret", action="store_true", help="CPU smoke check in the Triton interpreter (tiny sizes, float32)")
    return p.parse_args(argv)


def _timer(device: str, rep_ms: float) -> Callable[[Callable[[], Any]], float]:
    """Milliseconds per call: triton.testing.do_bench on CUDA, a wall-clock median on CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        def bench(fn: Callable[[], Any]) -> float:
            try:
                return float(do_bench(fn, warmup=max(25, int(rep_ms / 4)), rep=int(rep_ms), return_mode="median"))
            except TypeError:  # triton without return_mode
                return float(do_bench(fn, warmup=max(25, int(rep_ms / 4)), rep=int(rep_ms)))

        return bench

    def wall(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[1]

    return wall


def _peak_bytes(device: str, fn: Callable[[], Any]) -> int | None:
    """Peak allocated bytes during one call, above what was allocated before it (CUDA only)."""
    if device != "cuda":
        return None
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return int(peak)


def _max_err(a: Any, b: Any) -> float:
    if isinstance(a, tuple):
        return max(_max_err(x, y) for x, y in zip(a, b))
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def grouped(n: int, device: str) -> tuple[Any, int, float]:
    """The 3x3-neighbourhood grouped routing on a sqrt(N)^2 grid, group side = grid side / 8."""
    from attnctrl.policies.grouped import density, grouped_routing

    side = math.isqrt(n)
    if side * side != n:
        raise SystemExit(f"--sizes: {n} is not a perfect square (the routed part needs a square token grid)")
    g = max(1, side // 8)
    return grouped_routing(side, side, (g, g), "neighborhood", device=device), g, density(side, side, g)


def run(args: argparse.Namespace, on_size: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Measure every size; ``on_size(result so far)`` after each (so a cut run keeps what it did)."""
    import torch

    from attnctrl.kernels import attention, attention_with_probs
    from attnctrl.kernels._triton import TritonBackend

    device = "cpu" if args.interpret else "cuda"
    dtype = torch.float32 if args.interpret else getattr(torch, args.dtype)
    sizes = args.sizes or ([64, 144] if args.interpret else [TARGET_N, 4096, 65536])
    bench = _timer(device, args.rep_ms)
    fused = TritonBackend(autotune=not args.no_tune)
    two_pass = TritonBackend(autotune=not args.no_tune, fused_columns=0)
    rows: list[dict[str, Any]] = []
    config = dict(batch=args.batch, heads=args.heads, head_dim=args.head_dim, taps=args.taps,
                  dtype=str(dtype).replace("torch.", ""), device=device, interpret=bool(args.interpret),
                  tuned=not args.no_tune)
    for n in sizes:
        gen = torch.Generator(device="cpu").manual_seed(n)
        shape = (args.batch, args.heads, n, args.head_dim)
        q, k, v = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
        cols = torch.linspace(0, n - 1, args.taps, dtype=torch.float64).round().long().to(device)
        print(f"N={n}", file=sys.stderr, flush=True)

        def measure(part: str, name: str, fn: Callable[[], Any], baseline: Any = None) -> Any:
            try:
                result = fn()  # first call: compiles / tunes, and the result for "max err"
                ms = bench(fn)
                peak = _peak_bytes(device, fn)
            except Exception as err:  # report, keep going (e.g. out of memory at the largest N)
                rows.append(dict(N=n, part=part, variant=name, ms=None, peak_bytes=None, max_err=None,
                                 error=f"{type(err).__name__}: {str(err)[:200]}"))
                print(f"  {part:6s} {name:14s} failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
                return None
            err = None if baseline is None else _max_err(result, baseline)
            rows.append(dict(N=n, part=part, variant=name, ms=ms, peak_bytes=peak, max_err=err))
            print(f"  {part:6s} {name:14s} {ms:9.3f} ms", file=sys.stderr, flush=True)
            return result

        with torch.no_grad():
            if "taps" in args.parts:
                base = measure("taps", "sdpa+probs", lambda: attention_with_probs(q, k, v, columns=cols, backend="sdpa"))
                measure("taps", "triton taps", lambda: attention_with_probs(q, k, v, columns=cols, backend=fused), base)
                if not args.no_two_pass:
                    measure("taps", "triton 2-pass", lambda: attention_with_probs(q, k, v, columns=cols, backend=two_pass), base)
                del base
            if "dense" in args.parts:
                base = measure("dense", "sdpa", lambda: attention(q, k, v, backend="sdpa"))
                measure("dense", "triton", lambda: attention(q, k, v, backend=fused), base)
                del base
            if "routed" in args.parts:
                routing, group, dens = grouped(n, device)
                base = measure("routed", "sdpa routed", lambda: attention(q, k, v, mask=routing, backend="sdpa"))
                if not args.interpret:  # compiled flex needs CUDA here (eager flex materialises every score)
                    measure("routed", "flex", lambda: attention(q, k, v, mask=routing, backend="flex"), base)
                measure("routed", "triton routed", lambda: attention(q, k, v, mask=routing, backend=fused), base)
                for r in rows:
                    if r["N"] == n and r["part"] == "routed":
                        r.update(group=group, density=round(dens, 4))
                del base
        if device == "cuda":
            torch.cuda.empty_cache()
        if on_size is not None:
            on_size(_summarise(config, rows, fused))
    return _summarise(config, rows, fused)


def _summarise(config: dict[str, Any], rows: list[dict[str, Any]], fused: Any) -> dict[str, Any]:
    """Speed-ups against each part's baseline and the target verdict."""
    rows = [dict(r) for r in rows]
    baselines = {"taps": "sdpa+probs", "dense": "sdpa", "routed": "sdpa routed"}
    for r in rows:
        base = next((b for b in rows if b["N"] == r["N"] and b["variant"] == baselines[r["part"]]), None)
        ok = r["ms"] is not None and base is not None and base["ms"] is not None
        r["speedup_vs_baseline"] = base["ms"] / r["ms"] if ok else None
    verdict = None
    taps = {r["variant"]: r for r in rows if r["N"] == TARGET_N and r["part"] == "taps"}
    if not config["interpret"] and "sdpa+probs" in taps and "triton taps" in taps:
        s = taps["triton taps"]["speedup_vs_baseline"]
        verdict = dict(target=f"triton taps >= {TARGET_SPEEDUP}x faster than sdpa+probs at N={TARGET_N}",
                       speedup=s, met=bool(s is not None and s >= TARGET_SPEEDUP))
    return dict(config=config, rows=rows, tuned=fused.tuned_configs(), verdict=verdict)


def render(result: dict[str, Any]) -> str:
    from _common import fmt_ratio, markdown_table

    c = result["config"]
    head = (f"Triton taps benchmark: {c['device']} {c['dtype']}, B={c['batch']}, H={c['heads']}, D={c['head_dim']}, "
            f"C={c['taps']} tap columns" + (" (INTERPRETER smoke check: timings meaningless)" if c["interpret"] else ""))
    env = result.get("environment", {})
    tiles = "fixed 64x64 (interpreter)" if c["interpret"] else ("tuned per shape" if c["tuned"] else "default (no tuning)")
    head += (f"\n\n{env.get('gpu', env.get('cpu', '?'))}; torch {env.get('torch', '?')}, triton {env.get('triton', '?')}; "
             f"triton tiles {tiles}; ms = median per call; "
             f"peak = max_memory_allocated above the inputs during one call")
    table = []
    for r in result["rows"]:
        extra = f"group {r['group']}, density {r['density']:.3f}" if "group" in r else ""
        if r.get("error"):
            extra = r["error"]
        table.append([
            r["N"], r["part"], r["variant"],
            "—" if r["ms"] is None else f"{r['ms']:.3f}",
            fmt_ratio(r["speedup_vs_baseline"]),
            "—" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}",
            "—" if r["max_err"] is None else f"{r['max_err']:.2e}",
            extra,
        ])
    text = head + "\n\n" + markdown_table(
        ["N", "part", "variant", "ms", "speed-up vs baseline", "peak MiB", "max err vs baseline", "notes"], table)
    v = result.get("verdict")
    if v:
        text += f"\n\nTarget: {v['target']}: {fmt_ratio(v['speedup'])} -> {'met' if v['met'] else 'NOT met'}"
    return text + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    if not args.interpret and not torch.cuda.is_available():
        print(
            "triton_taps.py measures CUDA kernels and this machine has no CUDA device. Run it on a GPU, or use "
            "--interpret for a CPU smoke check of the script in the Triton interpreter (tiny sizes, no meaningful timings).",
            file=sys.stderr,
        )
        return 2
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        print("triton is not installed (pip install attnctrl[triton])", file=sys.stderr)
        return 2
    import json

    from _common import atomic_write, environment

    env = environment("cpu" if args.interpret else "cuda")
    env["triton"] = __import__("triton").__version__

    def write(result: dict[str, Any]) -> str:
        result["environment"] = env
        text = render(result)
        if args.out is not None:
            atomic_write(args.out / "triton_taps.json", json.dumps(result, indent=2, default=str) + "\n")
            atomic_write(args.out / "triton_taps.md", text)
        return text

    text = write(run(args, on_size=write))  # written after every size: a cut run keeps what it did
    print(text)
    if args.out is not None:
        print(f"wrote {args.out / 'triton_taps.json'} and {args.out / 'triton_taps.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
