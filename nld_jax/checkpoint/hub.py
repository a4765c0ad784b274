"""Hugging Face repository ids: ``nld_jax.load("nvidia/Nemotron-Labs-Diffusion-8B")``.

A local directory always wins. A string of the form ``ORG/NAME`` that is not a local path is a
hub repository: ``huggingface_hub.snapshot_download`` fetches (or, offline, finds in the cache)
exactly the files nld-jax reads, in two steps: first the small files (configs, index, tokenizer,
adapter config), then the weights those name (the shards an index lists, ``model.safetensors``,
the LoRA, or a converted checkpoint's Orbax items). The snapshot it returns is an ordinary
checkpoint directory whose files link into the cache's ``blobs/``, which the trust rule of
:mod:`nld_jax.checkpoint.files` allows (and nothing else outside the snapshot).

``HF_HUB_OFFLINE=1`` (read at each call) means ``local_files_only``; ``HF_HUB_CACHE`` names the
cache (else huggingface_hub's default). Progress bars are huggingface_hub's own.
"""

from __future__ import annotations

import os
import re

from nld_jax.checkpoint.files import CheckpointFiles

__all__ = ["looks_like_repo_id", "resolve_checkpoint", "SMALL_FILES"]

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")

# Every small file nld-jax may read from a checkpoint (hf.py, orbax.py, directory.py, tokenizer.py).
SMALL_FILES = ["config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja", "tokenizer.model", "nld_metadata.json",
               "preprocessor_config.json",
               "linear_spec_lora/adapter_config.json", "linear_spec_lora/adapter_model.safetensors.index.json"]


def looks_like_repo_id(path: str) -> bool:
    return bool(_REPO_ID.fullmatch(path)) and ".." not in path


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _weight_files(snapshot: str) -> list[str]:
    """The weight files (patterns) the small files of ``snapshot`` call for."""
    from nld_jax.checkpoint import hf, orbax

    files = CheckpointFiles(snapshot)
    if files.exists(orbax.METADATA_FILE):
        return [f"{orbax.PARAMS_ITEM}/*", f"{orbax.LORA_ITEM}/*", f"{orbax.VISION_ITEM}/*", orbax.STEP_METADATA]
    wanted = (sorted(set(hf.read_weight_map(files, hf.INDEX_FILE).values())) if files.exists(hf.INDEX_FILE)
              else [hf.SINGLE_FILE])
    if files.exists(hf.LORA_DIR):
        lora = files.subdirectory(hf.LORA_DIR)
        names = (sorted(set(hf.read_weight_map(lora, hf.ADAPTER_INDEX).values())) if lora.exists(hf.ADAPTER_INDEX)
                 else [hf.ADAPTER_FILE])
        wanted += [f"{hf.LORA_DIR}/{name}" for name in names]
    return wanted


def _download(repo_id: str, patterns: list[str]) -> str:
    from huggingface_hub import snapshot_download

    offline = _offline()
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline,
                                 cache_dir=os.environ.get("HF_HUB_CACHE") or None)
    except Exception as e:  # huggingface_hub's errors: not cached, no network, no such repo, gated...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "the Hugging Face cache" + (" (HF_HUB_OFFLINE=1: the hub is not asked)" if offline else " or the hub")
        raise FileNotFoundError(f"{repo_id!r} is not a local directory, and {where} could not provide it: "
                                f"{type(e).__name__}: {reason[:300]}") from None


def resolve_checkpoint(path: str | os.PathLike) -> str:
    """The local directory for ``path``: itself when it exists locally, else the hub snapshot of
    repository id ``ORG/NAME`` (downloaded or found in the cache)."""
    path = os.fspath(path)
    if os.path.lexists(path) or not looks_like_repo_id(path):
        return path  # CheckpointFiles says what is wrong with it, if anything
    snapshot = _download(path, SMALL_FILES)
    return _download(path, _weight_files(snapshot))
