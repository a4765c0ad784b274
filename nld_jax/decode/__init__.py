"""Pure, jit-compatible decode functions for the three NLD modes.

``decode(params, lora, cache, inputs, config=..., options=...)`` runs one mode end to end and
returns ``(DecodeOutput, cache)``. It is a pure function: call it inside your own ``jax.jit``
(``config`` and ``options`` static), or use :func:`decode_jit`, which also donates the cache.
"""

from __future__ import annotations


import jax

from nld_jax.config import NLDConfig
from nld_jax.decode.ar import ar_decode
from nld_jax.decode.common import (MODES, DecodeInputs, DecodeOptions, DecodeOutput, cache_size_for,
                                   output_size_for)
from nld_jax.decode.diffusion import diffusion_decode
from nld_jax.decode.spec import spec_decode
from nld_jax.kv_cache import KVCache

__all__ = ["MODES", "DecodeInputs", "DecodeOptions", "DecodeOutput", "decode", "decode_jit",
           "cache_size_for", "output_size_for", "ar_decode", "diffusion_decode", "spec_decode"]

_DECODERS = {"ar": ar_decode, "diffusion": diffusion_decode, "spec": spec_decode}


def decode(params, lora, cache: KVCache, inputs: DecodeInputs, *, config: NLDConfig,
           options: DecodeOptions) -> tuple[DecodeOutput, KVCache]:
    """Generate with ``options.mode``; ``lora`` may be None unless ``options.use_lora``."""
    if options.use_lora and lora is None:
        raise ValueError("use_lora=True but this model has no draft LoRA (linear_spec_lora/ not found)")
    return _DECODERS[options.mode](params, lora, cache, inputs, config=config, options=options)


# The cache (argument 2) is donated: XLA reuses its buffer for the returned cache, so a caller
# that feeds the returned cache into the next call never allocates a new one.
decode_jit = jax.jit(decode, static_argnames=("config", "options"), donate_argnums=(2,))
