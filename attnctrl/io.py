"""Atomic file writes: a reader never sees a half-written PNG or JSON file.

Every writer puts the data in a temporary file in the destination folder, flushes and fsyncs it,
then renames it over the destination with :func:`os.replace` (atomic on POSIX and Windows when both
paths are on one file system, which a temporary file in the same folder guarantees).

Only the standard library is imported at module level; Pillow is imported by
:func:`save_png_atomic` when called.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from typing import Any

__all__ = ["atomic_write_bytes", "save_png_atomic", "write_json_atomic"]


def _fsync_dir(folder: str) -> None:
    # Make the rename itself durable where the platform allows opening folders.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    # Reading the umask means setting it; put it straight back (no file is created in between).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> str:
    """Write ``data`` to ``path`` atomically; create missing parent folders. Returns the path."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        # mkstemp creates the file 0600; a saved result gets the permissions of any new file (umask).
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)
    return path


def save_png_atomic(image: Any, path: str | os.PathLike[str]) -> str:
    """Save a PIL image as PNG at ``path`` atomically. Returns the path."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if hasattr(obj, "items"):  # MappingProxyType and other mappings
        return dict(obj.items())
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    return str(obj)


def _finite(obj: Any) -> Any:
    # Strict JSON has no NaN/Infinity: store them as strings instead of writing invalid JSON.
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json_atomic(obj: Any, path: str | os.PathLike[str], *, indent: int = 2) -> str:
    """Write ``obj`` as UTF-8 JSON (strict: no NaN/Infinity) at ``path`` atomically. Returns the path."""
    text = json.dumps(_finite(json.loads(json.dumps(obj, default=_json_default))), indent=indent, ensure_ascii=False)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))
