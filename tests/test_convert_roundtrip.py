"""HF -> Orbax -> HF is bit-exact, and the converted checkpoint gives the source's logits.

Two sources: the golden tiny checkpoint (NVIDIA's own files, single shard, draft LoRA) and a
random three-shard checkpoint built here (explicit head_dim, index json, LoRA of rank 4).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nld_jax
from nld_jax.config import NLDConfig, RopeConfig
from nld_jax.checkpoint.hf import expand_keys
from nld_jax.params import abstract_params, flatten_tree, lora_specs, param_specs

from checkpoints_convert import convert_hf_to_orbax, convert_orbax_to_hf, save_orbax
from checkpoints_convert.orbax_io import PYTREE_HANDLER
from checkpoints_convert.testing import hf_dir_tensors, random_hf_checkpoint

TINY = pathlib.Path(__file__).resolve().parent / "data" / "nld-tiny"
SMALL = NLDConfig(vocab_size=256, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                  rope=RopeConfig(theta=1e4, factor=4.0, original_max_position_embeddings=32),
                  mask_token_id=3, bos_token_id=1, eos_token_id=2, block_size=8)
TOKENS = np.array([[1, 17, 42, 99, 5, 250, 7, 8, 64, 3, 11, 12]], np.int32)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    sharded = random_hf_checkpoint(str(tmp_path_factory.mktemp("src") / "small-sharded"), SMALL,
                                   num_shards=3, lora_rank=4)
    return {"tiny": str(TINY), "sharded": sharded}


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    out = {}
    for name, src in sources.items():
        work = tmp_path_factory.mktemp(name)
        orbax_dir, hf_dir = str(work / "orbax"), str(work / "hf")
        convert_hf_to_orbax(src, orbax_dir, progress=False)
        convert_orbax_to_hf(orbax_dir, hf_dir, progress=False)
        out[name] = (src, orbax_dir, hf_dir)
    return out


@pytest.mark.parametrize("name", ["tiny", "sharded"])
def test_round_trip_is_bit_exact(converted, name):
    src, _, back = converted[name]
    original, restored = hf_dir_tensors(src), hf_dir_tensors(back)
    assert sorted(original) == sorted(restored)
    for key, (dtype, shape, raw) in original.items():
        assert restored[key][:2] == (dtype, shape), key
        assert restored[key][2] == raw, f"bytes of {key} differ"
    for rel in ("config.json", "linear_spec_lora/adapter_config.json"):
        assert json.load(open(os.path.join(src, rel))) == json.load(open(os.path.join(back, rel)))
    index = json.load(open(os.path.join(back, "model.safetensors.index.json")))
    files = {f for f in os.listdir(src) if f.endswith(".safetensors")}
    assert set(index["weight_map"].values()) == files  # the source's shard files, reproduced
    if os.path.exists(os.path.join(src, "model.safetensors.index.json")):
        assert index["weight_map"] == json.load(open(os.path.join(src, "model.safetensors.index.json")))["weight_map"]


@pytest.mark.parametrize("name", ["tiny", "sharded"])
def test_logits_from_orbax_equal_logits_from_source(converted, name):
    src, orbax_dir, _ = converted[name]
    ref = nld_jax.load(src, dtype="float32")
    out = nld_jax.load(orbax_dir, dtype="float32")  # nld_jax.load reads both formats
    assert out.config == ref.config
    np.testing.assert_array_equal(np.asarray(nld_jax.forward(out, TOKENS)), np.asarray(nld_jax.forward(ref, TOKENS)))
    prefix, block = TOKENS[:, :6], TOKENS[:, 6:]
    np.testing.assert_array_equal(np.asarray(nld_jax.block_logits(out, prefix, block, use_lora=True)),
                                  np.asarray(nld_jax.block_logits(ref, prefix, block, use_lora=True)))
    assert float(out.lora["scale"]) == float(ref.lora["scale"])
    if name == "tiny":
        assert out.tokenizer is not None and out.tokenizer.encode("hi") == ref.tokenizer.encode("hi")


def test_bf16_stays_bf16_and_keep_dtype(converted):
    _, orbax_dir, _ = converted["tiny"]
    model = nld_jax.load(orbax_dir, dtype=None, load_tokenizer_files=False)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(model.params))
    assert model.lora["A"].dtype == jnp.float32


def test_orbax_own_restore_reads_the_format(converted):
    """The output is a plain Orbax checkpoint: Orbax's own APIs restore it."""
    import orbax.checkpoint as ocp

    src, orbax_dir, _ = converted["tiny"]
    ref = nld_jax.load(src, dtype="float32", load_tokenizer_files=False)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                          abstract_params(ref.config, jnp.float32))
    restored = ocp.StandardCheckpointer().restore(os.path.join(orbax_dir, "params"), target)
    for path, value in flatten_tree(ref.params).items():
        np.testing.assert_array_equal(np.asarray(flatten_tree(restored)[path]), np.asarray(value), err_msg=path)
    as_numpy = ocp.PyTreeCheckpointer().restore(os.path.join(orbax_dir, "lora"))
    assert set(as_numpy) == {"A", "B", "scale"} and isinstance(as_numpy["A"], np.ndarray)
    handler = ocp.PyTreeCheckpointHandler
    assert PYTREE_HANDLER == f"{handler.__module__}.{handler.__qualname__}"  # the name this Orbax records


def test_float32_conversion_and_back_to_bf16(sources, tmp_path):
    src = sources["sharded"]
    report = convert_hf_to_orbax(src, tmp_path / "f32", dtype="float32", progress=False, verify=True)
    assert report.dtypes["params"]["embed_tokens"] == "float32" and report.dtypes["lora"]["A"] == "float32"
    assert report.verify is not None and not report.verify.same_dtype  # bf16 vs f32 compute: reported
    assert np.isfinite(report.verify.max_abs_diff) and report.verify.kl < 1e-3
    convert_orbax_to_hf(tmp_path / "f32", tmp_path / "bf16", dtype="bfloat16", progress=False)
    assert hf_dir_tensors(tmp_path / "bf16") == hf_dir_tensors(src)  # bf16 -> f32 -> bf16 is exact
    cfg = json.load(open(tmp_path / "bf16" / "config.json"))
    assert cfg["torch_dtype"] == "bfloat16"


def test_no_lora(sources, tmp_path):
    convert_hf_to_orbax(sources["tiny"], tmp_path / "out", lora=False, progress=False)
    assert not (tmp_path / "out" / "lora").exists()
    assert nld_jax.load(tmp_path / "out", load_tokenizer_files=False).lora is None
    convert_orbax_to_hf(tmp_path / "out", tmp_path / "back", progress=False)
    assert not (tmp_path / "back" / "linear_spec_lora").exists()


@pytest.mark.parametrize("name", ["tiny", "sharded"])
def test_save_orbax_from_memory_then_reverse(sources, tmp_path, name):
    """Fine-tuned weights go back to NVIDIA's format: in-memory model -> save_orbax -> --reverse
    gives the source's files again (shard layout and PEFT config included)."""
    src = sources[name]
    model = nld_jax.load(src, dtype="float32")
    save_orbax(model, tmp_path / "saved")
    assert (tmp_path / "saved" / "config.json").exists()
    convert_orbax_to_hf(tmp_path / "saved", tmp_path / "hf", dtype="bfloat16", progress=False)
    assert hf_dir_tensors(tmp_path / "hf") == hf_dir_tensors(src)  # LoRA included (kept float32)
    assert sorted(f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors")) == \
        sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    for rel in ("config.json", "linear_spec_lora/adapter_config.json"):
        assert json.load(open(tmp_path / "hf" / rel)) == json.load(open(os.path.join(src, rel)))


def test_reverse_reads_an_orbax_native_ocdbt_save(tmp_path):
    """Params saved by Orbax itself (OCDBT, its defaults) are read by --reverse too."""
    import orbax.checkpoint as ocp

    model = nld_jax.load(TINY, dtype="bfloat16", load_lora=False)
    save_orbax(model, tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "ckpt" / "params")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt" / "params", model.params)
    checkpointer.wait_until_finished()
    checkpointer.close()
    convert_orbax_to_hf(tmp_path / "ckpt", tmp_path / "hf", progress=False)
    got = hf_dir_tensors(tmp_path / "hf")
    want = {k: v for k, v in hf_dir_tensors(TINY).items() if k[0] == "."}
    assert got == want


def test_cli_main_round_trip_with_verify(tmp_path, capsys):
    from checkpoints_convert.cli import main

    assert main([str(TINY), str(tmp_path / "o"), "--verify", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "max |logit diff| 0," in out and "KL 0" in out
    assert main([str(tmp_path / "o"), str(tmp_path / "h"), "--reverse", "--verify", "--no-progress"]) == 0
    assert "max |logit diff| 0," in capsys.readouterr().out
    assert hf_dir_tensors(tmp_path / "h") == hf_dir_tensors(TINY)


def test_reverse_without_recorded_layout_shards_by_size(tmp_path):
    """Weights that never came from an HF directory: Hugging Face shard names, sized shards, index."""
    model = nld_jax.random_model(SMALL, seed=3, dtype="bfloat16", lora_rank=4)
    save_orbax(model, tmp_path / "saved")
    report = convert_orbax_to_hf(tmp_path / "saved", tmp_path / "hf", max_shard_bytes=40_000, progress=False)
    shards = sorted(f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.load(open(tmp_path / "hf" / "model.safetensors.index.json"))
    assert set(index["weight_map"].values()) == set(shards)
    declared = [*param_specs(SMALL).values(), *lora_specs(SMALL, 4).values()]
    assert report.tensors == sum(len(expand_keys(spec, SMALL.L)) for spec in declared)
    back = nld_jax.load(tmp_path / "hf", dtype="bfloat16", load_tokenizer_files=False)
    for path, value in flatten_tree(model.params).items():
        np.testing.assert_array_equal(np.asarray(flatten_tree(back.params)[path]), np.asarray(value), err_msg=path)
    assert float(back.lora["scale"]) == float(model.lora["scale"])
    np.testing.assert_array_equal(np.asarray(back.lora["B"]), np.asarray(model.lora["B"]))
