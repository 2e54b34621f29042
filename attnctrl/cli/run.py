"""Running an entry point's job: load a model, pick a scheduler, check outputs and memory up front,
save results. Shared by the CLI, batch jobs, the web UI and ``attnctrl speed``."""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from typing import Any, Sequence

from .options import OptionError, resolve_device, resolve_dtype

__all__ = [
    "set_scheduler",
    "torch_threads",
    "versions",
    "threads_for",
    "load_model",
    "load_from_args",
    "generate",
    "check_images",
    "check_inversion_path",
    "load_inversion",
    "inversion_summary",
    "edit_from_inversion",
    "default_size",
    "check_out_dir",
    "memory_estimate",
    "check_memory",
    "available_memory",
    "safe_name",
    "mask_image",
    "blank_image",
]


def set_scheduler(pipe: Any, name: str | None) -> None:
    """Replace ``pipe.scheduler`` by the named sampler, built from the model's scheduler config."""
    if name is None:
        return
    if "FlowMatch" in type(pipe.scheduler).__name__:
        raise OptionError(
            f"--scheduler {name}: the offered samplers are for diffusion (DDPM-family) models; this flow-matching model "
            f"({type(pipe).__name__}) samples with its own {type(pipe.scheduler).__name__}: leave --scheduler unset"
        )
    import diffusers

    options: dict[str, Any] = {}
    cls_name = {
        "ddim": "DDIMScheduler",
        "euler": "EulerDiscreteScheduler",
        "dpm++2m": "DPMSolverMultistepScheduler",
        "heun": "HeunDiscreteScheduler",
        "pndm": "PNDMScheduler",
    }[name]
    if name == "dpm++2m":
        options = {"algorithm_type": "dpmsolver++", "solver_order": 2}
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **options)


def torch_threads() -> int:
    """Intra-op threads torch uses here."""
    import torch

    return int(torch.get_num_threads())


def versions() -> dict[str, str]:
    """Versions of attnctrl, Python, torch, diffusers and transformers (for run records)."""
    from .. import __version__

    out = {"attnctrl": __version__, "python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers"):
        module = sys.modules.get(name)
        if module is None:
            try:
                module = __import__(name)
            except ImportError:
                continue
        out[name] = str(getattr(module, "__version__", "?"))
    return out


def threads_for(model: str, device: str) -> None:
    """One CPU thread for the embedded shapes model (unless OMP_NUM_THREADS is set).

    Its layers are so small that intra-op threads barely help, and on a busy machine they make
    generation many times slower (measured: 26 s instead of 309 s for ``attnctrl demo`` on a
    2-core CPU shared with another job).
    """
    from ..models import SHAPES

    if device != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    if os.path.abspath(os.path.expanduser(model)) == os.path.abspath(SHAPES):
        import torch

        torch.set_num_threads(1)


def load_model(model: str, device: str, dtype: Any) -> Any:
    """The pipeline of a diffusers folder or hub id on ``device`` in ``dtype``; OptionError when it cannot be loaded."""
    from ..pipelines import load_pipeline

    looks_local = os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") != 1 or os.path.exists(model)
    path = os.path.expanduser(model)
    if looks_local and not os.path.isdir(path):
        raise OptionError(f"--model {model!r}: no such folder (give a diffusers model folder or a hub id like org/name)")
    try:
        return load_pipeline(path if os.path.isdir(path) else model, dtype=dtype, device=device)
    except OSError as err:  # not downloadable (offline) or not a diffusers model
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OptionError(f"cannot load model {model!r}: {message}") from None


def load_from_args(args: argparse.Namespace) -> tuple[Any, str, float]:
    """The pipeline named by ``--model`` (default: the shapes model) on ``--device``/``--dtype``:
    (pipeline, model, seconds it took to load)."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model = args.model
    if model is None or model in ("shapes", "shapes-flow"):
        from ..models import SHAPES, SHAPES_FLOW

        model = SHAPES_FLOW if model == "shapes-flow" else SHAPES  # the embedded models by name
    threads_for(model, device)
    started = time.perf_counter()
    pipe = load_model(model, device, dtype)
    return pipe, model, time.perf_counter() - started


def check_true_cfg(negative_prompt: str | None, true_cfg: float | None) -> None:
    """What can be checked of ``--true-cfg`` before a model is loaded."""
    if true_cfg is None:
        return
    if not math.isfinite(true_cfg) or true_cfg <= 1.0:
        raise OptionError(f"--true-cfg {true_cfg!r}: true CFG needs a scale above 1 (1 = off)")
    if negative_prompt is None:
        raise OptionError("--true-cfg needs --negative-prompt (the second call's prompt; an empty text ' ' is allowed)")


def negative_prompt_options(pipe: Any, negative_prompt: str | None, true_cfg: float | None) -> dict[str, Any]:
    """Pipeline keywords of ``--negative-prompt``/``--true-cfg``, refused where the model would ignore them:
    Flux.1 is guidance-distilled, so its negative prompt acts only under true CFG (``true_cfg_scale > 1``,
    a second transformer call per step), which no other family has."""
    from ..adapters import FluxAdapter, adapter_for
    from ..pipelines.mmdit_control import is_mmdit_pipeline

    check_true_cfg(negative_prompt, true_cfg)
    flux = is_mmdit_pipeline(pipe) and isinstance(adapter_for(pipe.transformer), FluxAdapter)
    if true_cfg is not None:
        if not flux:
            raise OptionError("--true-cfg applies to Flux (guidance-distilled); other models take --guidance with --negative-prompt")
        return {"true_cfg_scale": float(true_cfg), "negative_prompt": negative_prompt}
    if negative_prompt is None:
        return {}
    if flux:
        raise OptionError("--negative-prompt on Flux needs --true-cfg SCALE > 1: Flux.1 is guidance-distilled and has no unconditional call")
    return {"negative_prompt": negative_prompt}


def generate(pipe: Any, prompts: Sequence[str], edit: Any, *, seed: int, steps: int, guidance: float,
             size: tuple[int, int] | None, materialise: bool, extra: dict[str, Any] | None = None) -> Any:
    import torch

    kwargs: dict[str, Any] = dict(extra or {})
    if isinstance(kwargs.get("negative_prompt"), str):  # one per prompt: the SD pipelines check the types match
        kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(prompts)
    if size is not None:
        kwargs["width"], kwargs["height"] = size
    return pipe(
        list(prompts),
        edit=edit,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
        materialise=materialise,
        **kwargs,
    )


def check_images(paths: Sequence[str]) -> None:
    """Read every image once (cheaply) before a model is loaded: a missing or unreadable file ends
    with the :class:`~attnctrl.errors.ImageLoadError` message, not after minutes of loading."""
    from ..images import load_image

    for path in paths:
        load_image(path, height=8, width=8, multiple=8)


def check_inversion_path(path: str, option: str) -> None:
    """An inversion file name to write: ``*.safetensors``, not a folder."""
    if not path.endswith(".safetensors"):
        raise OptionError(f"{option} {path!r}: the inversion file name must end with .safetensors")
    if os.path.isdir(path):
        raise OptionError(f"{option} {path!r} is a folder; give a FILE.safetensors path")


def load_inversion(path: str, index: int | None) -> Any:
    """``Inversion.load(path)``, narrowed to one image (``--index``) when the file holds several."""
    from ..inversion import Inversion

    if not os.path.isfile(path):
        raise OptionError(f"--inversion {path!r}: no such file (make one with 'attnctrl invert IMAGE --prompt TEXT -o FILE')")
    inversion = Inversion.load(path)
    m = inversion.num_images
    if index is None:
        if m > 1:
            raise OptionError(
                f"--inversion {path!r} holds {m} images (prompts {list(inversion.prompts)}); choose one with --index 0..{m - 1}"
            )
        return inversion
    if not 0 <= index < m:
        raise OptionError(f"--index {index}: {path!r} holds {m} image(s), so the index must be in 0..{m - 1}")
    return inversion[index]


def inversion_summary(inversion: Any) -> str:
    """One line: method, images, size, steps, UNet evaluations, seconds."""
    stats = inversion.stats
    m = inversion.num_images
    return (
        f"{inversion.method} inversion of {m} image{'s' if m != 1 else ''} ({inversion.width}x{inversion.height}), "
        f"{inversion.num_inference_steps} steps, {stats.get('unet_evaluations', '?')} UNet evaluations, "
        f"{float(stats.get('seconds', 0.0)):.1f} s"
    )


def edit_from_inversion(pipe: Any, prompts: Sequence[str], edit: Any, inversion: Any, *, steps: int | None,
                        guidance: float | None, size: tuple[int, int] | None, materialise: bool) -> Any:
    """Edit from ``inversion``: only explicitly given settings are passed, so that one that differs
    from the inversion's raises :class:`~attnctrl.errors.InversionMismatchError` instead of being ignored."""
    kwargs: dict[str, Any] = {}
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    if size is not None:
        kwargs["width"], kwargs["height"] = size
    return pipe(list(prompts), edit=edit, inversion=inversion, materialise=materialise, **kwargs)


def safe_name(name: str) -> str:
    """``name`` with every character but letters, digits, ``-`` and ``_`` replaced (file names)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "subject"


def mask_image(mask: Any, size: tuple[int, int]) -> Any:
    """A bool (h, w) mask as a black-and-white PIL image of ``size`` (nearest resampling)."""
    from PIL import Image

    array = (mask.detach().cpu().numpy().astype("uint8") * 255)
    return Image.fromarray(array, mode="L").resize(size, Image.Resampling.NEAREST)


def blank_image(size: tuple[int, int]) -> Any:
    """A white RGB image (grid padding)."""
    from PIL import Image

    return Image.new("RGB", size, (255, 255, 255))


def default_size(pipe: Any, inversion: Any = None) -> tuple[int, int]:
    """(width, height) a call makes without a size: the inversion's, else the model's native size."""
    if inversion is not None:
        return int(inversion.width), int(inversion.height)
    unet = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    # SD3/Flux pipelines know their native latent side (Flux's transformer config has no sample_size).
    latent_side = getattr(pipe, "default_sample_size", None) or unet.config.sample_size
    side = int(latent_side) * int(getattr(pipe, "vae_scale_factor", 8) or 8)
    return side, side


def check_out_dir(path: str, *, label: str = "--out") -> str:
    """Check, before any work and without writing anything, that ``path`` is a writable folder or
    can be created as one (its first existing ancestor is a writable folder)."""
    if not path or not str(path).strip():
        raise OptionError(f"{label}: give a folder")
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise OptionError(f"{label} {path!r} exists and is not a folder; give a folder path (it is created if missing)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OptionError(f"{label} {path!r}: the folder is not writable")
        return path
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise OptionError(f"{label} {path!r}: {ancestor!r} is a file, so the folder cannot be created")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OptionError(f"{label} {path!r}: cannot create the folder ({ancestor!r} is not writable)")
    return path


#: For :func:`memory_estimate`: a UNet forward with fused attention holds about this many
#: ``(rows, C, h, w)``-sized buffers of its highest level at once. Calibrated on the shapes model
#: (CPU, fp32, Replace with the store, 2 prompts under guidance): peak growth 0.16 GB at 256² and
#: 0.50 GB at 512², where this gives 0.15 and 0.51 GB. A guard against sizes that cannot fit, not
#: a prediction.
ACTIVATION_BUFFERS = 40


def memory_estimate(pipe: Any, width: int, height: int, rows: int) -> int:
    """Rough peak bytes of one denoising call at ``width`` x ``height`` for ``rows`` batch rows
    (prompts x images x 2 under guidance): the weights plus the highest level's activations."""
    unet = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    params = sum(p.numel() * p.element_size() for p in unet.parameters()) if unet is not None else 0
    scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    channels = 320
    config = getattr(unet, "config", None)
    if config is not None and getattr(config, "block_out_channels", None):
        channels = int(config.block_out_channels[0])
    dtype = getattr(unet, "dtype", None)
    element = 2 if str(dtype) in ("torch.float16", "torch.bfloat16") else 4
    latent_pixels = math.ceil(height / scale) * math.ceil(width / scale)
    return params + ACTIVATION_BUFFERS * rows * channels * latent_pixels * element


def available_memory(device: Any) -> int | None:
    """Bytes free for a new allocation on ``device`` (None when it cannot be read)."""
    device = str(device)
    if device.startswith("cuda"):
        import torch

        try:
            free, _ = torch.cuda.mem_get_info(torch.device(device))
        except Exception:  # a driver that cannot answer: no check rather than a wrong one
            return None
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(pipe: Any, width: int, height: int, rows: int, *, label: str = "--size") -> None:
    """Refuse, before any work, a size whose estimated peak does not fit in the device's free memory."""
    needed = memory_estimate(pipe, width, height, rows)
    free = available_memory(getattr(pipe, "device", "cpu"))
    if free is not None and needed > free:
        raise OptionError(
            f"{label} {width}x{height}: a generation of {rows} batch rows needs about {needed / 2**30:.1f} GiB, "
            f"but only {free / 2**30:.1f} GiB is free on {getattr(pipe, 'device', 'cpu')}; use a smaller size"
        )
