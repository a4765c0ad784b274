"""The checkpoint errors, in a module of their own so every reader can raise them."""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as it is: a missing, unknown or misshaped tensor, a
    damaged file, or a file outside what nld-jax trusts (see :mod:`nld_jax.checkpoint.files`).
    Every message names the file (and the tensor or field, where there is one)."""
