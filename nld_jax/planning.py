"""Memory plans: will this model, mesh, batch and context fit? Compiled, never allocated.

Each mode's generate program (the very program :func:`nld_jax.generate` runs, with its in/out
shardings) is AOT-compiled on abstract, sharded shapes (``ShapeDtypeStruct`` with shardings),
and ``compiled.memory_analysis()`` gives the bytes one device needs. Weights, LoRA and KV cache
are counted from their per-device shard shapes; temporaries come from the compiler's buffer
assignment.

Without enough accelerators the program is compiled for fake CPU devices (one per mesh
position). Two XLA passes are then switched off (:data:`CPU_COMPILER_OPTIONS`):

* loop-invariant code motion: XLA:CPU has no native bf16 matmul and upcasts bf16 operands to
  f32; the pass would hoist f32 copies of every stacked weight out of the decode loop (+34 GB
  for the 8B), which no accelerator does;
* constant folding: masks built only from static positions are compile-time constants; folding
  large ones on the host takes minutes at long contexts and changes no buffer size.

Remaining CPU upcasts make the CPU temporaries an upper bound for GPU and TPU (a quantized plan
included: XLA:CPU converts each int8 matrix to the compute dtype in a temporary before its dot,
where GPU and TPU compilers fuse the convert into the matmul).

``quantize`` plans int8 / fp8 weights (``w`` + per-channel float32 scales, each sharded as
its declaration says), the weights counted at their stored size; ``kv_cache="int8"`` an int8 KV
cache (with its per-vector scales).
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from nld_jax.config import NLDConfig
from nld_jax.decode import MODES, SPEC_MODES, DecodeInputs, DecodeOptions, cache_size_for, decode
from nld_jax.placement import Placement
from nld_jax.kv_cache import KVCache
from nld_jax.params import abstract_params, lora_axes
from nld_jax.partitioning import DEFAULT_RULES, ShardingRules
from nld_jax.quant import Quantization

__all__ = ["DEVICES", "CPU_COMPILER_OPTIONS", "MAX_ELEMENTS", "ModeReport", "check_extent", "plan", "fits"]

# Usable memory per device (decimal GB as sold); a plan fits if it needs <= (1 - headroom) of it.
DEVICES = {"h100": ("NVIDIA H100 80 GB", 80e9), "h200": ("NVIDIA H200 141 GB", 141e9),
           "v5e": ("TPU v5e 16 GB", 16e9), "v5p": ("TPU v5p 95 GB", 95e9), "v6e": ("TPU v6e 32 GB", 32e9)}
CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion,"
                                                  "while-loop-expensive-invariant-code-motion,constant_folding"}


@dataclasses.dataclass
class ModeReport:
    mode: str
    weights: int
    lora: int
    kv_cache: int
    inputs: int
    temporaries: int
    outputs: int  # results not aliased to a donated input
    argument_bytes: int  # what the compiler counts for the arguments (cross-check)
    compile_seconds: float

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.kv_cache + self.inputs + self.temporaries + self.outputs


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _shard_bytes(tree, shardings) -> int:
    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        total += math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
    return total


def _abstract_inputs(batch: int, prompt_len: int) -> DecodeInputs:
    sds = jax.ShapeDtypeStruct
    rows_f, rows_i = sds((batch,), jnp.float32), sds((batch,), jnp.int32)
    return DecodeInputs(tokens=sds((batch, prompt_len), jnp.int32), lengths=rows_i, temperature=rows_f,
                        threshold=rows_f, key=sds((batch, 2), jnp.uint32), max_new_tokens=rows_i, top_p=rows_f,
                        top_k=rows_i, stop_ids=sds((batch, 1), jnp.int32), stream_id=None)


# XLA refuses (and XLA:CPU aborts the process: "overflow in static extent product") an array of
# 2**63 elements or more; byte counts of 2**61 float32 elements overflow too. Plans that large
# describe no machine, so they are refused before anything is compiled.
MAX_ELEMENTS = 2**60


def check_extent(config: NLDConfig, *, batch: int, prompt_len: int, cache_len: int, width: int) -> None:
    """Refuse shapes whose largest array, the attention scores ``[B, H, T, S]`` of the prefill
    (T = the prompt) or of a step (T = a block), cannot exist."""
    scores = batch * config.num_attention_heads * max(prompt_len, width) * cache_len
    if scores >= MAX_ELEMENTS:
        raise ValueError(f"batch {batch} x context {cache_len} is too large to plan: the attention scores alone "
                         f"would hold {scores:.3g} elements per program (batch x {config.num_attention_heads} heads x "
                         f"{max(prompt_len, width)} queries x {cache_len} keys; the compiler's limit is "
                         f"{float(MAX_ELEMENTS):.3g})")


def plan(config: NLDConfig, mesh, *, batch: int, prompt_len: int, max_new_tokens: int, block_length: int,
         lora_rank: int, dtype=jnp.bfloat16, modes=MODES, rules: ShardingRules = DEFAULT_RULES,
         compiler_options=None, quantize: str | None = None, kv_cache: str | None = None) -> list[ModeReport]:
    """Compile each mode's decode program for these shapes on ``mesh`` and measure it;
    ``quantize`` ("int8" / "fp8") plans quantized weights computing in ``dtype``."""
    quantization = None if quantize is None else Quantization(quantize, dtype)
    for mode in modes:
        options = DecodeOptions(mode=mode, max_new_tokens=max_new_tokens, block_length=block_length)
        check_extent(config, batch=batch, prompt_len=prompt_len, cache_len=cache_size_for(prompt_len, options),
                     width=options.width)
    place = Placement(mesh, rules, quantization)
    reports = []
    for mode in modes:
        rank = lora_rank if mode in SPEC_MODES and lora_rank else None
        options = DecodeOptions(mode=mode, max_new_tokens=max_new_tokens, block_length=block_length,
                                use_threshold=mode == "diffusion", use_lora=rank is not None)
        size = cache_size_for(prompt_len, options)
        inputs = _abstract_inputs(batch, prompt_len)
        if kv_cache not in (None, "int8"):
            raise ValueError(f"kv_cache must be None or 'int8', got {kv_cache!r}")
        in_sh, out_sh = place.decode_shardings(config, inputs, batch, size, rank, quantized_cache=kv_cache == "int8")
        cache_dtype = jnp.int8 if kv_cache == "int8" else dtype
        params = _abstract(abstract_params(config, dtype, quantization), in_sh[0])
        lora = None
        if rank:
            lora = _abstract({k: jax.ShapeDtypeStruct(shape, jnp.float32) for k, (_, shape) in
                              lora_axes(config, rank).items()}, in_sh[1])
        cache = _abstract(jax.eval_shape(lambda: KVCache.empty(config, batch, size, cache_dtype)), in_sh[2])
        args = (params, lora, cache, _abstract(inputs, in_sh[3]))
        start = time.perf_counter()
        fn = jax.jit(lambda *a: decode(*a, config=config, options=options, runtime=place.runtime("auto")),
                     in_shardings=in_sh, out_shardings=out_sh, donate_argnums=(2,))
        lowered = fn.lower(*args)
        compiled = lowered.compile(compiler_options) if compiler_options else lowered.compile()
        seconds = time.perf_counter() - start
        mem = compiled.memory_analysis()
        reports.append(ModeReport(
            mode=mode, weights=_shard_bytes(params, in_sh[0]), lora=_shard_bytes(lora, in_sh[1]) if lora else 0,
            kv_cache=_shard_bytes(cache, in_sh[2]), inputs=_shard_bytes(args[3], in_sh[3]),
            temporaries=int(mem.temp_size_in_bytes),
            outputs=max(int(mem.output_size_in_bytes) - int(mem.alias_size_in_bytes), 0),
            argument_bytes=int(mem.argument_size_in_bytes), compile_seconds=seconds))
        del compiled
    return reports


def fits(reports: list[ModeReport], devices, headroom: float) -> dict:
    """Per device: need (the largest mode), usable memory and the verdict."""
    worst = max(r.total for r in reports)
    out = {}
    for name in devices:
        label, capacity = DEVICES[name]
        usable = capacity * (1 - headroom)
        out[name] = {"device": label, "capacity": capacity, "usable": usable, "need": worst, "fits": worst <= usable}
    return out
