"""One validator for what users hand to generate / forward / block_logits (and the CLI and server).

Prompts are token-id lists (ragged allowed), strings, a 1-D array (one prompt) or a 2-D array
(a batch). Ids must be Python or numpy integers (no bools, no floats, not even 3.0), inside the
vocabulary; numbers must be what they say (an integer ``max_new_tokens``, a finite temperature).
Every error is a ``ValueError`` that names the argument, the row and the offending value.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import numpy as np

__all__ = ["prompt_ids", "token_array", "integer", "number", "probability", "seed_value", "seed_key", "MAX_SEED"]

MAX_SEED = 2**64 - 1


def _is_int(x) -> bool:
    return isinstance(x, (numbers.Integral, np.integer)) and not isinstance(x, (bool, np.bool_))


def _ids_of(p, name: str, row: int, vocab: int) -> list[int]:
    if hasattr(p, "__array__") and not isinstance(p, (list, tuple)):
        arr = np.asarray(p)
        if arr.ndim != 1:
            raise ValueError(f"{name}[{row}] must be a 1-D sequence of token ids, got an array of shape {arr.shape}")
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name}[{row}] holds {arr.dtype} values; token ids must be integers")
        ids = arr.astype(np.int64).tolist()
    elif isinstance(p, (list, tuple)):
        for j, t in enumerate(p):
            if not _is_int(t):
                what = "a nested list" if isinstance(t, (list, tuple)) else f"{type(t).__name__} {t!r}"
                raise ValueError(f"{name}[{row}][{j}] is {what}; token ids must be integers")
        ids = [int(t) for t in p]
    else:
        raise ValueError(f"{name}[{row}] is a {type(p).__name__}; expected a string or a list of token ids")
    if not ids:
        raise ValueError(f"{name}[{row}] is empty: a prompt needs at least one token (e.g. BOS)")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"{name}[{row}] has token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")
    return ids


def prompt_ids(prompts: Any, *, vocab: int, tokenizer=None, name: str = "prompts") -> list[list[int]]:
    """Token-id lists from ``prompts``, validated against the vocabulary (see the module docstring)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    elif hasattr(prompts, "__array__") and not isinstance(prompts, (list, tuple)):
        arr = np.asarray(prompts)
        if arr.ndim == 1:
            prompts = [arr]
        elif arr.ndim == 2:
            prompts = list(arr)
        else:
            raise ValueError(f"{name} must be a 1-D (one prompt) or 2-D (a batch) array of token ids, got shape "
                             f"{arr.shape}")
    elif isinstance(prompts, (list, tuple)) and prompts and all(_is_int(t) for t in prompts):
        prompts = [list(prompts)]  # one prompt of ids (Python or numpy integers)
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError(f"{name} must be a non-empty list of token-id lists or strings")
    out = []
    for row, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer, and this checkpoint has none; pass token ids")
            if not p:
                raise ValueError(f"{name}[{row}] is an empty string")
            p = tokenizer.encode(p)
        out.append(_ids_of(p, name, row, vocab))
    return out


def token_array(tokens: Any, *, vocab: int, name: str) -> np.ndarray:
    """A ``[B, T]`` int32 array of ids (a 1-D input is one row); rows must have equal length."""
    rows = prompt_ids(tokens, vocab=vocab, name=name)
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"{name} rows must all have the same length, got lengths {[len(r) for r in rows]}")
    return np.asarray(rows, np.int32)


def integer(value, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def number(value, name: str, *, minimum: float | None = None, maximum: float | None = None) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def probability(value, name: str, *, allow_zero: bool = True) -> float:
    value = number(value, name, minimum=0.0, maximum=1.0)
    if not allow_zero and value == 0.0:
        raise ValueError(f"{name} must be in (0, 1], got 0")
    return value


def seed_value(seed, rows: int) -> list[int]:
    """Per-row seeds: an int (row b uses ``seed + b``) or one int per row, each in [0, 2**64)."""
    if isinstance(seed, Sequence) and not isinstance(seed, str):
        if len(seed) != rows:
            raise ValueError(f"seed has {len(seed)} entries for {rows} prompts; give one per prompt or a single int")
        return [integer(s, f"seed[{i}]", minimum=0, maximum=MAX_SEED) for i, s in enumerate(seed)]
    seed = integer(seed, "seed", minimum=0, maximum=MAX_SEED - (rows - 1))
    return [seed + b for b in range(rows)]


def seed_key(seed: int) -> np.ndarray:
    """The threefry key data ``[seed >> 32, seed & 0xffffffff]`` of a 64-bit seed.

    It equals ``jax.random.key_data(jax.random.key(seed))`` for seeds below 2**32; JAX itself
    keeps only the low 32 bits of larger seeds (without x64), so distinct 64-bit seeds would
    collide there and do not here.
    """
    return np.asarray([seed >> 32, seed & 0xFFFFFFFF], np.uint32)
