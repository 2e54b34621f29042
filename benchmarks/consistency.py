"""IR-Diffusion reference attention: group routing vs a dense float mask, time and peak memory.

What it measures
----------------
One self-attention call of SDXL's 640-channel level (10 heads x head dim 64; SDXL's UNet config
has ``block_out_channels=(320, 640, 1280)`` and ``attention_head_dim=(5, 10, 20)`` heads, so 64 per
head) at the point where IR-Diffusion runs its extended attention: the target image's queries
attend over the keys of 2 references and of itself. That level's token grid is the image size
/ 16: N = 64² = 4096 at 1024², N = 128² = 16384 at 2048². Per call::

    q (2, 10, N, 64)         the target rows of both CFG halves
    k, v (2, 10, 3N, 64)     [reference 1 ; reference 2 ; target] keys/values per CFG half

The routing is IR-Diffusion's (``attnctrl.consistency.reference_table``, ``research/
consistency-anchors.md`` §1.3-§1.4) with 2 subjects, one per reference: target queries are labelled
background / subject i (two ellipses, isolated from each other) and, after query-side dropout
p = 0.5 (:meth:`Routing.with_query_dropout`), "subject i dropped"; reference keys are "reference i
inside its relocated subject mask" (an ellipse inside the target subject's box) or "outside"
(never attended). Reference logit bias 0. The routing is shared by both CFG halves (batch 1), as
a dense implementation would share its mask.

Variants (each in its own child process, :mod:`_common`):

* ``dense``          the baseline: materialise the full additive float mask ``(1, 1, N, 3N)``
                     (:meth:`Routing.dense`) and call ``torch.nn.functional.scaled_dot_product_attention``.
                     Its time is the SDPA call alone; building the mask is reported separately.
* ``auto``           ``attnctrl.kernels.attention(q, k, v, mask=routing)``, automatic backend;
* ``sdpa``           the same, ``backend="sdpa"`` (mask materialised per query chunk of 2**24 elements);
* ``flex-compiled``  ``FlexBackend(compile=True)`` (BlockMask from labels; ``torch.compile``d kernel);
* ``flex``           ``backend="flex"`` as registered (eager on CPU: materialises every score);
* ``reference``      ``backend="reference"`` (explicit float32 softmax with the dense mask).

Per variant: one warm-up call (reported as "first call": includes compiling and BlockMask
building for flex), then ``--repeats`` timed calls, median reported. Peak memory is the growth of
the peak during the timed calls over the memory held after the warm-up (q/k/v, the routing and
whatever the backend caches; CPU: ``VmHWM`` reset through ``/proc/self/clear_refs``; CUDA:
``max_memory_allocated``): the attention's own working memory, masks included. On CPU the
children run with ``MALLOC_MMAP_THRESHOLD_=1048576`` so that every buffer of 1 MiB or more is
mapped and unmapped on its own; otherwise glibc's sliding threshold (up to 32 MiB) keeps freed
buffers resident and hides them from the peak growth. Variants whose estimated need exceeds ``--max-gb`` are reported as "skipped" with
the estimate instead of being run. After timing, 16 random query rows of the output are checked
against a float64 softmax with the dense mask rows ("max err").

Targets (issue 5, at 2048²): peak attention memory <= 0.5x dense-mask SDPA, time <= 1.0x.

Reading the numbers: in this routing 57% of the keys (reference tokens outside the relocated
subject masks) are denied to every query. The sdpa backend drops them before attention
(``SdpaBackend.routing_key_fraction``), which is most of its time advantage over the dense
baseline, which computes scores for all 3N keys as IR-Diffusion's own code does. Flex skips
whole empty 128x128 tiles instead, but its compiled CPU kernel is slower per tile than SDPA's.

Measured (2-core AMD EPYC VM, one thread, another 1-thread job running; ``--sizes 1024 2048
--threads 1 --repeats 2``, 18 min): at 2048² dense 77.3 s and 3.31 GB; sdpa/auto 37.2 s (0.48x)
and 0.39 GB (0.12x); compiled flex 121.6 s (1.57x) and 0.17 GB (0.05x). Eager flex and the
reference are skipped at both sizes (they hold every score: ~12 GB at 1024², ~196 GB at 2048²).

How to run
----------
::

    python benchmarks/consistency.py                         # 1024² and 2048² (~18 min, 1 CPU thread)
    python benchmarks/consistency.py --sizes 256 512 --no-write   # smoke test, a minute
    python benchmarks/consistency.py --sizes 2048 --repeats 1 --variants dense auto sdpa flex-compiled
    python benchmarks/consistency.py --device cuda --dtype fp16

Results: a markdown table per size on stdout, ``benchmarks/results/consistency.md`` and
``benchmarks/results/consistency.json``; progress on stderr.
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
    GB,
    GIB,
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
VARIANTS = ("dense", "auto", "sdpa", "flex-compiled", "flex", "reference")
BATCH = 2  # CFG halves
HEADS = 10  # SDXL 640-channel level
HEAD_DIM = 64
REFERENCES = 2
DROPOUT = 0.5
SEED = 0
TIME_TARGET = 1.0
MEM_TARGET = 0.5
CHECK_ROWS = 16
AS_SLACK_BYTES = 4 * GIB  # virtual memory the runtime reserves but never touches (see p2p.py)
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def tokens_per_image(size: int) -> int:
    """Tokens of SDXL's 640-channel level for a ``size``² image: latent size/8, level /2."""
    side = size // 16
    return side * side


def estimated_bytes(variant: str, n: int, element_size: int) -> int:
    """Rough working memory of a variant beyond q/k/v, for the pre-check."""
    keys = (REFERENCES + 1) * n
    mask = n * keys * element_size
    scores = BATCH * HEADS * n * keys * 4
    if variant == "dense":
        return mask
    if variant in ("flex", "reference"):
        return 3 * scores + mask  # scores, probabilities and a temporary, all (B, H, N, 3N)
    return 2**24 * 4 * 2  # one routing chunk (and its temporaries)


# ---- the routing (child side) --------------------------------------------------------------------
def ellipse(side: int, cy: float, cx: float, ry: float, rx: float) -> Any:
    import torch

    ys = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    xs = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    return ((ys[:, None] - cy) / ry) ** 2 + ((xs[None, :] - cx) / rx) ** 2 <= 1.0


def build_routing(n: int, device: str) -> Any:
    """IR-Diffusion's extended-attention routing for 2 subjects on a side x side grid."""
    import torch

    from attnctrl.consistency import group_labels, reference_table
    from attnctrl.kernels import Routing

    side = math.isqrt(n)
    targets = torch.stack([ellipse(side, 0.45, 0.28, 0.30, 0.18), ellipse(side, 0.55, 0.72, 0.35, 0.20)])
    # Relocated reference masks: a slightly thinner shape inside each target subject's box.
    moved = torch.stack([ellipse(side, 0.45, 0.28, 0.27, 0.15), ellipse(side, 0.55, 0.72, 0.32, 0.17)])
    labels = group_labels(targets.flatten(1))  # 0 background, i subject i
    n_subjects = REFERENCES
    outside = 2 * n_subjects + 1
    key_labels = [torch.where(moved[i].flatten(), n_subjects + 1 + i, outside) for i in range(n_subjects)]
    key_labels.append(labels)
    table = reference_table(n_subjects, isolate=True, reference_bias=0.0)
    routing = Routing(labels[None], torch.cat(key_labels)[None], table)
    generator = torch.Generator().manual_seed(SEED + 7)
    routing = routing.with_query_dropout({i: n_subjects + i for i in range(1, n_subjects + 1)}, DROPOUT, generator=generator)
    return routing.to(device)


def run_variant(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from attnctrl import kernels
    from attnctrl.kernels._flex import FlexBackend

    torch.set_num_threads(int(spec["threads"]))
    device, variant, n = spec["device"], spec["variant"], int(spec["tokens"])
    dtype = getattr(torch, spec["dtype"])
    keys = (REFERENCES + 1) * n

    def log(msg: str) -> None:
        print(f"[{variant} N={n}] {msg}", file=sys.stderr, flush=True)

    g = torch.Generator().manual_seed(SEED)
    q = torch.randn(BATCH, HEADS, n, HEAD_DIM, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(BATCH, HEADS, keys, HEAD_DIM, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(BATCH, HEADS, keys, HEAD_DIM, generator=g).to(device=device, dtype=dtype)
    routing = build_routing(n, device)
    scale = HEAD_DIM**-0.5
    backend: Any = {"auto": None, "sdpa": "sdpa", "flex": "flex", "reference": "reference"}.get(variant)
    if variant == "flex-compiled":
        backend = FlexBackend(compile=True)
    build_times: list[float] = []

    def call() -> Any:
        if variant == "dense":
            start = time.perf_counter()
            mask = routing.dense(dtype)
            synchronize(device)
            build_times.append(time.perf_counter() - start)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return kernels.attention(q, k, v, mask=routing, scale=scale, backend=backend)

    def timed() -> tuple[float, Any]:
        synchronize(device)
        start = time.perf_counter()
        out = call()
        synchronize(device)
        total = time.perf_counter() - start
        return total - (build_times[-1] if variant == "dense" else 0.0), out

    memory = Memory(device)
    load_before = os.getloadavg()[0]
    log("first call")
    first_s, out = timed()
    del out
    # Measure from here: one-off costs of the first call (imports, compiling, caches) are not
    # the attention's working memory.
    synchronize(device)
    base = memory.current()
    memory.reset_peak()
    cpu_before = time.process_time()
    times = []
    for r in range(int(spec["repeats"])):
        seconds, out = timed()
        times.append(seconds)
        log(f"repeat {r + 1}: {seconds:.2f} s")
        if r + 1 < int(spec["repeats"]):
            del out
    cpu_s = time.process_time() - cpu_before
    peak = memory.peak()
    chosen = kernels._registry.select_backend(None, q, k, v, mask=routing, need_probs=False, need_grad=False).name

    # Correctness on a few query rows: float64 softmax with the dense mask rows.
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(SEED + 1))[:CHECK_ROWS].sort().values
    worst = 0.0
    for row in rows.tolist():
        mask_row = routing.additive_rows(row, row + 1, torch.float64)  # (1, 1, 1, 3N)
        scores = (q[:, :, row : row + 1].double() @ k.double().transpose(-1, -2)) * scale + mask_row
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        expected = probs @ v.double()
        worst = max(worst, (out[:, :, row : row + 1].double() - expected).abs().max().item())
    return {
        "variant": variant,
        "tokens": n,
        "keys": keys,
        "backend": "torch SDPA + dense mask" if variant == "dense" else (chosen if variant == "auto" else variant),
        "first_call_s": first_s,
        "times_s": times,
        "time_s": median(times),
        "mask_build_s": median(build_times) if build_times else None,
        "cpu_s": cpu_s,
        "peak_delta_bytes": peak - base,
        "base_bytes": base,
        "peak_resettable": memory.peak_resettable,
        "max_err": worst,
        "loadavg_1min": [load_before, os.getloadavg()[0]],
    }


# ---- parent side ---------------------------------------------------------------------------------
def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def size_table(size: int, results: dict[str, dict[str, Any]]) -> str:
    dense = results.get("dense", {})
    dense_time = dense.get("time_s") if dense.get("status") == "ok" else None
    dense_mem = dense.get("peak_delta_bytes") if dense.get("status") == "ok" else None
    rows = []
    for variant, r in results.items():
        if r.get("status") != "ok":
            rows.append([variant, "—", r.get("status", "?") + (f": {r['message']}" if r.get("message") else ""),
                         "—", "—", "—", "—", "—"])
            continue
        time_cell = f"{r['time_s']:.2f}"
        if r.get("mask_build_s") is not None:
            time_cell += f" (+{r['mask_build_s']:.2f} mask)"
        rows.append([
            variant,
            r["backend"],
            time_cell,
            fmt_ratio(_ratio(r["time_s"], dense_time)),
            f"{r['first_call_s']:.2f}",
            fmt_gb(r["peak_delta_bytes"]),
            fmt_ratio(_ratio(r["peak_delta_bytes"], dense_mem)),
            f"{r['max_err']:.1e}",
        ])
    n = tokens_per_image(size)
    head = f"### {size}² — N = {n} queries, {(REFERENCES + 1) * n} keys, q (2, {HEADS}, {n}, {HEAD_DIM})\n\n"
    return head + markdown_table(
        ["variant", "backend", "time (s)", "vs dense", "first call (s)", "peak Δ (GB)", "vs dense", "max err"], rows
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="image sizes (multiples of 16)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after the warm-up call")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch intra-op threads")
    parser.add_argument("--max-gb", type=float, default=12.0, help="skip variants estimated to need more (GB)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per-variant limit in seconds")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write benchmarks/results/")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args.child, run_variant)

    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    if device == "cpu":
        # Children inherit it (see the module doc): large buffers are returned to the OS on free.
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    element_size = 4 if dtype == "float32" else 2
    all_results: dict[str, dict[str, dict[str, Any]]] = {}
    tables = []
    started = time.time()
    for size in args.sizes:
        if size % 16:
            raise SystemExit(f"--sizes: {size} is not a multiple of 16")
        n = tokens_per_image(size)
        results: dict[str, dict[str, Any]] = {}
        for variant in args.variants:
            need = estimated_bytes(variant, n, element_size)
            if need > args.max_gb * GB:
                results[variant] = {"status": "skipped", "message": f"needs ~{need / GB:.0f} GB > --max-gb {args.max_gb:g}"}
                print(f"[{variant} N={n}] skipped: {results[variant]['message']}", file=sys.stderr)
                continue
            spec = {"variant": variant, "tokens": n, "device": device, "dtype": dtype, "repeats": args.repeats,
                    "threads": args.threads}
            if device == "cpu":
                spec["address_space_limit_bytes"] = int(args.max_gb * GB + AS_SLACK_BYTES)
            child = run_child(__file__, spec, timeout_s=args.timeout)
            results[variant] = {**child.data, "status": child.status, "message": child.message, "wall_s": child.wall_s}
            print(f"[{variant} N={n}] {child.status} in {child.wall_s:.0f} s", file=sys.stderr, flush=True)
        all_results[str(size)] = results
        table = size_table(size, results)
        tables.append(table)
        print(table + "\n", flush=True)

    env = environment(device)
    loads = [x for rs in all_results.values() for r in rs.values() for x in r.get("loadavg_1min", [])]
    busy = bool(loads) and max(loads) > (os.cpu_count() or 1)
    notes = [
        f"Device {device}, {dtype}, {args.threads} torch thread(s), {args.repeats} timed call(s) after one warm-up; "
        f"torch {env.get('torch')}; {env.get('cpu', env.get('gpu', ''))}.",
        "time: median SDPA/attention call; dense excludes building its mask (shown as '+x mask'). "
        "peak Δ: peak memory growth during the timed calls over what is held after the warm-up call "
        "(q/k/v, routing, backend caches): the attention's working memory. "
        f"max err: {CHECK_ROWS} random query rows vs a float64 softmax with the dense mask.",
        f"Targets at 2048²: peak Δ ≤ {MEM_TARGET}× dense, time ≤ {TIME_TARGET}× dense.",
    ]
    if busy:
        notes.append(f"The 1-minute load average exceeded the core count during the run (max {max(loads):.1f}): "
                     "timings are noisy.")
    markdown = (
        "## Consistency routing vs dense-mask SDPA (SDXL 640-channel level, 2 references)\n\n"
        + "\n\n".join(tables) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
        + f"\nCommand: `python benchmarks/consistency.py {' '.join(sys.argv[1:])}`\n"
    )
    print("\n".join(f"- {n}" for n in notes))
    if not args.no_write:
        from attnctrl.io import atomic_write_bytes, write_json_atomic

        atomic_write_bytes(RESULTS / "consistency.md", markdown.encode("utf-8"))
        write_json_atomic(
            {"command": sys.argv[1:], "environment": env, "results": all_results, "notes": notes,
             "shape": {"batch": BATCH, "heads": HEADS, "head_dim": HEAD_DIM, "references": REFERENCES, "dropout": DROPOUT},
             "elapsed_s": time.time() - started},
            RESULTS / "consistency.json",
        )
        print(f"wrote {RESULTS / 'consistency.md'} and {RESULTS / 'consistency.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
