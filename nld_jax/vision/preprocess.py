"""Image preprocessing as Pixtral's image processor does it, with Pillow, on the host.

An image (a file path, a PIL image or an ``[H, W, 3]`` / ``[H, W]`` array) becomes ``[h, w, 3]``
float32 pixels: converted to RGB (transparency composited on white, as transformers does),
resized with bicubic filtering keeping the aspect ratio so that the longest edge is at most
``max_image_size`` (each side floored), each side then rounded *up* to a multiple of
``patch_size * spatial_merge_size`` (what ``PixtralProcessor`` hands its image processor; the
rounding is a second resize, folded into the same one), rescaled by 1/255 and normalised with
CLIP's mean and std. The image then occupies ``h / (P * M)`` rows of ``w / (P * M)`` image
tokens: :func:`image_token_layout`.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from nld_jax.vision.config import CLIP_MEAN, CLIP_STD, VisionConfig

__all__ = ["ImageError", "load_image", "resized_size", "preprocess_image", "image_token_layout", "token_grid"]


class ImageError(ValueError):
    """An image nld-jax cannot read (a missing or unreadable file, not an image, a bad array)."""


def _pil():
    from PIL import Image

    return Image


def load_image(image: Any):
    """A PIL image in RGB from a path, a PIL image or an array (uint8 0..255 or float 0..1)."""
    Image = _pil()
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise ImageError(f"{path}: no such image file")
        try:
            with Image.open(path) as opened:
                opened.load()
                image = opened.copy()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ImageError(f"{path}: not a readable image ({e})") from None
    elif isinstance(image, np.ndarray) or hasattr(image, "__array__") and not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)) or 0 in array.shape:
            raise ImageError(f"an image array must be [H, W], [H, W, 3] or [H, W, 4], got shape {array.shape}")
        if array.dtype != np.uint8:
            if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array)):
                raise ImageError(f"an image array must be uint8 (0..255) or finite floats (0..1), got {array.dtype}")
            array = np.clip(np.round(array * 255.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)
    elif not isinstance(image, Image.Image):
        raise ImageError(f"an image must be a file path, a PIL image or an array, got {type(image).__name__}")
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def resized_size(height: int, width: int, config: VisionConfig, max_image_size: int | None = None) -> tuple[int, int]:
    """``(h, w)`` an image of ``height x width`` is resized to (see the module docstring)."""
    longest = config.longest_edge if max_image_size is None else max_image_size
    ratio = max(height / longest, width / longest)
    if ratio > 1:
        height, width = int(math.floor(height / ratio)), int(math.floor(width / ratio))
    unit = config.merged_patch
    return max(1, -(-height // unit)) * unit, max(1, -(-width // unit)) * unit


def preprocess_image(image: Any, config: VisionConfig, max_image_size: int | None = None) -> np.ndarray:
    """``[h, w, 3]`` float32 normalised pixels, ``h`` and ``w`` multiples of ``P * M``."""
    Image = _pil()
    rgb = load_image(image)
    h, w = resized_size(rgb.height, rgb.width, config, max_image_size)
    if (h, w) != (rgb.height, rgb.width):
        rgb = rgb.resize((w, h), Image.Resampling.BICUBIC)
    pixels = np.asarray(rgb, np.float32) * np.float32(1 / 255)
    return (pixels - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def token_grid(pixels: np.ndarray, config: VisionConfig) -> tuple[int, int]:
    """``(rows, cols)`` of image tokens (merged patches) of preprocessed ``pixels [h, w, 3]``."""
    return pixels.shape[0] // config.merged_patch, pixels.shape[1] // config.merged_patch


def image_token_layout(rows: int, cols: int, config: VisionConfig) -> list[int]:
    """The prompt tokens of one image: ``rows`` times ``[IMG] * cols + [IMG_BREAK]``, the last
    break replaced by ``[IMG_END]`` (Pixtral's layout)."""
    img, brk, end = config.image_token_id, config.image_break_token_id, config.image_end_token_id
    if img is None or brk is None or end is None:
        raise ValueError("the checkpoint names no image token ids (image_token_id, image_break_token_id, "
                         "image_end_token_id in config.json, or [IMG], [IMG_BREAK], [IMG_END] in its tokenizer)")
    ids = ([img] * cols + [brk]) * rows
    ids[-1] = end
    return ids
