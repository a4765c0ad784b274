"""Restoring a converted checkpoint straight into caller-given NamedShardings on an 8-device
CPU mesh (the suite's process has 8 CPU devices, see conftest.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import nld_jax
from checkpoints_convert import convert_hf_to_orbax
from nld_jax.params import flatten_tree, param_specs, tree_from_flat


def test_restore_into_8_device_cpu_mesh(golden_dir, tmp_path):
    converted = tmp_path / "orbax"
    convert_hf_to_orbax(golden_dir, converted, progress=False)
    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    # tiny: V 512, D 64, F 192, H 4, K 2: K does not divide by 4, so kv heads stay unsharded.
    rules = {"vocab": "tp", "embed": "fsdp", "mlp": "tp", "q_heads": "tp", "kv_heads": None,
             "head_dim": None, "layers": None}
    ref = nld_jax.load(golden_dir, dtype="float32", load_tokenizer_files=False)
    specs = param_specs(ref.config)
    shardings = tree_from_flat({p: NamedSharding(mesh, P(*[rules[a] for a in s.axes])) for p, s in specs.items()})
    model = nld_jax.load(converted, dtype=jnp.float32, shardings=shardings, load_tokenizer_files=False)

    want, got, refs = flatten_tree(shardings), flatten_tree(model.params), flatten_tree(ref.params)
    for path, arr in got.items():
        assert arr.sharding.is_equivalent_to(want[path], arr.ndim), (path, arr.sharding)
        local = want[path].shard_shape(arr.shape)
        assert all(s.data.shape == local for s in arr.addressable_shards), (path, local)
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(refs[path]), err_msg=path)
    assert sum(got["embed_tokens"].addressable_shards[0].data.shape) < sum(got["embed_tokens"].shape)
    for name, arr in model.lora.items():  # the LoRA goes to the same mesh
        assert isinstance(arr.sharding, NamedSharding) and arr.sharding.mesh == mesh, name
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(ref.lora[name]))
    tokens = np.array([[1, 5, 9, 200, 7, 3, 44, 12]], np.int32)
    np.testing.assert_allclose(np.asarray(nld_jax.forward(model, tokens)), np.asarray(nld_jax.forward(ref, tokens)),
                               rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="structure"):  # a wrong structure is refused by name
        nld_jax.load(converted, shardings={"embed_tokens": want["embed_tokens"]})
