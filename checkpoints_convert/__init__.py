"""NVIDIA safetensors <-> Orbax checkpoint conversion (``nld-convert``).

* :func:`convert_hf_to_orbax` / :func:`convert_orbax_to_hf`: streaming, strictly accounted,
  atomic conversions in both directions (the CLI is :mod:`checkpoints_convert.cli`).
* :func:`save_orbax`: in-memory weights (e.g. fine-tuned) -> the same format.

The converter stands on the library: the format and its read side are
:mod:`nld_jax.checkpoint.orbax` (``nld_jax.load`` reads converted directories), the writers are
:mod:`checkpoints_convert.orbax_io`. Names are imported on first
use, so that ``nld-convert --help`` does not pay for importing JAX.
"""

import importlib

_EXPORTS = {
    "convert_hf_to_orbax": "checkpoints_convert.to_orbax",
    "ConversionReport": "checkpoints_convert.to_orbax",
    "convert_orbax_to_hf": "checkpoints_convert.to_hf",
    "save_orbax": "checkpoints_convert.orbax_io",
    "verify_conversion": "checkpoints_convert.verify",
    "VerifyReport": "checkpoints_convert.verify",
    "VerificationError": "checkpoints_convert.verify",
}

__version__ = "1.0.0"
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'checkpoints_convert' has no attribute {name!r}")
