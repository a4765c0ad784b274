"""Generation and forward passes over a device mesh: ``jax.jit`` with explicit in/out shardings.

The decode functions of :mod:`nld_jax.decode` are mesh-agnostic; this module compiles them with
every argument and result placed by :mod:`nld_jax.sharding`'s rules:

* weights and LoRA: from their declarations in :mod:`nld_jax.params`;
* KV cache ``[L, B, S, K, Dh]``: batch over data/fsdp, KV heads over tensor (donated, so the
  returned cache reuses the buffer);
* prompts and lengths: batch over data/fsdp; temperature, threshold and key replicated;
* results (tokens, counts, NFE): replicated, so that every process can read them (they are
  small next to the cache; the gather is one collective at the end of generation).

Tracing happens under ``jax.set_mesh(mesh)`` with the rules as a static argument, so the
activation constraints in the model (:func:`nld_jax.sharding.constrain`) see the mesh.
:func:`compile_decode` works on abstract shapes only (``nld-plan`` uses it to size models
that are never loaded); :func:`generate_sharded` is the convenience wrapper for loaded models.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from nld_jax.config import NLDConfig
from nld_jax.decode import DecodeInputs, DecodeOptions, DecodeOutput, cache_size_for, decode
from nld_jax.generate import GenerationResult, bucket_length, make_options, prepare_prompts
from nld_jax.inference import block_logits_fn
from nld_jax.kv_cache import KVCache
from nld_jax.loading import NLDModel
from nld_jax.model import forward_logits
from nld_jax.params import abstract_params, lora_specs
from nld_jax.sharding import (DEFAULT_RULES, ShardingRules, batch_shards, cache_shardings, lora_shardings,
                              logical_rules, named_sharding, param_shardings, place_global, put_tree, replicated)

__all__ = ["DecodeLayout", "decode_layout", "decode_program", "abstract_decode_args", "compile_decode",
           "model_mesh", "shard_model", "generate_sharded", "forward_sharded", "block_logits_sharded"]


@dataclasses.dataclass(frozen=True)
class DecodeLayout:
    """The sharding of every argument and result of the decode program."""

    params: Any
    lora: Any
    cache: KVCache
    inputs: DecodeInputs
    output: DecodeOutput


def decode_layout(config: NLDConfig, mesh: Mesh, *, batch: int, cache_size: int, lora_rank: int | None,
                  rules: ShardingRules = DEFAULT_RULES) -> DecodeLayout:
    rep = replicated(mesh)
    rows = named_sharding(("batch",), (batch,), mesh, rules, what="inputs.lengths")
    return DecodeLayout(
        params=param_shardings(config, mesh, rules),
        lora=lora_shardings(config, mesh, lora_rank, rules) if lora_rank else None,
        cache=cache_shardings(config, mesh, batch, cache_size, rules),
        inputs=DecodeInputs(tokens=named_sharding(("batch", "seq"), (batch, 1), mesh, rules, what="inputs.tokens"),
                            lengths=rows, temperature=rep, threshold=rep, key=rep),
        output=DecodeOutput(tokens=rep, num_tokens=rep, nfe=rep, decided_at=rep),
    )


def _decode_under_rules(params, lora, cache, inputs, *, config, options, rules):
    with logical_rules(rules):
        return decode(params, lora, cache, inputs, config=config, options=options)


def decode_program(config: NLDConfig, options: DecodeOptions, layout: DecodeLayout,
                   rules: ShardingRules = DEFAULT_RULES):
    """``jax.jit`` of :func:`nld_jax.decode.decode` with the layout's shardings, cache donated.

    Lower it inside ``jax.set_mesh(mesh)`` (``compile_decode`` does).
    """
    fn = functools.partial(_decode_under_rules, config=config, options=options, rules=rules)
    return jax.jit(fn, in_shardings=(layout.params, layout.lora, layout.cache, layout.inputs),
                   out_shardings=(layout.output, layout.cache), donate_argnums=(2,))


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_decode_args(config: NLDConfig, options: DecodeOptions, layout: DecodeLayout, *, batch: int,
                         prompt_len: int, cache_size: int, dtype=jnp.bfloat16, lora_rank: int | None = None):
    """``(params, lora, cache, inputs)`` as sharded ``ShapeDtypeStruct`` trees: nothing is allocated."""
    params = _abstract(abstract_params(config, dtype), layout.params)
    lora = None
    if lora_rank:
        shapes = {name: jax.ShapeDtypeStruct(spec.shape, jnp.float32) for name, spec in lora_specs(config, lora_rank).items()}
        shapes["scale"] = jax.ShapeDtypeStruct((), jnp.float32)
        lora = _abstract(shapes, layout.lora)
    cache = _abstract(jax.eval_shape(lambda: KVCache.empty(config, batch, cache_size, dtype)), layout.cache)
    inputs = DecodeInputs(tokens=jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32),
                          lengths=jax.ShapeDtypeStruct((batch,), jnp.int32),
                          temperature=jax.ShapeDtypeStruct((), jnp.float32),
                          threshold=jax.ShapeDtypeStruct((), jnp.float32),
                          key=jax.eval_shape(lambda: jax.random.PRNGKey(0)))
    return params, lora, cache, _abstract(inputs, layout.inputs)


def compile_decode(config: NLDConfig, options: DecodeOptions, mesh: Mesh, *, batch: int, prompt_len: int,
                   dtype=jnp.bfloat16, lora_rank: int | None = None, rules: ShardingRules = DEFAULT_RULES,
                   compiler_options: dict | None = None):
    """AOT-compile one mode for these shapes on ``mesh``: ``(compiled, layout, seconds)``."""
    cache_size = cache_size_for(prompt_len, options)
    layout = decode_layout(config, mesh, batch=batch, cache_size=cache_size, lora_rank=lora_rank, rules=rules)
    args = abstract_decode_args(config, options, layout, batch=batch, prompt_len=prompt_len,
                                cache_size=cache_size, dtype=dtype, lora_rank=lora_rank)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = decode_program(config, options, layout, rules).lower(*args)
    compiled = lowered.compile(compiler_options) if compiler_options else lowered.compile()
    return compiled, layout, time.perf_counter() - start


# --------------------------------------------------------------------------------------
# Loaded models
# --------------------------------------------------------------------------------------

def model_mesh(model: NLDModel) -> Mesh | None:
    """The mesh the model's weights live on (None for single-device weights)."""
    sharding = getattr(model.params["embed_tokens"], "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh) else None


def _lora_rank(lora) -> int | None:
    return None if lora is None else int(lora["A"].shape[-1])


def _on_layout(tree, shardings) -> bool:
    leaves, targets = jax.tree.leaves(tree), jax.tree.leaves(shardings)
    return all(isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(leaves, targets))


def shard_model(model: NLDModel, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> NLDModel:
    """A copy of ``model`` whose weights (and LoRA) are placed by the rules on ``mesh``."""
    params = put_tree(model.params, param_shardings(model.config, mesh, rules))
    lora = model.lora
    if lora is not None:
        lora = put_tree(lora, lora_shardings(model.config, mesh, _lora_rank(lora), rules))
    return dataclasses.replace(model, params=params, lora=lora, _cache_pool={})


_PROGRAMS: dict = {}
_MAX_PROGRAMS = 32


def _program(model: NLDModel, mesh: Mesh, rules: ShardingRules, options: DecodeOptions, batch: int, bucket: int):
    cache_size = cache_size_for(bucket, options)
    rank = _lora_rank(model.lora)
    key = (model.config, options, mesh, rules, batch, bucket, str(model.dtype), rank)
    if key in _PROGRAMS:
        return _PROGRAMS[key] + (0.0,)
    start = time.perf_counter()
    layout = decode_layout(model.config, mesh, batch=batch, cache_size=cache_size, lora_rank=rank, rules=rules)
    args = abstract_decode_args(model.config, options, layout, batch=batch, prompt_len=bucket,
                                cache_size=cache_size, dtype=model.dtype, lora_rank=rank)
    with jax.set_mesh(mesh):
        compiled = decode_program(model.config, options, layout, rules).lower(*args).compile()
    if len(_PROGRAMS) >= _MAX_PROGRAMS:
        _PROGRAMS.pop(next(iter(_PROGRAMS)))
    _PROGRAMS[key] = (compiled, layout)
    return compiled, layout, time.perf_counter() - start


def _take_cache(model: NLDModel, layout: DecodeLayout, batch: int, size: int) -> KVCache:
    cache = model._cache_pool.pop((batch, size), None)
    if cache is not None and not cache.k.is_deleted() and _on_layout(cache, layout.cache):
        return cache
    config, dtype = model.config, model.dtype
    return jax.jit(lambda: KVCache.empty(config, batch, size, dtype), out_shardings=layout.cache)()


def generate_sharded(model: NLDModel, prompts, mode: str = "ar", max_new_tokens: int = 128,
                     block_length: int | None = None, threshold: float | None = None, temperature: float = 0.0,
                     use_lora: bool = False, seed: int = 0, *, mesh: Mesh | None = None,
                     rules: ShardingRules = DEFAULT_RULES, kernels: str = "auto") -> GenerationResult:
    """:func:`nld_jax.generate` over a mesh (same arguments and results).

    ``mesh`` defaults to the mesh of the model's weights (``nld_jax.load(path, mesh=...)``);
    weights that are not on the mesh's layout yet are moved there once, in place. The batch
    is padded with copies of the last prompt to a multiple of the batch shards (rows are
    independent, so padding never changes a row's tokens); in a multi-process run every
    process passes the same prompts and receives every row's results.
    """
    mesh = mesh or model_mesh(model)
    if mesh is None:
        raise ValueError("generate_sharded needs a mesh: pass mesh=, or load the model with nld_jax.load(..., mesh=)")
    options = make_options(model, mode, max_new_tokens, block_length, threshold, temperature, use_lora, kernels)
    ids = prepare_prompts(model, prompts)
    longest = max(len(p) for p in ids)
    if longest + options.max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={options.max_new_tokens} exceeds the "
                         f"model's context of {model.config.max_position_embeddings} positions")
    rows = len(ids)
    shards = batch_shards(mesh, rules)
    batch = -(-rows // shards) * shards
    padded = ids + [ids[-1]] * (batch - rows)
    bucket = bucket_length(longest)

    compiled, layout, compile_seconds = _program(model, mesh, rules, options, batch, bucket)
    if not _on_layout(model.params, layout.params):
        model.params = put_tree(model.params, layout.params)
    if model.lora is not None and not _on_layout(model.lora, layout.lora):
        model.lora = put_tree(model.lora, layout.lora)

    tokens = np.zeros((batch, bucket), np.int32)
    for row, p in enumerate(padded):
        tokens[row, :len(p)] = p
    host_inputs = DecodeInputs(tokens=tokens, lengths=np.asarray([len(p) for p in padded], np.int32),
                               temperature=np.float32(temperature),
                               threshold=np.float32(0.0 if threshold is None else threshold),
                               key=np.asarray(jax.random.PRNGKey(seed)))
    inputs = jax.tree.map(place_global, host_inputs, layout.inputs)
    cache = _take_cache(model, layout, batch, cache_size_for(bucket, options))
    start = time.perf_counter()
    out, cache = compiled(model.params, model.lora, cache, inputs)
    out = jax.tree.map(np.asarray, out)  # replicated: readable on every process
    seconds = time.perf_counter() - start
    model._cache_pool.clear()
    model._cache_pool[(batch, cache.size)] = cache

    toks = [out.tokens[b, :out.num_tokens[b]].tolist() for b in range(rows)]
    decided = [out.decided_at[b, :out.num_tokens[b]].tolist() for b in range(rows)]
    text = [model.tokenizer.decode(t) for t in toks] if model.tokenizer is not None else None
    return GenerationResult(toks, out.nfe[:rows].tolist(), mode, seconds, text, decided, compile_seconds)


# --------------------------------------------------------------------------------------
# Logits
# --------------------------------------------------------------------------------------

def _forward_under_rules(params, tokens, *, config, rules):
    with logical_rules(rules):
        return forward_logits(params, config, tokens, attn_impl="xla")


def _block_under_rules(params, lora, prefix, block, *, config, rules):
    with logical_rules(rules):
        return block_logits_fn(params, lora, prefix, block, config=config, attn_impl="xla")


def _logits_layout(model: NLDModel, mesh: Mesh, rules: ShardingRules, *arrays):
    tok = [named_sharding(("batch", "seq"), a.shape, mesh, rules, what="tokens") for a in arrays]
    return tok, param_shardings(model.config, mesh, rules)


def forward_sharded(model: NLDModel, tokens, *, mesh: Mesh | None = None,
                    rules: ShardingRules = DEFAULT_RULES) -> jax.Array:
    """Causal logits ``[B, T, V]`` (float32) like :func:`nld_jax.forward`, computed on ``mesh``;
    the result is sharded (batch over data/fsdp, vocabulary over tensor)."""
    mesh = mesh or model_mesh(model)
    tokens = np.asarray(tokens, np.int32).reshape(-1, np.shape(tokens)[-1])
    (tok_sh,), p_sh = _logits_layout(model, mesh, rules, tokens)
    out_sh = named_sharding(("batch", "seq", "act_vocab"), (*tokens.shape, model.config.V), mesh, rules)
    fn = jax.jit(functools.partial(_forward_under_rules, config=model.config, rules=rules),
                 in_shardings=(p_sh, tok_sh), out_shardings=out_sh)
    with jax.set_mesh(mesh):
        return fn(put_tree(model.params, p_sh), place_global(tokens, tok_sh))


def block_logits_sharded(model: NLDModel, prefix, block, use_lora: bool = False, *, mesh: Mesh | None = None,
                         rules: ShardingRules = DEFAULT_RULES) -> jax.Array:
    """Diffusion-mode logits ``[B, C, V]`` like :func:`nld_jax.block_logits`, computed on ``mesh``."""
    mesh = mesh or model_mesh(model)
    prefix, block = np.asarray(prefix, np.int32), np.asarray(block, np.int32)
    (pre_sh, blk_sh), p_sh = _logits_layout(model, mesh, rules, prefix, block)
    lora = model.lora if use_lora else None
    lora_sh = lora_shardings(model.config, mesh, _lora_rank(lora), rules) if lora is not None else None
    out_sh = named_sharding(("batch", "seq", "act_vocab"), (*block.shape, model.config.V), mesh, rules)
    fn = jax.jit(functools.partial(_block_under_rules, config=model.config, rules=rules),
                 in_shardings=(p_sh, lora_sh, pre_sh, blk_sh), out_shardings=out_sh)
    with jax.set_mesh(mesh):
        return fn(put_tree(model.params, p_sh), put_tree(lora, lora_sh) if lora is not None else None,
                  place_global(prefix, pre_sh), place_global(block, blk_sh))
