"""Pictures of attention: heatmaps, overlays, labelled image grids and word-map figures.

Pillow and numpy only (no matplotlib, no torch import: tensors are read through ``.detach()``).
Small images (the 64x64 shapes model) are enlarged with nearest-neighbour to a readable cell size,
large ones shrunk, always keeping the aspect ratio; labels use Pillow's default font.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from .errors import InvalidOptionError

__all__ = ["COLORMAP", "colorize", "heatmap", "overlay", "image_grid", "word_map_figure"]

# A perceptual dark-to-bright colormap (black -> purple -> red -> orange -> pale yellow), in the
# spirit of "inferno": control points of a piecewise-linear table, interpolated to 256 entries.
_STOPS = np.array(
    [
        (0.000, 0, 0, 4),
        (0.125, 31, 12, 72),
        (0.250, 85, 15, 109),
        (0.375, 136, 34, 106),
        (0.500, 186, 54, 85),
        (0.625, 227, 89, 51),
        (0.750, 249, 140, 10),
        (0.875, 249, 201, 50),
        (1.000, 252, 255, 164),
    ],
    dtype=np.float64,
)
_X = np.linspace(0.0, 1.0, 256)
COLORMAP: np.ndarray = np.stack(
    [np.interp(_X, _STOPS[:, 0], _STOPS[:, c]) for c in (1, 2, 3)], axis=-1
).round().astype(np.uint8)
"""The (256, 3) uint8 lookup table used by :func:`heatmap` and :func:`overlay`."""

_MIN_CELL = 128  # images smaller than this (shorter side) are enlarged by an integer factor
_MAX_CELL = 384  # images larger than this (longer side) are shrunk
_PAD = 6
_BG = (255, 255, 255)
_FG = (20, 20, 20)
_MUTED = (120, 120, 120)


# ------------------------------------------------------------------------------------------------
# Maps and colours
# ------------------------------------------------------------------------------------------------


def _to_numpy_2d(map2d: Any) -> np.ndarray:
    if hasattr(map2d, "detach"):  # a torch tensor, without importing torch
        map2d = map2d.detach().float().cpu().numpy()
    arr = np.asarray(map2d, dtype=np.float64)
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise InvalidOptionError(f"expected a 2-D (h, w) map, got shape {tuple(np.shape(map2d))}")
    return arr


def _normalise(arr: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] (min -> 0, max -> 1); non-finite entries count as the minimum; flat -> zeros."""
    arr = np.where(np.isfinite(arr), arr, np.nan)
    if np.all(np.isnan(arr)):
        return np.zeros(arr.shape, dtype=np.float32)
    lo, hi = np.nanmin(arr), np.nanmax(arr)
    arr = np.nan_to_num(arr, nan=lo)
    if hi - lo <= 0:
        return np.zeros(arr.shape, dtype=np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def _size_wh(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        w = h = int(size)
    else:
        w, h = (int(s) for s in size)
    if w < 1 or h < 1:
        raise InvalidOptionError(f"size must be positive, got {size!r}")
    return w, h


def _resize_map(unit: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a [0, 1] float map to (w, h)."""
    if unit.shape[::-1] == size:
        return unit
    img = Image.fromarray(unit.astype(np.float32), mode="F").resize(size, Image.BILINEAR)
    return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)


def colorize(unit: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to (..., 3) uint8 colours with :data:`COLORMAP`."""
    idx = np.clip(np.round(np.asarray(unit, dtype=np.float64) * 255.0), 0, 255).astype(np.intp)
    return COLORMAP[idx]


def heatmap(map2d: Any, size: int | Sequence[int] | None = None) -> Image.Image:
    """A colour image of a 2-D map, normalised to [0, 1].

    Args:
        map2d: an (h, w) array or tensor (e.g. ``store.word_maps(1, "tiger")``).
        size: output size, an int (square) or (width, height); bilinear. None keeps (w, h).
    """
    unit = _normalise(_to_numpy_2d(map2d))
    if size is not None:
        unit = _resize_map(unit, _size_wh(size))
    return Image.fromarray(colorize(unit), mode="RGB")


def _as_rgb(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def overlay(image: Any, map2d: Any, alpha: float = 0.5) -> Image.Image:
    """``image`` with the colour heatmap of ``map2d`` blended on top.

    The map is normalised and bilinearly upsampled to the image size (any aspect ratio).
    ``alpha`` is the heatmap's opacity in [0, 1].
    """
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise InvalidOptionError(f"alpha must be a number in [0, 1], got {alpha!r}")
    base = _as_rgb(image)
    heat = heatmap(map2d, base.size)
    return Image.blend(base, heat, float(alpha))


# ------------------------------------------------------------------------------------------------
# Layout helpers
# ------------------------------------------------------------------------------------------------


def _font(size: int = 12) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: Any) -> float:
    try:
        return float(draw.textlength(text, font=font))
    except AttributeError:  # very old Pillow
        return float(draw.textsize(text, font=font)[0])


def _line_height(font: Any) -> int:
    box = font.getbbox("Hgy")
    return int(box[3]) + 3


def _wrap(text: str, width: int, font: Any) -> list[str]:
    """Greedy word wrap to ``width`` pixels; words longer than a line are cut by characters."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for paragraph in str(text).split("\n"):
        line = ""
        for word in paragraph.split():
            trial = f"{line} {word}" if line else word
            if _text_width(draw, trial, font) <= width:
                line = trial
                continue
            if line:
                lines.append(line)
            while _text_width(draw, word, font) > width and len(word) > 1:
                cut = len(word)
                while cut > 1 and _text_width(draw, word[:cut], font) > width:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines or [""]


def _cell_size(w: int, h: int) -> tuple[int, int]:
    """Display size of a (w, h) image: enlarge small ones by an integer factor, shrink large ones."""
    if max(w, h) > _MAX_CELL:
        s = _MAX_CELL / max(w, h)
        return max(1, round(w * s)), max(1, round(h * s))
    if min(w, h) < _MIN_CELL:
        f = min(math.ceil(_MIN_CELL / min(w, h)), max(1, _MAX_CELL // max(w, h)))
        return w * f, h * f
    return w, h


def _fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    if image.size == size:
        return image
    enlarging = size[0] >= image.size[0] and size[1] >= image.size[1]
    return image.resize(size, Image.NEAREST if enlarging else Image.LANCZOS)


def _draw_lines(draw: ImageDraw.ImageDraw, lines: Sequence[str], x: int, y: int, width: int, font: Any, fill) -> None:
    lh = _line_height(font)
    for k, line in enumerate(lines):
        tw = _text_width(draw, line, font)
        draw.text((x + max(0, (width - tw) / 2), y + k * lh), line, fill=fill, font=font)


def _save(image: Image.Image, path: str | os.PathLike[str] | None) -> None:
    if path is not None:
        from .io import save_png_atomic

        save_png_atomic(image, path)


# ------------------------------------------------------------------------------------------------
# Grids and figures
# ------------------------------------------------------------------------------------------------


def image_grid(
    images: Sequence[Any],
    rows: int,
    cols: int,
    labels: Sequence[str] | None = None,
    *,
    row_labels: Sequence[str] | None = None,
    path: str | os.PathLike[str] | None = None,
) -> Image.Image:
    """Images on a ``rows`` x ``cols`` grid (row-major), each with an optional label under it.

    ``row_labels`` (one per row) are titles drawn above each row. Images may differ in size:
    every cell gets the size of the largest, enlarged to a readable size when tiny
    (nearest-neighbour) or shrunk when huge. Saved atomically as PNG if ``path``.
    """
    images = [_as_rgb(im) for im in images]
    if rows < 1 or cols < 1:
        raise InvalidOptionError(f"rows and cols must be positive, got {rows}x{cols}")
    if not images or len(images) > rows * cols:
        raise InvalidOptionError(f"{len(images)} images do not fit a {rows}x{cols} grid")
    if labels is not None and len(labels) != len(images):
        raise InvalidOptionError(f"got {len(labels)} labels for {len(images)} images")
    if row_labels is not None and len(row_labels) != rows:
        raise InvalidOptionError(f"got {len(row_labels)} row labels for {rows} rows")
    w0 = max(im.size[0] for im in images)
    h0 = max(im.size[1] for im in images)
    cw, ch = _cell_size(w0, h0)
    font, title_font = _font(12), _font(13)
    lh = _line_height(font)
    width = cols * cw + (cols + 1) * _PAD
    wrapped = [_wrap(t, cw, font) for t in labels] if labels is not None else None
    label_h = (max(len(w) for w in wrapped) * lh + _PAD) if wrapped else 0
    titles = [_wrap(t, width - 2 * _PAD, title_font) for t in row_labels] if row_labels is not None else None
    title_h = (max(len(t) for t in titles) * _line_height(title_font) + _PAD // 2) if titles else 0
    row_h = title_h + ch + label_h
    height = rows * row_h + (rows + 1) * _PAD
    canvas = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(canvas)
    if titles:
        for r, title in enumerate(titles):
            _draw_lines(draw, title, _PAD, _PAD + r * (row_h + _PAD), width - 2 * _PAD, title_font, _FG)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        x = _PAD + c * (cw + _PAD)
        y = _PAD + r * (row_h + _PAD) + title_h
        # Keep each image's own aspect ratio inside the cell.
        s = min(cw / im.size[0], ch / im.size[1])
        shown = _fit(im, (max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s))))
        canvas.paste(shown, (x + (cw - shown.size[0]) // 2, y + (ch - shown.size[1]) // 2))
        if wrapped:
            _draw_lines(draw, wrapped[i], x, y + ch + _PAD // 2, cw, font, _FG)
    _save(canvas, path)
    return canvas


def _words_for_rows(words_per_prompt: Sequence[Any], count: int) -> list[list[str]]:
    if isinstance(words_per_prompt, str):
        return [[words_per_prompt]] * count
    entries = list(words_per_prompt)
    if entries and all(isinstance(w, str) for w in entries):
        return [list(entries)] * count  # a flat list: the same words for every prompt
    if len(entries) != count:
        raise InvalidOptionError(f"words_per_prompt has {len(entries)} entries for {count} prompts; give one list per prompt")
    rows = []
    for entry in entries:
        rows.append([entry] if isinstance(entry, str) else list(entry or []))
    return rows


def word_map_figure(
    images: Sequence[Any],
    store: Any,
    words_per_prompt: Sequence[Any],
    *,
    prompts: Sequence[str],
    path: str | os.PathLike[str] | None = None,
    alpha: float = 0.6,
    skip_missing: bool = False,
) -> Image.Image:
    """One row per prompt: the generated image, then each word's attention map over it.

    Args:
        images: the images in prompt order (source first). With several images per prompt
            (``store.images_per_prompt`` > 1) the first image of each prompt is used.
        store: an :class:`attnctrl.store.AttentionStore` (``out.attention``).
        words_per_prompt: one list of words per prompt; or one flat list of words for every prompt
            (a word that is not in a prompt then shows an empty cell).
        prompts: the prompt texts (row titles).
        path: save the figure atomically as PNG here.
        alpha: heatmap opacity of the overlays.
        skip_missing: show an empty cell for a word that has no map (not in the prompt, or cut
            off by the token limit) instead of raising ``WordNotFoundError``.

    Works at any image size and aspect ratio; maps are upsampled bilinearly to the image.
    """
    prompts = list(prompts)
    count = len(prompts)
    per = int(getattr(store, "images_per_prompt", 1) or 1)
    images = list(images)
    if len(images) == count * per:
        images = images[::per]
    if len(images) != count:
        raise InvalidOptionError(f"got {len(images)} images for {count} prompts")
    flat = isinstance(words_per_prompt, str) or all(isinstance(w, str) for w in words_per_prompt)
    rows_words = _words_for_rows(words_per_prompt, count)

    rgb = [_as_rgb(im) for im in images]
    cw, ch = _cell_size(max(im.size[0] for im in rgb), max(im.size[1] for im in rgb))
    font, title_font = _font(12), _font(13)
    lh = _line_height(font)
    ncols = 1 + max((len(w) for w in rows_words), default=0)
    width = ncols * cw + (ncols + 1) * _PAD

    row_images = []
    for i, (image, words) in enumerate(zip(rgb, rows_words)):
        s = min(cw / image.size[0], ch / image.size[1])
        shown = _fit(image, (max(1, round(image.size[0] * s)), max(1, round(image.size[1] * s))))
        cells: list[tuple[Image.Image | None, str]] = [(shown, "image")]
        for word in words:
            if flat or skip_missing:
                try:
                    m = store.word_maps(i, word)
                except ValueError:  # WordNotFoundError: not in this prompt, or past the token limit
                    cells.append((None, f"{word} (no map)"))
                    continue
            else:
                m = store.word_maps(i, word)
            cells.append((overlay(shown, m, alpha=alpha), word))
        title = _wrap(f"{'source' if i == 0 else f'edit {i}'}: {prompts[i]}", width - 2 * _PAD, title_font)
        captions = [_wrap(text, cw, font) for _, text in cells]
        title_h = len(title) * _line_height(title_font) + _PAD
        caption_h = max(len(c) for c in captions) * lh + _PAD
        row = Image.new("RGB", (width, title_h + ch + caption_h + _PAD), _BG)
        draw = ImageDraw.Draw(row)
        _draw_lines(draw, title, _PAD, 0, width - 2 * _PAD, title_font, _FG)
        y = title_h
        for k, ((picture, _), caption_lines) in enumerate(zip(cells, captions)):
            x = _PAD + k * (cw + _PAD)
            if picture is None:
                draw.rectangle((x, y, x + cw - 1, y + ch - 1), outline=_MUTED)
            else:
                row.paste(picture, (x + (cw - picture.size[0]) // 2, y + (ch - picture.size[1]) // 2))
            _draw_lines(draw, caption_lines, x, y + ch + _PAD // 2, cw, font, _FG if picture is not None else _MUTED)
        row_images.append(row)

    height = sum(r.size[1] for r in row_images) + _PAD * (len(row_images) + 1)
    figure = Image.new("RGB", (width, height), _BG)
    y = _PAD
    for r in row_images:
        figure.paste(r, (0, y))
        y += r.size[1] + _PAD
    _save(figure, path)
    return figure
