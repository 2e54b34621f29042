"""Synthetic "shapes" scenes: the data behind attnctrl's embedded text-to-image model.

A scene is one or two flat coloured shapes (circle, square, triangle, star) on a plain background,
each at one of nine grid positions ("on the left", "in the top right corner", ...), small or big.
Everything here is deterministic and needs only numpy + Pillow (no torch, no diffusers):

* :func:`sample_scene` / :func:`caption` / :func:`render` draw a scene, describe it in plain English
  and rasterise it (antialiased: drawn at 4x and box-downsampled).
* :func:`item` / :class:`ShapesDataset`: item ``i`` of seed ``s`` is always the same (image, caption).
* :data:`HELD_OUT` / :data:`HELD_OUT_PAIRS` are kept out of training; :func:`held_out_prompts` is the
  fixed evaluation prompt set built from them.
* :func:`analyze` finds the coloured objects in an image (generated or rendered) without any learned
  model, so edits and generations can be scored exactly (colour, position, size, mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw
from ...errors import InvalidOptionError, InvalidTypeError

__all__ = [
    "COLOURS",
    "BACKGROUNDS",
    "PALETTE",
    "SHAPE_KINDS",
    "SHAPES_NAMES",
    "POSITIONS",
    "POSITION_ALIASES",
    "SIZES",
    "SIZE_AREA_THRESHOLD",
    "VOCABULARY",
    "HELD_OUT",
    "HELD_OUT_PAIRS",
    "SceneObject",
    "Scene",
    "ExpectedObject",
    "EvalPrompt",
    "DetectedObject",
    "with_article",
    "object_phrase",
    "sample_scene",
    "caption",
    "render",
    "render_array",
    "object_masks",
    "item",
    "ShapesDataset",
    "is_held_out",
    "held_out_prompts",
    "background_colour",
    "to_uint8_image",
    "position_of",
    "analyze",
    "object_extent",
]

# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (245, 225, 40),
    "orange": (245, 130, 20),
    "purple": (150, 60, 190),
}
"""Object colours (name -> RGB). Pairwise RGB distance >= 95 and >= 95 from every background."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
"""Background colours (name -> RGB). ``white`` is used whenever a caption names no background."""

PALETTE: dict[str, tuple[int, int, int]] = {**COLOURS, **BACKGROUNDS}
"""Every colour that can appear in a rendered scene."""

SHAPE_KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star")
"""The four shape kinds."""

SHAPES_NAMES: tuple[str, ...] = SHAPE_KINDS
"""Alias of :data:`SHAPE_KINDS`."""

_COLUMNS: dict[str, float] = {"left": 0.2, "centre": 0.5, "right": 0.8}
_ROWS: dict[str, float] = {"top": 0.2, "centre": 0.5, "bottom": 0.8}

POSITIONS: dict[str, tuple[float, float]] = {
    "in the top left corner": (0.2, 0.2),
    "at the top": (0.5, 0.2),
    "in the top right corner": (0.8, 0.2),
    "on the left": (0.2, 0.5),
    "in the centre": (0.5, 0.5),
    "on the right": (0.8, 0.5),
    "in the bottom left corner": (0.2, 0.8),
    "at the bottom": (0.5, 0.8),
    "in the bottom right corner": (0.8, 0.8),
}
"""Position phrase -> (x, y) centre as a fraction of the image (x to the right, y downwards)."""

POSITION_ALIASES: dict[str, str] = {"in the center": "in the centre"}
"""Other spellings used in captions -> canonical :data:`POSITIONS` key."""

# (column, row) of each canonical position on the 3x3 grid, and the inverse.
_GRID: dict[str, tuple[int, int]] = {
    p: (int(round((x - 0.2) / 0.3)), int(round((y - 0.2) / 0.3))) for p, (x, y) in POSITIONS.items()
}
_GRID_INV: dict[tuple[int, int], str] = {v: k for k, v in _GRID.items()}

SIZES: dict[str, float] = {"small": 0.075, "big": 0.115}
"""Size name -> nominal radius as a fraction of the image side. Every shape kind has the same area,
about ``2.6 * radius**2`` (small ~ 0.0146, big ~ 0.0344 of the image)."""

SIZE_AREA_THRESHOLD: float = 0.023
"""Objects covering more than this fraction of the image are "big", others "small"."""

SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small",), "big": ("big", "large")}

# Shape geometry relative to the nominal radius R: chosen so that all four kinds have area 2.6 R^2.
_CIRCLE_R = math.sqrt(2.6 / math.pi)  # 0.910
_SQUARE_HALF = math.sqrt(2.6) / 2.0  # 0.806
_TRIANGLE_CIRCUM = math.sqrt(2.6 / (3.0 * math.sqrt(3.0) / 4.0))  # 1.415
_STAR_INNER_RATIO = 0.45
_STAR_OUTER = math.sqrt(2.6 / (5.0 * _STAR_INNER_RATIO * math.sin(math.radians(36.0))))  # 1.40
_BOUND: dict[str, float] = {
    "circle": _CIRCLE_R,
    "square": _SQUARE_HALF * math.sqrt(2.0),
    "triangle": _TRIANGLE_CIRCUM,
    "star": _STAR_OUTER,
}
_JITTER = 0.02  # max centre offset from the grid position (fraction of the image)
_GAP = 0.025  # min gap between the bounding circles of two objects

VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        set(COLOURS)
        | set(BACKGROUNDS)
        | {"grey"}
        | set(SHAPE_KINDS)
        | {"small", "big", "large"}
        | {w for p in list(POSITIONS) + list(POSITION_ALIASES) for w in p.split()}
        | {"a", "an", "and", "background", "there", "is", "picture", "image", "of"}
    )
)
"""Every word the caption generator uses (the tokenizer makes most of them single tokens)."""

# --------------------------------------------------------------------------------------------------
# Held-out combinations (never in training scenes)
# --------------------------------------------------------------------------------------------------

HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "star", "on the left"),
    ("green", "circle", "in the top right corner"),
    ("blue", "triangle", "at the bottom"),
    ("yellow", "square", "in the centre"),
    ("orange", "circle", "at the top"),
    ("purple", "square", "on the right"),
    ("red", "triangle", "in the bottom left corner"),
    ("blue", "star", "in the top left corner"),
)
"""(colour, shape, position) triples that never appear in a training scene (in any scene role)."""

HELD_OUT_PAIRS: tuple[tuple[tuple[str, str], tuple[str, str]], ...] = (
    (("red", "circle"), ("green", "triangle")),
    (("blue", "square"), ("yellow", "star")),
    (("orange", "triangle"), ("purple", "circle")),
    (("green", "square"), ("red", "star")),
    (("yellow", "circle"), ("blue", "triangle")),
    (("purple", "star"), ("orange", "square")),
)
"""Unordered pairs of (colour, shape) objects that never appear together in a training scene."""

_HELD_OUT_SET = frozenset(HELD_OUT)
_HELD_OUT_PAIR_SET = frozenset(frozenset(p) for p in HELD_OUT_PAIRS)

# --------------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """One flat shape: ``colour`` in :data:`COLOURS`, ``shape`` in :data:`SHAPE_KINDS`, ``position``
    a key of :data:`POSITIONS`, ``size`` in :data:`SIZES`; ``dx``/``dy`` offset the centre from the
    grid position (fractions of the image, ``|d| <= 0.02``)."""

    colour: str
    shape: str
    position: str
    size: str = "big"
    dx: float = 0.0
    dy: float = 0.0

    @property
    def centre(self) -> tuple[float, float]:
        """Centre (x, y) as fractions of the image."""
        x, y = POSITIONS[self.position]
        return (x + self.dx, y + self.dy)

    @property
    def radius(self) -> float:
        """Nominal radius (fraction of the image side)."""
        return SIZES[self.size]

    @property
    def bound(self) -> float:
        """Radius of a circle around the centre that contains the whole shape."""
        return _BOUND[self.shape] * self.radius


@dataclass(frozen=True)
class Scene:
    """A background colour (key of :data:`BACKGROUNDS`) and one or two non-overlapping objects at
    different positions."""

    background: str
    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise InvalidOptionError(f"unknown background {self.background!r}; use one of {list(BACKGROUNDS)}")
        for o in self.objects:
            if o.colour not in COLOURS:
                raise InvalidOptionError(f"unknown colour {o.colour!r}; use one of {list(COLOURS)}")
            if o.shape not in SHAPE_KINDS:
                raise InvalidOptionError(f"unknown shape {o.shape!r}; use one of {list(SHAPE_KINDS)}")
            if o.position not in POSITIONS:
                raise InvalidOptionError(f"unknown position {o.position!r}; use one of {list(POSITIONS)}")
            if o.size not in SIZES:
                raise InvalidOptionError(f"unknown size {o.size!r}; use one of {list(SIZES)}")


def with_article(phrase: str) -> str:
    """``"red circle"`` -> ``"a red circle"``, ``"orange star"`` -> ``"an orange star"``."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def object_phrase(obj: SceneObject, size_word: str | None = None) -> str:
    """Noun phrase with article, e.g. ``"a small blue square"`` (``size_word`` optional)."""
    words = ([size_word] if size_word else []) + [obj.colour, obj.shape]
    return with_article(" ".join(words))


def is_held_out(scene: Scene) -> bool:
    """True if the scene contains a :data:`HELD_OUT` triple or a :data:`HELD_OUT_PAIRS` pair."""
    for o in scene.objects:
        if (o.colour, o.shape, o.position) in _HELD_OUT_SET:
            return True
    if len(scene.objects) == 2:
        a, b = scene.objects
        if frozenset({(a.colour, a.shape), (b.colour, b.shape)}) in _HELD_OUT_PAIR_SET:
            return True
    return False


def _fits(objs: Sequence[SceneObject]) -> bool:
    for o in objs:
        x, y = o.centre
        b = o.bound
        if x - b < 0.0 or y - b < 0.0 or x + b > 1.0 or y + b > 1.0:
            return False
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            (x1, y1), (x2, y2) = objs[i].centre, objs[j].centre
            if math.hypot(x1 - x2, y1 - y2) < objs[i].bound + objs[j].bound + _GAP:
                return False
    return True


def sample_scene(
    rng: np.random.Generator,
    n_objects: int | None = None,
    *,
    two_object_prob: float = 0.4,
    white_prob: float = 0.7,
    allow_held_out: bool = False,
) -> Scene:
    """Draw a random scene.

    ``n_objects`` (1 or 2) defaults to 2 with probability ``two_object_prob``. The background is white
    with probability ``white_prob``, else black or gray. Two objects always have different colours,
    different positions and do not overlap. Scenes containing :data:`HELD_OUT` triples or
    :data:`HELD_OUT_PAIRS` are rejected unless ``allow_held_out``.
    """
    if n_objects is None:
        n_objects = 2 if rng.random() < two_object_prob else 1
    if n_objects not in (1, 2):
        raise InvalidOptionError(f"n_objects must be 1 or 2, got {n_objects}")
    u = rng.random()
    background = "white" if u < white_prob else ("black" if u < (1 + white_prob) / 2 else "gray")
    colours, shapes, positions, sizes = list(COLOURS), list(SHAPE_KINDS), list(POSITIONS), list(SIZES)
    while True:
        cidx = rng.choice(len(colours), size=n_objects, replace=False)
        pidx = rng.choice(len(positions), size=n_objects, replace=False)
        objs = tuple(
            SceneObject(
                colour=colours[int(cidx[k])],
                shape=shapes[int(rng.integers(len(shapes)))],
                position=positions[int(pidx[k])],
                size=sizes[int(rng.integers(len(sizes)))],
                dx=float(np.round(rng.uniform(-_JITTER, _JITTER), 4)),
                dy=float(np.round(rng.uniform(-_JITTER, _JITTER), 4)),
            )
            for k in range(n_objects)
        )
        scene = Scene(background, objs)
        if _fits(objs) and (allow_held_out or not is_held_out(scene)):
            return scene


def caption(
    scene: Scene,
    template_rng: np.random.Generator,
    *,
    position_prob: float | None = None,
    size_prob: float = 0.35,
    background_prob: float = 0.25,
) -> str:
    """A plain-English caption of ``scene``; ``template_rng`` picks the template and optional words.

    Positions are mentioned with probability ``position_prob`` (default 0.85 for one object, 0.6
    for two; for two objects both or neither); size words ("small", "big"/"large") each with
    probability ``size_prob``. A non-white background is always named ("on a black background");
    white only with probability ``background_prob``, so captions that name no background always
    describe white-background images. "centre" is sometimes spelt "center", "gray" "grey".
    """
    rng = template_rng
    n = len(scene.objects)
    if position_prob is None:
        position_prob = 0.85 if n == 1 else 0.6
    with_pos = rng.random() < position_prob
    order = list(range(n))
    if n == 2 and rng.random() < 0.5:
        order.reverse()
    parts = []
    for k in order:
        o = scene.objects[k]
        size_word = rng.choice(SIZE_WORDS[o.size]) if rng.random() < size_prob else None
        phrase = object_phrase(o, str(size_word) if size_word is not None else None)
        if with_pos:
            pos = o.position
            if pos == "in the centre" and rng.random() < 0.3:
                pos = "in the center"
            phrase += " " + pos
        parts.append(phrase)
    text = " and ".join(parts)
    if n == 1:
        u = rng.random()
        if u < 0.08:
            text = "there is " + text
        elif u < 0.14:
            text = "a picture of " + text
        elif u < 0.2:
            text = "an image of " + text
    if scene.background != "white" or rng.random() < background_prob:
        bg = scene.background
        if bg == "gray" and rng.random() < 0.3:
            bg = "grey"
        text += f" on a {bg} background"
    return text


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------

_SUPERSAMPLE = 4


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of ``shape`` centred at (cx, cy) with nominal radius ``r`` (pixels); None for a circle."""
    if shape == "square":
        h = _SQUARE_HALF * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        c = _TRIANGLE_CIRCUM * r
        return [
            (cx + c * math.cos(math.radians(a)), cy - c * math.sin(math.radians(a)))
            for a in (90.0, 210.0, 330.0)
        ]
    if shape == "star":
        o, i = _STAR_OUTER * r, _STAR_OUTER * _STAR_INNER_RATIO * r
        pts = []
        for k in range(10):
            a = math.radians(90.0 + 36.0 * k)
            rad = o if k % 2 == 0 else i
            pts.append((cx + rad * math.cos(a), cy - rad * math.sin(a)))
        return pts
    return None


def _draw_shape(draw: "ImageDraw.ImageDraw", shape: str, cx: float, cy: float, r: float, fill: Any) -> None:
    poly = _shape_polygon(shape, cx, cy, r)
    if poly is None:
        rr = _CIRCLE_R * r
        draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Rasterise ``scene`` as a ``size`` x ``size`` RGB image (drawn at 4x, box-downsampled)."""
    s = size * _SUPERSAMPLE
    img = Image.new("RGB", (s, s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy = o.centre
        _draw_shape(draw, o.shape, cx * s, cy * s, o.radius * s, COLOURS[o.colour])
    return img.resize((size, size), Image.BOX)


def render_array(scene: Scene, size: int = 64) -> np.ndarray:
    """:func:`render` as a ``(size, size, 3)`` uint8 array."""
    return np.asarray(render(scene, size), dtype=np.uint8)


def object_masks(scene: Scene, size: int = 16) -> np.ndarray:
    """Coverage of each object of ``scene`` on a ``size`` x ``size`` grid, in [0, 1].

    Returns float32 ``(len(scene.objects), size, size)``: the fraction of each cell the object covers
    (drawn at 4x the 64-pixel render, box-averaged), so ``size=16`` is the 16x16 latent grid of a
    64x64 image. Used to supervise where an object's words attend.
    """
    s = 64 * _SUPERSAMPLE
    out = np.zeros((len(scene.objects), size, size), dtype=np.float32)
    for k, o in enumerate(scene.objects):
        img = Image.new("L", (s, s), 0)
        cx, cy = o.centre
        _draw_shape(ImageDraw.Draw(img), o.shape, cx * s, cy * s, o.radius * s, 255)
        out[k] = np.asarray(img.resize((size, size), Image.BOX), dtype=np.float32) / 255.0
    return out


def _item_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index)])


def item(index: int, seed: int = 0, size: int = 64, *, allow_held_out: bool = False) -> tuple[Image.Image, str]:
    """Dataset item ``index`` of ``seed``: ``(image, caption)``, always the same for the same arguments."""
    scene, text = item_scene(index, seed, allow_held_out=allow_held_out)
    return render(scene, size), text


def item_scene(index: int, seed: int = 0, *, allow_held_out: bool = False) -> tuple[Scene, str]:
    """The scene and caption of dataset item ``index`` of ``seed`` (see :func:`item`)."""
    rng = _item_rng(seed, index)
    scene = sample_scene(rng, allow_held_out=allow_held_out)
    return scene, caption(scene, rng)


@dataclass
class ShapesDataset:
    """A deterministic map-style dataset: ``ds[i] -> (PIL image, caption)`` (see :func:`item`).

    Training data never contains :data:`HELD_OUT` triples or :data:`HELD_OUT_PAIRS`.
    """

    seed: int = 0
    length: int = 50_000
    size: int = 64

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of length {self.length}")
        return item(index, self.seed, self.size)

    def scene(self, index: int) -> Scene:
        """The scene of item ``index``."""
        return item_scene(index, self.seed)[0]

    def __iter__(self) -> Iterator[tuple[Image.Image, str]]:
        for i in range(self.length):
            yield self[i]


# --------------------------------------------------------------------------------------------------
# Evaluation prompts
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpectedObject:
    """What an evaluation prompt asks for: a colour, a shape and a position (``None``: any)."""

    colour: str
    shape: str
    position: str | None = None


@dataclass(frozen=True)
class EvalPrompt:
    """An evaluation prompt and the objects a correct image contains."""

    prompt: str
    objects: tuple[ExpectedObject, ...]


def held_out_prompts() -> list[EvalPrompt]:
    """The fixed evaluation set, built only from combinations never seen in training.

    * one prompt per :data:`HELD_OUT` triple, e.g. ``"a red star on the left"`` (8 prompts);
    * one prompt per :data:`HELD_OUT_PAIRS` pair without positions, e.g.
      ``"a red circle and a green triangle"`` (6 prompts);
    * the same pairs with explicit positions ``"... on the left and ... on the right"`` (6 prompts).
    """
    out: list[EvalPrompt] = []
    for c, s, p in HELD_OUT:
        out.append(EvalPrompt(f"{with_article(c + ' ' + s)} {p}", (ExpectedObject(c, s, p),)))
    for (c1, s1), (c2, s2) in HELD_OUT_PAIRS:
        out.append(
            EvalPrompt(
                f"{with_article(c1 + ' ' + s1)} and {with_article(c2 + ' ' + s2)}",
                (ExpectedObject(c1, s1), ExpectedObject(c2, s2)),
            )
        )
    side_pairs = [("on the left", "on the right"), ("at the top", "at the bottom")]
    for k, ((c1, s1), (c2, s2)) in enumerate(HELD_OUT_PAIRS):
        p1, p2 = side_pairs[k % 2]
        out.append(
            EvalPrompt(
                f"{with_article(c1 + ' ' + s1)} {p1} and {with_article(c2 + ' ' + s2)} {p2}",
                (ExpectedObject(c1, s1, p1), ExpectedObject(c2, s2, p2)),
            )
        )
    return out


# --------------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectedObject:
    """An object found by :func:`analyze`.

    ``mask`` is a bool ``(H, W)`` array; ``centroid`` is (x, y) as fractions of the width/height;
    ``position`` the :data:`POSITIONS` key of its 3x3 grid cell; ``area`` the fraction of the image
    it covers; ``size`` "small"/"big" (threshold :data:`SIZE_AREA_THRESHOLD`); ``shape`` the kind whose
    ideal outline at the same centroid and area overlaps the mask best (>99% right on rendered
    scenes, indicative only on generated images); ``bbox`` = (x0, y0, x1, y1) in pixels, exclusive end.
    """

    colour: str
    mask: np.ndarray = field(repr=False, compare=False)
    centroid: tuple[float, float]
    position: str
    area: float
    size: str
    shape: str
    bbox: tuple[int, int, int, int]


def to_uint8_image(image: Any) -> np.ndarray:
    """Convert an image to an ``(H, W, 3)`` uint8 RGB array.

    Accepts a PIL image; a numpy array ``(H, W, 3)`` (uint8, or float in [0, 1]); or a torch tensor
    ``(3, H, W)`` / ``(1, 3, H, W)`` / ``(H, W, 3)`` holding floats in [0, 1] — or in [-1, 1] if any
    value is negative (the diffusers VAE convention) — or uint8.
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if hasattr(image, "detach") and hasattr(image, "cpu"):  # torch tensor, without importing torch
        t = image.detach().cpu()
        if t.ndim == 4:
            if t.shape[0] != 1:
                raise InvalidOptionError(f"expected a single image, got a batch of shape {tuple(t.shape)}")
            t = t[0]
        if t.ndim != 3:
            raise InvalidOptionError(f"expected an image tensor (3, H, W), got shape {tuple(t.shape)}")
        is_uint8 = str(t.dtype) == "torch.uint8"
        arr = t.float().numpy() if not is_uint8 else t.numpy()
        if arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = np.transpose(arr, (1, 2, 0))
        elif arr.shape[0] == 3 and arr.shape[-1] == 3:  # ambiguous 3x3x3: torch convention
            arr = np.transpose(arr, (1, 2, 0))
        if is_uint8:
            return _rgb(arr.astype(np.uint8))
        if arr.min() < 0:
            arr = (arr + 1.0) / 2.0
        return _rgb(np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8))
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim != 3:
            raise InvalidOptionError(f"expected an (H, W, 3) array, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            arr = np.clip(np.round(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
        return _rgb(arr)
    raise InvalidTypeError(
        f"cannot read an image from {type(image).__name__}; pass a PIL image, an (H, W, 3) numpy array "
        "or a (3, H, W) torch tensor"
    )


def _rgb(arr: np.ndarray) -> np.ndarray:
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.shape[-1] != 3:
        raise InvalidOptionError(f"expected 3 colour channels, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


_PALETTE_NAMES = list(PALETTE)
_PALETTE_RGB = np.array([PALETTE[n] for n in _PALETTE_NAMES], dtype=np.float32)


def _nearest_palette(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index into ``_PALETTE_NAMES`` and distance of the nearest palette colour, per pixel."""
    d = np.linalg.norm(pixels[..., None, :].astype(np.float32) - _PALETTE_RGB, axis=-1)
    idx = d.argmin(-1)
    return idx, np.take_along_axis(d, idx[..., None], -1)[..., 0]


def background_colour(image: Any) -> str:
    """Name of the palette colour (:data:`PALETTE`) nearest the median colour of the image border."""
    arr = to_uint8_image(image).astype(np.float32)
    h, w = arr.shape[:2]
    b = max(1, min(h, w) // 32)
    border = np.concatenate(
        [arr[:b].reshape(-1, 3), arr[-b:].reshape(-1, 3), arr[:, :b].reshape(-1, 3), arr[:, -b:].reshape(-1, 3)]
    )
    med = np.median(border, axis=0)
    idx, _ = _nearest_palette(med[None])
    return _PALETTE_NAMES[int(idx[0])]


def position_of(centroid: tuple[float, float]) -> str:
    """The :data:`POSITIONS` key of the 3x3 grid cell containing ``centroid`` (x, y fractions)."""
    col = min(2, max(0, int(centroid[0] * 3.0)))
    row = min(2, max(0, int(centroid[1] * 3.0)))
    return _GRID_INV[(col, row)]


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a bool mask (numpy-only label propagation)."""
    h, w = mask.shape
    big = np.iinfo(np.int64).max
    labels = np.where(mask, np.arange(h * w, dtype=np.int64).reshape(h, w), big)
    while True:
        p = np.pad(labels, 1, constant_values=big)
        m = labels.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                np.minimum(m, p[dy : dy + h, dx : dx + w], out=m)
        m = np.where(mask, m, big)
        if np.array_equal(m, labels):
            break
        labels = m
    return [labels == v for v in np.unique(labels[mask])]


def _guess_shape(mask: np.ndarray, centroid_px: tuple[float, float]) -> str:
    """The shape kind whose ideal outline (same centroid, same area) overlaps ``mask`` best (IoU)."""
    h, w = mask.shape
    r = math.sqrt(mask.sum() / 2.6)  # every kind has area 2.6 r^2
    ss = _SUPERSAMPLE
    best, best_iou = "circle", -1.0
    for kind in SHAPE_KINDS:
        canvas = Image.new("L", (w * ss, h * ss), 0)
        _draw_shape(ImageDraw.Draw(canvas), kind, centroid_px[0] * ss, centroid_px[1] * ss, r * ss, 255)
        tmpl = np.asarray(canvas.resize((w, h), Image.BOX)) >= 128
        iou = (tmpl & mask).sum() / max(1, (tmpl | mask).sum())
        if iou > best_iou:
            best, best_iou = kind, iou
    return best


def analyze(
    image: Any,
    *,
    max_distance: float = 70.0,
    min_area: float = 0.004,
) -> list[DetectedObject]:
    """Find the coloured objects in an image, sorted by area (largest first).

    ``image``: PIL image, ``(H, W, 3)`` uint8 numpy array, or torch tensor ``(3, H, W)`` in [0, 1]
    (or [-1, 1]); any size. No learned model: every pixel is classified to the nearest
    :data:`PALETTE` colour if it is within ``max_distance`` (RGB Euclidean), pixels of the background
    colour (estimated from the border, :func:`background_colour`) and of the other background colours
    are ignored, and each 8-connected component of one object colour covering at least ``min_area``
    of the image becomes a :class:`DetectedObject`.
    """
    arr = to_uint8_image(image)
    h, w = arr.shape[:2]
    idx, dist = _nearest_palette(arr)
    bg = background_colour(arr)
    found: list[DetectedObject] = []
    for ci, name in enumerate(_PALETTE_NAMES):
        if name not in COLOURS or name == bg:
            continue
        cmask = (idx == ci) & (dist <= max_distance)
        if cmask.sum() < min_area * h * w:
            continue
        for comp in _components(cmask):
            n = int(comp.sum())
            area = n / float(h * w)
            if area < min_area:
                continue
            ys, xs = np.nonzero(comp)
            centroid = ((float(xs.mean()) + 0.5) / w, (float(ys.mean()) + 0.5) / h)
            bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            found.append(
                DetectedObject(
                    colour=name,
                    mask=comp,
                    centroid=centroid,
                    position=position_of(centroid),
                    area=area,
                    size="big" if area > SIZE_AREA_THRESHOLD else "small",
                    shape=_guess_shape(comp, (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)),
                    bbox=bbox,
                )
            )
    found.sort(key=lambda d: -d.area)
    return found


def object_extent(image: Any, detected: DetectedObject) -> np.ndarray:
    """The outline of ``detected`` at half contrast: a bool ``(H, W)`` mask.

    A pixel belongs to the object when its colour lies at least half way from the background colour
    (:func:`background_colour`) to the object's palette colour (projected on the line between the
    two), and it is connected (8-neighbours) to ``detected.mask``. ``detected.mask`` keeps only the
    pixels within ``max_distance`` of the palette colour, so on an anti-aliased or slightly blurred
    edge its boundary sits where a fixed RGB distance is crossed: further in for a colour close to
    the background (yellow on white) than for a distant one (blue on white). The half-contrast
    boundary does not move with the colour, which is what comparing one outline drawn in two colours
    needs (a colour swap's mask IoU).
    """
    arr = to_uint8_image(image).astype(np.float32)
    if arr.shape[:2] != detected.mask.shape:
        raise InvalidOptionError(f"image is {arr.shape[:2]} but the detected mask is {detected.mask.shape}; pass the analysed image")
    background = np.array(PALETTE[background_colour(arr.astype(np.uint8))], dtype=np.float32)
    direction = np.array(PALETTE[detected.colour], dtype=np.float32) - background
    fraction = (arr - background) @ direction / float(direction @ direction)
    inside = (fraction >= 0.5) | detected.mask
    extent = np.zeros_like(detected.mask)
    for comp in _components(inside):
        if (comp & detected.mask).any():
            extent |= comp
    return extent
