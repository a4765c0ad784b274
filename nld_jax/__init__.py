"""nld-jax: Nemotron-Labs-Diffusion in JAX.

One checkpoint, three decoding modes (autoregressive, block diffusion, linear self-speculation),
all as pure functions that ``jax.jit`` compiles.

Quick start::

    import nld_jax
    model = nld_jax.load()                      # the embedded default, or a checkpoint directory
    out = nld_jax.generate(model, ["def fib(n):"], mode="spec", max_new_tokens=64)
    print(out.text[0], out.nfe[0])
"""

from nld_jax.checkpoint.hf import CheckpointError
from nld_jax.checkpoint.directory import load_hf_config
from nld_jax.config import ConfigError, NLDConfig, PRESETS, RopeConfig, config_from_hf, preset
from nld_jax.decode import DecodeInputs, DecodeOptions, DecodeOutput, decode, decode_jit
from nld_jax.generate import GenerationResult, NonFiniteError, generate
from nld_jax.inference import block_logits, forward
from nld_jax.kv_cache import KVCache
from nld_jax.loading import NLDModel, load, quantize, random_model
from nld_jax.quant import QuantizedArray
from nld_jax.partitioning import DEFAULT_RULES, ShardingError, ShardingRules
from nld_jax.runtime import Runtime
from nld_jax.sharding import make_mesh, shard_model

__version__ = "0.2.0"

__all__ = [
    "load", "generate", "forward", "block_logits", "random_model", "quantize", "QuantizedArray",
    "NLDModel", "NLDConfig", "RopeConfig", "GenerationResult", "PRESETS", "preset",
    "config_from_hf", "load_hf_config", "ConfigError", "CheckpointError", "NonFiniteError",
    "decode", "decode_jit", "DecodeOptions", "DecodeInputs", "DecodeOutput", "KVCache", "Runtime",
    "make_mesh", "ShardingRules", "DEFAULT_RULES", "ShardingError", "shard_model",
]
