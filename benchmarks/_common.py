"""Shared helpers of the attnctrl benchmarks: isolated variant runs, peak memory, tables, results.

Every benchmark measures a few *variants* (e.g. plain SDPA generation, the fused edit, the
materialised reference) against a baseline measured in the same run, and prints ratios. Each
variant runs in a fresh Python child process so that

* its peak memory is its own (CPU: peak RSS, ``VmHWM``, reset after the model is built; CUDA:
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``),
* a variant that runs out of memory is reported, never takes the benchmark (or the machine) down:
  on CPU the child gets an address-space limit (``RLIMIT_AS``), on CUDA the allocator raises.

A benchmark script calls :func:`run_child` from its parent process with a JSON-able spec; the
child side is the same script started with ``--child SPEC_FILE``; it calls
:func:`child_main` with a function that builds and runs the variant and returns a dict.

Nothing here imports diffusers; torch is imported lazily so ``--help`` is instant.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

GIB = 1024**3
GB = 10**9  # reported sizes are decimal gigabytes

__all__ = [
    "GB",
    "GIB",
    "PIXART_ALPHA_TRANSFORMER",
    "SDXL_UNET",
    "ChildResult",
    "Memory",
    "atomic_write",
    "child_main",
    "environment",
    "fmt_gb",
    "fmt_ratio",
    "is_oom_error",
    "markdown_table",
    "median",
    "resolve_device",
    "run_child",
    "set_address_space_limit",
    "synchronize",
]


# ---- published model configs (random weights are built from them) -----------------------------
# SDXL base 1.0's UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json), keyword
# arguments of ``diffusers.UNet2DConditionModel``. 2.6 B parameters; text conditioning is 2048 wide
# (CLIP ViT-L 768 + OpenCLIP bigG 1280), ``text_embeds`` 1280 + 6 time ids x 256 = 2816.
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=(320, 640, 1280), layers_per_block=2,
    downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# PixArt-alpha XL-2 1024 (PixArt-alpha/PixArt-XL-2-1024-MS, transformer/config.json), keyword
# arguments of ``diffusers.PixArtTransformer2DModel``: 28 blocks of 16 heads x 72, patch 2, T5 captions
# (4096 wide, 120 tokens); sample_size 128 turns on the resolution / aspect-ratio conditions.
PIXART_ALPHA_TRANSFORMER: dict[str, Any] = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, dropout=0.0,
    norm_num_groups=32, cross_attention_dim=1152, attention_bias=True, sample_size=128, patch_size=2,
    activation_fn="gelu-approximate", num_embeds_ada_norm=1000, upcast_attention=False, norm_type="ada_norm_single",
    norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=4096, attention_type="default",
)


# ---- devices and dtypes ------------------------------------------------------------------------
def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    return name


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# ---- memory ------------------------------------------------------------------------------------
def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Memory:
    """Current and peak memory of this process on one device, in bytes.

    CPU: resident set size. ``reset_peak()`` writes ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0
    resets ``VmHWM`` to the current RSS); where that is not possible, the peak falls back to
    ``ru_maxrss``, which cannot be reset (then :attr:`peak_resettable` is False and the peak may
    include model construction).
    CUDA: ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` (tensors only, not the
    caching allocator's reserve or the CUDA context).
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak_resettable = True

    def current(self) -> int:
        if self.device.startswith("cuda"):
            import torch

            return int(torch.cuda.memory_allocated())
        kib = _proc_status_kib("VmRSS")
        if kib is None:  # not Linux: best effort
            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        return kib * 1024

    def reset_peak(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
        except OSError:
            self.peak_resettable = False

    def peak(self) -> int:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        kib = _proc_status_kib("VmHWM") if self.peak_resettable else None
        if kib is None:
            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        return kib * 1024


def set_address_space_limit(limit_bytes: int) -> None:
    """Cap this process's virtual address space: allocations past it raise instead of swapping or
    waking the OOM killer. Only for CPU runs (CUDA reserves huge virtual ranges)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit_bytes = min(limit_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, hard))


def is_oom_error(err: BaseException) -> bool:
    """MemoryError, torch's OutOfMemoryError, or a RuntimeError saying an allocation failed."""
    if isinstance(err, MemoryError):
        return True
    name = type(err).__name__
    text = str(err).lower()
    if name == "OutOfMemoryError":
        return True
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("can't allocate", "cannot allocate", "out of memory", "failed to allocate", "not enough memory")
    )


# ---- child processes ---------------------------------------------------------------------------
@dataclass
class ChildResult:
    """What a variant's child process reported.

    ``status``: ``ok``, ``oom`` (memory error inside the child, or killed by SIGKILL, which on
    Linux is the OOM killer), ``timeout`` or ``error``. ``data`` is the dict the child returned.
    """

    status: str
    data: dict[str, Any]
    message: str = ""
    wall_s: float = 0.0


def run_child(
    script: str | Path,
    spec: dict[str, Any],
    *,
    timeout_s: float | None = None,
    log: Callable[[str], None] = print,
) -> ChildResult:
    """Run ``python SCRIPT --child SPEC_FILE`` and collect the JSON it writes to ``SPEC_FILE.out``.

    The child's stdout/stderr go to this process's stderr (progress lines), so a hang is visible.
    """
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="attnctrl-bench-") as tmp:
        spec_file = Path(tmp) / "spec.json"
        out_file = Path(tmp) / "spec.json.out"
        spec_file.write_text(json.dumps(spec), encoding="utf-8")
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        proc = subprocess.Popen(
            [sys.executable, str(script), "--child", str(spec_file)],
            stdout=sys.stderr, stderr=sys.stderr, env=env, start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return ChildResult("timeout", {}, f"no result after {timeout_s:.0f} s", time.perf_counter() - start)
        wall = time.perf_counter() - start
        data: dict[str, Any] = {}
        if out_file.exists():
            data = json.loads(out_file.read_text(encoding="utf-8"))
        if data.get("status") in ("ok", "oom", "error"):
            return ChildResult(data["status"], data, data.get("message", ""), wall)
        if rc == -signal.SIGKILL or rc == 137:
            return ChildResult("oom", data, "killed by SIGKILL (the OOM killer)", wall)
        return ChildResult("error", data, f"child exited with code {rc} without a result", wall)


def child_main(spec_file: str, body: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """The child side of :func:`run_child`: apply the memory limit, run ``body(spec)``, write JSON.

    ``spec["address_space_limit_bytes"]`` (optional) is applied with :func:`set_address_space_limit`
    before ``body`` runs. Memory errors are reported as ``status: oom`` with the message.
    """
    spec = json.loads(Path(spec_file).read_text(encoding="utf-8"))
    out = Path(spec_file + ".out")
    limit = spec.get("address_space_limit_bytes")
    if limit:
        set_address_space_limit(int(limit))
    try:
        result = dict(body(spec))
        result.setdefault("status", "ok")
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which decides
        status = "oom" if is_oom_error(err) else "error"
        result = {"status": status, "message": f"{type(err).__name__}: {str(err)[:500]}"}
        if status == "error":
            result["traceback"] = traceback.format_exc()[-4000:]
            print(result["traceback"], file=sys.stderr)
    atomic_write(out, json.dumps(result))
    return 0


# ---- statistics and formatting -----------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def fmt_gb(nbytes: float | None) -> str:
    return "—" if nbytes is None else f"{nbytes / GB:.2f}"


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table, columns padded for reading in a terminal."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def atomic_write(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def environment(device: str) -> dict[str, Any]:
    """Versions and hardware, for the results file."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import diffusers
        import transformers

        info["diffusers"] = diffusers.__version__
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo", encoding="ascii") as f:
            info["mem_total_gb"] = round(int(f.readline().split()[1]) * 1024 / GB, 1)
    except OSError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_mem_gb"] = round(torch.cuda.get_device_properties(0).total_memory / GB, 1)
    return info
