"""``attnctrl batch JOBS.jsonl --out DIR``: many generations and edits from one JSON-lines file.

One job per line (blank lines and lines starting with ``#`` are ignored). Every job has an ``id``
(letters, digits, ``.``, ``_``, ``-``; unique in the file; its outputs go to ``DIR/ID/``) and a
``kind``; the other fields mirror the command-line options. Examples, one per kind::

    {"id": "circle", "kind": "generate", "prompt": "a red circle on the left", "seed": 1, "steps": 30}
    {"id": "swap", "kind": "edit", "prompt": "a red circle on the left", "to": ["a blue circle on the left"],
     "mode": "replace", "weights": {"blue": 2.0}, "blend": ["circle"], "cross": 0.8, "self": 0.4, "seed": 0}
    {"id": "real", "kind": "invert-and-edit", "image": "photo.png", "method": "null-text",
     "prompt": "a red circle on the left", "to": "a blue circle on the left", "steps": 30}
    {"id": "pals", "kind": "consistent", "subjects": [{"name": "c", "prompt": "a red circle", "word": "circle"}],
     "scenes": ["a red circle at the top", "a red circle on the left"], "seed": 0}

(each job on one line in the file). Fields:

- every kind: ``model`` (overrides ``--model``), ``steps`` (default 50), ``guidance`` (default 7.5; ``invert-and-edit``: the method's),
  ``size`` (``"WxH"``, ``"N"`` or ``[W, H]``; multiples of 8);
- ``generate``: ``prompt``, ``seed`` (default 0), ``scheduler``, ``efficient`` (an efficient-attention
  policy as ``--efficient``: ``"agent"``, ``"window:shift=none"``...);
- ``edit``: ``prompt``, ``to`` (a prompt or a list; optional with ``weights``), ``mode``
  (``replace``/``refine``), ``weights`` (``{"WORD": X}`` or ``{"WORD": [X1, X2]}``), ``blend`` (a list
  of words as ``--blend``: ``"cat"`` or ``"cat,tiger"``, or one list of words per prompt),
  ``blend_threshold`` (as ``--blend-threshold``; unset: 0.3), ``cross``
  (a fraction, a ``[start, end]`` pair, or ``{"default": ..., "WORD": ...}``), ``self``,
  ``source_context`` (true/false as ``--source-context``; unset: the default), ``shared`` (replace:
  the shared words' window as ``--shared``, a fraction, a pair or ``"off"``; unset: the default), ``seed``,
  ``scheduler``, ``efficient``;
- ``invert-and-edit``: ``image`` (relative to the jobs file's folder), ``method`` (default
  ``null-text``; SD3/Flux models: ``fireflow``, or ``rf-euler``, ``rf-solver``, ``rf-bdia``, ``rf-inversion``) and the edit fields except ``seed`` and ``scheduler``;
- ``consistent``: ``subjects`` (``[{"name", "prompt", "word"}, ...]``), ``scenes`` (prompts), ``seed``;
- ``flow-edit`` (FlowEdit on an SD3/SD3.5 or Flux.1 model; default model: the embedded flow shapes
  model): ``image``, ``prompt`` (its caption), ``to`` (a target prompt or a list: ``edit_N.png`` each),
  ``steps``, ``n_max``, ``n_min``, ``n_avg``, ``source_guidance``, ``target_guidance`` (unset: the
  model family's FlowEdit defaults), ``seed``, ``size``, ``blend`` (LocalBlend words as for ``edit``,
  for the source and each target; writes ``mask_N.png``), ``blend_threshold`` (default 0.3); ``guidance`` is not a field. Example:
  ``{"id": "fe", "kind": "flow-edit", "image": "photo.png", "prompt": "a red circle", "to": "a blue circle"}``.

The whole file is checked before anything runs; a bad line ends with
``error: JOBS.jsonl line N: "FIELD": ...`` and exit code 2. Each finished job leaves ``DIR/ID/job.json``
(a hash of its parameters and its outputs, written last); a rerun skips jobs whose outputs are there
and whose hash matches, and reruns the others. ``DIR/results.jsonl`` gets one record per job
(``status`` ok/failed/skipped, ``outputs``, ``seed``, ``seconds``, ``error``); a failing job never stops
the others, and the exit code is 1 if any failed.

Under ``accelerate launch --multi_gpu --num_processes N -m attnctrl batch ...`` (on a machine
without GPUs too: the processes then use gloo; accelerate's ``--cpu`` starts one process unless an
MPI hostfile is given) job ``k`` (in file order) runs on
process ``k % N``; each process writes ``DIR/results.part-K.jsonl`` and the main process merges them
into ``DIR/results.jsonl`` once all are done. Without a launcher it is one process.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..errors import AttnctrlError
from .options import (
    DEFAULT_GUIDANCE,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    MODES,
    SCHEDULERS,
    OptionError,
    build_edit,
    check_prompt,
    parse_blend,
    parse_size,
    resolve_device,
    resolve_dtype,
    word_keys,
)
from .run import load_model, mask_image, safe_name, set_scheduler, threads_for

__all__ = ["Job", "BatchFileError", "load_jobs", "run_batch", "KINDS"]

KINDS = ("generate", "edit", "invert-and-edit", "consistent", "flow-edit")
_COMMON = {"id", "kind", "model", "steps", "guidance", "size"}
_EDIT = {"prompt", "to", "mode", "weights", "blend", "blend_threshold", "cross", "self", "source_context", "shared"}
FIELDS: dict[str, set[str]] = {
    "generate": _COMMON | {"prompt", "seed", "scheduler", "efficient"},
    "edit": _COMMON | _EDIT | {"seed", "scheduler", "efficient"},
    "invert-and-edit": _COMMON | _EDIT | {"image", "method"},
    "consistent": _COMMON | {"subjects", "scenes", "seed"},
    "flow-edit": (_COMMON - {"guidance"}) | {"image", "prompt", "to", "n_max", "n_min", "n_avg", "source_guidance",
                                              "target_guidance", "seed", "blend", "blend_threshold"},
}
_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")
#: Ids that would collide with the files the batch writes beside the job folders.
_RESERVED = re.compile(r"^results(\.part-\d+)?\.jsonl$", re.IGNORECASE)
HASH_VERSION = 1


class BatchFileError(OptionError):
    """A line of the jobs file is malformed (``error: FILE line N: "FIELD": ...``, exit code 2)."""


@dataclass
class Job:
    """One validated line: the raw parameters plus their normalised form (what runs, what is hashed)."""

    index: int  # position among the jobs (file order), used for the process split
    line: int  # 1-based line number in the file
    id: str
    kind: str
    params: dict[str, Any]  # normalised: defaults filled, model resolved
    hash: str = ""
    extra_hash: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Validation (pure: no model is loaded)
# ------------------------------------------------------------------------------------------------


class _Line:
    def __init__(self, name: str, line: int):
        self.name, self.line = name, line

    def error(self, key: str | None, message: str) -> BatchFileError:
        where = f"{self.name} line {self.line}"
        return BatchFileError(f"{where}: {json.dumps(key)}: {message}" if key else f"{where}: {message}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(L: _Line, key: str, v: Any) -> float:
    if not _is_number(v):
        raise L.error(key, f"expected a number, got {json.dumps(v)}")
    if not math.isfinite(float(v)):
        raise L.error(key, f"{v!r} is not a finite number")
    return float(v)


def _string(L: _Line, key: str, v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise L.error(key, f"expected a non-empty string, got {json.dumps(v)}")
    return v


def _int(L: _Line, key: str, v: Any, minimum: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise L.error(key, f"expected an integer, got {json.dumps(v)}")
    if v < minimum:
        raise L.error(key, f"must be at least {minimum}, got {v}")
    return v


def _window(L: _Line, key: str, v: Any) -> Any:
    if _is_number(v):
        return _finite(L, key, v)
    if isinstance(v, list) and len(v) == 2:
        return [_finite(L, key, x) for x in v]
    raise L.error(key, f"expected a fraction like 0.8 or a [start, end] pair, got {json.dumps(v)}")


def _size(L: _Line, v: Any) -> list[int] | None:
    if v is None:
        return None
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        v = f"{v[0]}x{v[1]}"
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        raise L.error("size", f"expected \"WxH\" or [W, H], got {json.dumps(v)}")
    try:
        w, h = parse_size(v)  # type: ignore[misc]
    except OptionError as err:
        raise L.error("size", str(err).replace("--size ", "")) from None
    return [w, h]


def _check_words(L: _Line, key: str, word: str, prompts: Sequence[str], which: str) -> None:
    parts = word_keys(word)
    if not parts:
        raise L.error(key, f"empty word {json.dumps(word)}")
    for prompt in prompts:
        keys = word_keys(prompt)
        if all(p in keys for p in parts):
            return
    words = sorted({k for p in prompts for k in word_keys(p)})
    raise L.error(key, f"word {json.dumps(word)} is not in {which} ({', '.join(json.dumps(p) for p in prompts)}); "
                       f"its words: {', '.join(words)}")


def _blend(L: _Line, blend_raw: Any, prompts: Sequence[str]) -> list[list[str]] | None:
    """A job's ``blend``: words as ``--blend`` (``"cat"``, ``"cat,tiger"``) or one list per prompt ->
    one list of words per prompt, each checked against its prompt; None when absent."""
    if blend_raw is None:
        return None
    if not isinstance(blend_raw, list) or not blend_raw:
        raise L.error("blend", f"expected a list of words, got {json.dumps(blend_raw)}")
    if all(isinstance(b, list) for b in blend_raw):
        if len(blend_raw) != len(prompts) or not all(all(isinstance(w, str) for w in b) for b in blend_raw):
            raise L.error("blend", f"one list of words per prompt ({len(prompts)}, source first) expected")
        blend = [list(b) for b in blend_raw]
    elif all(isinstance(b, str) for b in blend_raw):
        try:
            blend = parse_blend(blend_raw, len(prompts))
        except OptionError as err:
            raise L.error("blend", str(err).replace("--blend ", "")) from None
    else:
        raise L.error("blend", "expected a list of words (\"cat\" or \"cat,tiger\") or one list of words per prompt")
    for words, p in zip(blend, prompts):  # type: ignore[arg-type]
        for w in words:
            _check_words(L, "blend", w, [p], "its prompt")
    return blend


def _edit_params(L: _Line, raw: dict[str, Any], out: dict[str, Any]) -> None:
    prompt = _prompt(L, "prompt", raw.get("prompt"))
    to = raw.get("to", [])
    if isinstance(to, str):
        to = [to]
    if not isinstance(to, list) or not all(isinstance(t, str) and t.strip() for t in to):
        raise L.error("to", f"expected an edited prompt or a list of them, got {json.dumps(raw.get('to'))}")
    weights_raw = raw.get("weights", {})
    if not isinstance(weights_raw, dict):
        raise L.error("weights", f"expected {{\"WORD\": FACTOR}}, got {json.dumps(weights_raw)}")
    if not to:
        if not weights_raw:
            raise L.error("to", "give at least one edited prompt (or \"weights\" to reweight the source prompt)")
        to = [prompt]
    to = [_prompt(L, "to", t) for t in to]
    prompts = [prompt] + list(to)
    mode = raw.get("mode", "replace")
    if mode not in MODES:
        raise L.error("mode", f"expected one of {', '.join(MODES)}, got {json.dumps(mode)}")
    if mode == "replace":
        n = len(prompt.split())
        for t in to:
            if len(t.split()) != n:
                raise L.error("to", f"replace needs as many words as the source prompt ({n}); {json.dumps(t)} has "
                                    f"{len(t.split())} (use \"mode\": \"refine\")")
    weights: dict[str, Any] = {}
    for word, factor in weights_raw.items():
        if isinstance(factor, list):
            if len(factor) != len(to):
                raise L.error("weights", f"word {json.dumps(word)}: {len(factor)} factors for {len(to)} edited prompts")
            weights[word] = [_finite(L, "weights", x) for x in factor]
        else:
            weights[word] = _finite(L, "weights", factor)
        _check_words(L, "weights", word, to, "the edited prompts")
    blend = _blend(L, raw.get("blend"), prompts)
    cross_raw = raw.get("cross", 0.8)
    if isinstance(cross_raw, dict):
        cross: Any = {"default": 0.8}
        for word, window in cross_raw.items():
            cross[word] = _window(L, "cross", window)
            if word != "default":
                _check_words(L, "cross", word, prompts, "the prompts")
    else:
        cross = _window(L, "cross", cross_raw)
    self_steps = _window(L, "self", raw.get("self", 0.4))
    source_context = raw.get("source_context")
    if source_context is not None and not isinstance(source_context, bool):
        raise L.error("source_context", f"expected true, false or null, got {json.dumps(source_context)}")
    blend_threshold = raw.get("blend_threshold")
    if blend_threshold is not None:
        blend_threshold = _finite(L, "blend_threshold", blend_threshold)
    shared_raw = raw.get("shared")
    shared: Any = "default" if shared_raw is None else shared_raw if shared_raw == "off" else _window(L, "shared", shared_raw)
    try:  # the library's own checks (weight range, window order, ...) before any job runs
        build_edit(mode, cross=_windows_as_tuples(cross), self_steps=_windows_as_tuples(self_steps),
                   weights=_windows_as_tuples(weights), blend=blend, label="mode", source_context=source_context,
                   shared_steps=_windows_as_tuples(shared), blend_threshold=blend_threshold)
    except AttnctrlError as err:
        raise L.error(None, str(err)) from None
    out.update(prompt=prompt, to=list(to), mode=mode, weights=weights, blend=blend, cross=cross, self=self_steps)
    # Replace's output on UNets changed when its shared words' window became the whole run: hashed
    # for every replace job, so jobs finished by an older version run again
    if mode == "replace":
        out["shared"] = shared
    if blend_threshold is not None:  # only when given: finished jobs without it keep their hash
        out["blend_threshold"] = blend_threshold
    # Replace's output changed when source_context became its default: the key is always hashed for
    # replace, so jobs finished by an older version run again; elsewhere only when given
    if mode == "replace" or source_context is not None:
        out["source_context"] = source_context


def _windows_as_tuples(value: Any) -> Any:
    """JSON lists -> tuples (the edits take pairs and per-prompt factors as tuples)."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, dict):
        return {k: _windows_as_tuples(v) for k, v in value.items()}
    return value


def _prompt(L: _Line, key: str, v: Any) -> str:
    text = _string(L, key, v)
    try:
        return check_prompt(text, key)
    except OptionError as err:
        raise L.error(key, str(err)) from None


def _shapes_unet() -> str:
    from ..models import SHAPES

    return SHAPES


def _image_path(L: _Line, raw: dict[str, Any], base_dir: str, extra: dict[str, Any]) -> str:
    image = _string(L, "image", raw.get("image"))
    path = image if os.path.isabs(image) else os.path.join(base_dir, image)
    if not os.path.isfile(path):
        raise L.error("image", f"no such file: {path}")
    with open(path, "rb") as f:
        extra["image_sha256"] = hashlib.sha256(f.read()).hexdigest()
    return os.path.abspath(path)


def _flow_edit_params(L: _Line, raw: dict[str, Any], p: dict[str, Any], base_dir: str, extra: dict[str, Any]) -> None:
    """A flow-edit job: FlowEdit (attnctrl.pipelines.flow_edit); unset numbers are the model family's defaults."""
    p["image"] = _image_path(L, raw, base_dir, extra)
    p["prompt"] = _prompt(L, "prompt", raw.get("prompt"))
    to = raw.get("to")
    targets = [to] if isinstance(to, str) else to
    if not isinstance(targets, list) or not targets:
        raise L.error("to", "expected the target prompt (a string) or a list of them")
    p["to"] = [_prompt(L, "to", t) for t in targets]
    p["size"] = _size(L, raw.get("size"))
    p["seed"] = _int(L, "seed", raw.get("seed", DEFAULT_SEED), 0)
    p["n_min"] = _int(L, "n_min", raw.get("n_min", 0), 0)
    p["n_avg"] = _int(L, "n_avg", raw.get("n_avg", 1), 1)
    for key in ("steps", "n_max"):
        p[key] = None if raw.get(key) is None else _int(L, key, raw[key], 1)
    if p["steps"] is not None and p["n_max"] is not None and p["n_max"] > p["steps"]:
        raise L.error("n_max", f"n_max {p['n_max']} is more than steps {p['steps']}; lower n_max or raise steps")
    if p["n_max"] is not None and p["n_min"] >= p["n_max"]:
        raise L.error("n_min", f"n_min {p['n_min']} must be below n_max {p['n_max']}")
    for key in ("source_guidance", "target_guidance"):
        p[key] = None if raw.get(key) is None else _finite(L, key, raw[key])
    blends = [_blend(L, raw.get("blend"), [p["prompt"], target]) for target in p["to"]]
    if blends[0] is not None:  # (absent: no key, so the hashes of earlier finished jobs still match)
        p["blend"] = blends[0]  # the same words for every target: "cat,tiger" names the source's and each target's word
    if blends[0] is not None and p["n_min"]:
        raise L.error("n_min", "blend keeps the image outside the words' region, which n_min > 0 (plain target sampling) would undo; use 0")
    if raw.get("blend_threshold") is not None:
        if blends[0] is None:
            raise L.error("blend_threshold", "needs \"blend\" (the words whose region may change)")
        p["blend_threshold"] = _finite(L, "blend_threshold", raw["blend_threshold"])
        if not 0.0 <= p["blend_threshold"] <= 1.0:
            raise L.error("blend_threshold", f"must be in [0, 1], got {p['blend_threshold']}")


def _validate(L: _Line, raw: Any, default_model: str, base_dir: str) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
    if not isinstance(raw, dict):
        raise L.error(None, f"expected a JSON object ({{\"id\": ..., \"kind\": ...}}), got {type(raw).__name__}")
    job_id = raw.get("id")
    if not isinstance(job_id, str) or not _ID.match(job_id) or job_id in (".", ".."):
        raise L.error("id", f"expected a name of letters, digits, '.', '_' or '-' (a folder name), got {json.dumps(job_id)}")
    if _RESERVED.match(job_id):
        raise L.error("id", f"{json.dumps(job_id)} is the name of a file the batch writes in the output folder; choose another id")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise L.error("kind", f"expected one of {', '.join(KINDS)}, got {json.dumps(kind)}")
    unknown = sorted(set(raw) - FIELDS[kind])
    if unknown:
        raise L.error(unknown[0], f"not a field of a {kind} job (its fields: {', '.join(sorted(FIELDS[kind]))})")
    model = raw.get("model", default_model)
    if kind == "flow-edit" and "model" not in raw and default_model == _shapes_unet():
        from ..models import SHAPES_FLOW

        model = SHAPES_FLOW  # FlowEdit needs a flow model: the embedded one unless the job or --model names another
    model = _string(L, "model", model)
    p: dict[str, Any] = {"model": model}
    if kind == "flow-edit":
        extra: dict[str, Any] = {}
        _flow_edit_params(L, raw, p, base_dir, extra)
        return job_id, kind, p, extra
    p["steps"] = _int(L, "steps", raw.get("steps", DEFAULT_STEPS), 1)
    p["guidance"] = _finite(L, "guidance", raw.get("guidance", DEFAULT_GUIDANCE))
    p["size"] = _size(L, raw.get("size"))
    extra = {}
    if "seed" in FIELDS[kind]:
        p["seed"] = _int(L, "seed", raw.get("seed", DEFAULT_SEED), 0)
    if "scheduler" in FIELDS[kind] and raw.get("scheduler") is not None:
        if raw["scheduler"] not in SCHEDULERS:
            raise L.error("scheduler", f"expected one of {', '.join(SCHEDULERS)}, got {json.dumps(raw['scheduler'])}")
        p["scheduler"] = raw["scheduler"]
    if "efficient" in FIELDS[kind] and raw.get("efficient") is not None:
        from ..pipelines.speed import parse_policy

        text = _string(L, "efficient", raw["efficient"])
        try:
            parse_policy(text)
        except ValueError as err:
            raise L.error("efficient", str(err)) from None
        p["efficient"] = text.strip()
    if kind == "generate":
        p["prompt"] = _string(L, "prompt", raw.get("prompt"))
    elif kind in ("edit", "invert-and-edit"):
        _edit_params(L, raw, p)
    if kind == "invert-and-edit":
        from ..inversion import METHODS

        image = _string(L, "image", raw.get("image"))
        path = image if os.path.isabs(image) else os.path.join(base_dir, image)
        if not os.path.isfile(path):
            raise L.error("image", f"no such file: {path}")
        method = raw.get("method")  # None: null-text on UNets, fireflow on SD3/Flux (decided with the model)
        if method is not None and method not in METHODS:
            raise L.error("method", f"expected one of {', '.join(METHODS)}, got {json.dumps(method)}")
        if raw.get("guidance") is None:
            p["guidance"] = None  # the method's default (pipelines.default_guidance)
        p.update(image=os.path.abspath(path), method=method)
        with open(path, "rb") as f:
            extra["image_sha256"] = hashlib.sha256(f.read()).hexdigest()
    if kind == "consistent":
        subjects = raw.get("subjects")
        if not isinstance(subjects, list) or not subjects:
            raise L.error("subjects", "expected a list of {\"name\", \"prompt\", \"word\"} objects")
        names = set()
        clean = []
        for s in subjects:
            if not isinstance(s, dict) or set(s) != {"name", "prompt", "word"} or not all(
                isinstance(s[k], str) and s[k].strip() for k in s
            ):
                raise L.error("subjects", f"expected {{\"name\": ..., \"prompt\": ..., \"word\": ...}} (non-empty strings), got {json.dumps(s)}")
            if s["name"] in names:
                raise L.error("subjects", f"the name {json.dumps(s['name'])} is given twice")
            names.add(s["name"])
            _check_words(L, "subjects", s["word"], [s["prompt"]], "its portrait prompt")
            clean.append({"name": s["name"], "prompt": s["prompt"], "word": s["word"]})
        scenes = raw.get("scenes")
        if not isinstance(scenes, list) or not scenes or not all(isinstance(x, str) and x.strip() for x in scenes):
            raise L.error("scenes", "expected a non-empty list of scene prompts")
        p.update(subjects=clean, scenes=list(scenes))
    return job_id, kind, p, extra


def _hash(kind: str, params: dict[str, Any], extra: dict[str, Any]) -> str:
    blob = json.dumps({"v": HASH_VERSION, "kind": kind, "params": params, "extra": extra}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def load_jobs(path: str, *, model: str | None = None) -> list[Job]:
    """Read and check the whole jobs file; raises :class:`BatchFileError` naming the line and field."""
    from ..models import SHAPES

    default_model = model or SHAPES
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BatchFileError(f"{path}: cannot read the jobs file ({err})") from None
    base_dir = os.path.dirname(os.path.abspath(path))
    jobs: list[Job] = []
    seen: dict[str, int] = {}
    for number, text in enumerate(lines, start=1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        L = _Line(name, number)
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise L.error(None, f"not valid JSON ({err.msg} at column {err.colno})") from None
        except RecursionError:
            raise L.error(None, "JSON nested too deeply (a job is a flat object of fields)") from None
        job_id, kind, params, extra = _validate(L, raw, default_model, base_dir)
        if job_id in seen:
            raise L.error("id", f"{json.dumps(job_id)} is already the id of line {seen[job_id]}; ids must be unique")
        seen[job_id] = number
        jobs.append(Job(len(jobs), number, job_id, kind, params, _hash(kind, params, extra), extra))
    if not jobs:
        raise BatchFileError(f"{name}: no jobs (one JSON object per line)")
    return jobs


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------


class _Models:
    """Loaded pipelines, keyed by model id (one load per model per process)."""

    def __init__(self, device: str, dtype_name: str):
        self.device, self.dtype_name = device, dtype_name
        self._pipes: dict[str, Any] = {}
        self._consistent: dict[str, Any] = {}

    def get(self, model: str) -> Any:
        if model not in self._pipes:

            threads_for(model, self.device)
            pipe = load_model(model, self.device, resolve_dtype(self.dtype_name, self.device))
            pipe.set_progress_bar_config(disable=True)
            self._pipes[model] = pipe
        return self._pipes[model]

    def consistent(self, model: str) -> Any:
        if model not in self._consistent:
            from ..pipelines.consistency import ConsistentSubjectsPipeline, ConsistentSubjectsXLPipeline

            loaded = self.get(model)
            cls = ConsistentSubjectsXLPipeline if hasattr(loaded, "text_encoder_2") else ConsistentSubjectsPipeline
            pipe = cls.from_pipe(loaded)
            pipe.set_progress_bar_config(disable=True)
            self._consistent[model] = pipe
        return self._consistent[model]


def _build(p: dict[str, Any]) -> Any:

    cross = p["cross"]
    if isinstance(cross, list):
        cross = tuple(cross)
    elif isinstance(cross, dict):
        cross = {k: tuple(v) if isinstance(v, list) else v for k, v in cross.items()}
    self_steps = tuple(p["self"]) if isinstance(p["self"], list) else p["self"]
    weights = {k: tuple(v) if isinstance(v, list) else v for k, v in p["weights"].items()}
    shared = p.get("shared", "default")
    return build_edit(p["mode"], cross=cross, self_steps=self_steps, weights=weights, blend=p["blend"],
                      source_context=p.get("source_context"), shared_steps=_windows_as_tuples(shared),
                      blend_threshold=p.get("blend_threshold"))


def _size_kwargs(p: dict[str, Any]) -> dict[str, Any]:
    return {} if p["size"] is None else {"width": p["size"][0], "height": p["size"][1]}


def _run_job(job: Job, models: _Models, folder: str) -> list[str]:
    """Run one job; write its images into ``folder`` atomically; return their file names."""
    import torch

    from ..io import save_png_atomic

    p = job.params
    files: list[tuple[str, Any]] = []
    if job.kind in ("generate", "edit"):
        from ..pipelines.efficient import apply
        from ..pipelines.speed import parse_policy

        pipe = models.get(p["model"])
        original = pipe.scheduler
        set_scheduler(pipe, p.get("scheduler"))
        policy = parse_policy(p.get("efficient"))
        handle = apply(pipe, policy) if policy is not None else None
        try:
            prompts = [p["prompt"]] if job.kind == "generate" else [p["prompt"]] + p["to"]
            edit = None if job.kind == "generate" else _build(p)
            out = pipe(prompts if edit is not None else p["prompt"], edit=edit, num_inference_steps=p["steps"],
                       guidance_scale=p["guidance"], generator=torch.Generator("cpu").manual_seed(p["seed"]),
                       **_size_kwargs(p))
        finally:
            pipe.scheduler = original
            if handle is not None:
                handle.remove()
        if job.kind == "generate":
            files.append(("image.png", out.images[0]))
        else:
            files.append(("source.png", out.images[0]))
            files += [(f"edit_{k}.png", im) for k, im in enumerate(out.images[1:], start=1)]
    elif job.kind == "invert-and-edit":
        from ..pipelines import invert
        from ..plan import compile_edit

        pipe = models.get(p["model"])
        prompts = [p["prompt"]] + p["to"]
        edit = _build(p)
        from ..pipelines.mmdit_control import is_mmdit_pipeline

        flow = is_mmdit_pipeline(pipe)
        if not flow:
            compile_edit(edit, pipe.tokenizer, prompts)  # a bad edit fails before the inversion
        size = p["size"]
        method = p["method"] or ("fireflow" if flow else "null-text")
        inversion = invert(pipe, p["image"], p["prompt"], method=method, num_inference_steps=p["steps"],
                           guidance_scale=p["guidance"], height=None if size is None else size[1],
                           width=None if size is None else size[0])
        out = pipe(prompts, edit=edit, inversion=inversion)
        files.append(("source.png", out.images[0]))
        files += [(f"edit_{k}.png", im) for k, im in enumerate(out.images[1:], start=1)]
    elif job.kind == "flow-edit":
        from .. import LocalBlend
        from ..pipelines import flow_edit

        pipe = models.get(p["model"])
        size = p["size"]
        for k, target in enumerate(p["to"], start=1):
            out = flow_edit(pipe, p["image"], p["prompt"], target, num_inference_steps=p["steps"], n_max=p["n_max"],
                            n_min=p["n_min"], n_avg=p["n_avg"], source_guidance_scale=p["source_guidance"],
                            target_guidance_scale=p["target_guidance"], seed=p["seed"], progress=False,
                            blend=LocalBlend(p["blend"], threshold=p.get("blend_threshold", 0.3)) if "blend" in p else None,
                            height=None if size is None else size[1], width=None if size is None else size[0])
            files.append((f"edit_{k}.png", out.images[0]))
            if out.blend_masks is not None:
                files.append((f"mask_{k}.png", mask_image(out.blend_masks[0, 0] > 0.5, out.images[0].size)))
    else:
        from ..consistency import IRDiffusion
        from ..pipelines.consistency import Subject

        pipe = models.consistent(p["model"])
        subjects = [Subject(s["name"], s["prompt"], s["word"]) for s in p["subjects"]]
        out = pipe(subjects=subjects, scenes=list(p["scenes"]), settings=IRDiffusion(seed=p["seed"]),
                   num_inference_steps=p["steps"], guidance_scale=p["guidance"],
                   generator=torch.Generator("cpu").manual_seed(p["seed"]), **_size_kwargs(p))
        for subject, image, mask in zip(subjects, out.references, out.reference_masks):
            files.append((f"reference_{safe_name(subject.name)}.png", image))
            files.append((f"reference_{safe_name(subject.name)}_mask.png", mask_image(mask, image.size)))
        for k, image in enumerate(out.scenes):
            files.append((f"scene_{k}.png", image))
    os.makedirs(folder, exist_ok=True)
    for name, image in files:
        save_png_atomic(image, os.path.join(folder, name))
    return [name for name, _ in files]


def _finished(job: Job, folder: str) -> list[str] | None:
    """The outputs of a finished run of this very job (same hash, every file present), else None."""
    try:
        with open(os.path.join(folder, "job.json"), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("hash") != job.hash:
        return None
    outputs = record.get("outputs")
    if not isinstance(outputs, list) or not outputs:
        return None
    if not all(isinstance(o, str) and os.path.isfile(os.path.join(folder, o)) for o in outputs):
        return None
    return outputs


def _clear(folder: str) -> None:
    """Before a job (re)runs: remove its stale ``job.json`` (it must not vouch for half-rewritten
    outputs) and temporary files left by a process killed in the middle of an atomic write."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return
    for name in names:
        if name == "job.json" or (name.startswith(".") and name.endswith(".tmp")):
            try:
                os.unlink(os.path.join(folder, name))
            except FileNotFoundError:
                pass


def _message(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def _process_state(cpu: bool) -> tuple[int, int, Callable[[], None], Any]:
    """(process_index, num_processes, wait_for_everyone, device) from accelerate's ``PartialState``
    when the command runs under a launcher; one process otherwise (accelerate is then not imported).

    ``cpu`` is passed on: without it accelerate ignores ``WORLD_SIZE`` on a machine without GPUs.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 or "ACCELERATE_PROCESS_INDEX" in os.environ
    if launched:
        try:
            from accelerate import PartialState
        except ImportError:  # pragma: no cover - launched by torchrun without accelerate
            PartialState = None  # type: ignore[assignment]
        if PartialState is not None:
            state = PartialState(cpu=cpu)
            return state.process_index, state.num_processes, state.wait_for_everyone, state.device
    return 0, 1, lambda: None, None


def _merge(out_dir: str, jobs: Sequence[Job], num_processes: int) -> list[dict[str, Any]]:
    """Merge the processes' result parts into ``results.jsonl`` (file order; the last record of a
    job wins), atomically, then remove the parts."""
    from ..io import atomic_write_bytes

    by_id: dict[str, dict[str, Any]] = {}
    parts = [os.path.join(out_dir, f"results.part-{k}.jsonl") for k in range(num_processes)]
    for part in parts:
        try:
            with open(part, encoding="utf-8") as f:
                for text in f:
                    try:
                        record = json.loads(text)
                    except ValueError:  # a line cut short by a killed process
                        continue
                    if isinstance(record, dict) and "id" in record:
                        by_id[record["id"]] = record
        except OSError:
            continue
    records = []
    for job in jobs:
        record = by_id.get(job.id) or {"id": job.id, "kind": job.kind, "line": job.line, "status": "failed",
                                       "error": "no result: the process running it did not finish"}
        records.append(record)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_bytes(os.path.join(out_dir, "results.jsonl"), text.encode("utf-8"))
    for part in parts:
        try:
            os.unlink(part)
        except OSError:
            pass
    return records


def run_batch(jobs_path: str, out_dir: str, *, model: str | None = None, device: str = "auto",
              dtype: str = "auto", progress: bool = True) -> int:
    """Run every job of ``jobs_path`` (this process's share of them under ``accelerate launch``).

    Returns 0 if every job succeeded or was skipped, 1 if any failed. Raises
    :class:`BatchFileError` (before anything runs) when the file is invalid.
    """
    from ..io import write_json_atomic

    jobs = load_jobs(jobs_path, model=model)
    dev = resolve_device(device)
    index, num, wait, state_device = _process_state(cpu=dev == "cpu")
    if dev == "cuda" and num > 1 and state_device is not None:
        dev = str(state_device)  # one GPU per process (cuda:LOCAL_RANK)
    mine = [job for job in jobs if job.index % num == index]
    os.makedirs(out_dir, exist_ok=True)
    if index == 0:
        # A summary of an earlier run must not outlive this one: if this run is killed, job folders
        # change (new seed, new outputs) while an old results.jsonl would still describe the old ones.
        try:
            os.unlink(os.path.join(out_dir, "results.jsonl"))
        except FileNotFoundError:
            pass
    wait()
    part_path = os.path.join(out_dir, f"results.part-{index}.jsonl")
    models = _Models(dev, dtype)
    failed = 0
    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine), desc=f"batch[{index}/{num}]" if num > 1 else "batch", unit="job",
               disable=not progress, file=sys.stderr, position=index, dynamic_ncols=True)
    with open(part_path, "w", encoding="utf-8") as part:
        for job in mine:
            folder = os.path.join(out_dir, job.id)
            record: dict[str, Any] = {"id": job.id, "kind": job.kind, "line": job.line, "model": job.params["model"],
                                      "seed": job.params.get("seed"), "process": index}
            started = time.perf_counter()
            done = _finished(job, folder)
            if done is not None:
                record.update(status="skipped", outputs=[os.path.join(job.id, o) for o in done], seconds=0.0)
            else:
                try:
                    _clear(folder)
                    outputs = _run_job(job, models, folder)
                    seconds = round(time.perf_counter() - started, 3)
                    write_json_atomic({"id": job.id, "kind": job.kind, "hash": job.hash, "params": job.params,
                                            **job.extra_hash, "outputs": outputs, "seconds": seconds},
                                           os.path.join(folder, "job.json"))
                    record.update(status="ok", outputs=[os.path.join(job.id, o) for o in outputs], seconds=seconds)
                except Exception as err:  # noqa: BLE001 - one failing job never stops the others
                    failed += 1
                    record.update(status="failed", outputs=[], seconds=round(time.perf_counter() - started, 3),
                                  error=_message(err))
                    bar.write(f"job {job.id} (line {job.line}) failed: {record['error']}", file=sys.stderr)
            part.write(json.dumps(record, ensure_ascii=False) + "\n")
            part.flush()
            os.fsync(part.fileno())
            bar.set_postfix(failed=failed, refresh=False)
            bar.update(1)
    bar.close()
    wait()  # every part is complete
    status = 0
    if index == 0:
        records = _merge(out_dir, jobs, num)
        counts = {s: sum(r.get("status") == s for r in records) for s in ("ok", "skipped", "failed")}
        print(f"{os.path.join(out_dir, 'results.jsonl')}: {counts['ok']} ok, {counts['skipped']} skipped, "
              f"{counts['failed']} failed", flush=True)
        status = 1 if counts["failed"] else 0
    wait()  # the merge is written
    # Only the main process reports failures in its exit code: a launcher such as torchrun stops the
    # other processes as soon as one exits non-zero, which must not happen before the merge.
    return status
