"""Turning user images (paths, PIL images, arrays, tensors) into model-sized RGB tensors.

The resize rule, used everywhere an image enters attnctrl (inversion, the CLI, the app, batch jobs):

1. Colour: RGB. Transparent images (RGBA, LA, P with transparency) are composited over white;
   greyscale is replicated to three channels.
2. Size: with ``height`` and ``width`` given, the image is centre-cropped to that aspect ratio and
   resized to exactly that size. Without them, the aspect ratio is kept: the image is scaled to the
   area of the model's native square (``native`` x ``native``), each side is rounded to the nearest
   multiple of ``multiple`` (at least one multiple), and the few pixels of rounding are centre-cropped.
3. Resampling: Lanczos (Pillow) for both up- and down-scaling.

Only Pillow, NumPy and torch are used; nothing here knows about diffusers.
"""

from __future__ import annotations

import math
import os
from typing import Any, Union

import numpy as np
import torch

from .errors import ImageLoadError, InvalidOptionError

__all__ = ["ImageInput", "load_image", "target_size", "to_pil"]

ImageInput = Union[str, os.PathLike, "Any", np.ndarray, torch.Tensor]
"""A path, a PIL image, an (H, W[, C]) uint8/float array, or a (3, H, W) / (1, 3, H, W) tensor in [0, 1]."""


def _open(image: Any) -> Any:
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.exists(path):
            raise ImageLoadError(f"image file {path!r} does not exist")
        if not os.path.isfile(path):
            raise ImageLoadError(f"{path!r} is not a regular file (a folder or a device); give a PNG, JPEG or WebP file")
        try:
            with Image.open(path) as opened:
                pixels = opened.width * opened.height
                if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:
                    raise ImageLoadError(
                        f"{path!r} is {opened.width}x{opened.height} pixels, more than the {Image.MAX_IMAGE_PIXELS} an image "
                        "may have (a guard against decompression bombs); downscale it first"
                    )
                opened.load()
                return opened.copy()
        except Image.DecompressionBombError as exc:
            raise ImageLoadError(f"{path!r} is refused as a decompression bomb ({exc}); downscale it first") from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ImageLoadError(f"cannot read {path!r} as an image ({exc}); give a PNG, JPEG or WebP file") from exc
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.ndim == 4 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
            raise ImageLoadError(f"an image tensor must be (3, H, W) or (1, 3, H, W) in [0, 1]; got shape {tuple(image.shape)}")
        if tensor.dtype == torch.uint8:
            array = tensor.permute(1, 2, 0).numpy()
        else:
            array = (tensor.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        image = array[..., 0] if array.shape[-1] == 1 else array
    if isinstance(image, np.ndarray):
        array = image
        if array.dtype != np.uint8:
            if not np.issubdtype(array.dtype, np.floating):
                raise ImageLoadError(f"an image array must be uint8 or float in [0, 1]; got {array.dtype}")
            array = (np.clip(np.nan_to_num(array), 0, 1) * 255).round().astype(np.uint8)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ImageLoadError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4); got shape {array.shape}")
        if 0 in array.shape:
            raise ImageLoadError(f"the image has zero size {array.shape}")
        return Image.fromarray(array)
    raise ImageLoadError(f"cannot use a {type(image).__name__} as an image; give a path, a PIL image, an array or a tensor")


def _rgb(image: Any) -> Any:
    from PIL import Image

    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def target_size(width: int, height: int, *, native: int, multiple: int) -> tuple[int, int]:
    """(width, height) an image of ``width`` x ``height`` is resized to when no size is given."""
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"the image has zero size ({width}x{height})")
    scale = math.sqrt(native * native / (width * height))
    new_w = max(multiple, int(round(width * scale / multiple)) * multiple)
    new_h = max(multiple, int(round(height * scale / multiple)) * multiple)
    return new_w, new_h


def _centre_crop_to_aspect(image: Any, width: int, height: int) -> Any:
    w, h = image.size
    if w * height > h * width:  # too wide
        new_w = max(1, round(h * width / height))
        left = (w - new_w) // 2
        return image.crop((left, 0, left + new_w, h))
    new_h = max(1, round(w * height / width))
    top = (h - new_h) // 2
    return image.crop((0, top, w, top + new_h))


def load_image(
    image: ImageInput,
    *,
    height: int | None = None,
    width: int | None = None,
    native: int = 512,
    multiple: int = 8,
) -> torch.Tensor:
    """Load ``image`` and resize it by the module's rule.

    Returns a float32 tensor of shape (3, height, width) with values in [0, 1].
    Raises :class:`~attnctrl.errors.ImageLoadError` for a missing or unreadable file, a zero-size
    image or an unsupported type, and ``ValueError`` for a size that is not a multiple of ``multiple``.
    """
    from PIL import Image

    pil = _rgb(_open(image))
    if pil.size[0] == 0 or pil.size[1] == 0:
        raise ImageLoadError(f"the image has zero size {pil.size}")
    if (height is None) != (width is None):
        raise InvalidOptionError("give both height and width, or neither (then the aspect ratio is kept)")
    if height is None or width is None:
        width, height = target_size(*pil.size, native=native, multiple=multiple)
    for name, value in (("height", height), ("width", width)):
        if int(value) <= 0 or int(value) % multiple:
            raise InvalidOptionError(f"{name}={value} must be a positive multiple of {multiple} for this model")
    pil = _centre_crop_to_aspect(pil, int(width), int(height))
    if pil.size != (width, height):
        pil = pil.resize((int(width), int(height)), Image.Resampling.LANCZOS)
    array = np.asarray(pil, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255.0


def to_pil(image: torch.Tensor) -> Any:
    """(3, H, W) tensor in [0, 1] -> PIL RGB image."""
    from PIL import Image

    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)
