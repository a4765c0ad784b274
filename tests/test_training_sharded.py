"""A training step on 8 CPU devices (data, FSDP and tensor meshes) equals the one-device step.

Plain SGD (``w -= lr * g``): any error in how the mesh combines gradients (a psum where a mean
belongs, a shard counted twice) shows up in the weights as it is, where Adam's normalisation
would hide a constant factor. The gradients are compared directly too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nld_jax.params import flatten_tree
from nld_jax.sharding import mesh_from_spec
from nld_jax.training import TrainConfig, init_state, make_train_step, pack_documents
from nld_jax.training.sharded import sharded_train_step

MESHES = ("data=8", "data=2,fsdp=4", "data=2,fsdp=2,tensor=2")
LR = 0.5


@pytest.fixture(scope="module")
def rows(cases):
    docs = [ids[1:] for group in ("batch", "eos_batch") for ids in cases["prompts"][group]["ids"]]
    return jnp.asarray(pack_documents(docs * 3, 32, 1, 2)[:8])


def _trainable(tiny, mode):
    if mode == "pretrain":
        return tiny.params, None
    return {"A": tiny.lora["A"], "B": tiny.lora["B"]}, tiny.params


def _one_step(step, state, frozen, rows):
    state, metrics = step(state, frozen, {"tokens": rows}, jnp.int32(8))
    return jax.tree.map(np.asarray, state.trainable), {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("mode", ["pretrain", pytest.param("lora", marks=pytest.mark.slow)])  # lora: slow step
def test_sharded_sgd_step_equals_one_device(tiny, rows, mode):
    trainable, frozen = _trainable(tiny, mode)
    train = TrainConfig(mode=mode, block_lengths=(8,))
    scale = float(tiny.lora["scale"])
    optimizer = optax.sgd(LR)
    step = make_train_step(tiny.config, train, optimizer, lora_scale=scale)
    ref, ref_metrics = _one_step(step, init_state(jax.tree.map(jnp.copy, trainable), optimizer, seed=1), frozen, rows)
    before = flatten_tree(jax.tree.map(np.asarray, trainable))
    moved = max(float(np.abs(ref_leaf - before[k]).max()) for k, ref_leaf in flatten_tree(ref).items())
    assert moved > 1e-4  # the step changes the weights: the comparison means something
    for spec in MESHES:
        mesh = mesh_from_spec(spec)
        sstep, state, sfrozen = sharded_train_step(tiny.config, train, optimizer, jax.tree.map(jnp.copy, trainable),
                                                   mesh, seed=1, frozen=frozen, lora_scale=scale, batch=rows.shape[0])
        weights = state.trainable if mode == "pretrain" else sfrozen
        specs = [str(x.sharding.spec) for x in jax.tree.leaves(weights)]  # read before the state is donated
        got, metrics = _one_step(sstep, state, sfrozen, rows)
        assert metrics["loss"] == pytest.approx(ref_metrics["loss"], rel=1e-5), spec
        assert metrics["grad_norm"] == pytest.approx(ref_metrics["grad_norm"], rel=1e-4), spec
        flat_ref = flatten_tree(ref)
        for path, leaf in flatten_tree(got).items():
            # SGD: weight difference = LR x gradient difference; 1e-5 of the step's own size.
            np.testing.assert_allclose(leaf, flat_ref[path], atol=1e-5 * moved + 1e-7, rtol=0,
                                       err_msg=f"{spec} {path}")
        if "fsdp" in spec:  # the model weights really are split over fsdp
            assert any("fsdp" in s for s in specs), specs


def test_the_sharded_step_pins_activations_to_the_mesh(tiny, rows):
    """Under a mesh the model's activation constraints are in the compiled step (the mesh is an
    explicit argument of the runtime, not a context the step must be entered into); without a
    mesh there are none."""
    optimizer = optax.sgd(LR)
    train = TrainConfig(block_lengths=(8,), trace_block_length=True)
    mesh = mesh_from_spec("data=2,fsdp=2,tensor=2")
    sstep, state, _ = sharded_train_step(tiny.config, train, optimizer, tiny.params, mesh, batch=rows.shape[0])
    sharded_text = sstep.lower(state, None, {"tokens": rows}, jnp.int32(8)).as_text()
    plain = make_train_step(tiny.config, train, optimizer)
    plain_text = plain.lower(init_state(tiny.params, optimizer), None, {"tokens": rows}, jnp.int32(8)).as_text()
    assert sharded_text.count("sharding_constraint") >= tiny.config.L and plain_text.count("sharding_constraint") == 0
