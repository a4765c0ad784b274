"""``nld_jax.load``: a checkpoint directory, a hub repository id (or the embedded default) ->
:class:`NLDModel`.

One walk for both formats: resolve the directory (:mod:`nld_jax.checkpoint.hub`), open its
files under the one trust rule (:class:`~nld_jax.checkpoint.files.CheckpointFiles`), read
``config.json`` once, say which layout the directory holds (or what it lacks), derive every
weight's sharding once (from the parameter declarations and the mesh, or the caller's tree, or
the first device), then restore the tensors from NVIDIA's safetensors
(:mod:`nld_jax.checkpoint.hf`) or from a converted Orbax checkpoint
(:mod:`nld_jax.checkpoint.orbax`) straight into those shardings, refusing non-finite weights.
``load(quantize="int8")`` quantizes each weight as soon as it is placed (one unquantized leaf
on the device at a time); :func:`quantize` does the same to a model already in memory.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nld_jax import partitioning, quant
from nld_jax.checkpoint import finite, hf, orbax
from nld_jax.checkpoint.directory import (CONFIG_FILE, GenerationDefaults, load_configs, read_generation_defaults,
                                          read_max_image_size)
from nld_jax.checkpoint.errors import CheckpointError
from nld_jax.checkpoint.files import CheckpointFiles
from nld_jax.checkpoint.hub import resolve_checkpoint
from nld_jax.config import NLDConfig
from nld_jax.params import flatten_tree, init_lora, init_params, param_specs, quantized_leaves, tree_from_flat
from nld_jax.tokenizer import Tokenizer, load_tokenizer
from nld_jax.vision.config import VisionConfig, resolve_image_tokens
from nld_jax.vision.params import vision_shardings, vision_specs

__all__ = ["NLDModel", "load", "quantize", "random_model", "DEFAULT_CHECKPOINT", "STDLIB_CHECKPOINT", "resolve_dtype", "stored_dtype",
           "layout_of"]

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(__file__), "assets", "default-model")
# The second embedded model: a 9.5M byte model of Python stdlib source (examples/train_tiny.py), which the
# benchmarks measure free-form decoding on.
STDLIB_CHECKPOINT = os.path.join(os.path.dirname(__file__), "assets", "stdlib-model")

_DTYPES = {"float32": jnp.float32, "f32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}


def resolve_dtype(dtype) -> Any:
    if isinstance(dtype, str):
        try:
            return _DTYPES[dtype.lower()]
        except KeyError:
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}") from None
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    return jnp.dtype(dtype).type


@dataclasses.dataclass(frozen=True)
class NLDModel:
    """Weights (one pytree), the optional draft LoRA and tokenizer, and the config. Frozen: a
    changed model is a new one (``dataclasses.replace``).

    ``params`` and ``lora`` are plain pytrees: pass them to the pure functions of
    :mod:`nld_jax.decode` inside your own ``jax.jit`` if the convenience API does not fit.
    """

    config: NLDConfig
    params: dict
    lora: dict | None = None
    tokenizer: Tokenizer | None = None
    path: str | None = None
    generation: GenerationDefaults = GenerationDefaults()  # the checkpoint's generation_config.json
    # A VLM's vision tower and projector ({"tower", "projector"}, nld_jax.vision.params) and their
    # config; None for a text-only checkpoint.
    vision: dict | None = None
    vision_config: VisionConfig | None = None

    @property
    def dtype(self):
        """The compute dtype (of a quantized model too: its weights stand in for this dtype)."""
        return self.params["embed_tokens"].dtype

    @property
    def quantization(self) -> quant.Quantization | None:
        """The weights' quantization (scheme and compute dtype), None when they are not quantized."""
        return quant.quantization_of(self.params)


def layout_of(files: CheckpointFiles) -> str:
    """``"orbax"`` (converted by ``nld-convert``) or ``"hf"`` (NVIDIA's safetensors), or an error
    that says what the directory looks like and what it lacks."""
    if orbax.is_converted_dir(files):
        return "orbax"
    if files.exists(hf.INDEX_FILE) or files.exists(hf.SINGLE_FILE):
        return "hf"
    looks = orbax.looks_like_orbax(files)
    if looks:
        raise CheckpointError(f"{files.directory} looks like an Orbax checkpoint ({looks}) but has no "
                              f"{orbax.METADATA_FILE}: nld-jax reads the Orbax checkpoints nld-convert writes "
                              "(which carry it); convert the original safetensors with nld-convert")
    pickles = [n for n in files.listdir() if n.endswith(hf.PICKLE_SUFFIXES)]
    if pickles:
        raise CheckpointError(f"{files.directory} holds only pickle weights ({', '.join(pickles)}); nld_jax "
                              "never unpickles (it can run arbitrary code). Convert them to safetensors first.")
    raise CheckpointError(f"{files.directory} holds no weights: neither {hf.SINGLE_FILE} nor {hf.INDEX_FILE} "
                          f"(NVIDIA's layout), nor {orbax.PARAMS_ITEM}/ with {orbax.METADATA_FILE} (nld-convert's "
                          "Orbax layout)")


def stored_dtype(path: str | os.PathLike | CheckpointFiles) -> str:
    """The dtype a checkpoint stores its weights in, as the model dtype to load them in
    (``"bfloat16"``, else ``"float32"``: float16 and float64 weights run in float32)."""
    files = CheckpointFiles.of(path)
    if layout_of(files) == "orbax":
        leaves = orbax.open_item(files.subdirectory(orbax.PARAMS_ITEM))
        # The final norm is never quantized: its dtype is the one a quantized checkpoint computes in.
        if "norm" not in leaves:
            raise CheckpointError(f"{files.shown(orbax.PARAMS_ITEM)}: no array 'norm'")
        dtype = np.dtype(leaves["norm"].dtype.numpy_dtype)
    else:
        ckpt = hf.HFCheckpoint(files)
        key = "encoder.embed_tokens.weight"
        if key not in ckpt:
            raise CheckpointError(f"{files.directory}: missing tensor {key!r}")
        dtype = np.dtype(ckpt.dtype(key))
    return "bfloat16" if dtype.name == "bfloat16" else "float32"


def _sharding_plan(config: NLDConfig, mesh, rules, shardings):
    """``(sharding_of(leaf), lora_sharding_of(rank) -> (leaf -> sharding))``, derived once: from
    the caller's tree, else from the declarations on ``mesh``, else the first device."""
    rules = rules or partitioning.DEFAULT_RULES
    if shardings is not None:
        flat = partitioning.flat_shardings(shardings, list(param_specs(config)), "shardings")
        if mesh is None:
            mesh = partitioning.mesh_of(list(flat.values()))
    elif mesh is not None:
        flat = flatten_tree(partitioning.param_shardings(config, mesh, rules))
    else:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return (lambda leaf: one), (lambda rank: lambda leaf: one)
    if mesh is None:  # the caller's shardings name no mesh (single devices): the LoRA goes with the embedding
        return flat.__getitem__, (lambda rank: lambda leaf: flat["embed_tokens"])
    return flat.__getitem__, (lambda rank: partitioning.lora_shardings(config, mesh, rank, rules).__getitem__)


def load(path: str | os.PathLike | None = None, dtype="float32", *, load_lora: bool = True,
         load_tokenizer_files: bool = True, mesh=None, rules=None, shardings=None,
         check_finite: bool | None = None, quantize: str | None = None) -> NLDModel:
    """Load an NLD checkpoint directory (NVIDIA's HF layout, or one converted by ``nld-convert``),
    a Hugging Face repository id (``"nvidia/Nemotron-Labs-Diffusion-8B"``: a local directory of
    that name wins; see :mod:`nld_jax.checkpoint.hub`) or the embedded default (``path=None``).

    ``dtype`` is the compute and storage dtype of the weights (bf16 on disk is upcast for
    float32; None keeps the stored dtype). The draft LoRA of ``linear_spec_lora/`` stays float32
    (as PEFT runs it).

    ``mesh`` (a ``jax.sharding.Mesh``, see :func:`nld_jax.sharding.make_mesh`) restores every
    weight straight into its sharding under ``rules`` (default :data:`nld_jax.partitioning.DEFAULT_RULES`),
    and the LoRA into its own; ``shardings`` (a tree like the weights) overrides the derived
    ones. In a multi-process run each process reads only its own devices' slices.

    ``quantize`` ("int8" or "fp8"): every matmul weight and the embedding are quantized per
    output channel as they are placed (:mod:`nld_jax.quant`; ``dtype`` is then the compute dtype,
    and the result equals ``quantize(load(...))`` exactly). A checkpoint written by
    ``nld-convert --quantize`` loads quantized without it; asking to quantize it again is an error.
    A vision-language checkpoint's tower and projector are never quantized: they stay in ``dtype``.

    ``check_finite``: a NaN or Inf in any weight raises a :class:`CheckpointError` naming the
    tensor. None (default): checked when the weights, in ``dtype``, take at most
    :data:`nld_jax.checkpoint.finite.DEFAULT_LIMIT_BYTES` (1 GiB, a VLM's vision weights
    counted), where it costs little.

    Everything read from the directory goes through :class:`CheckpointFiles` (plain names,
    symlinks only inside it or into the hub cache's blobs, regular files only); every error
    names the file.
    """
    scheme = None if quantize is None else quant.scheme(quantize).name
    files = CheckpointFiles(DEFAULT_CHECKPOINT if path is None else resolve_checkpoint(path))
    layout = layout_of(files)
    config, vision_config = load_configs(files)
    dt = resolve_dtype(stored_dtype(files) if dtype is None else dtype)
    if check_finite is None:
        vision_count = 0 if vision_config is None else sum(
            int(np.prod(spec.shape)) for spec in vision_specs(vision_config).values())
        check_finite = finite.default_on((config.num_params() + vision_count) * np.dtype(dt).itemsize)
    param_sharding_of, lora_sharding_of = _sharding_plan(config, mesh, rules, shardings)
    finish = None
    if scheme is not None:
        qleaves = quantized_leaves(config)

        def finish(leaf, x):  # right after the leaf is placed (and checked): one bf16/f32 leaf at a time
            return quant.quantize_placed(x, qleaves[leaf], scheme) if leaf in qleaves else x
    if layout == "orbax":
        stored = orbax.quantization_of_metadata(orbax.read_metadata(files), files)  # also checks format, version
        if stored is not None and scheme is not None:
            raise ValueError(f"{files.directory} is already quantized ({stored}); load it without quantize= "
                             "(its weights load as stored), or quantize the unquantized checkpoint it was made from")
        params = orbax.read_params(files, config, dt, param_sharding_of, check_finite, quantized=stored,
                                   finish=finish)
        rank = orbax.lora_rank(files) if load_lora else None
        lora = orbax.read_lora(files, config, lora_sharding_of(rank), check_finite) if rank else None
    else:
        params = hf.read_hf_params(files, config, dt, param_sharding_of, check_finite, finish=finish,
                                   vision=vision_config is not None)
        rank = hf.hf_lora_rank(files) if load_lora else None
        lora = hf.read_hf_lora(files, config, lora_sharding_of(rank), check_finite) if rank else None
    tok = load_tokenizer(files, config.bos_token_id, config.eos_token_id) if load_tokenizer_files else None
    vision = None
    if vision_config is not None:
        vision_config = resolve_image_tokens(vision_config, tok, files.shown(CONFIG_FILE), config.V)
        vision_config = dataclasses.replace(vision_config, max_image_size=read_max_image_size(files))
        vision_sharding_of = (vision_shardings(vision_config, mesh, rules) if mesh is not None
                              else lambda leaf: jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        # The tower and projector stay in dt even with quantize=: only the text decoder is quantized.
        read_vision = orbax.read_vision if layout == "orbax" else hf.read_hf_vision
        vision = read_vision(files, vision_config, dt, vision_sharding_of, check_finite)
    return NLDModel(config, params, lora, tok, files.directory, read_generation_defaults(files), vision,
                    vision_config)


def quantize(model: NLDModel, scheme: str = "int8") -> NLDModel:
    """``model`` with its matmul weights and embedding quantized per output channel ("int8" or
    "fp8"; see :mod:`nld_jax.quant`): each leaf compiled in place on its own devices and
    sharding. The norms keep the model's dtype (the compute dtype); the draft LoRA stays float32;
    a VLM's vision tower and projector are left as they are (only the text decoder is quantized).
    Quantizing a quantized model is an error (quantize the unquantized weights instead)."""
    name = quant.scheme(scheme).name
    quant.check_not_quantized(model.params)
    qleaves = quantized_leaves(model.config)
    flat = flatten_tree(model.params)
    params = tree_from_flat({leaf: quant.quantize_placed(x, qleaves[leaf], name) if leaf in qleaves else x
                             for leaf, x in flat.items()})
    return dataclasses.replace(model, params=params)


def random_model(config: NLDConfig, seed: int = 0, dtype="float32", lora_rank: int | None = None,
                 std: float = 0.02) -> NLDModel:
    """A model with random weights (tests, benchmarks, memory plans)."""
    key = jax.random.PRNGKey(seed)
    params = init_params(config, key, resolve_dtype(dtype), std=std)
    lora = None
    if lora_rank:
        lora = init_lora(config, jax.random.fold_in(key, 1), lora_rank, alpha=4.0 * lora_rank, std=std, zero_b=False)
    return NLDModel(config, params, lora, None, None)
