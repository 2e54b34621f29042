"""The web UI's model cache: each model is loaded once, per (model, device, dtype), thread-safely.

A model typed by the user is checked before anything is read: ``shapes`` (or blank) is the embedded
shapes model, a directory must hold ``model_index.json``, anything else must look like a hub id
``org/name``. Nothing else on disk is opened.

Every pipeline call on a model holds that model's lock (:attr:`LoadedModel.lock`), so requests on
one model run one at a time even when the app's concurrency limit allows several at once, and
requests on different models can overlap. Nothing here changes process-wide state per request.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from attnctrl.cli import options as grammar

from .options import OptionError

__all__ = ["SHAPES_NAME", "check_model", "resolve_device", "resolve_dtype", "LoadedModel", "ModelCache"]

SHAPES_NAME = "shapes"
"""What the UI shows for the embedded shapes model (:data:`attnctrl.models.SHAPES`)."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def check_model(text: str | None) -> str:
    """The model to load for what the user typed: the shapes folder, a diffusers folder (a directory
    with ``model_index.json``) or a hub id ``org/name``. Raises :class:`OptionError` otherwise."""
    from attnctrl.models import SHAPES

    name = (text or "").strip()
    if name.lower() in ("", SHAPES_NAME, "shapes (embedded)"):
        return SHAPES
    if "\x00" in name:
        raise OptionError("Model: the name contains a NUL character")
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise OptionError(f"Model {name!r}: this folder is not a diffusers model (it has no model_index.json)")
        return os.path.abspath(path)
    looks_local = os.path.isabs(path) or name.startswith((".", "~")) or os.path.exists(path) or "\\" in name
    if not looks_local and _HUB_ID.match(name) and ".." not in name:
        return name
    if looks_local:
        raise OptionError(f"Model {name!r}: no such folder (give a diffusers model folder with model_index.json, or a hub id like org/name)")
    raise OptionError(
        f"Model {name!r}: not a model name; give 'shapes' (the embedded model), a hub id like "
        "stable-diffusion-v1-5/stable-diffusion-v1-5, or a diffusers model folder (with model_index.json)"
    )


def resolve_device(name: str | None) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu`` (the grammar's rule, labelled for the UI)."""
    return grammar.resolve_device(name, label="device")


def resolve_dtype(name: Any, device: str) -> Any:
    """``auto`` -> fp16 on CUDA, fp32 on CPU; ``fp32``/``fp16``/``bf16`` or a torch dtype."""
    return grammar.resolve_dtype(name, device, label="dtype")


@dataclass
class LoadedModel:
    """A loaded Prompt-to-Prompt pipeline and what goes with it.

    ``lock`` must be held around every call on ``pipe`` (and on the pipelines derived from it,
    which share its UNet). ``backend`` is the kernel backend chosen for this model when it was
    loaded (None: the best one for each call).
    """

    model: str
    device: str
    dtype: Any
    pipe: Any
    backend: str | None = None
    load_seconds: float = 0.0
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _derived: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def display_name(self) -> str:
        from attnctrl.models import SHAPES

        return SHAPES_NAME if self.model == SHAPES else self.model

    def consistent(self) -> Any:
        """The consistent-subjects pipeline on this model's components (made once)."""
        with self.lock:
            pipe = self._derived.get("consistent")
            if pipe is None:
                from attnctrl.pipelines.consistency import ConsistentSubjectsPipeline, ConsistentSubjectsXLPipeline
                from attnctrl.pipelines.mmdit_control import is_mmdit_pipeline
                from attnctrl.pipelines.mmdit_subjects import ConsistentSubjectsFluxPipeline, ConsistentSubjectsSD3Pipeline

                if is_mmdit_pipeline(self.pipe):
                    flux = hasattr(self.pipe.transformer, "single_transformer_blocks")
                    cls = ConsistentSubjectsFluxPipeline if flux else ConsistentSubjectsSD3Pipeline
                else:
                    cls = ConsistentSubjectsXLPipeline if hasattr(self.pipe, "text_encoder_2") else ConsistentSubjectsPipeline
                pipe = cls.from_pipe(self.pipe)
                self._derived["consistent"] = pipe
            return pipe

    def describe(self) -> str:
        from attnctrl.pipelines.inversion import image_geometry

        native, _ = image_geometry(self.pipe)
        dtype = str(self.dtype).replace("torch.", "")
        return (
            f"**{self.display_name}**: {type(self.pipe).__name__}, native size {native}x{native}, "
            f"{self.device} {dtype}, loaded in {self.load_seconds:.1f} s"
        )


def _default_loader(model: str, device: str, dtype: Any) -> Any:
    from attnctrl.pipelines import load_pipeline

    return load_pipeline(model, dtype=dtype, device=device)


class ModelCache:
    """Loaded models keyed by (model, device, dtype); at most ``max_models`` kept (least recently
    used first out). Safe to use from many threads: a model is loaded once even when several
    requests ask for it at the same time, and loading one model does not block using another."""

    def __init__(
        self,
        *,
        device: str | None = "auto",
        dtype: Any = "auto",
        max_models: int = 2,
        backend: str | None = None,
        loader: Callable[[str, str, Any], Any] | None = None,
    ) -> None:
        if max_models < 1:
            raise OptionError(f"max_models must be at least 1, got {max_models}")
        if backend is not None:
            from attnctrl import kernels

            if backend not in kernels.registered_backends():
                raise OptionError(f"backend {backend!r}: use one of {', '.join(kernels.registered_backends())} (or leave it unset)")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_models = int(max_models)
        self.backend = backend
        self._loader = loader or _default_loader
        self._guard = threading.Lock()
        self._models: OrderedDict[tuple[str, str, str], LoadedModel] = OrderedDict()
        self._loading: dict[tuple[str, str, str], threading.Lock] = {}

    def key(self, model: str | None) -> tuple[str, str, str]:
        return (check_model(model), self.device, str(self.dtype))

    def cached(self) -> list[str]:
        with self._guard:
            return [m.display_name for m in self._models.values()]

    def get(self, model: str | None) -> LoadedModel:
        """The loaded model for what the user typed (checked first), loading it if needed."""
        key = self.key(model)
        with self._guard:
            entry = self._models.get(key)
            if entry is not None:
                self._models.move_to_end(key)
                return entry
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._guard:
                entry = self._models.get(key)
                if entry is not None:
                    return entry
            try:
                started = time.perf_counter()
                pipe = self._load(key[0], model)
                entry = LoadedModel(model=key[0], device=self.device, dtype=self.dtype, pipe=pipe, backend=self.backend,
                                    load_seconds=time.perf_counter() - started)
                with self._guard:
                    self._models[key] = entry
                    while len(self._models) > self.max_models:
                        self._models.popitem(last=False)  # in-flight requests keep their reference
            finally:
                with self._guard:
                    self._loading.pop(key, None)
        return entry

    def _load(self, path: str, typed: str | None) -> Any:
        from attnctrl import errors

        error_types = tuple(getattr(errors, name) for name in errors.__all__)
        try:
            return self._loader(path, self.device, self.dtype)
        except error_types:
            raise
        except Exception as err:  # not downloadable (offline), not a diffusers model, broken files
            text = str(err).strip()
            first = text.splitlines()[0] if text else type(err).__name__
            raise OptionError(f"cannot load model {(typed or path).strip()!r}: {first}") from None
