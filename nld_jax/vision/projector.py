"""The Mistral3 multimodal projector: RMSNorm, the M x M patch merger, ``linear_1``, GELU,
``linear_2``: tower features ``[N, Dv]`` -> image tokens ``[Nm, D]`` in the text model's width.

The merger concatenates each M x M window of patches of one image (transformers' ``unfold``:
input channel-major, then window row, then column) and maps it back to ``Dv``. Windows are
given as ``merge_index [Nm, M, M]``: for every image token, the packed-patch index of each
patch of its window (built on the host by :mod:`nld_jax.vision.packing`, image by image, windows
in row-major order), so packed images of any sizes merge in one gather.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nld_jax.model import rms_norm
from nld_jax.vision.config import VisionConfig

__all__ = ["project"]


def project(params, config: VisionConfig, features: jax.Array, merge_index: jax.Array) -> jax.Array:
    """``features [N, Dv]`` (the tower's output) -> image tokens ``[Nm, D]``.

    ``params`` is the ``projector`` subtree of the vision weights."""
    x = rms_norm(features, params["norm"], config.projector_eps)
    windows = x[merge_index]  # [Nm, M, M, Dv]
    merged = jnp.einsum("nijc,cijo->no", windows, params["merging_layer"])
    h = jnp.einsum("nc,cd->nd", merged, params["linear_1"])
    # transformers' "gelu" is the exact (erf) GELU, not the tanh approximation.
    h = jax.nn.gelu(h, approximate=False)
    return jnp.einsum("nd,de->ne", h, params["linear_2"])
