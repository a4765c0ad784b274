"""Writing the converted checkpoint: an Orbax composite checkpoint of zarr arrays.

The format (layout, constants) and its read side are the library's,
:mod:`nld_jax.checkpoint.orbax`; this module writes it: one zarr (v2) array per leaf, raw (no
compressor), chunks of ~8 MiB, the layer axis chunked by 1, and the Orbax metadata files.

Why write the zarr arrays ourselves instead of calling ``StandardCheckpointer.save``: Orbax
saves a pytree whose arrays are all in memory, and one stacked leaf of the 14B model is
several GB. Opening each leaf with tensorstore lets the converter fill it one layer slice (or
slab) at a time. The files are those Orbax itself writes for a non-OCDBT PyTree save, and the
leaves are typed ``np.ndarray`` so no device or sharding is baked in: any Orbax restore reads
them (the tests use Orbax's own ``StandardCheckpointer``), and ``nld_jax.load`` restores
straight into shardings, each device reading only the chunks it holds.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable

import numpy as np
import tensorstore as ts

from nld_jax.checkpoint.files import CheckpointFiles
from nld_jax.checkpoint.hf import CheckpointError
from nld_jax import quant
from nld_jax.checkpoint.orbax import (COMMIT_FILE, LORA_ITEM, METADATA_FILE, PARAMS_ITEM, PYTREE_HANDLER, VISION_ITEM,
                                      PYTREE_METADATA, STEP_METADATA, is_converted_dir, quantization_metadata,
                                      read_metadata, tensorstore_context)
from nld_jax.config import config_to_hf
from nld_jax.vision.config import vision_config_to_hf
from nld_jax.loading import NLDModel
from nld_jax.params import flatten_tree

from checkpoints_convert.atomic_output import atomic_output_dir
from checkpoints_convert.key_map import KeyMap
from checkpoints_convert.provenance import build_metadata, write_json
from checkpoints_convert.streaming import (FiniteCheck, NonFiniteError, PendingWrites, chunk_blocks, copy_blocked,
                                          slowest_axis)

__all__ = ["ItemWriter", "chunk_shape", "write_step_metadata", "save_orbax", "CHUNK_BYTES"]

CHUNK_BYTES = 8 << 20


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
        self._context = tensorstore_context()
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
                   on_bytes: Callable[[int], None] | None = None, finite: FiniteCheck | None = None) -> None:
        """Write ``view`` (our layout, any strides, any float dtype) to ``leaf[layer]``, chunk by chunk.

        With ``finite``, each chunk is checked after the cast to the stored dtype, before it is
        submitted: a NaN or Inf raises :class:`NonFiniteError` (the caller names the tensor)."""
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
            if finite is not None and not finite(out):
                raise NonFiniteError(f"{leaf}[{layer}] holds NaN or Inf")
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
        write_json(os.path.join(self.item_dir, PYTREE_METADATA),
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
    with open(os.path.join(directory, COMMIT_FILE), "w") as f:
        f.write(f"Checkpoint commit was successful to {directory}\n")


def write_step_metadata(directory: str, items: list[str], started_ns: int) -> None:
    """Orbax's composite-checkpoint metadata, so ``CompositeCheckpointHandler`` sees the items."""
    write_json(os.path.join(directory, STEP_METADATA), {
        "item_handlers": {item: PYTREE_HANDLER for item in items}, "metrics": {}, "performance_metrics": {},
        "init_timestamp_nsecs": started_ns, "commit_timestamp_nsecs": time.time_ns(), "custom_metadata": {}})
    _write_commit_file(directory)


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
    from nld_jax.checkpoint.hf import ADAPTER_CONFIG, INDEX_FILE, LORA_DIR

    from checkpoints_convert.hf_source import TensorFiles

    if not path or not os.path.isdir(path):
        return None, None
    files = CheckpointFiles(path)
    if is_converted_dir(path):
        files.path(METADATA_FILE)
        meta = read_metadata(path)
        return meta.get("hf_layout"), (meta.get("lora") or {}).get("adapter_config")
    try:
        tensors = TensorFiles(files, "model.safetensors", INDEX_FILE)
        adapter_name = f"{LORA_DIR}/{ADAPTER_CONFIG}"
        adapter = files.read_json(adapter_name) if files.exists(adapter_name) else None
    except (CheckpointError, ValueError, OSError):
        return None, None
    return {"weight_map": {k: tensors.file_of(k) for k in tensors.order}}, adapter


def save_orbax(model: NLDModel, path, *, overwrite: bool = False, config_json: dict | None = None) -> str:
    """Write in-memory weights (e.g. after fine-tuning) in the converter's format, atomically.

    Side files (tokenizer, generation config, code) are copied from ``model.path`` when it is a
    checkpoint directory, and its HF shard layout is recorded for ``--reverse``; ``config.json``
    is ``config_json`` or the source's or built from the config. Single-process: each leaf must
    be fully addressable from this host. The weights are written as they are, NaN or Inf
    included (a diverged fine-tune can still be saved and inspected); ``nld-convert --reverse``
    refuses them. Quantized weights (``nld_jax.quantize``) are written as ``nld-convert
    --quantize`` writes them (``<leaf>.w`` and ``<leaf>.scale``, the scheme in the metadata).
    """
    from checkpoints_convert.hf_source import copy_side_files

    started = time.time_ns()
    layout, adapter_config = _recorded_layout(model.path)
    path = os.path.abspath(os.fspath(path))
    key_map = KeyMap.for_params(model.config)
    quantization = quant.quantization_of(model.params)
    flat = {}
    for leaf, value in flatten_tree(model.params).items():
        if isinstance(value, quant.QuantizedArray):
            flat[leaf + ".w"], flat[leaf + ".scale"] = value.w, value.scale
        else:
            flat[leaf] = value
    key_map.check_stored({k: tuple(v.shape) for k, v in flat.items()},
                         {k: np.dtype(v.dtype) for k, v in flat.items()}, "model.params",
                         quantized=None if quantization is None else quantization.scheme)
    with atomic_output_dir(path, overwrite) as tmp:
        stacked = {name: spec.stacked for leaf, spec in key_map.leaves.items()
                   for name in (leaf, leaf + ".w", leaf + ".scale")}
        dtypes = {PARAMS_ITEM: _write_tree(os.path.join(tmp, PARAMS_ITEM), flat, stacked)}
        items = [PARAMS_ITEM]
        lora_meta = None
        if model.lora is not None:
            lora = {k: model.lora[k] for k in ("A", "B", "scale")}
            dtypes[LORA_ITEM] = _write_tree(os.path.join(tmp, LORA_ITEM), lora, {"A": True, "B": True})
            items.append(LORA_ITEM)
            rank = int(lora["A"].shape[-1])
            lora_meta = {"rank": rank, "alpha": float(lora["scale"]) * rank, "adapter_config": adapter_config}
        if model.vision is not None:  # a VLM: its tower and projector, as nld-convert writes them
            vision_map = KeyMap.for_vision(model.vision_config)
            vision = flatten_tree(model.vision)
            vision_map.check_stored({k: tuple(v.shape) for k, v in vision.items()},
                                    {k: np.dtype(v.dtype) for k, v in vision.items()}, "model.vision")
            dtypes[VISION_ITEM] = _write_tree(os.path.join(tmp, VISION_ITEM), vision,
                                              {leaf: spec.stacked for leaf, spec in vision_map.leaves.items()})
            items.append(VISION_ITEM)
        has_source = bool(model.path) and os.path.isdir(model.path)
        copied = copy_side_files(CheckpointFiles(model.path), tmp) if has_source else []
        if config_json is not None or "config.json" not in copied:
            built = config_to_hf(model.config)
            if model.vision_config is not None:
                built.update(vision_config_to_hf(model.vision_config))
            write_json(os.path.join(tmp, "config.json"), config_json or built)
            copied = sorted(set(copied) | {"config.json"})
        write_json(os.path.join(tmp, METADATA_FILE), build_metadata(
            source={"kind": "in-memory", "path": model.path}, dtypes=dtypes, lora=lora_meta, hf_layout=layout,
            side_files=copied, chunk_bytes=CHUNK_BYTES,
            quantization=None if quantization is None else quantization_metadata(
                quantization.scheme, [leaf for leaf, spec in key_map.leaves.items() if spec.contracting])))
        write_step_metadata(tmp, items, started)
    return path
