"""Training over a device mesh: data parallelism over ``data``, parameters (and optimiser state)
sharded over ``fsdp`` and ``tensor`` by the rules of :mod:`nld_jax.sharding`.

The weights get the shardings their declarations imply; the optimiser state inherits them
(``optimizer.init`` on sharded weights returns moments with the weights' shardings); scalars are
replicated. The train step is then jitted with these shardings as ``in_shardings`` and
``out_shardings``, so every step keeps the same layout and the state buffers are donated.
"""

from __future__ import annotations

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from nld_jax import partitioning as sh
from nld_jax.config import NLDConfig
from nld_jax.training.trainer import TrainConfig, init_state, make_train_step

__all__ = ["sharded_train_step", "batch_sharding"]


def batch_sharding(mesh, rules: sh.ShardingRules = sh.DEFAULT_RULES, batch: int | None = None) -> NamedSharding:
    """``[B, L]`` token batches: rows over the batch axes (data, fsdp) of the mesh."""
    shape = (batch or sh.batch_shards(mesh, rules), 1)
    return sh.named_sharding(("batch", None), shape, mesh, rules, what="batch")


def _replicate_the_rest(tree, mesh):
    """Leaves not yet on the mesh (step counter, PRNG key, optax counts) become replicated."""

    def put(x):
        if isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh:
            return x
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))

    return jax.tree.map(put, tree)


def sharded_train_step(config: NLDConfig, train: TrainConfig, optimizer: optax.GradientTransformation,
                       params, mesh, *, rules: sh.ShardingRules = sh.DEFAULT_RULES, seed: int = 0,
                       frozen=None, lora_scale: float | None = None, batch: int):
    """``(step, state, frozen)`` for training on ``mesh``.

    ``params`` is the trainable tree (the base weights, or the LoRA ``{"A", "B"}`` in lora mode
    with the base weights as ``frozen``). ``batch`` is the global batch size (a multiple of the
    batch shards). ``step(state, frozen, batch, block_length)`` is :func:`make_train_step`'s.
    """
    if train.mode == "lora":
        rank = int(params["A"].shape[-1])
        placed = sh.put_tree(params, {k: v for k, v in sh.lora_shardings(config, mesh, rank, rules).items()
                                      if k in params})
        frozen = sh.put_tree(frozen, sh.param_shardings(config, mesh, rules))
    else:
        placed = sh.put_tree(params, sh.param_shardings(config, mesh, rules))
    state = _replicate_the_rest(init_state(placed, optimizer, seed=seed), mesh)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    frozen_shardings = None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)
    replicated = NamedSharding(mesh, PartitionSpec())
    rows = batch_sharding(mesh, rules, batch)
    batch_shardings = {"tokens": rows} if train.mode != "sft" else {"tokens": rows, "loss_mask": rows}
    step = make_train_step(config, train, optimizer, lora_scale=lora_scale,
                           in_shardings=(state_shardings, frozen_shardings, batch_shardings, replicated),
                           out_shardings=(state_shardings, replicated), mesh=mesh, rules=rules)
    return step, state, frozen
