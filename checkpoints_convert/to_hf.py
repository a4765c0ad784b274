"""Converted Orbax checkpoint -> NVIDIA HF safetensors (``--reverse``), one tensor at a time.

Keys are NVIDIA's exact names (from the same key map as the forward direction). The shard
files follow the source's recorded layout when there is one, so HF -> Orbax -> HF reproduces
the original files' tensors byte for byte; otherwise shards of ``max_shard_bytes`` with
Hugging Face's names. An index is always written. The draft LoRA goes back to
``linear_spec_lora/`` in PEFT's format; a VLM's ``vision`` item goes back into the same shards
under NVIDIA's names (``encoder.vision_tower.*``, ``encoder.multi_modal_projector.*``), whatever
names the original used.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import time
from typing import Callable, Iterator

import numpy as np
import tensorstore as ts

from nld_jax.checkpoint.files import CheckpointFiles
from nld_jax.checkpoint.hf import ADAPTER_CONFIG, ADAPTER_FILE, LORA_DIR, CheckpointError
from nld_jax.checkpoint.hf_write import peft_adapter_config, write_index
from nld_jax.checkpoint.orbax import (LORA_ITEM, METADATA_FILE, PARAMS_ITEM, VISION_ITEM, open_item,
                                      quantization_of_metadata, read_metadata, stored_shapes)
from nld_jax.config import NLDConfig
from nld_jax.vision.config import VisionConfig

from checkpoints_convert.atomic_output import (atomic_output_dir, check_destination, check_not_overlapping,
                                               remove_leftovers, terminate_as_exit)
from checkpoints_convert.hf_source import copy_side_files, read_configs, refuse_non_directory
from checkpoints_convert.key_map import KeyMap, Ledger, TensorRoute
from checkpoints_convert.safetensors_stream import BufferPool, SafetensorsStreamWriter, plan_shards
from checkpoints_convert.streaming import FiniteCheck, NonFiniteError, chunk_blocks, copy_blocked, slowest_axis
from checkpoints_convert.to_orbax import ConversionReport, _progress_bar, parse_dtype
from checkpoints_convert.verify import verify_conversion

__all__ = ["convert_orbax_to_hf", "iter_hf_strips", "is_dense_layout"]

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")


STRIP_BYTES = 32 << 20  # HF rows gathered before they are handed to the file writer


def is_dense_layout(view: np.ndarray) -> bool:
    """Whether ``view`` numbers every element of a contiguous buffer exactly once (a transpose /
    reshape of a C-ordered array): its strides, sorted, are a mixed-radix system starting at the
    item size. Then a run of the slowest axis is a contiguous byte range."""
    axes = sorted((s, n) for s, n in zip(view.strides, view.shape) if n > 1)
    if view.ndim == 0 or not axes:
        return False
    expected = view.itemsize
    for stride, n in axes:
        if stride != expected:
            return False
        expected *= n
    return True


def iter_hf_strips(array: ts.TensorStore, route: TensorRoute, dtype: np.dtype, pool: BufferPool, prefetch: int = 4,
                   finite: FiniteCheck | None = None) -> Iterator[tuple[np.ndarray, Callable[[], None]]]:
    """The HF bytes of ``route.hf_key`` in file order, as ``(uint8 strip, release)`` pieces.

    ``to_ours`` of an (untouched, so never resident) HF-shaped buffer gives our layout's strides
    over HF memory. Its slowest axis is HF's outermost, so a run of it is a contiguous range of
    the tensor's bytes: each run of whole stored chunk columns is gathered into a pooled strip
    (through a view with the same strides) and handed on, the next chunks' reads in flight. The
    whole tensor is never in memory. With ``finite``, each strip is checked before it is handed
    on: a NaN or Inf raises :class:`NonFiniteError` naming the tensor, layer and HF index.
    """
    region = array if route.layer is None else array[route.layer]
    dtype, stored = np.dtype(dtype), np.dtype(array.dtype.numpy_dtype)
    probe = route.to_ours(np.empty(route.hf_shape, dtype))
    if tuple(probe.shape) != route.slot_shape or tuple(region.shape) != route.slot_shape:
        raise CheckpointError(f"tensor {route.hf_key!r}: stored slot {list(region.shape)} / layout "
                              f"{list(probe.shape)} differ from {list(route.slot_shape)}")
    if not is_dense_layout(probe):  # a scalar, or a transform that copies: convert the slot whole
        whole = np.ascontiguousarray(route.to_hf(region.read().result())).astype(dtype, copy=False)
        _check_strip(finite, whole, 0, route, stored)
        buf = pool.get(whole.nbytes)
        buf[:whole.nbytes] = whole.reshape(-1).view(np.uint8)
        yield buf[:whole.nbytes], lambda: pool.put(buf)
        return
    axis = slowest_axis(probe)
    n, stride = probe.shape[axis], probe.strides[axis]
    chunks = tuple(region.chunk_layout.read_chunk.shape or region.shape)
    run = max(1, STRIP_BYTES // (chunks[axis] * stride)) * chunks[axis]
    strip = None  # (start, buffer, nbytes, strided view of the buffer)

    def new_strip(start: int):
        stop = min(start + run, n)
        nbytes = (stop - start) * stride
        buf = pool.get(nbytes)
        shape = list(probe.shape)
        shape[axis] = stop - start
        view = np.lib.stride_tricks.as_strided(buf[:nbytes].view(dtype), shape, probe.strides, writeable=True)
        return start, buf, nbytes, view

    def finished(strip):
        start, buf, nbytes, _ = strip
        _check_strip(finite, buf[:nbytes].view(dtype), start * stride // dtype.itemsize, route, stored)
        return buf[:nbytes], functools.partial(pool.put, buf)

    reads = collections.deque()
    blocks = iter(chunk_blocks(probe.shape, chunks, axis))  # chunk columns of `axis` in order
    while True:
        while len(reads) < prefetch and (idx := next(blocks, None)) is not None:
            reads.append((idx, region[idx].read()))
        if not reads:
            break
        idx, future = reads.popleft()
        start = idx[axis].start // run * run
        if strip is None or strip[0] != start:
            if strip is not None:
                yield finished(strip)
            strip = new_strip(start)
        local = idx[:axis] + (slice(idx[axis].start - start, idx[axis].stop - start),) + idx[axis + 1:]
        copy_blocked(strip[3][local], future.result())
    if strip is not None:
        yield finished(strip)


def _check_strip(finite: FiniteCheck | None, values: np.ndarray, offset: int, route: TensorRoute,
                 stored: np.dtype) -> None:
    """``values``: HF elements ``offset``... of ``route``'s tensor, in HF (C) order."""
    if finite is None:
        return
    bad = finite.first_bad(values)
    if bad is None:
        return
    index = [int(i) for i in np.unravel_index(offset + bad, route.hf_shape)]
    where = f"tensor {route.hf_key!r}" + (f" (layer {route.layer})" if route.layer is not None else "")
    cast = "" if stored == values.dtype else f", or a value beyond the range of {values.dtype.name},"
    raise NonFiniteError(f"{route.item}/{route.leaf}: {where} holds NaN or Inf{cast} (first at {index}); "
                         "a checkpoint's weights must be finite")


def _write_files(directory: str, plan, routes: dict[str, TensorRoute], leaves, dtypes: dict[str, np.dtype],
                 ledger: Ledger, bar, source: str, check_finite: bool = True) -> None:
    pool = BufferPool()
    finite = FiniteCheck() if check_finite else None
    for name, keys in plan:
        writer = SafetensorsStreamWriter(os.path.join(directory, name),
                                         [(k, dtypes[k], routes[k].hf_shape) for k in keys], {"format": "pt"})
        try:
            for key in keys:
                ledger.use(key)
                route = routes[key]
                writer.write_parts(key, iter_hf_strips(leaves[route.leaf], route, dtypes[key], pool, finite=finite),
                                   bar.update)
        except NonFiniteError as e:
            writer.abort()
            raise NonFiniteError(f"{source}/{e}") from None
        except BaseException:
            writer.abort()
            raise
        writer.close()


def _adapter_config(meta_lora: dict | None, rank: int, scale: float) -> dict:
    """The source's PEFT config when it still matches the stored rank and scale, else a minimal one."""
    recorded = (meta_lora or {}).get("adapter_config")
    if recorded and int(recorded.get("r", -1)) == rank and float(recorded.get("lora_alpha", 0)) / rank == scale:
        return recorded
    return peft_adapter_config(rank, scale * rank)


def _torch_dtype_name(dtypes) -> str | None:
    names = {np.dtype(d).name for d in dtypes}
    return names.pop() if len(names) == 1 else None


def _open_converted(src: str) -> tuple[CheckpointFiles, dict, NLDConfig, VisionConfig | None]:
    """The files, metadata and config of a converted checkpoint, every file read under the
    library's rule (:class:`CheckpointFiles`); the zarr arrays, which tensorstore opens itself,
    are checked file by file (:meth:`CheckpointFiles.check_tree`) before they are opened."""
    refuse_non_directory(src)
    files = CheckpointFiles(src)
    if files.exists(METADATA_FILE):
        files.path(METADATA_FILE)
    meta = read_metadata(files.directory)  # says "not a converted checkpoint" when it has none
    stored = quantization_of_metadata(meta, files)
    if stored is not None:
        # Refused rather than dequantized: bf16 tensors rebuilt from int8 look like NVIDIA's
        # original but are not it, and nothing in safetensors would record the loss.
        raise CheckpointError(f"{src} is quantized ({stored}); --reverse writes NVIDIA's unquantized layout and "
                              "would have to dequantize it, which is lossy. Reverse the unquantized checkpoint it "
                              "was made from (or keep NVIDIA's original safetensors)")
    config, vision_config = read_configs(files)
    files.check_tree(PARAMS_ITEM)
    return files, meta, config, vision_config


def convert_orbax_to_hf(src, dst, *, dtype=None, lora: bool = True, overwrite: bool = False,
                        verify: bool = False, progress: bool = True,
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, check_finite: bool = True) -> ConversionReport:
    """Write the converted checkpoint ``src`` back as an HF safetensors directory ``dst``.

    ``dtype``: None / "keep" writes each tensor in its stored dtype; "bfloat16" / "float32"
    casts the base weights (the LoRA keeps its dtype). A weight holding NaN or Inf (or one a
    cast would overflow) is refused by name unless ``check_finite=False``.
    """
    t0 = time.perf_counter()
    requested = parse_dtype(dtype)
    src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
    remove_leftovers(dst)
    check_destination(dst, overwrite)
    files, meta, config, vision_config = _open_converted(src)
    key_map = KeyMap.for_params(config)
    leaves = open_item(os.path.join(src, PARAMS_ITEM))
    key_map.check_stored(*stored_shapes(leaves), os.path.join(src, PARAMS_ITEM))
    routes = {r.hf_key: r for r in key_map.routes}
    key_maps = [key_map]
    if vision_config is not None:  # a VLM: the tower and projector go into the same shards
        if not files.is_dir(VISION_ITEM):
            raise CheckpointError(f"{src}: config.json describes a vision-language model but there is no "
                                  f"{VISION_ITEM}/ item (the vision tower's weights)")
        files.check_tree(VISION_ITEM)
        vision_map = KeyMap.for_vision(vision_config)
        vision_leaves = open_item(os.path.join(src, VISION_ITEM))
        vision_map.check_stored(*stored_shapes(vision_leaves), os.path.join(src, VISION_ITEM))
        leaves = {**leaves, **vision_leaves}  # leaf names differ: tower.* / projector.* vs the text model's
        routes.update({r.hf_key: r for r in vision_map.routes})
        key_maps.append(vision_map)
    lora_map = lora_leaves = None
    if lora and files.exists(LORA_ITEM):
        files.check_tree(LORA_ITEM)
        lora_leaves = open_item(os.path.join(src, LORA_ITEM))
        shapes, dtypes = stored_shapes(lora_leaves)
        if len(shapes.get("A", ())) != 4 or shapes.get("scale") != ():
            raise CheckpointError(f"{src}/{LORA_ITEM}: needs arrays 'A' [L, H, Dh, r] and a scalar 'scale'")
        lora_map = KeyMap.for_lora(config, shapes["A"][-1])
        lora_map.check_stored(shapes, dtypes, os.path.join(src, LORA_ITEM), extra_ok={"scale": ()})
    check_not_overlapping(src, dst)

    out_dtypes = {k: requested if requested is not None else np.dtype(leaves[r.leaf].dtype.numpy_dtype)
                  for k, r in routes.items()}
    sizes = {k: int(np.prod(r.hf_shape)) * out_dtypes[k].itemsize for k, r in routes.items()}
    plan = plan_shards(sizes, max_shard_bytes, (meta.get("hf_layout") or {}).get("weight_map"))
    total = sum(sizes.values())
    if lora_map is not None:
        lora_routes = {r.hf_key: r for r in lora_map.routes}
        lora_dtypes = {k: np.dtype(lora_leaves[r.leaf].dtype.numpy_dtype) for k, r in lora_routes.items()}
        lora_sizes = {k: int(np.prod(r.hf_shape)) * lora_dtypes[k].itemsize for k, r in lora_routes.items()}
        total += sum(lora_sizes.values())

    ledger = Ledger(key_maps + ([lora_map] if lora_map else []))
    with terminate_as_exit(), atomic_output_dir(dst, overwrite) as tmp:
        with _progress_bar(total, progress, "nld-convert --reverse") as bar:
            _write_files(tmp, plan, routes, leaves, out_dtypes, ledger, bar, src, check_finite)
            write_index(tmp, plan, sizes)
            if lora_map is not None:
                lora_dir = os.path.join(tmp, LORA_DIR)
                os.mkdir(lora_dir)
                _write_files(lora_dir, [(ADAPTER_FILE, list(lora_routes))], lora_routes, lora_leaves,
                             lora_dtypes, ledger, bar, src, check_finite)
                rank = int(lora_leaves["A"].shape[-1])
                scale = float(lora_leaves["scale"].read().result())
                with open(os.path.join(lora_dir, ADAPTER_CONFIG), "w") as f:
                    json.dump(_adapter_config(meta.get("lora"), rank, scale), f, indent=2)
        ledger.check_complete()
        copy_side_files(files, tmp)
        _record_dtype(os.path.join(tmp, "config.json"), _torch_dtype_name(out_dtypes.values()))
        report = ConversionReport(src, dst, ledger.used, total, 0.0,
                                  {PARAMS_ITEM: sorted({d.name for d in out_dtypes.values()})}, lora_map is not None)
        report.seconds = time.perf_counter() - t0  # the conversion itself, without --verify
        if verify:
            report.verify = verify_conversion(src, tmp)
    return report


def _record_dtype(config_path: str, dtype_name: str | None) -> None:
    """Keep config.json byte-identical unless the weights' dtype changed from what it says."""
    if dtype_name is None:
        return
    with open(config_path) as f:
        cfg = json.load(f)
    fields = [k for k in ("torch_dtype", "dtype") if k in cfg]
    if all(cfg[k] == dtype_name for k in fields) and fields:
        return
    for k in fields or ["torch_dtype"]:
        cfg[k] = dtype_name
    with open(config_path, "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
