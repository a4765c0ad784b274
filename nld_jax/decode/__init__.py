"""Pure, jit-compatible decoding for the three NLD modes.

``decode(params, lora, cache, inputs, config=..., options=..., runtime=...)`` runs one mode end to
end and returns ``(DecodeOutput, cache)``. It is a pure function: call it inside your own
``jax.jit`` (``config``, ``options`` and ``runtime`` static), or use :func:`decode_jit`, which also
donates the cache. The loop itself is :mod:`nld_jax.decode.loop` (one forward per step, every
mode); :func:`step` is what a serving engine calls.
"""

from __future__ import annotations

import jax

from nld_jax.decode.loop import MODE_LOGIC, StepSpec, decode, prefill, readout, rows_for, start, step
from nld_jax.decode.options import (BLOCK_MODES, MODES, SPEC_MODES, DecodeInputs, DecodeOptions, DecodeOutput, cache_size_for,
                                    context_needed, output_size_for)
from nld_jax.decode.spec import accepted_length
from nld_jax.decode.state import DecodeState, Rows, Track

__all__ = ["MODES", "BLOCK_MODES", "SPEC_MODES", "DecodeInputs", "DecodeOptions", "DecodeOutput", "DecodeState", "Rows", "Track",
           "StepSpec", "MODE_LOGIC", "decode", "decode_jit", "prefill", "start", "step", "readout", "rows_for",
           "cache_size_for", "output_size_for", "context_needed", "accepted_length"]

# The cache (argument 2) is donated: XLA reuses its buffer for the returned cache, so a caller
# that feeds the returned cache into the next call never allocates a new one.
decode_jit = jax.jit(decode, static_argnames=("config", "options", "runtime"), donate_argnums=(2,))
