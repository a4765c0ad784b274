"""One training step on a mesh of N fake CPU devices == the same step on one device.

Run by tests/test_training_sharded.py in a process of its own (the device count is fixed when
JAX starts); prints one JSON object: per mesh and mode, the loss difference and the largest
parameter difference after the step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "data", "nld-tiny")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--meshes", default="data=8;data=2,fsdp=4;data=2,fsdp=2,tensor=2")
    args = p.parse_args()
    import jax
    import jax.numpy as jnp

    import nld_jax
    from nld_jax.sharding import mesh_from_spec
    from nld_jax.training import OptimConfig, TrainConfig, init_state, make_optimizer, make_train_step, pack_documents
    from nld_jax.training.sharded import sharded_train_step

    model = nld_jax.load(TINY)
    with open(os.path.join(TINY, "golden", "cases.json")) as f:
        cases = json.load(f)
    docs = [ids[1:] for group in ("batch", "eos_batch") for ids in cases["prompts"][group]["ids"]]
    rows = jnp.asarray(pack_documents(docs * 3, 32, 1, 2)[:8])
    optimizer = make_optimizer(OptimConfig(lr=1e-3, total_steps=10, warmup_steps=1))
    lora = {"A": model.lora["A"], "B": model.lora["B"]}
    out = {"devices": jax.device_count(), "results": []}
    for mode in ("pretrain", "lora"):
        train = TrainConfig(mode=mode, block_sizes=(8,))
        trainable, frozen = (model.params, None) if mode == "pretrain" else (lora, model.params)
        scale = float(model.lora["scale"])
        step = make_train_step(model.config, train, optimizer, lora_scale=scale)
        # two steps: the first has learning rate 0 (warm-up starts at 0), the second moves the weights
        ref_state = init_state(jax.tree.map(jnp.copy, trainable), optimizer, seed=1)
        for _ in range(2):
            ref_state, ref_metrics = step(ref_state, frozen, {"tokens": rows}, jnp.int32(8))
        ref = jax.tree.map(np.asarray, ref_state.trainable)
        for spec in args.meshes.split(";"):
            mesh = mesh_from_spec(spec)
            sstep, state, sfrozen = sharded_train_step(model.config, train, optimizer,
                                                       jax.tree.map(jnp.copy, trainable), mesh, seed=1,
                                                       frozen=frozen, lora_scale=scale, batch=rows.shape[0])
            for _ in range(2):
                state, metrics = sstep(state, sfrozen, {"tokens": rows}, jnp.int32(8))
            diffs = [float(np.abs(np.asarray(a) - b).max()) for a, b in
                     zip(jax.tree.leaves(state.trainable), jax.tree.leaves(ref))]
            leaf = jax.tree.leaves(state.trainable)[0]
            moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(trainable)))
            out["results"].append({"mode": mode, "mesh": spec, "loss": float(metrics["loss"]), "moved": moved,
                                   "ref_loss": float(ref_metrics["loss"]), "max_param_diff": max(diffs),
                                   "sharded_leaf": str(leaf.sharding.spec)})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
