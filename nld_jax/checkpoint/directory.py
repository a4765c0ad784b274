"""The small JSON files of a checkpoint directory: ``config.json``, ``generation_config.json``
and (a VLM's) ``preprocessor_config.json``.

Tensors are read by :mod:`.hf` (safetensors) and :mod:`.orbax` (converted checkpoints); this
module reads the configuration that decides what those readers expect, through
:class:`~nld_jax.checkpoint.files.CheckpointFiles`, and names the file in every error.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from nld_jax.checkpoint.files import JSON_LIMIT, CheckpointFiles, open_regular, parse_json
from nld_jax.config import ConfigError, NLDConfig, config_from_hf
from nld_jax.vision.config import VisionConfig, is_vlm_config, vision_config_from_hf

__all__ = ["CONFIG_FILE", "GENERATION_CONFIG_FILE", "PREPROCESSOR_CONFIG_FILE", "read_max_image_size",
           "GenerationDefaults", "read_json", "load_hf_config",
           "load_configs", "read_config_json", "read_generation_defaults"]

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"
MAX_IMAGE_EDGE = 2**16


def read_json(path: str, what: str, error=ConfigError) -> Any:
    """The JSON of a file named directly by the caller (not found inside a checkpoint): only a
    regular file is opened; a file that is not UTF-8 JSON raises ``error`` naming it."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > JSON_LIMIT:
            raise error(f"{path}: {what} is {size} bytes, more than the {JSON_LIMIT} a {what} may have")
        return parse_json(f.read(), path, what, error)


def read_config_json(path: str | os.PathLike | CheckpointFiles) -> tuple[dict, str]:
    """The parsed ``config.json`` of a checkpoint directory (or the file itself), and its path."""
    if isinstance(path, CheckpointFiles) or os.path.isdir(path):
        files = CheckpointFiles.of(path)
        where = files.shown(CONFIG_FILE)
        if not files.exists(CONFIG_FILE):
            raise FileNotFoundError(f"no {CONFIG_FILE} at {where}")
        hf = files.read_json(CONFIG_FILE, error=ConfigError)
    else:
        where = os.fspath(path)
        if not os.path.exists(where):
            raise FileNotFoundError(f"no {CONFIG_FILE} at {where}")
        hf = read_json(where, CONFIG_FILE)
    if not isinstance(hf, dict):
        raise ConfigError(f"{where}: {CONFIG_FILE} must hold a JSON object, got {type(hf).__name__}")
    return hf, where


def load_hf_config(path: str | os.PathLike | CheckpointFiles) -> NLDConfig:
    """Read ``config.json`` from a checkpoint directory (or the file itself)."""
    hf, where = read_config_json(path)
    try:
        return config_from_hf(hf)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_configs(path: str | os.PathLike | CheckpointFiles) -> tuple[NLDConfig, VisionConfig | None]:
    """``config.json`` read once: the text model's config and, for a VLM checkpoint (a
    ``vision_config``), the vision tower's and projector's, else None."""
    hf, where = read_config_json(path)
    try:
        config = config_from_hf(hf)
        vision = vision_config_from_hf(hf, config.D, config.rms_norm_eps) if is_vlm_config(hf) else None
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return config, vision


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """Decoding defaults a checkpoint names in ``generation_config.json`` (None: not named)."""

    block_length: int | None = None
    threshold: float | None = None


def read_generation_defaults(directory: str | os.PathLike | CheckpointFiles) -> GenerationDefaults:
    """The NLD decoding defaults of ``generation_config.json`` (``block_length`` and ``threshold``;
    transformers' other fields are not NLD's and are ignored), or empty defaults without one."""
    files = CheckpointFiles.of(directory)
    if not files.exists(GENERATION_CONFIG_FILE):
        return GenerationDefaults()
    path = files.shown(GENERATION_CONFIG_FILE)
    raw = files.read_json(GENERATION_CONFIG_FILE, error=ConfigError)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must hold a JSON object, got {type(raw).__name__}")
    block, threshold = raw.get("block_length"), raw.get("threshold")
    if block is not None and (not isinstance(block, int) or isinstance(block, bool) or not 1 <= block <= 2**20):
        raise ConfigError(f"{path}: block_length={block!r} must be a positive integer")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0.0 <= threshold <= 1.0):
        raise ConfigError(f"{path}: threshold={threshold!r} must be a number in [0, 1]")
    return GenerationDefaults(block, None if threshold is None else float(threshold))


def read_max_image_size(directory: str | os.PathLike | CheckpointFiles) -> int | None:
    """The longest edge images are resized to, from Pixtral's ``preprocessor_config.json``
    (``size: {"longest_edge": N}``), or None when the file or its ``size`` is absent. Any other
    ``size`` (a height / width pair, a bad number) is refused naming the file and field: the
    images would otherwise be prepared differently from what the checkpoint was trained on."""
    files = CheckpointFiles.of(directory)
    if not files.exists(PREPROCESSOR_CONFIG_FILE):
        return None
    path = files.shown(PREPROCESSOR_CONFIG_FILE)
    raw = files.read_json(PREPROCESSOR_CONFIG_FILE, error=ConfigError)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must hold a JSON object, got {type(raw).__name__}")
    size = raw.get("size")
    if size is None:
        return None
    edge = size.get("longest_edge") if isinstance(size, dict) else None
    if not isinstance(edge, int) or isinstance(edge, bool) or not 1 <= edge <= MAX_IMAGE_EDGE:
        raise ConfigError(f"{path}: size={size!r:.80} must be {{\"longest_edge\": N}} with N an integer in "
                          f"[1, {MAX_IMAGE_EDGE}] (Pixtral's image processor)")
    return edge
