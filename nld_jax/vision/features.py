"""Images -> image tokens ``[Nm, D]``: pack on the host, run the tower and the projector as one
compiled program, splice the result into a batch of prompt embeddings.

Packing: every image's pixels ``[h, w, 3]`` are cut into ``P x P`` patches (row-major), all
images' patches concatenated and padded to a power-of-two bucket, each patch tagged with its
row, column and image; the image tokens' merge windows likewise. The program is compiled once
per (patch bucket, token bucket) pair -- a new bucket recompiles, a new image of a seen bucket
does not. Packed images attend only within themselves (see :mod:`nld_jax.vision.encoder`), so
features do not depend on which images share a call.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from nld_jax.model import embed
from nld_jax.programs import PROGRAMS
from nld_jax.runtime import DEFAULT_RUNTIME, Runtime
from nld_jax.vision.config import VisionConfig
from nld_jax.vision.encoder import encode
from nld_jax.vision.projector import project

__all__ = ["PackedImages", "pack_images", "image_features", "vision_tokens", "splice_features", "splice_embeddings"]


def _bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class PackedImages:
    """Host arrays of several images packed for one tower call (``N``, ``Nm``: padded counts)."""

    patches: np.ndarray  # [N, 3, P, P] float32
    rows: np.ndarray  # [N] int32, the patch's row inside its image
    cols: np.ndarray  # [N] int32
    segments: np.ndarray  # [N] int32, the image index, -1 for padding
    merge_index: np.ndarray  # [Nm, M, M] int32, packed patch of each window position
    tokens_per_image: tuple[int, ...]  # image tokens (merged patches) of each image, in order


def pack_images(images: list[np.ndarray], config: VisionConfig) -> PackedImages:
    """Pack preprocessed ``[h, w, 3]`` images (sides multiples of ``P * M``)."""
    P, M = config.patch_size, config.spatial_merge_size
    patches, rows, cols, segments, windows, counts = [], [], [], [], [], []
    start = 0
    for index, pixels in enumerate(images):
        h, w = pixels.shape[0] // P, pixels.shape[1] // P
        if pixels.shape[0] % (P * M) or pixels.shape[1] % (P * M) or pixels.shape[2] != 3:
            raise ValueError(f"image {index}: pixels {pixels.shape} are not [h, w, 3] with sides multiples of "
                             f"{P * M} (preprocess_image makes them)")
        # [h, P, w, P, 3] -> [h, w, 3, P, P]: the conv's (channel, row, column) order
        grid = pixels.reshape(h, P, w, P, 3).transpose(0, 2, 4, 1, 3)
        patches.append(grid.reshape(h * w, 3, P, P))
        r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        rows.append(r.reshape(-1))
        cols.append(c.reshape(-1))
        segments.append(np.full(h * w, index))
        # window (a, b) holds patches (a*M + i, b*M + j); row-major windows, like unfold
        ids = (start + np.arange(h * w)).reshape(h // M, M, w // M, M).transpose(0, 2, 1, 3)
        windows.append(ids.reshape(-1, M, M))
        counts.append((h // M) * (w // M))
        start += h * w
    n, nm = _bucket(start), _bucket(sum(counts))

    def padded(parts, size, fill, dtype):
        out = np.concatenate(parts) if parts else np.zeros((0,), dtype)
        pad = np.full((size - out.shape[0], *out.shape[1:]), fill, dtype)
        return np.concatenate([out.astype(dtype), pad])

    return PackedImages(
        patches=padded(patches, n, 0.0, np.float32) if patches else np.zeros((n, 3, P, P), np.float32),
        rows=padded(rows, n, 0, np.int32), cols=padded(cols, n, 0, np.int32),
        segments=padded(segments, n, -1, np.int32),
        merge_index=padded(windows, nm, 0, np.int32) if windows else np.zeros((nm, M, M), np.int32),
        tokens_per_image=tuple(counts))


def image_features(params, patches, rows, cols, segments, merge_index, *, config: VisionConfig,
                   runtime: Runtime = DEFAULT_RUNTIME) -> jax.Array:
    """Tower then projector: image tokens ``[Nm, D]`` of packed images (pure; jit with
    ``config`` and ``runtime`` static)."""
    hidden = encode(params["tower"], config, patches, rows, cols, segments, runtime)
    return project(params["projector"], config, hidden, merge_index)


def vision_tokens(params, config: VisionConfig, images: list[np.ndarray],
                  runtime: Runtime = DEFAULT_RUNTIME) -> list[np.ndarray]:
    """The image tokens ``[rows * cols, D]`` (float32, host) of each preprocessed image."""
    if not images:
        return []
    packed = pack_images(images, config)
    dtype = params["tower"]["ln_pre"].dtype
    args = (params, jnp.asarray(packed.patches, dtype), packed.rows, packed.cols, packed.segments,
            packed.merge_index)
    program, _ = PROGRAMS.get(image_features, args, static=dict(config=config, runtime=runtime))
    out = np.asarray(program(*args), np.float32)
    ends = np.cumsum(packed.tokens_per_image)
    return [out[end - count:end] for end, count in zip(ends, packed.tokens_per_image)]


def splice_features(params, tokens, features, feature_index, is_image):
    """Token embeddings of ``tokens [B, T]`` with the image positions (``is_image``) replaced by
    ``features[feature_index]`` (pure, jittable; the splice of prompts and of VLM training)."""
    x = embed(params, tokens)
    picked = features[feature_index].astype(x.dtype)
    return jnp.where(is_image[..., None], picked, x)


def splice_embeddings(params, tokens: np.ndarray, image_token_id: int, features: list[list[np.ndarray]],
                      lengths: np.ndarray | None = None):
    """Prompt embeddings ``[B, T, D]`` (float32, host): the token embeddings of ``tokens [B, T]``
    with the image tokens of row b replaced, in order, by the rows of ``features[b]`` (that row's
    images' tokens, concatenated) -- transformers' ``masked_scatter``, row by row. Positions at or
    past ``lengths[b]`` are padding, never image tokens."""
    tokens = np.asarray(tokens, np.int32)
    is_image = tokens == image_token_id
    if lengths is not None:
        is_image &= np.arange(tokens.shape[1])[None, :] < np.asarray(lengths)[:, None]
    dim = params["norm"].shape[-1]
    rows = [np.concatenate(f, 0) if f else np.zeros((0, dim), np.float32) for f in features]
    for b, (mask, f) in enumerate(zip(is_image, rows)):
        if int(mask.sum()) != f.shape[0]:
            raise ValueError(f"prompt {b} holds {int(mask.sum())} image tokens but its images make {f.shape[0]}")
    table = np.concatenate([np.zeros((1, dim), np.float32), *rows], 0)  # row 0: what text tokens pick
    offsets = np.cumsum([0] + [f.shape[0] for f in rows[:-1]]) + 1
    index = np.where(is_image, np.cumsum(is_image, axis=1) - 1 + offsets[:, None], 0).astype(np.int32)
    table = np.pad(table, ((0, _bucket(table.shape[0]) - table.shape[0]), (0, 0)))  # fewer compiles
    args = ({"embed_tokens": params["embed_tokens"]}, tokens, table, index, is_image)
    program, _ = PROGRAMS.get(splice_features, args, static={})
    return np.asarray(program(*args), np.float32)
