"""NVIDIA HF safetensors -> converted Orbax checkpoint, one tensor (one slab) at a time.

Order of work: validate everything that can be validated from headers and config (nothing is
written before that), then stream each source tensor, in file order, into its slot of the
Orbax arrays while a background thread hashes the source files, then write the side files
and metadata, optionally verify logits, and only then rename the result into place.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from nld_jax.checkpoint.hf import CheckpointError, INDEX_FILE, LORA_DIR
from nld_jax.checkpoint.orbax import LORA_ITEM, METADATA_FILE, PARAMS_ITEM
from nld_jax.loading import resolve_dtype

from checkpoints_convert.atomic_output import atomic_output_dir, check_not_overlapping, terminate_as_exit
from checkpoints_convert.hf_source import TensorFiles, copy_side_files, open_hf_source
from checkpoints_convert.key_map import KeyMap, Ledger
from checkpoints_convert.orbax_io import CHUNK_BYTES, ItemWriter, write_step_metadata
from checkpoints_convert.provenance import FileHasher, build_metadata, write_json
from checkpoints_convert.streaming import PendingWrites
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


def _convert_item(item_dir: str, tensors: TensorFiles, key_map: KeyMap, requested: np.dtype | None,
                  ledger: Ledger, bar, chunk_bytes: int, extra: dict[str, np.ndarray] | None = None) -> dict:
    writer = ItemWriter(item_dir, chunk_bytes)
    leaf_dtypes = key_map.leaf_dtypes(tensors.dtype, requested)
    for leaf, spec in key_map.leaves.items():
        writer.create(leaf, spec.shape, leaf_dtypes[leaf], spec.stacked)
    pending = PendingWrites()
    try:
        for key in tensors.order:  # file order: the source is read sequentially
            route = key_map.by_key[key]
            ledger.use(key)
            with tensors.read(key) as hf:
                view = route.to_ours(hf)  # a strided view of the mapped file, not a copy
                if view.shape != route.slot_shape:
                    raise CheckpointError(f"tensor {key!r}: layout transform gave {list(view.shape)}, "
                                          f"expected {list(route.slot_shape)}")
                writer.write_slot(route.leaf, route.layer, view, pending, bar.update)
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


def _hashed_files(src: str, source) -> list[str]:
    rel = [os.path.relpath(p, src) for p in source.weight_paths()]
    if os.path.exists(os.path.join(src, INDEX_FILE)):
        rel.append(INDEX_FILE)
    if source.lora is not None:
        rel += [os.path.relpath(os.path.join(source.lora.directory, n), src)
                for n in sorted(os.listdir(source.lora.directory)) if n.endswith(".json")]
    return rel + list(source.side_files)


def convert_hf_to_orbax(src, dst, *, dtype=None, lora: bool = True, overwrite: bool = False,
                        verify: bool = False, progress: bool = True,
                        chunk_bytes: int = CHUNK_BYTES) -> ConversionReport:
    """Convert the HF checkpoint directory ``src`` into a converted Orbax checkpoint at ``dst``.

    ``dtype``: None / "keep" (the source's dtype, bf16 for NVIDIA's checkpoints), "bfloat16" or
    "float32" for the base weights; the draft LoRA keeps its own dtype. ``lora=False`` skips the
    draft LoRA. ``verify`` compares logits before the result is put in place.
    """
    started_ns, t0 = time.time_ns(), time.perf_counter()
    requested = parse_dtype(dtype)
    src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite (overwrite=True) to replace it")
    source = open_hf_source(src, with_lora=lora)  # every check that needs no data, before any write
    check_not_overlapping(src, dst)
    key_maps = [source.key_map] + ([source.lora.key_map] if source.lora else [])
    total = sum(source.tensors.nbytes(k) for k in source.tensors.order)
    if source.lora:
        total += sum(source.lora.tensors.nbytes(k) for k in source.lora.tensors.order)

    with terminate_as_exit(), atomic_output_dir(dst, overwrite) as tmp:
        hasher = FileHasher(src, _hashed_files(src, source))
        ledger = Ledger(key_maps)
        with _progress_bar(total, progress, "nld-convert") as bar:
            dtypes = {PARAMS_ITEM: _convert_item(os.path.join(tmp, PARAMS_ITEM), source.tensors, source.key_map,
                                                 requested, ledger, bar, chunk_bytes)}
            lora_meta = None
            if source.lora is not None:
                scale = np.asarray(source.lora.alpha / source.lora.rank, np.float32)
                dtypes[LORA_ITEM] = _convert_item(os.path.join(tmp, LORA_ITEM), source.lora.tensors,
                                                  source.lora.key_map, None, ledger, bar, chunk_bytes,
                                                  extra={"scale": scale})
                lora_meta = {"rank": source.lora.rank, "alpha": source.lora.alpha,
                             "adapter_config": source.lora.adapter_config,
                             "weight_map": {k: source.lora.tensors.file_of(k) for k in source.lora.tensors.order}}
        ledger.check_complete()
        copy_side_files(src, tmp, source.side_files)  # config.json, tokenizer, generation config, code
        layout = {"weight_map": {k: source.tensors.file_of(k) for k in source.tensors.order},
                  "indexed": os.path.exists(os.path.join(src, INDEX_FILE))}
        meta = build_metadata(
            source={"kind": "hf-safetensors", "path": src, "files": hasher.result(),
                    "lora_dir": LORA_DIR if source.lora else None},
            dtypes={"requested": requested.name if requested is not None else "keep", **dtypes},
            lora=lora_meta, hf_layout=layout, side_files=source.side_files, chunk_bytes=chunk_bytes)
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
