"""Training a vision-language NLD: image-text examples -> batches whose input embeddings carry the
image features, computed inside the train step so that the tower and the projector train jointly
with the text model.

An example is ``(prompt ids, answer ids, images)``. Its row is built as generation builds its
prompt (:func:`nld_jax.vision.prompts.place_images`: each image's layout where the prompt holds a
placeholder, else after BOS), then ``answer + [EOS]``, padded with EOS. The loss mask is 1 on the
answer and its EOS only, so image positions, like every prompt token, are never masked and never
AR targets (NVIDIA's SFT rule; the image tokens therefore enter both halves of the training
layout as features, see :func:`nld_jax.training.objective.train_hidden`).

The trainable tree is ``{"text": NLD params, "vision": {"tower", "projector"}}``; pass
:func:`vlm_inputs` (with the vision config bound) as ``make_train_step(..., inputs=...)``.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from nld_jax.vision.config import VisionConfig
from nld_jax.vision.features import image_features, pack_images, splice_features
from nld_jax.vision.preprocess import preprocess_image, token_grid
from nld_jax.vision.prompts import place_images

__all__ = ["vlm_rows", "vlm_batch", "vlm_inputs", "make_vlm_inputs"]


def vlm_rows(examples: Sequence[tuple[list[int], list[int], list[Any]]], config: VisionConfig, seq_len: int,
             bos: int | None, eos: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """``(tokens [B, seq_len], loss_mask [B, seq_len], preprocessed pixels of every image, in
    row order)`` of ``(prompt ids with BOS, answer ids, images)`` examples."""
    rows, masks, pixels = [], [], []
    for b, (prompt, answer, images) in enumerate(examples):
        row_pixels = [preprocess_image(im, config) for im in images]
        placed = place_images(prompt, [token_grid(p, config) for p in row_pixels], config, bos, b)
        ids = placed + list(answer) + [eos]
        if len(ids) > seq_len:
            raise ValueError(f"example {b} is {len(ids)} tokens with its images, more than seq_len={seq_len}")
        rows.append(ids + [eos] * (seq_len - len(ids)))
        masks.append([0] * len(placed) + [1] * (len(answer) + 1) + [0] * (seq_len - len(ids)))
        pixels.extend(row_pixels)
    return np.asarray(rows, np.int32), np.asarray(masks, np.int32), pixels


def vlm_batch(tokens: np.ndarray, loss_mask: np.ndarray, pixels: list[np.ndarray], config: VisionConfig) -> dict:
    """The host arrays of one training batch: the rows, their loss mask, the packed images
    (:func:`nld_jax.vision.features.pack_images`) and, per position, which image token it takes."""
    packed = pack_images(pixels, config)
    is_image = tokens == config.image_token_id
    if int(is_image.sum()) != sum(packed.tokens_per_image):
        raise ValueError(f"the rows hold {int(is_image.sum())} image tokens but the images make "
                         f"{sum(packed.tokens_per_image)}")
    # images are packed in row order, so the k-th image token of the batch (row-major) takes feature k
    feature_index = np.where(is_image, np.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1, 0)
    return {"tokens": tokens, "loss_mask": loss_mask, "patches": packed.patches, "rows": packed.rows,
            "cols": packed.cols, "segments": packed.segments, "merge_index": packed.merge_index,
            "feature_index": feature_index.astype(np.int32), "is_image": is_image}


def vlm_inputs(trainable, batch, *, config: VisionConfig):
    """``(text params, input embeddings [B, L, D])``: the tower and projector over the batch's
    packed images, their tokens spliced into the token embeddings (pure; traced in the step)."""
    text, vision = trainable["text"], trainable["vision"]
    patches = batch["patches"].astype(vision["tower"]["ln_pre"].dtype)
    features = image_features(vision, patches, batch["rows"], batch["cols"], batch["segments"],
                              batch["merge_index"], config=config)
    return text, splice_features(text, batch["tokens"], features, batch["feature_index"], batch["is_image"])


def make_vlm_inputs(config: VisionConfig):
    """:func:`vlm_inputs` with the vision config bound, for ``make_train_step(..., inputs=...)``."""
    return functools.partial(vlm_inputs, config=config)
