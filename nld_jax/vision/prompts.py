"""Multimodal prompts: token ids plus images per row -> the ids with every image's token layout
in place, and the prompt embeddings with the image tokens' features spliced in.

Where an image goes in a row's prompt, by what the row holds:

* one ``[IMG]`` token per image: each is a placeholder, expanded to its image's layout (rows of
  ``[IMG] * w + [IMG_BREAK]``, the last break ``[IMG_END]``), images in order;
* exactly the expanded layouts already (one ``[IMG_END]`` per image and as many ``[IMG]`` as the
  images make): kept as they are (a prompt built by a chat template or a processor);
* no image token at all: every layout goes at the front, after BOS when the row starts with it;
* anything else is an error that says what the row holds.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from nld_jax.vision.config import VisionConfig
from nld_jax.vision.features import splice_embeddings, vision_tokens
from nld_jax.vision.preprocess import image_token_layout, preprocess_image, token_grid

__all__ = ["images_per_row", "place_images", "placed_prompts", "multimodal_prompts"]


def images_per_row(images: Any, rows: int) -> list[list[Any]]:
    """``images``: one list (or None) per prompt, of file paths, PIL images or arrays."""
    if not isinstance(images, (list, tuple)) or len(images) != rows:
        raise ValueError(f"images must be a list with one list of images (or None) per prompt: {rows} prompt(s), "
                         f"got {type(images).__name__}" + (f" of {len(images)}" if isinstance(images, (list, tuple))
                                                           else ""))
    out = []
    for b, row in enumerate(images):
        if row is None:
            row = []
        if not isinstance(row, (list, tuple)):
            raise ValueError(f"images[{b}] must be a list of images (or None), got {type(row).__name__}: give "
                             "each prompt its own list, e.g. images=[[image]]")
        out.append(list(row))
    return out


def place_images(ids: Sequence[int], grids: Sequence[tuple[int, int]], config: VisionConfig, bos: int | None,
                 row: int = 0) -> list[int]:
    """``ids`` with the layouts of images of ``grids`` (token rows, cols) placed (module docstring)."""
    ids = list(ids)
    img, end = config.image_token_id, config.image_end_token_id
    n_img, n_end = ids.count(img), ids.count(end)
    layouts = [image_token_layout(h, w, config) for h, w in grids]
    if not grids:
        if n_img:
            raise ValueError(f"prompt {row} holds {n_img} image token(s) (id {img}) but no images were given for it")
        return ids
    if n_end == len(grids) and n_img == sum(h * w for h, w in grids):
        return ids
    if n_img == len(grids) and n_end == 0:
        out, layout = [], iter(layouts)
        for t in ids:
            out.extend(next(layout) if t == img else [t])
        return out
    if n_img == 0 and n_end == 0:
        at = 1 if ids and bos is not None and ids[0] == bos else 0
        return ids[:at] + [t for layout in layouts for t in layout] + ids[at:]
    raise ValueError(f"prompt {row} has {len(grids)} image(s) and holds {n_img} image token(s) (id {img}) and "
                     f"{n_end} image-end token(s) (id {end}): give one image token per image as a placeholder, the "
                     "full layouts, or none (images then go first)")


def placed_prompts(ids: list[list[int]], pixels: list[list[np.ndarray]], config: VisionConfig, bos: int | None,
                   context: int) -> list[list[int]]:
    """Each row's ids with the layouts of its preprocessed images placed (:func:`place_images`);
    a row longer than ``context``, counting its image tokens, is refused."""
    placed = []
    for b, (row_ids, row_pixels) in enumerate(zip(ids, pixels)):
        grids = [token_grid(p, config) for p in row_pixels]
        out = place_images(row_ids, grids, config, bos, b)
        if len(out) > context:
            n = sum(h * w for h, w in grids)
            raise ValueError(f"prompt {b} is {len(out)} tokens with its {len(grids)} image(s) ({n} image tokens plus "
                             f"layout breaks), more than the model's context of {context} positions: use smaller or "
                             "fewer images")
        placed.append(out)
    return placed


def multimodal_prompts(vision_params, config: VisionConfig | None, text_params, ids: list[list[int]], images: Any,
                       bos: int | None, context: int, max_image_size: int | None = None, runtime=None
                       ) -> tuple[list[list[int]], np.ndarray]:
    """``(ids with the image layouts placed, prompt embeddings [B, T, D])`` (T the longest row):
    every image preprocessed, all of them run through the tower in one packed call, their tokens
    spliced in. A row longer than ``context`` is refused, counting its image tokens; so are
    images for a text-only model (``vision_params`` None)."""
    if vision_params is None or config is None:
        raise ValueError("images were given, but this checkpoint is text-only (its config.json has no "
                         "vision_config); load a vision-language checkpoint")
    per_row = images_per_row(images, len(ids))
    pixels = [[preprocess_image(im, config, max_image_size) for im in row] for row in per_row]
    placed = placed_prompts(ids, pixels, config, bos, context)
    flat = [p for row in pixels for p in row]
    kwargs = {} if runtime is None else {"runtime": runtime}
    tokens = vision_tokens(vision_params, config, flat, **kwargs)
    features, start = [], 0
    for row in pixels:
        features.append(tokens[start:start + len(row)])
        start += len(row)
    longest = max(len(p) for p in placed)
    table = np.zeros((len(placed), longest), np.int32)
    for b, p in enumerate(placed):
        table[b, :len(p)] = p
    lengths = np.asarray([len(p) for p in placed])
    return placed, splice_embeddings(text_params, table, config.image_token_id, features, lengths)
