"""The converted checkpoint on disk: an Orbax composite checkpoint of zarr arrays.

Layout of a converted directory::

    _CHECKPOINT_METADATA        Orbax step metadata: items "params" (and "lora"), PyTree handler
    params/_METADATA            Orbax PyTree metadata: one entry per leaf, use_ocdbt false
    params/<leaf path>/         one zarr (v2) array per leaf, e.g. layers.self_attn.q_proj/,
                                raw (no compressor), chunks of ~8 MiB, layer axis chunked by 1
    lora/...                    the draft LoRA {A, B, scale}, same format
    config.json, tokenizer*     copied verbatim from the source
    nld_metadata.json           format version, provenance, stored dtypes

Why write the zarr arrays ourselves instead of calling ``StandardCheckpointer.save``: Orbax
saves a pytree whose arrays are all in memory, and one stacked leaf of the 14B model is
several GB. Opening each leaf with tensorstore lets the converter fill it one layer slice (or
slab) at a time. The files are those Orbax itself writes for a non-OCDBT PyTree save, and the
leaves are typed ``np.ndarray`` so no device or sharding is baked in: any Orbax restore reads
them (the tests use Orbax's own ``StandardCheckpointer``), and :func:`load_orbax` restores
straight into caller-given shardings, each device reading only the chunks it holds.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from nld_jax.checkpoint.hf import CheckpointError
from nld_jax.config import config_to_hf, load_hf_config
from nld_jax.loading import NLDModel, is_converted_dir
from nld_jax.params import flatten_tree, tree_from_flat
from nld_jax.sharding import replicated
from nld_jax.tokenizer import load_tokenizer

from checkpoints_convert.atomic_output import atomic_output_dir
from checkpoints_convert.key_map import LORA_ITEM, PARAMS_ITEM, KeyMap
from checkpoints_convert.provenance import METADATA_FILE, build_metadata, read_metadata, write_json
from checkpoints_convert.streaming import PendingWrites, chunk_blocks, copy_blocked, slowest_axis

__all__ = ["ItemWriter", "open_item", "chunk_shape", "write_step_metadata", "load_orbax", "save_orbax",
           "is_converted_dir", "CHUNK_BYTES", "PARAMS_ITEM", "LORA_ITEM"]

CHUNK_BYTES = 8 << 20
_PYTREE_METADATA = "_METADATA"
_STEP_METADATA = "_CHECKPOINT_METADATA"
_COMMIT_FILE = "commit_success.txt"
# The handler name Orbax records for PyTree items (tests check it against the installed Orbax).
PYTREE_HANDLER = "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler"


def _context() -> ts.Context:
    # No chunk cache (every chunk is written once, read once); no fsync per chunk: the output
    # becomes visible by one rename at the end, like `cp`, which does not fsync either.
    return ts.Context({"cache_pool": {"total_bytes_limit": 0}, "file_io_sync": False,
                       "file_io_concurrency": {"limit": 32}})


def chunk_shape(shape: tuple[int, ...], itemsize: int, stacked: bool, target_bytes: int = CHUNK_BYTES) -> list[int]:
    """Chunks of at most ~``target_bytes``, made by halving the largest extent.

    The layer axis is chunked by 1, so a layer slice is whole chunks (written without reading
    back). Halving the largest extent keeps chunks roughly square in elements, so a sharded
    restore reads about what each device holds whichever axis the mesh splits.
    """
    chunks = list(shape)
    first = 1 if stacked and chunks else 0
    if stacked and chunks:
        chunks[0] = 1
    while math.prod(chunks) * itemsize > target_bytes:
        extents = [(c, i) for i, c in enumerate(chunks) if i >= first and c > 1]
        if not extents:
            break
        _, i = max(extents)
        chunks[i] = (chunks[i] + 1) // 2
    return chunks


class ItemWriter:
    """Writes the zarr arrays and the Orbax PyTree metadata of one item directory."""

    def __init__(self, item_dir: str, chunk_bytes: int = CHUNK_BYTES):
        os.makedirs(item_dir)
        self.item_dir = item_dir
        self.chunk_bytes = chunk_bytes
        self._context = _context()
        self._arrays: dict[str, ts.TensorStore] = {}
        self._chunks: dict[str, list[int]] = {}
        self.dtypes: dict[str, np.dtype] = {}

    def create(self, leaf: str, shape: tuple[int, ...], dtype: np.dtype, stacked: bool) -> None:
        dtype = np.dtype(dtype)
        chunks = chunk_shape(tuple(shape), dtype.itemsize, stacked, self.chunk_bytes)
        spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": os.path.join(self.item_dir, leaf)},
                "metadata": {"shape": list(shape), "chunks": chunks, "compressor": None,
                             "order": "C", "dimension_separator": "."}}
        self._arrays[leaf] = ts.open(spec, create=True, dtype=ts.dtype(dtype.name), context=self._context).result()
        self._chunks[leaf] = chunks
        self.dtypes[leaf] = dtype

    def write_slot(self, leaf: str, layer: int | None, view: np.ndarray, pending: PendingWrites,
                   on_bytes: Callable[[int], None] | None = None) -> None:
        """Write ``view`` (our layout, any strides, any float dtype) to ``leaf[layer]``, chunk by chunk."""
        region = self._arrays[leaf] if layer is None else self._arrays[leaf][layer]
        chunks = self._chunks[leaf] if layer is None else self._chunks[leaf][1:]
        if tuple(region.shape) != view.shape:
            raise CheckpointError(f"{leaf}[{layer}]: tensor of shape {list(view.shape)} for a slot of "
                                  f"shape {list(region.shape)}")
        dtype = self.dtypes[leaf]
        axis = slowest_axis(view)
        for idx in chunk_blocks(view.shape, chunks, axis):
            part = view[idx]
            out = np.empty(part.shape, dtype)
            copy_blocked(out, part)
            pending.submit(_write_chunk(region[idx], out), out.nbytes)
            if on_bytes is not None:
                on_bytes(part.size * part.itemsize)

    def finalize(self) -> None:
        """Write Orbax's ``_METADATA`` for the leaves created (call after the writes are drained)."""
        entries = {}
        for leaf in self._arrays:
            keys = leaf.split(".")
            entries[str(tuple(keys))] = {
                "key_metadata": [{"key": k, "key_type": 2} for k in keys],  # 2: dict key
                "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False},
            }
        write_json(os.path.join(self.item_dir, _PYTREE_METADATA),
                   {"tree_metadata": entries, "use_ocdbt": False, "use_zarr3": False,
                    "store_array_data_equal_to_fill_value": True, "custom_metadata": None})
        _write_commit_file(self.item_dir)


def _write_chunk(target: ts.TensorStore, data: np.ndarray):
    # `data` is exactly one chunk, C-ordered, and never touched again: tensorstore may write it
    # as it is instead of copying it into a chunk buffer of its own (3x less CPU per byte).
    try:
        return target.write(data, can_reference_source_data_indefinitely=True)
    except TypeError:  # tensorstore older than that option
        return target.write(data)


def _write_commit_file(directory: str) -> None:
    with open(os.path.join(directory, _COMMIT_FILE), "w") as f:
        f.write(f"Checkpoint commit was successful to {directory}\n")


def write_step_metadata(directory: str, items: list[str], started_ns: int) -> None:
    """Orbax's composite-checkpoint metadata, so ``CompositeCheckpointHandler`` sees the items."""
    write_json(os.path.join(directory, _STEP_METADATA), {
        "item_handlers": {item: PYTREE_HANDLER for item in items}, "metrics": {}, "performance_metrics": {},
        "init_timestamp_nsecs": started_ns, "commit_timestamp_nsecs": time.time_ns(), "custom_metadata": {}})
    _write_commit_file(directory)


def open_item(item_dir: str) -> dict[str, ts.TensorStore]:
    """The leaves of an Orbax PyTree item as tensorstore arrays (opened lazily, read on demand).

    Reads our layout and Orbax's own saves (OCDBT, zarr3) alike, from its ``_METADATA``.
    """
    meta_path = os.path.join(item_dir, _PYTREE_METADATA)
    if not os.path.exists(meta_path):
        raise CheckpointError(f"{item_dir} is not an Orbax PyTree checkpoint (no {_PYTREE_METADATA})")
    with open(meta_path) as f:
        meta = json.load(f)
    driver = "zarr3" if meta.get("use_zarr3") else "zarr"
    context = _context()
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


def stored_shapes(leaves: Mapping[str, ts.TensorStore]) -> tuple[dict, dict]:
    return ({k: tuple(a.shape) for k, a in leaves.items()},
            {k: np.dtype(a.dtype.numpy_dtype) for k, a in leaves.items()})


# --------------------------------------------------------------------------------------
# Loading (Orbax restore) and saving in-memory weights
# --------------------------------------------------------------------------------------

def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flat_shardings(shardings, leaves: list[str], what: str) -> dict[str, jax.sharding.Sharding] | None:
    """``{dotted leaf path: sharding}`` from any pytree (dict, FrozenDict...) of shardings."""
    if shardings is None:
        return None
    with_paths, _ = jax.tree_util.tree_flatten_with_path(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    flat = {".".join(_key_name(k) for k in path): leaf for path, leaf in with_paths}
    if set(flat) != set(leaves):
        raise ValueError(f"{what} must be a pytree with the structure of the weights {sorted(leaves)}; "
                         f"got {sorted(flat)}")
    for leaf, sharding in flat.items():
        if not isinstance(sharding, jax.sharding.Sharding):
            raise ValueError(f"{what}[{leaf!r}] is {type(sharding).__name__}, not a jax.sharding.Sharding")
    return flat


def _restore(item_dir: str, wanted: dict[str, tuple[tuple[int, ...], Any, jax.sharding.Sharding]]) -> dict:
    import orbax.checkpoint as ocp  # slow to import; only loading needs it

    restore_args = tree_from_flat({leaf: ocp.ArrayRestoreArgs(sharding=sharding, dtype=dtype, global_shape=shape)
                                   for leaf, (shape, dtype, sharding) in wanted.items()})
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        return checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    finally:
        checkpointer.close()


def _replicated_like(flat: dict[str, jax.sharding.Sharding] | None, default: jax.sharding.Sharding):
    """Replicated over the mesh of the given weight shardings (for the small LoRA), else ``default``."""
    first = next(iter(flat.values()), None) if flat else None
    return replicated(first.mesh) if isinstance(first, jax.sharding.NamedSharding) else default


def load_orbax(path, dtype=jnp.float32, *, load_lora: bool = True, load_tokenizer_files: bool = True,
               shardings=None) -> NLDModel:
    """Load a converted checkpoint directory.

    ``dtype``: the weights' dtype after loading (None keeps the stored dtype); the LoRA is always
    float32, as PEFT runs it. ``shardings``: a pytree of ``jax.sharding.Sharding`` with the
    structure of the weights; each device then reads only the chunks of its own shard. Without
    it every leaf goes to the first device. The LoRA ``{A, B, scale}`` is replicated over the
    mesh of ``shardings`` (it is small; callers reshard it if they like).
    """
    path = os.path.abspath(os.fspath(path))
    read_metadata(path)  # checks format and version
    config = load_hf_config(path)
    key_map = KeyMap.for_params(config)
    item_dir = os.path.join(path, PARAMS_ITEM)
    shapes, dtypes = stored_shapes(open_item(item_dir))
    key_map.check_stored(shapes, dtypes, item_dir)
    flat = _flat_shardings(shardings, list(key_map.leaves), "shardings")
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    wanted = {leaf: (spec.shape, dtype if dtype is not None else dtypes[leaf], flat[leaf] if flat else default)
              for leaf, spec in key_map.leaves.items()}
    params = _restore(item_dir, wanted)

    lora = None
    lora_dir = os.path.join(path, LORA_ITEM)
    if load_lora and os.path.isdir(lora_dir):
        lora_shapes, lora_dtypes = stored_shapes(open_item(lora_dir))
        if "A" not in lora_shapes or len(lora_shapes["A"]) != 4:
            raise CheckpointError(f"{lora_dir}: no LoRA array 'A' of rank 4")
        lora_map = KeyMap.for_lora(config, lora_shapes["A"][-1])
        lora_map.check_stored(lora_shapes, lora_dtypes, lora_dir, extra_ok=["scale"])
        if lora_shapes.get("scale") != ():
            raise CheckpointError(f"{lora_dir}: missing scalar array 'scale'")
        lora_sharding = _replicated_like(flat, default)
        lora = _restore(lora_dir, {leaf: (shape, jnp.float32, lora_sharding) for leaf, shape in lora_shapes.items()})
    tok = load_tokenizer(path, config.bos_token_id, config.eos_token_id) if load_tokenizer_files else None
    return NLDModel(config, params, lora, tok, path)


def _write_tree(item_dir: str, flat: dict[str, Any], stacked: dict[str, bool]) -> dict[str, str]:
    writer = ItemWriter(item_dir)
    pending = PendingWrites()
    try:
        for leaf, value in flat.items():
            writer.create(leaf, tuple(value.shape), np.dtype(value.dtype), stacked.get(leaf, False))
            if stacked.get(leaf, False):
                for n in range(value.shape[0]):  # one layer on the host at a time
                    writer.write_slot(leaf, n, np.asarray(value[n]), pending)
            else:
                writer.write_slot(leaf, None, np.asarray(value), pending)
        pending.drain()
    except BaseException:
        pending.settle()
        raise
    writer.finalize()
    return {leaf: dt.name for leaf, dt in writer.dtypes.items()}


def _recorded_layout(path: str | None) -> tuple[dict | None, dict | None]:
    """The HF shard layout and PEFT adapter config of the directory a model was loaded from, so
    that ``--reverse`` of re-saved (e.g. fine-tuned) weights writes the same files again."""
    from nld_jax.checkpoint.hf import ADAPTER_CONFIG

    from checkpoints_convert.hf_source import TensorFiles

    if not path or not os.path.isdir(path):
        return None, None
    if is_converted_dir(path):
        meta = read_metadata(path)
        return meta.get("hf_layout"), (meta.get("lora") or {}).get("adapter_config")
    try:
        tensors = TensorFiles(path, "model.safetensors", "model.safetensors.index.json")
    except (CheckpointError, ValueError, OSError):
        return None, None
    adapter = None
    adapter_path = os.path.join(path, "linear_spec_lora", ADAPTER_CONFIG)
    if os.path.exists(adapter_path):
        with open(adapter_path) as f:
            adapter = json.load(f)
    return {"weight_map": {k: tensors.file_of(k) for k in tensors.order}}, adapter


def save_orbax(model: NLDModel, path, *, overwrite: bool = False, config_json: dict | None = None) -> str:
    """Write in-memory weights (e.g. after fine-tuning) in the converter's format, atomically.

    Side files (tokenizer, generation config, code) are copied from ``model.path`` when it is a
    checkpoint directory, and its HF shard layout is recorded for ``--reverse``; ``config.json``
    is ``config_json`` or the source's or built from the config. Single-process: each leaf must
    be fully addressable from this host.
    """
    from checkpoints_convert.hf_source import copy_side_files

    started = time.time_ns()
    layout, adapter_config = _recorded_layout(model.path)
    path = os.path.abspath(os.fspath(path))
    key_map = KeyMap.for_params(model.config)
    flat = flatten_tree(model.params)
    key_map.check_stored({k: tuple(v.shape) for k, v in flat.items()},
                         {k: np.dtype(v.dtype) for k, v in flat.items()}, "model.params")
    with atomic_output_dir(path, overwrite) as tmp:
        stacked = {leaf: spec.stacked for leaf, spec in key_map.leaves.items()}
        dtypes = {PARAMS_ITEM: _write_tree(os.path.join(tmp, PARAMS_ITEM), flat, stacked)}
        items = [PARAMS_ITEM]
        lora_meta = None
        if model.lora is not None:
            lora = {k: model.lora[k] for k in ("A", "B", "scale")}
            dtypes[LORA_ITEM] = _write_tree(os.path.join(tmp, LORA_ITEM), lora, {"A": True, "B": True})
            items.append(LORA_ITEM)
            rank = int(lora["A"].shape[-1])
            lora_meta = {"rank": rank, "alpha": float(lora["scale"]) * rank, "adapter_config": adapter_config}
        copied = copy_side_files(model.path, tmp) if model.path and os.path.isdir(model.path) else []
        if config_json is not None or "config.json" not in copied:
            write_json(os.path.join(tmp, "config.json"), config_json or config_to_hf(model.config))
            copied = sorted(set(copied) | {"config.json"})
        write_json(os.path.join(tmp, METADATA_FILE), build_metadata(
            source={"kind": "in-memory", "path": model.path}, dtypes=dtypes, lora=lora_meta, hf_layout=layout,
            side_files=copied, chunk_bytes=CHUNK_BYTES))
        write_step_metadata(tmp, items, started)
    return path
