"""Reading nld-jax's converted checkpoints: an Orbax composite checkpoint of zarr arrays.

Layout of a converted directory (``nld-convert`` writes it; :mod:`checkpoints_convert` holds the
writers, this module the format and the read side, so the library reads its own format alone)::

    _CHECKPOINT_METADATA        Orbax step metadata: items "params" (and "lora"), PyTree handler
    params/_METADATA            Orbax PyTree metadata: one entry per leaf
    params/<leaf path>/         one zarr array per leaf, e.g. layers.self_attn.q_proj/
    lora/...                    the draft LoRA {A, B, scale}, same format
    config.json, tokenizer*     copied verbatim from the source
    nld_metadata.json           format version, provenance, stored dtypes

Reads return trees of arrays (never a model): :func:`read_params` and :func:`read_lora` restore
straight into the caller's shardings, each device reading only the chunks it holds.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np

from nld_jax.checkpoint.hf import FLOAT_DTYPES, CheckpointError, key_listing
from nld_jax.config import NLDConfig
from nld_jax.params import lora_specs, param_specs, tree_from_flat

__all__ = ["METADATA_FILE", "FORMAT_NAME", "FORMAT_VERSION", "PARAMS_ITEM", "LORA_ITEM", "PYTREE_METADATA",
           "STEP_METADATA", "COMMIT_FILE", "PYTREE_HANDLER", "is_converted_dir", "read_metadata", "tensorstore_context",
           "open_item", "stored_shapes", "check_item", "read_params", "read_lora", "lora_rank"]

METADATA_FILE = "nld_metadata.json"
FORMAT_NAME = "nld-jax-orbax"
FORMAT_VERSION = 1
PARAMS_ITEM = "params"
LORA_ITEM = "lora"
PYTREE_METADATA = "_METADATA"
STEP_METADATA = "_CHECKPOINT_METADATA"
COMMIT_FILE = "commit_success.txt"
# The handler name Orbax records for PyTree items (tests check it against the installed Orbax).
PYTREE_HANDLER = "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler"


def is_converted_dir(path: str) -> bool:
    """Whether ``path`` is a checkpoint written by ``nld-convert`` (Orbax), not an HF directory."""
    return os.path.isdir(os.path.join(path, PARAMS_ITEM)) and os.path.exists(os.path.join(path, METADATA_FILE))


def read_metadata(directory: str) -> dict:
    """``nld_metadata.json``, checked for format name and version."""
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{directory} has no {METADATA_FILE}: not a converted NLD checkpoint")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} is not {FORMAT_NAME!r}")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: format_version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version} is newer than this nld-jax understands "
                              f"({FORMAT_VERSION}); upgrade nld-jax")
    return meta


def tensorstore_context():
    """No chunk cache (every chunk is read or written once); no fsync per chunk (a converted
    directory becomes visible by one rename at the end, like ``cp``, which does not fsync either)."""
    import tensorstore as ts

    return ts.Context({"cache_pool": {"total_bytes_limit": 0}, "file_io_sync": False,
                       "file_io_concurrency": {"limit": 32}})


def open_item(item_dir: str) -> dict[str, Any]:
    """The leaves of an Orbax PyTree item as tensorstore arrays (opened lazily, read on demand).

    Reads our layout and Orbax's own saves (OCDBT, zarr3) alike, from its ``_METADATA``.
    """
    import tensorstore as ts

    meta_path = os.path.join(item_dir, PYTREE_METADATA)
    if not os.path.exists(meta_path):
        raise CheckpointError(f"{item_dir} is not an Orbax PyTree checkpoint (no {PYTREE_METADATA})")
    with open(meta_path) as f:
        meta = json.load(f)
    driver = "zarr3" if meta.get("use_zarr3") else "zarr"
    context = tensorstore_context()
    leaves = {}
    for entry in meta["tree_metadata"].values():
        name = ".".join(str(k["key"]) for k in entry["key_metadata"])
        if meta.get("use_ocdbt"):
            kvstore = {"driver": "ocdbt", "base": {"driver": "file", "path": item_dir}, "path": name}
        else:
            kvstore = {"driver": "file", "path": os.path.join(item_dir, name)}
        try:
            leaves[name] = ts.open({"driver": driver, "kvstore": kvstore}, open=True, read=True,
                                   context=context).result()
        except ValueError as e:
            raise CheckpointError(f"{item_dir}: cannot open array {name!r} ({e})") from None
    return leaves


def stored_shapes(leaves: Mapping[str, Any]) -> tuple[dict, dict]:
    """``({leaf: shape}, {leaf: numpy dtype})`` of opened leaves."""
    return ({k: tuple(a.shape) for k, a in leaves.items()},
            {k: np.dtype(a.dtype.numpy_dtype) for k, a in leaves.items()})


def check_item(where: str, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, np.dtype],
               expected: Mapping[str, tuple[int, ...]], extra_ok: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """The item holds exactly the ``expected`` floating leaves with their shapes (plus the
    ``extra_ok`` leaves, e.g. the LoRA's scalar ``scale``); an error names the offending leaf."""
    extra_ok = dict(extra_ok or {})
    missing = [leaf for leaf in [*expected, *extra_ok] if leaf not in shapes]
    if missing:
        raise CheckpointError(f"{where}: missing array(s) {key_listing(missing)}")
    unknown = [leaf for leaf in shapes if leaf not in expected and leaf not in extra_ok]
    if unknown:
        raise CheckpointError(f"{where}: unknown array(s) {key_listing(unknown)}: not part of the "
                              "architecture that config.json describes")
    for leaf, shape in {**expected, **extra_ok}.items():
        if tuple(shapes[leaf]) != tuple(shape):
            raise CheckpointError(f"{where}: array {leaf!r} has shape {list(shapes[leaf])}, "
                                  f"config.json implies {list(shape)}")
        if np.dtype(dtypes[leaf]).name not in FLOAT_DTYPES:
            raise CheckpointError(f"{where}: array {leaf!r} has dtype {np.dtype(dtypes[leaf]).name}; "
                                  f"weights must be one of {FLOAT_DTYPES}")


def _restore(item_dir: str, wanted: dict[str, tuple[tuple[int, ...], Any, jax.sharding.Sharding]]) -> dict:
    import orbax.checkpoint as ocp  # slow to import; only loading needs it

    restore_args = tree_from_flat({leaf: ocp.ArrayRestoreArgs(sharding=sharding, dtype=dtype, global_shape=shape)
                                   for leaf, (shape, dtype, sharding) in wanted.items()})
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        return checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    finally:
        checkpointer.close()


def read_params(path: str, config: NLDConfig, dtype, sharding_of: Callable[[str], jax.sharding.Sharding]) -> dict:
    """The base weights of a converted checkpoint as a tree, each leaf restored into
    ``sharding_of(leaf path)`` in ``dtype`` (None: the stored dtype)."""
    item_dir = os.path.join(path, PARAMS_ITEM)
    specs = param_specs(config)
    shapes, dtypes = stored_shapes(open_item(item_dir))
    check_item(item_dir, shapes, dtypes, {leaf: spec.shape for leaf, spec in specs.items()})
    return _restore(item_dir, {leaf: (spec.shape, dtypes[leaf] if dtype is None else dtype, sharding_of(leaf))
                               for leaf, spec in specs.items()})


def lora_rank(path: str) -> int | None:
    """The rank of the stored draft LoRA, or None when the checkpoint has none."""
    lora_dir = os.path.join(path, LORA_ITEM)
    if not os.path.isdir(lora_dir):
        return None
    shapes, _ = stored_shapes(open_item(lora_dir))
    if "A" not in shapes or len(shapes["A"]) != 4:
        raise CheckpointError(f"{lora_dir}: no LoRA array 'A' of rank 4")
    return int(shapes["A"][-1])


def read_lora(path: str, config: NLDConfig, sharding_of: Callable[[str], jax.sharding.Sharding]) -> dict | None:
    """The draft LoRA ``{A, B, scale}`` (float32, as PEFT runs it), or None when there is none."""
    rank = lora_rank(path)
    if rank is None:
        return None
    lora_dir = os.path.join(path, LORA_ITEM)
    shapes, dtypes = stored_shapes(open_item(lora_dir))
    check_item(lora_dir, shapes, dtypes, {leaf: spec.shape for leaf, spec in lora_specs(config, rank).items()},
               extra_ok={"scale": ()})
    return _restore(lora_dir, {leaf: (shape, np.float32, sharding_of(leaf)) for leaf, shape in shapes.items()})
