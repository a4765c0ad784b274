"""The small JSON files of a checkpoint directory: ``config.json`` and ``generation_config.json``.

Tensors are read by :mod:`.hf` (safetensors) and :mod:`.orbax` (converted checkpoints); this
module reads the configuration that decides what those readers expect, and names the file in
every error.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from nld_jax.config import ConfigError, NLDConfig, config_from_hf

__all__ = ["CONFIG_FILE", "GENERATION_CONFIG_FILE", "GenerationDefaults", "read_json", "load_hf_config",
           "read_config_json", "read_generation_defaults"]

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


def read_json(path: str, what: str, error=ConfigError) -> Any:
    """``json.load`` of ``path``; a file that is not UTF-8 JSON raises ``error`` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: {what} is not valid JSON ({e})") from None


def read_config_json(path: str | os.PathLike) -> tuple[dict, str]:
    """The parsed ``config.json`` of a checkpoint directory (or the file itself), and its path."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {CONFIG_FILE} at {path}")
    hf = read_json(path, CONFIG_FILE)
    if not isinstance(hf, dict):
        raise ConfigError(f"{path}: {CONFIG_FILE} must hold a JSON object, got {type(hf).__name__}")
    return hf, path


def load_hf_config(path: str | os.PathLike) -> NLDConfig:
    """Read ``config.json`` from a checkpoint directory (or the file itself)."""
    hf, where = read_config_json(path)
    try:
        return config_from_hf(hf)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """Decoding defaults a checkpoint names in ``generation_config.json`` (None: not named)."""

    block_length: int | None = None
    threshold: float | None = None


def read_generation_defaults(directory: str) -> GenerationDefaults:
    """The NLD decoding defaults of ``generation_config.json`` (``block_length`` and ``threshold``;
    transformers' other fields are not NLD's and are ignored), or empty defaults without one."""
    path = os.path.join(directory, GENERATION_CONFIG_FILE)
    if not os.path.isfile(path):
        return GenerationDefaults()
    raw = read_json(path, GENERATION_CONFIG_FILE)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must hold a JSON object, got {type(raw).__name__}")
    block, threshold = raw.get("block_length"), raw.get("threshold")
    if block is not None and (not isinstance(block, int) or isinstance(block, bool) or block < 1):
        raise ConfigError(f"{path}: block_length={block!r} must be a positive integer")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0.0 <= threshold <= 1.0):
        raise ConfigError(f"{path}: threshold={threshold!r} must be a number in [0, 1]")
    return GenerationDefaults(block, None if threshold is None else float(threshold))
