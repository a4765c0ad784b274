"""Where a program's arrays live: one device (the weights' own placement) or a mesh with rules.

:class:`Placement` is what ``generate``, ``forward``, ``block_logits`` and the memory planner
share: it puts the weights on the mesh as their declarations say and derives the in/out
shardings of the decode program (weights and LoRA as declared, KV cache and per-row inputs over
the batch axes, results replicated). A quantized model's placement carries its quantization, so
that the shardings it derives have the quantized tree's structure.
"""

from __future__ import annotations

import dataclasses

import jax

from nld_jax.decode import DecodeInputs, DecodeOutput
from nld_jax.kv_cache import KVCache
from nld_jax.loading import NLDModel
from nld_jax.partitioning import (DEFAULT_RULES, ShardingRules, batch_shards, lora_shardings,
                                  mesh_of, named_sharding, param_shardings, place_global, put_tree, replicated)
from nld_jax.quant import Quantization, quantization_of
from nld_jax.runtime import Runtime

__all__ = ["Placement"]


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a program's arrays live: nowhere in particular (one device) or a mesh with rules."""

    mesh: jax.sharding.Mesh | None = None
    rules: ShardingRules = DEFAULT_RULES
    quantization: Quantization | None = None  # of the weights placed (None: not quantized)

    @classmethod
    def for_model(cls, model: NLDModel, mesh=None, rules: ShardingRules | None = None) -> "Placement":
        mesh = mesh if mesh is not None else mesh_of(model.params)
        return cls(mesh, rules or DEFAULT_RULES, quantization_of(model.params))

    def runtime(self, implementation: str) -> Runtime:
        return Runtime(implementation, self.mesh, self.rules)

    @property
    def batch_shards(self) -> int:
        return 1 if self.mesh is None else batch_shards(self.mesh, self.rules)

    def weights(self, model: NLDModel):
        """The model's weights and LoRA on this placement, and their shardings (None without a mesh)."""
        if self.mesh is None:
            return model.params, model.lora, None, None
        p_sh = param_shardings(model.config, self.mesh, self.rules, quantization=self.quantization)
        l_sh = None if model.lora is None else lora_shardings(model.config, self.mesh, int(model.lora["A"].shape[-1]),
                                                              self.rules)
        lora = None if model.lora is None else put_tree(model.lora, l_sh)
        return put_tree(model.params, p_sh), lora, p_sh, l_sh

    def rows(self, shape) -> jax.sharding.Sharding | None:
        """Arrays with a leading batch axis: rows over the batch axes."""
        if self.mesh is None:
            return None
        return named_sharding(("batch",) + (None,) * (len(shape) - 1), shape, self.mesh, self.rules,
                              what="inputs")

    def decode_shardings(self, config, inputs: DecodeInputs, batch: int, cache_size: int, lora_rank: int | None,
                         quantized_cache: bool = False):
        """``(in_shardings, out_shardings)`` of the decode program (None without a mesh): weights
        and LoRA as declared, cache and per-row inputs over the batch axes, scalars and results
        replicated (the results are small; every process can read them)."""
        if self.mesh is None:
            return None, None
        rep = replicated(self.mesh)
        inputs_sh = jax.tree.map(lambda x: self.rows(x.shape) if x.ndim else rep, inputs)
        cache_sh = KVCache.shardings(config, self.mesh, batch, cache_size, self.rules, quantized=quantized_cache)
        lora_sh = None if not lora_rank else lora_shardings(config, self.mesh, lora_rank, self.rules)
        in_sh = (param_shardings(config, self.mesh, self.rules, quantization=self.quantization), lora_sh, cache_sh,
                 inputs_sh)
        return in_sh, (DecodeOutput(rep, rep, rep, rep, rep), cache_sh)

    def put(self, host, sharding):
        if host is None:
            return None
        # device_put compiles nothing (jnp.asarray of a host scalar may compile a tiny program).
        return jax.device_put(host) if self.mesh is None else place_global(host, sharding)
