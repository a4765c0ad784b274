"""Reading nld-jax's converted checkpoints: an Orbax composite checkpoint of zarr arrays.

Layout of a converted directory (``nld-convert`` writes it; :mod:`checkpoints_convert` holds the
writers, this module the format and the read side, so the library reads its own format alone)::

    _CHECKPOINT_METADATA        Orbax step metadata: items "params" (and "lora"), PyTree handler
    params/_METADATA            Orbax PyTree metadata: one entry per leaf
    params/<leaf path>/         one zarr array per leaf, e.g. layers.self_attn.q_proj/
    lora/...                    the draft LoRA {A, B, scale}, same format
    vision/...                  a VLM's Pixtral tower and Mistral3 projector (tower.*, projector.*,
                                nld_jax.vision.params), never quantized
    config.json, tokenizer*     copied verbatim from the source
    nld_metadata.json           format version, provenance, stored dtypes, quantization

A quantized checkpoint (``nld-convert --quantize int8``, format version 2) stores each quantized
weight as two arrays, ``<leaf>.w`` (int8 / float8, our layout) and ``<leaf>.scale`` (float32, one
per output channel), and names the scheme in ``nld_metadata.json``; which leaves are quantized is
derived from the declarations (:func:`nld_jax.params.quantized_leaves`), and integer arrays are
accepted exactly there, beside their scale, and nowhere else.

Reads return trees of arrays (never a model): :func:`read_params` and :func:`read_lora` restore
straight into the caller's shardings, each device reading only the chunks it holds. Every file of
an item is checked under the trust rule (:mod:`nld_jax.checkpoint.files`) before tensorstore
opens it, leaf names from ``_METADATA`` must be plain folder names, and a damaged item (a chunk
deleted or truncated, ``_METADATA`` not what Orbax writes) is one error naming the array:
"checkpoint DIR is damaged: array NAME unreadable (...)".
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping

import jax
import numpy as np

from nld_jax import quant
from nld_jax.checkpoint.files import CheckpointFiles, plain_name
from nld_jax.checkpoint.finite import first_nonfinite_in_placed
from nld_jax.checkpoint.hf import FLOAT_DTYPES, CheckpointError, key_listing
from nld_jax.config import NLDConfig
from nld_jax.params import ParamSpec, lora_specs, param_specs, quantized_leaves, tree_from_flat
from nld_jax.vision.config import VisionConfig
from nld_jax.vision.params import vision_specs

__all__ = ["METADATA_FILE", "FORMAT_NAME", "FORMAT_VERSION", "PLAIN_FORMAT_VERSION", "QUANTIZED_FORMAT_VERSION",
           "quantization_of_metadata", "quantization_metadata", "quantized_item_shapes", "PARAMS_ITEM", "LORA_ITEM", "VISION_ITEM", "PYTREE_METADATA",
           "STEP_METADATA", "COMMIT_FILE", "PYTREE_HANDLER", "is_converted_dir", "looks_like_orbax", "read_metadata",
           "tensorstore_context", "open_item", "stored_shapes", "check_item", "read_params", "read_vision", "read_lora",
           "lora_rank"]

METADATA_FILE = "nld_metadata.json"
FORMAT_NAME = "nld-jax-orbax"
PLAIN_FORMAT_VERSION = 1  # what unquantized checkpoints are written as (readable by older nld-jax)
QUANTIZED_FORMAT_VERSION = 2  # quantized ones: older readers say "upgrade" instead of "unknown array"
FORMAT_VERSION = QUANTIZED_FORMAT_VERSION  # the newest this nld-jax reads
PARAMS_ITEM = "params"
LORA_ITEM = "lora"
VISION_ITEM = "vision"
PYTREE_METADATA = "_METADATA"
STEP_METADATA = "_CHECKPOINT_METADATA"
COMMIT_FILE = "commit_success.txt"
# The handler name Orbax records for PyTree items (tests check it against the installed Orbax).
PYTREE_HANDLER = "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler"


def is_converted_dir(path: str | os.PathLike | CheckpointFiles) -> bool:
    """Whether ``path`` is a checkpoint written by ``nld-convert`` (Orbax), not an HF directory."""
    files = CheckpointFiles.of(path)
    return files.is_dir(PARAMS_ITEM) and files.exists(METADATA_FILE)


def looks_like_orbax(files: CheckpointFiles) -> str | None:
    """The Orbax file that makes ``files`` look like an Orbax checkpoint (e.g. ``params/_METADATA``), or None."""
    for name in (f"{PARAMS_ITEM}/{PYTREE_METADATA}", STEP_METADATA, PYTREE_METADATA):
        if files.exists(name):
            return name
    return None


def read_metadata(directory: str | os.PathLike | CheckpointFiles) -> dict:
    """``nld_metadata.json``, checked for format name and version."""
    files = CheckpointFiles.of(directory)
    if not files.exists(METADATA_FILE):
        raise CheckpointError(f"{files.directory} has no {METADATA_FILE}: not a converted NLD checkpoint")
    path = files.shown(METADATA_FILE)
    meta = files.read_json_object(METADATA_FILE)
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} is not {FORMAT_NAME!r}")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: format_version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version} is newer than this nld-jax understands "
                              f"({FORMAT_VERSION}); upgrade nld-jax")
    return meta


def quantization_metadata(scheme_name: str, leaves) -> dict:
    """The ``quantization`` entry of ``nld_metadata.json`` (writers call this)."""
    return {"scheme": quant.scheme(scheme_name).name, "storage_dtype": quant.scheme(scheme_name).storage.name,
            "scale_dtype": "float32", "granularity": "per output channel (one scale per row of NVIDIA's [out, in])",
            "leaves": sorted(leaves)}


def quantization_of_metadata(meta: dict, directory: str | os.PathLike | CheckpointFiles) -> str | None:
    """The scheme a converted checkpoint is quantized with (from its metadata), or None."""
    entry = meta.get("quantization")
    if entry is None:
        return None
    where = CheckpointFiles.of(directory).shown(METADATA_FILE)
    if not isinstance(entry, dict) or entry.get("scheme") not in quant.SCHEMES:
        raise CheckpointError(f"{where}: 'quantization' must name a scheme of {list(quant.SCHEMES)}, got {entry!r:.120}")
    if meta.get("format_version") != QUANTIZED_FORMAT_VERSION:
        raise CheckpointError(f"{where}: a quantized checkpoint must have format_version {QUANTIZED_FORMAT_VERSION}")
    return entry["scheme"]


def quantized_item_shapes(config: NLDConfig, scheme_name: str) -> tuple[dict, dict]:
    """``({array: shape}, {array: exact dtype})`` a quantized params item must hold: ``<leaf>.w``
    and ``<leaf>.scale`` for every quantized leaf, the other leaves by their own name."""
    qleaves = quantized_leaves(config)
    storage = quant.scheme(scheme_name).storage
    shapes, exact = {}, {}
    for leaf, spec in param_specs(config).items():
        if leaf in qleaves:
            shapes[leaf + ".w"], exact[leaf + ".w"] = spec.shape, storage
            shapes[leaf + ".scale"] = quant.scale_shape(spec.shape, qleaves[leaf])
            exact[leaf + ".scale"] = np.dtype(np.float32)
        else:
            shapes[leaf] = spec.shape
    return shapes, exact


def tensorstore_context():
    """No chunk cache (every chunk is read or written once); no fsync per chunk (a converted
    directory becomes visible by one rename at the end, like ``cp``, which does not fsync either)."""
    import tensorstore as ts

    return ts.Context({"cache_pool": {"total_bytes_limit": 0}, "file_io_sync": False,
                       "file_io_concurrency": {"limit": 32}})


def _damaged(item: CheckpointFiles, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {os.path.dirname(item.directory)} is damaged: {what}")


def _leaf_names(meta: dict, where: str) -> list[str]:
    """The leaf names of an Orbax ``_METADATA`` (``layers.mlp.up_proj``), each one plain folder
    name: tensorstore opens ``item/<name>``, so a name must not reach outside the item."""
    tree = meta.get("tree_metadata")
    if not isinstance(tree, dict):
        raise CheckpointError(f"{where}: 'tree_metadata' must be an object, got {type(tree).__name__}")
    names = []
    for entry in tree.values():
        keys = entry.get("key_metadata") if isinstance(entry, dict) else None
        if not isinstance(keys, list) or not keys or not all(isinstance(k, dict) and isinstance(k.get("key"), (str, int))
                                                             and not isinstance(k.get("key"), bool) for k in keys):
            raise CheckpointError(f"{where}: a tree_metadata entry has no valid 'key_metadata' ({entry!r:.120})")
        names.append(plain_name(".".join(str(k["key"]) for k in keys), where))
    return names


def open_item(item_dir: str | os.PathLike | CheckpointFiles) -> dict[str, Any]:
    """The leaves of an Orbax PyTree item as tensorstore arrays (opened lazily, read on demand).

    Reads our layout and Orbax's own saves (OCDBT, zarr3) alike, from its ``_METADATA``. Every
    file of the item is checked under the trust rule first (tensorstore opens them itself), and
    a chunk file that is missing is an error when read, never zeros.
    """
    import tensorstore as ts

    item = CheckpointFiles.of(item_dir)
    item.check_all()
    if not item.exists(PYTREE_METADATA):
        raise CheckpointError(f"{item.directory} is not an Orbax PyTree checkpoint (no {PYTREE_METADATA})")
    where = item.shown(PYTREE_METADATA)
    try:
        meta = item.read_json_object(PYTREE_METADATA)
        names = _leaf_names(meta, where)
    except CheckpointError as e:
        raise _damaged(item, str(e)) from None
    driver = "zarr3" if meta.get("use_zarr3") else "zarr"
    context = tensorstore_context()
    leaves = {}
    for name in names:
        if meta.get("use_ocdbt"):
            kvstore = {"driver": "ocdbt", "base": {"driver": "file", "path": item.real_root}, "path": name}
        else:
            kvstore = {"driver": "file", "path": os.path.join(item.real_root, name)}
        try:
            leaves[name] = ts.open({"driver": driver, "kvstore": kvstore, "fill_missing_data_reads": False},
                                   open=True, read=True, context=context).result()
        except Exception as e:  # tensorstore raises ValueError, and others for odd metadata
            raise _damaged(item, f"array {name!r} cannot be opened ({_short(e, item)})") from None
    return leaves


def _short(error: BaseException, item: CheckpointFiles) -> str:
    """The first line of a tensorstore error, without its spec dump and with paths made relative."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.split(r"\s*\[source locations=|\s*See full TensorStore details|\s*tensorstore_spec=", text)[0]
    for root in (item.real_root, item.directory):
        text = text.replace(root.rstrip(os.sep) + os.sep, "")
    return text[:300]


def stored_shapes(leaves: Mapping[str, Any]) -> tuple[dict, dict]:
    """``({leaf: shape}, {leaf: numpy dtype})`` of opened leaves."""
    return ({k: tuple(a.shape) for k, a in leaves.items()},
            {k: np.dtype(a.dtype.numpy_dtype) for k, a in leaves.items()})


def check_item(where: str, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, np.dtype],
               expected: Mapping[str, tuple[int, ...]], extra_ok: Mapping[str, tuple[int, ...]] | None = None,
               exact_dtypes: Mapping[str, np.dtype] | None = None) -> None:
    """The item holds exactly the ``expected`` floating leaves with their shapes (plus the
    ``extra_ok`` leaves, e.g. the LoRA's scalar ``scale``); an error names the offending leaf.
    ``exact_dtypes`` names the leaves that must have one exact dtype instead (a quantized
    weight's int8 ``w`` and float32 ``scale``): integers are accepted there and nowhere else."""
    exact_dtypes = dict(exact_dtypes or {})
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
        if leaf in exact_dtypes:
            if np.dtype(dtypes[leaf]) != np.dtype(exact_dtypes[leaf]):
                raise CheckpointError(f"{where}: array {leaf!r} has dtype {np.dtype(dtypes[leaf]).name}; this "
                                      f"quantized checkpoint stores it as {np.dtype(exact_dtypes[leaf]).name}")
        elif np.dtype(dtypes[leaf]).name not in FLOAT_DTYPES:
            raise CheckpointError(f"{where}: array {leaf!r} has dtype {np.dtype(dtypes[leaf]).name}; "
                                  f"weights must be one of {FLOAT_DTYPES}")


def _restore(item: CheckpointFiles, leaves: Mapping[str, Any],
             wanted: dict[str, tuple[tuple[int, ...], Any, jax.sharding.Sharding]]) -> dict:
    """``{leaf: array}``: each leaf put into its sharding, each device's slice read from the zarr
    chunks it covers.

    Read with tensorstore directly (not Orbax's restore): a chunk that is missing or truncated
    is then one error naming the array, raised here, instead of Orbax's concurrent reads failing
    together and leaving "Exception ignored in coroutine" tracebacks on stderr."""
    flat = {}
    for leaf, (shape, dtype, sharding) in wanted.items():
        slices: dict[tuple, np.ndarray] = {}  # devices holding the same slice (replication) read it once

        def read(index, leaf=leaf, dtype=np.dtype(dtype), slices=slices):
            key = tuple((s.start, s.stop, s.step) for s in index)
            if key not in slices:
                try:
                    slices[key] = np.asarray(leaves[leaf][index].read().result(), dtype=dtype)
                except Exception as e:  # tensorstore's errors carry its whole spec: keep the reason only
                    raise _damaged(item, f"array {leaf!r} unreadable ({_short(e, item)})") from None
            return slices[key]

        flat[leaf] = jax.make_array_from_callback(tuple(shape), sharding, read)
    return flat


def _check_finite(item: CheckpointFiles, tree: dict, stacked: Callable[[str], bool]) -> None:
    from nld_jax.params import flatten_tree

    bad = first_nonfinite_in_placed(flatten_tree(tree), stacked)
    if bad is not None:
        leaf, layer = bad
        at = "" if layer is None else f" (layer {layer})"
        raise CheckpointError(f"{item.shown(leaf)}: array {leaf!r}{at} holds NaN or Inf; refusing weights "
                              "with non-finite values")


def read_params(path: str | os.PathLike | CheckpointFiles, config: NLDConfig, dtype,
                sharding_of: Callable[[str], jax.sharding.Sharding], check_finite: bool = False,
                quantized: str | None = None, finish: Callable[[str, Any], Any] | None = None) -> dict:
    """The base weights of a converted checkpoint as a tree, each leaf restored into
    ``sharding_of(leaf path)`` in ``dtype`` (None: the stored dtype), leaf by leaf: checked for
    NaN/Inf when asked, then handed to ``finish(leaf path, array)`` when given.

    ``quantized`` (the scheme the metadata names): quantized leaves come back as
    :class:`~nld_jax.quant.QuantizedArray` (stored integers, float32 scales in the sharding
    derived from the weight's) standing in for ``dtype``; the others as usual."""
    item = CheckpointFiles.of(path).subdirectory(PARAMS_ITEM)
    specs = param_specs(config)
    leaves = open_item(item)
    shapes, dtypes = stored_shapes(leaves)
    qleaves = quantized_leaves(config) if quantized else {}
    if quantized:
        expected, exact = quantized_item_shapes(config, quantized)
        check_item(item.directory, shapes, dtypes, expected, exact_dtypes=exact)
    else:
        check_item(item.directory, shapes, dtypes, {leaf: spec.shape for leaf, spec in specs.items()})
    flat = {}
    for leaf, spec in specs.items():
        sharding = sharding_of(leaf)
        if leaf in qleaves:
            axes = qleaves[leaf]
            scale_sh = quant.scale_sharding(sharding, axes, len(spec.shape)) or sharding
            parts = _restore(item, leaves, {leaf + ".w": (spec.shape, dtypes[leaf + ".w"], sharding),
                                            leaf + ".scale": (shapes[leaf + ".scale"], np.float32, scale_sh)})
            compute = dtypes["norm"] if dtype is None else dtype  # never quantized: the compute dtype
            value = quant.QuantizedArray(parts[leaf + ".w"], parts[leaf + ".scale"], axes, np.dtype(compute))
            checked = {leaf + ".scale": value.scale}
        else:
            value = _restore(item, leaves, {leaf: (spec.shape, dtypes[leaf] if dtype is None else dtype, sharding)})[leaf]
            checked = {leaf: value}
        if check_finite:
            _check_finite(item, checked, lambda name: spec.stacked)
        flat[leaf] = value if finish is None else finish(leaf, value)
    return tree_from_flat(flat)


def read_vision(path: str | os.PathLike | CheckpointFiles, config: VisionConfig, dtype,
                sharding_of: Callable[[str], jax.sharding.Sharding], check_finite: bool = False) -> dict:
    """A VLM's vision tower and projector (``{"tower": ..., "projector": ...}``) from the
    ``vision`` item, under the same accounting as the text weights (never quantized)."""
    files = CheckpointFiles.of(path)
    if not files.is_dir(VISION_ITEM):
        raise CheckpointError(f"{files.directory}: config.json describes a vision-language model but the "
                              f"checkpoint has no {VISION_ITEM}/ item (the vision tower's weights)")
    item = files.subdirectory(VISION_ITEM)
    specs: dict[str, ParamSpec] = vision_specs(config)
    leaves = open_item(item)
    shapes, dtypes = stored_shapes(leaves)
    check_item(item.directory, shapes, dtypes, {leaf: spec.shape for leaf, spec in specs.items()})
    flat = {}
    for leaf, spec in specs.items():
        wanted = {leaf: (spec.shape, dtypes[leaf] if dtype is None else dtype, sharding_of(leaf))}
        flat[leaf] = _restore(item, leaves, wanted)[leaf]
        if check_finite:
            _check_finite(item, {leaf: flat[leaf]}, lambda name, spec=spec: spec.stacked)
    return tree_from_flat(flat)



def lora_rank(path: str | os.PathLike | CheckpointFiles) -> int | None:
    """The rank of the stored draft LoRA, or None when the checkpoint has none."""
    files = CheckpointFiles.of(path)
    if not files.exists(LORA_ITEM):
        return None
    item = files.subdirectory(LORA_ITEM)
    shapes, _ = stored_shapes(open_item(item))
    if "A" not in shapes or len(shapes["A"]) != 4 or shapes["A"][-1] < 1:
        raise CheckpointError(f"{item.directory}: no LoRA array 'A' [L, H, Dh, r] with r >= 1")
    return int(shapes["A"][-1])


def read_lora(path: str | os.PathLike | CheckpointFiles, config: NLDConfig,
              sharding_of: Callable[[str], jax.sharding.Sharding], check_finite: bool = False) -> dict | None:
    """The draft LoRA ``{A, B, scale}`` (float32, as PEFT runs it), or None when there is none."""
    files = CheckpointFiles.of(path)
    rank = lora_rank(files)
    if rank is None:
        return None
    item = files.subdirectory(LORA_ITEM)
    leaves = open_item(item)
    shapes, dtypes = stored_shapes(leaves)
    check_item(item.directory, shapes, dtypes, {leaf: spec.shape for leaf, spec in lora_specs(config, rank).items()},
               extra_ok={"scale": ()})
    tree = tree_from_flat(_restore(item, leaves, {leaf: (shape, np.float32, sharding_of(leaf))
                                                  for leaf, shape in shapes.items()}))
    if check_finite:
        _check_finite(item, tree, lambda leaf: leaf != "scale")
    return tree
