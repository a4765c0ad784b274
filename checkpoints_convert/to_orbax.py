"""NVIDIA HF safetensors -> converted Orbax checkpoint, one tensor (one slab) at a time.

A vision-language checkpoint's tower and projector (``encoder.vision_tower.*``,
``encoder.multi_modal_projector.*``, or transformers' Mistral3 names) go to a third item,
``vision/``, in the same pass over the files; ``--quantize`` leaves them in float.

Order of work: remove what killed runs left beside the destination, validate everything that
can be validated from headers and config (nothing is written before that), then stream each
source tensor, in file order, into its slot of the Orbax arrays (each chunk checked for NaN and
Inf on the way) while a background thread hashes the source files, then write the side files
and metadata, optionally verify logits, and only then rename the result into place.

``--quantize int8`` (or fp8) quantizes each matmul weight as its HF tensor streams past: an HF
tensor ``[out, in]`` is one layer's whole matrix, so the per-output-channel scale (the max over
each row) is computed from that tensor alone, in blocks of rows (:func:`nld_jax.quant.quantize_rows`,
bit-identical to what ``nld_jax.load(quantize=)`` computes). The quantized values are written
to ``<leaf>.w`` through the same strided, chunked writer and the scales to ``<leaf>.scale``;
a NaN or Inf anywhere in a row makes its scale non-finite, so checking the scales refuses every
non-finite weight, by name.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from nld_jax import quant
from nld_jax.checkpoint.hf import CheckpointError, LORA_DIR
from nld_jax.checkpoint.orbax import (LORA_ITEM, METADATA_FILE, PARAMS_ITEM, VISION_ITEM, is_converted_dir,
                                      quantization_metadata, quantization_of_metadata, read_metadata)
from nld_jax.loading import resolve_dtype

from checkpoints_convert.atomic_output import (atomic_output_dir, check_destination, check_not_overlapping,
                                               remove_leftovers, terminate_as_exit)
from checkpoints_convert.hf_source import TensorFiles, copy_side_files, open_hf_source
from checkpoints_convert.key_map import KeyMap, Ledger
from checkpoints_convert.orbax_io import CHUNK_BYTES, ItemWriter, write_step_metadata
from checkpoints_convert.provenance import FileHasher, build_metadata, write_json
from checkpoints_convert.streaming import FiniteCheck, NonFiniteError, PendingWrites, first_non_finite
from checkpoints_convert.verify import VerifyReport, verify_conversion

__all__ = ["ConversionReport", "convert_hf_to_orbax", "parse_dtype"]

def parse_dtype(dtype) -> np.dtype | None:
    """None / "keep" -> None (keep the source's); "bfloat16" / "float32" (as ``nld_jax.load``
    spells them) -> numpy dtype."""
    if dtype is None or (isinstance(dtype, str) and dtype.lower() == "keep"):
        return None
    try:
        return np.dtype(resolve_dtype(dtype))
    except (ValueError, TypeError):
        raise ValueError(f"dtype must be bfloat16, float32 or keep, got {dtype!r}") from None


@dataclasses.dataclass
class ConversionReport:
    source: str
    destination: str
    tensors: int
    bytes_read: int
    seconds: float
    dtypes: dict
    lora: bool
    verify: VerifyReport | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        rate = self.bytes_read / max(self.seconds, 1e-9) / 2**20
        lines = [f"wrote {self.destination}: {self.tensors} tensors, {self.bytes_read / 2**20:.1f} MiB read in "
                 f"{self.seconds:.2f} s ({rate:.0f} MiB/s); LoRA: {'yes' if self.lora else 'no'}"]
        lines += self.notes
        if self.verify is not None:
            lines.append(self.verify.summary())
        return "\n".join(lines)


def _progress_bar(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled,
                dynamic_ncols=True)


def _non_finite(tensors: TensorFiles, key: str, layer: int | None, source: np.ndarray,
                stored: np.dtype) -> NonFiniteError:
    where = f"{os.path.join(tensors.directory, tensors.file_of(key))}: tensor {key!r}"
    where += f" (layer {layer})" if layer is not None else ""
    index = first_non_finite(source)
    if index is None:  # finite in the source: the cast to the stored dtype overflowed
        return NonFiniteError(f"{where} has values beyond the range of {stored.name}, which would be stored as Inf; "
                              "keep the source's dtype")
    return NonFiniteError(f"{where} holds NaN or Inf (first at {list(index)}); a checkpoint's weights must be finite")


def _write_quantized(writer: ItemWriter, route, spec, hf: np.ndarray, scheme: quant.Scheme, pending: PendingWrites,
                     finite: FiniteCheck | None) -> None:
    """One HF matrix ``[out, in]`` quantized per row into ``<leaf>.w`` (our layout, through the
    route's strided view of the quantized rows) and ``<leaf>.scale``."""
    q, scale = quant.quantize_rows(hf, scheme.name)
    slot_scale = spec.scale_shape[1:] if spec.stacked else spec.scale_shape
    if scale.size != int(np.prod(slot_scale)):
        raise CheckpointError(f"tensor {route.hf_key!r}: {scale.size} output channels for a scale of shape "
                              f"{list(slot_scale)}")
    # HF rows are the output channels in row-major order of our free axes, whatever the transform.
    writer.write_slot(route.leaf + ".scale", route.layer, scale.reshape(slot_scale), pending, None, finite)
    writer.write_slot(route.leaf + ".w", route.layer, route.to_ours(q), pending)


def _convert_item(item_dir: str, tensors: TensorFiles, key_map: KeyMap, requested: np.dtype | None,
                  ledger: Ledger, bar, chunk_bytes: int, extra: dict[str, np.ndarray] | None = None,
                  check_finite: bool = True, scheme: quant.Scheme | None = None) -> dict:
    writer = ItemWriter(item_dir, chunk_bytes)
    leaf_dtypes = key_map.leaf_dtypes(tensors.dtype, requested)
    quantized = {leaf for leaf, spec in key_map.leaves.items() if scheme is not None and spec.contracting}
    for leaf, spec in key_map.leaves.items():
        if leaf in quantized:
            writer.create(leaf + ".w", spec.shape, scheme.storage, spec.stacked)
            writer.create(leaf + ".scale", spec.scale_shape, np.float32, spec.stacked)
        else:
            writer.create(leaf, spec.shape, leaf_dtypes[leaf], spec.stacked)
    finite = FiniteCheck() if check_finite else None
    pending = PendingWrites()
    try:
        for key in tensors.order:  # file order: the source is read sequentially
            if key not in key_map.by_key:  # another item's (a VLM's text and vision share the files)
                continue
            route = key_map.by_key[key]
            ledger.use(key)
            with tensors.read(key) as hf:
                if route.leaf in quantized:
                    try:
                        _write_quantized(writer, route, key_map.leaves[route.leaf], hf, scheme, pending, finite)
                    except NonFiniteError:
                        raise _non_finite(tensors, key, route.layer, hf, np.dtype(np.float32)) from None
                    bar.update(hf.nbytes)
                    del hf
                    continue
                view = route.to_ours(hf)  # a strided view of the mapped file, not a copy
                if view.shape != route.slot_shape:
                    raise CheckpointError(f"tensor {key!r}: layout transform gave {list(view.shape)}, "
                                          f"expected {list(route.slot_shape)}")
                try:
                    writer.write_slot(route.leaf, route.layer, view, pending, bar.update, finite)
                except NonFiniteError:
                    raise _non_finite(tensors, key, route.layer, hf, leaf_dtypes[route.leaf]) from None
                del view, hf  # release the mapping before the next tensor is mapped
        for leaf, value in (extra or {}).items():
            writer.create(leaf, value.shape, value.dtype, stacked=False)
            writer.write_slot(leaf, None, value, pending)
        pending.drain()
    except BaseException:
        pending.settle()  # no write may land in the directory while it is being removed
        raise
    writer.finalize()
    return {leaf: dt.name for leaf, dt in writer.dtypes.items()}


def _refuse_converted_source(src: str, quantize: str | None) -> None:
    """A converted (Orbax) directory is not a source of this direction; say what it is."""
    if not os.path.isdir(src) or not is_converted_dir(src):
        return
    stored = quantization_of_metadata(read_metadata(src), src)
    if stored is not None:
        raise CheckpointError(f"{src} is already quantized ({stored}) by nld-convert; quantize the original "
                              "safetensors checkpoint instead (quantizing twice would compound the rounding)")
    raise CheckpointError(f"{src} is already a converted (Orbax) checkpoint; nld-convert SRC DST reads NVIDIA's "
                          "safetensors (--reverse turns a converted checkpoint back into them"
                          + (", which --quantize can then take" if quantize else "") + ")")


def convert_hf_to_orbax(src, dst, *, dtype=None, lora: bool = True, overwrite: bool = False,
                        verify: bool = False, progress: bool = True, chunk_bytes: int = CHUNK_BYTES,
                        check_finite: bool = True, quantize: str | None = None) -> ConversionReport:
    """Convert the HF checkpoint directory ``src`` into a converted Orbax checkpoint at ``dst``.

    ``dtype``: None / "keep" (the source's dtype, bf16 for NVIDIA's checkpoints), "bfloat16" or
    "float32" for the base weights; the draft LoRA keeps its own dtype. ``lora=False`` skips the
    draft LoRA. ``verify`` compares logits before the result is put in place. A weight holding
    NaN or Inf is refused by name; ``check_finite=False`` converts it anyway (to inspect a broken
    checkpoint, and to measure what the check costs). ``quantize`` ("int8" / "fp8"): every
    matmul weight and the embedding are stored quantized per output channel (``dtype`` then
    applies to the norms, which are the compute dtype when loaded); the LoRA stays float32.
    """
    started_ns, t0 = time.time_ns(), time.perf_counter()
    requested = parse_dtype(dtype)
    scheme = None if quantize is None else quant.scheme(quantize)
    src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
    remove_leftovers(dst)
    check_destination(dst, overwrite)
    _refuse_converted_source(src, quantize)
    source = open_hf_source(src, with_lora=lora)  # every check that needs no data, before any write
    check_not_overlapping(src, dst)
    key_maps = [source.key_map] + ([source.vision_key_map] if source.vision_key_map else []) \
        + ([source.lora.key_map] if source.lora else [])
    total = sum(source.tensors.nbytes(k) for k in source.tensors.order)
    if source.lora:
        total += sum(source.lora.tensors.nbytes(k) for k in source.lora.tensors.order)

    with terminate_as_exit(), atomic_output_dir(dst, overwrite) as tmp:
        hasher = FileHasher(source.read_files())
        ledger = Ledger(key_maps)
        with _progress_bar(total, progress, "nld-convert") as bar:
            dtypes = {PARAMS_ITEM: _convert_item(os.path.join(tmp, PARAMS_ITEM), source.tensors, source.key_map,
                                                 requested, ledger, bar, chunk_bytes, check_finite=check_finite,
                                                 scheme=scheme)}
            if source.vision_key_map is not None:  # a VLM: the tower and projector, never quantized
                dtypes[VISION_ITEM] = _convert_item(os.path.join(tmp, VISION_ITEM), source.tensors,
                                                    source.vision_key_map, requested, ledger, bar, chunk_bytes,
                                                    check_finite=check_finite)
            lora_meta = None
            if source.lora is not None:
                scale = np.asarray(source.lora.alpha / source.lora.rank, np.float32)
                dtypes[LORA_ITEM] = _convert_item(os.path.join(tmp, LORA_ITEM), source.lora.tensors,
                                                  source.lora.key_map, None, ledger, bar, chunk_bytes,
                                                  extra={"scale": scale}, check_finite=check_finite)
                lora_meta = {"rank": source.lora.rank, "alpha": source.lora.alpha,
                             "adapter_config": source.lora.adapter_config,
                             "weight_map": {k: source.lora.tensors.file_of(k) for k in source.lora.tensors.order}}
        ledger.check_complete()
        copy_side_files(source.files, tmp, source.side_files)  # config.json, tokenizer, generation config, code
        layout = {"weight_map": {k: source.tensors.file_of(k) for k in source.tensors.order},
                  "indexed": source.tensors.index_file is not None}
        meta = build_metadata(
            source={"kind": "hf-safetensors", "path": src, "files": hasher.result(),
                    "lora_dir": LORA_DIR if source.lora else None},
            dtypes={"requested": requested.name if requested is not None else "keep", **dtypes},
            lora=lora_meta, hf_layout=layout, side_files=source.side_files, chunk_bytes=chunk_bytes,
            quantization=None if scheme is None else quantization_metadata(
                scheme.name, [leaf for leaf, spec in source.key_map.leaves.items() if spec.contracting]))
        write_json(os.path.join(tmp, METADATA_FILE), meta)
        write_step_metadata(tmp, list(dtypes), started_ns)
        report = ConversionReport(src, dst, ledger.used, total, 0.0, dtypes, source.lora is not None)
        report.notes += [f"note: ignored {p} (not listed in the index)" for p in source.tensors.ignored]
        if lora and source.lora is None:
            report.notes.append("note: the source has no draft LoRA (linear_spec_lora/)")
        report.seconds = time.perf_counter() - t0  # the conversion itself, without --verify
        if verify:
            report.verify = verify_conversion(src, tmp)
    return report
