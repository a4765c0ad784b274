"""Plug the kernels into ``nld_jax.ops`` (imported by it the first time a non-XLA op is resolved).

Each name is registered in both registries, because the decode loops pass one ``kernels=``
name to the attention and to the greedy head:

* ``pallas_tpu``: the default on TPU (``implementation="auto"``).
* ``pallas_triton``: the default on GPU.
* ``pallas_mosaic_gpu``: the Hopper attention kernel (TMA + wgmma), Triton greedy head; opt-in
  until the GPU benchmark has confirmed it beats ``pallas_triton``.
* ``pallas_interpret`` / ``pallas_triton_interpret``: the TPU / Triton kernels run by the
  Pallas interpreter, on any backend (CPU tests; slow).

Registered functions use ``fallback=True``: shapes a kernel cannot run (say a head_dim that is
not a multiple of 128 on TPU) go to the next choice and finally to the XLA reference, so
selecting a kernel never breaks a model.
"""

from __future__ import annotations

from nld_jax.ops import ATTENTION, GREEDY_HEAD
from pallas_kernels.block_attention.api import block_attention
from pallas_kernels.verify.api import greedy_head

__all__ = ["attention_fn", "greedy_head_fn"]


def attention_fn(implementation: str):
    """``fn(q, k, v, cache_k, cache_v, cache_lengths, *, causal)`` for ``nld_jax.ops.ATTENTION``."""

    def fn(q, k, v, cache_k, cache_v, cache_lengths, *, causal: bool):
        return block_attention(q, k, v, cache_k, cache_v, cache_lengths, causal=causal,
                               implementation=implementation, fallback=True)

    fn.__name__ = f"block_attention_{implementation}"
    return fn


def greedy_head_fn(implementation: str):
    """``fn(hidden [..., D], weight [D, V]) -> (tokens, probabilities)`` for ``nld_jax.ops.GREEDY_HEAD``."""

    def fn(hidden, weight):
        return greedy_head(hidden, weight, implementation=implementation, fallback=True)

    fn.__name__ = f"greedy_head_{implementation}"
    return fn


# Registration order matters for auto: the last name registered for a platform is its default.
# No kernel is an `auto` default yet: none has run on a real GPU or TPU (only in interpret mode
# and as lowered IR on CPU), so `auto` stays on the XLA reference everywhere until
# benchmarks/gpu_device_check.sh (and a TPU run) validate them. Opt in with kernels="pallas_triton"
# / "pallas_tpu"; set VALIDATED below to make them the defaults.
VALIDATED = False
_NAMES = (
    ("pallas_interpret", ()),
    ("pallas_triton_interpret", ()),
    ("pallas_mosaic_gpu", ()),
    ("pallas_triton", ("gpu",) if VALIDATED else ()),
    ("pallas_tpu", ("tpu",) if VALIDATED else ()),
)

for _name, _auto_for in _NAMES:
    ATTENTION.register(_name, attention_fn(_name), auto_for=_auto_for)
    GREEDY_HEAD.register(_name, greedy_head_fn(_name), auto_for=_auto_for)
