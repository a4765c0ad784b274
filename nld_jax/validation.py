"""One validator for what users hand to generate / forward / block_logits (and the CLI and server).

Prompts are token-id lists (ragged allowed), strings, a 1-D array (one prompt) or a 2-D array
(a batch). Ids must be Python or numpy integers (no bools, no floats, not even 3.0), inside the
vocabulary; numbers must be what they say (an integer ``max_new_tokens``, a finite temperature).
A 0-d numpy or JAX array counts as the scalar it holds. Every error is a ``ValueError`` that
names the argument, the row and the offending value.
"""

from __future__ import annotations

import math
import numbers
import reprlib
from typing import Any, Sequence

import numpy as np

__all__ = ["prompt_ids", "token_array", "integer", "number", "probability", "flag", "token_ids", "callback",
           "seed_value", "seed_key", "MAX_SEED"]

MAX_SEED = 2**64 - 1


def _scalar(x):
    """A 0-d numpy or JAX array as the Python scalar it holds (``jnp.int32(5)`` is an array);
    anything else unchanged."""
    if hasattr(x, "__array__") and not isinstance(x, (np.generic, list, tuple, str)) and getattr(x, "ndim", None) == 0:
        return np.asarray(x)[()]
    return x


def _is_int(x) -> bool:
    x = _scalar(x)
    return isinstance(x, (numbers.Integral, np.integer)) and not isinstance(x, (bool, np.bool_))


def _describe(x) -> str:
    x = _scalar(x)
    if isinstance(x, (list, tuple)):
        return "a nested list"
    if isinstance(x, np.ndarray):
        return f"an array of shape {x.shape}"
    return f"{type(x).__name__} {_short(x.item() if isinstance(x, np.generic) else x)}"


def _short(value) -> str:
    """repr, cut in the middle past ~40 characters: a careless 400-digit number stays one line."""
    return reprlib.repr(value)


def _ids_of(p, label: str, vocab: int) -> list[int]:
    if hasattr(p, "__array__") and not isinstance(p, (list, tuple)):
        arr = np.asarray(p)
        if arr.ndim == 0:
            raise ValueError(f"{label} is {_describe(arr)}; expected a string or a list of token ids")
        if arr.ndim != 1:
            raise ValueError(f"{label} must be a 1-D sequence of token ids, got an array of shape {arr.shape}")
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{label} holds {arr.dtype} values; token ids must be integers")
        ids = arr.tolist()  # Python ints: a uint64 id beyond int64 must not wrap into a negative one
    elif isinstance(p, (list, tuple)):
        for j, t in enumerate(p):
            if not _is_int(t):
                raise ValueError(f"{label}[{j}] is {_describe(t)}; token ids must be integers")
        ids = [int(_scalar(t)) for t in p]
    else:
        raise ValueError(f"{label} is a {type(p).__name__}; expected a string or a list of token ids")
    if not ids:
        raise ValueError(f"{label} is empty: a prompt needs at least one token (e.g. BOS)")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"{label} has token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")
    return ids


def prompt_ids(prompts: Any, *, vocab: int, tokenizer=None, name: str = "prompts",
               row_names: Sequence[str] | None = None) -> list[list[int]]:
    """Token-id lists from ``prompts``, validated against the vocabulary (see the module docstring).
    Errors name row b ``name[b]``, or ``row_names[b]`` when given (a CLI names its own flags)."""
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
        label = f"{name}[{row}]" if row_names is None else row_names[row]
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer, and this checkpoint has none; pass token ids")
            if not p:
                raise ValueError(f"{label} is an empty string")
            try:
                p.encode("utf-8")
            except UnicodeEncodeError as e:  # lone surrogates: bytes that were not UTF-8 (os.fsdecode, argv)
                raise ValueError(f"{label} is not valid UTF-8 text (lone surrogate at character {e.start})") from None
            p = tokenizer.encode(p)
        out.append(_ids_of(p, label, vocab))
    return out


def token_array(tokens: Any, *, vocab: int, name: str) -> np.ndarray:
    """A ``[B, T]`` int32 array of ids (a 1-D input is one row); rows must have equal length."""
    rows = prompt_ids(tokens, vocab=vocab, name=name)
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"{name} rows must all have the same length, got lengths {[len(r) for r in rows]}")
    return np.asarray(rows, np.int32)


def integer(value, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer, got {_describe(value)}")
    value = int(_scalar(value))
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {_short(value)}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {_short(value)}")
    return value


def number(value, name: str, *, minimum: float | None = None, maximum: float | None = None) -> float:
    value = _scalar(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number, got {_describe(value)}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float range
        raise ValueError(f"{name} must be finite, got {_short(value)}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {_short(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {_short(value)}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {_short(value)}")
    return value


def probability(value, name: str, *, allow_zero: bool = True) -> float:
    value = number(value, name, minimum=0.0, maximum=1.0)
    if not allow_zero and value == 0.0:
        raise ValueError(f"{name} must be in (0, 1], got 0")
    return value


def flag(value, name: str) -> bool:
    """A bool (Python or numpy): ``1``, ``"yes"`` or ``None`` are refused, not read as truthy."""
    value = _scalar(value)
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {_describe(value)}")
    return bool(value)


def token_ids(value, name: str, *, vocab: int) -> list[int]:
    """A list (tuple, 1-D array) of token ids, e.g. ``stop_token_ids``; None is the empty list."""
    if value is None:
        return []
    if hasattr(value, "__array__") and not isinstance(value, (list, tuple)) and np.ndim(value) != 0:
        value = np.asarray(value)
        if value.ndim != 1:
            raise ValueError(f"{name} must be a list of token ids, got an array of shape {value.shape}")
        value = value.tolist()  # bools and floats stay what they are, and are refused below
    if not isinstance(value, (list, tuple)):
        hint = f" (write [{_short(int(_scalar(value)))}])" if _is_int(value) else ""
        raise ValueError(f"{name} must be a list of token ids, got {_describe(value)}{hint}")
    return [integer(t, f"{name}[{i}]", minimum=0, maximum=vocab - 1) for i, t in enumerate(value)]


def callback(value, name: str):
    """None or a callable (called from the decode loop's host callback, so a wrong type would
    only show up there)."""
    if value is not None and not callable(value):
        raise ValueError(f"{name} must be a callable or None, got {_describe(value)}")
    return value


def seed_value(seed, rows: int) -> list[int]:
    """Per-row seeds: an int (row b uses ``seed + b``) or one int per row, each in [0, 2**64)."""
    if hasattr(seed, "__array__") and not isinstance(seed, np.generic) and np.ndim(seed) == 1:
        seed = np.asarray(seed).tolist()  # one seed per row, checked one by one below
    if isinstance(seed, Sequence) and not isinstance(seed, (str, bytes)):
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
