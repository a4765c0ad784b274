"""Sharding rules, sharded == unsharded decoding on fake-device meshes, and the memory plan.

The suite's process has one device, so the multi-device checks run tests/_sharded_check.py in
a process of its own with XLA_FLAGS=--xla_force_host_platform_device_count=8. Rule tests use
``jax.sharding.AbstractMesh``, which needs no devices.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

import nld_jax
from nld_jax import sharding as sh
from nld_jax.config import PRESETS
from nld_jax.kv_cache import KVCache
from nld_jax.params import param_specs

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN_DIR = ROOT / "tests" / "data" / "nld-tiny"

# float32 logits of the same weights through differently ordered partial sums (tensor-parallel
# all-reduces): relative to the logit scale (~20 for the golden model).
LOGIT_ATOL = 1e-4


def abstract_mesh(data=1, fsdp=1, tensor=1):
    return AbstractMesh((data, fsdp, tensor), sh.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def tiny_config():
    return nld_jax.load_hf_config(GOLDEN_DIR)


# --------------------------------------------------------------------------------------
# Rules (no devices needed)
# --------------------------------------------------------------------------------------

def test_param_specs_follow_declarations():
    config = PRESETS["8b"]
    mesh = abstract_mesh(data=2, fsdp=2, tensor=2)
    specs = {path: sh.partition_spec(s.axes, s.shape, mesh) for path, s in param_specs(config).items()}
    assert specs["embed_tokens"] == P("tensor", "fsdp")
    assert specs["layers.self_attn.q_proj"] == P(None, "fsdp", "tensor")
    assert specs["layers.self_attn.k_proj"] == P(None, "fsdp", "tensor")
    assert specs["layers.self_attn.o_proj"] == P(None, "tensor", None, "fsdp")
    assert specs["layers.mlp.gate_proj"] == P(None, "fsdp", "tensor")
    assert specs["layers.mlp.down_proj"] == P(None, "tensor", "fsdp")
    assert specs["layers.input_layernorm"] == P(None, "fsdp")
    assert specs["diffusion_head"] == P("fsdp", "tensor")
    cache = sh.partition_spec(sh.CACHE_AXES["k"], (34, 8, 1024, 8, 128), mesh)
    assert cache == P(None, ("data", "fsdp"), None, "tensor")


def test_size_one_axes_are_dropped():
    mesh = abstract_mesh(data=8)
    assert sh.partition_spec(("vocab", "embed"), (512, 64), mesh) == P()
    assert sh.partition_spec(("batch", "seq"), (8, 16), mesh) == P("data")


def test_kv_heads_that_do_not_divide_are_replicated_with_a_warning():
    config = tiny_config()  # 4 query heads, 2 KV heads
    mesh = abstract_mesh(data=2, tensor=4)
    spec = param_specs(config)["layers.self_attn.k_proj"]
    with pytest.warns(sh.ShardingFallbackWarning, match="kv_heads=2 does not divide over mesh axis 'tensor'"):
        assert sh.partition_spec(spec.axes, spec.shape, mesh) == P()
    q = param_specs(config)["layers.self_attn.q_proj"]
    assert sh.partition_spec(q.axes, q.shape, mesh) == P(None, None, "tensor")
    notes = sh.fallback_notes(config, mesh, batch=2)
    assert any("kv_heads=2" in n for n in notes) and any("cache.k" in n for n in notes)
    with pytest.raises(sh.ShardingError, match="kv_heads=2"):
        sh.partition_spec(spec.axes, spec.shape, mesh, sh.ShardingRules(strict=True))


def test_batch_keeps_the_axes_that_divide():
    mesh = abstract_mesh(data=2, fsdp=4)
    with pytest.warns(sh.ShardingFallbackWarning, match="batch=2"):
        assert sh.partition_spec(("batch",), (2,), mesh) == P("data")
    assert sh.partition_spec(("batch",), (16,), mesh) == P(("data", "fsdp"))
    assert sh.batch_shards(mesh) == 8


def test_rules_are_hashable_and_overridable():
    rules = sh.DEFAULT_RULES.replace(vocab=None, embed=("fsdp", "data"))
    assert hash(rules) != hash(sh.DEFAULT_RULES)
    assert rules.mesh_axes("vocab") == () and rules.mesh_axes("embed") == ("fsdp", "data")
    with pytest.raises(sh.ShardingError, match="no sharding rule"):
        rules.mesh_axes("nonsense")
    with pytest.raises(sh.ShardingError, match="logical axes"):
        sh.partition_spec(("batch",), (2, 3), abstract_mesh(data=2))


def test_parse_mesh_and_make_mesh_errors():
    assert sh.parse_mesh("data=4,tensor=2") == {"data": 4, "fsdp": 1, "tensor": 2}
    assert sh.parse_mesh(None) == {"data": -1, "fsdp": 1, "tensor": 1}
    for bad, match in [("data=4,pipe=2", "unknown mesh axis"), ("data", "name=size"), ("data=x", "not an integer"),
                       ("data=-1,tensor=-1", "at most one"), ("data=0", "positive")]:
        with pytest.raises(sh.ShardingError, match=match):
            sh.parse_mesh(bad)
    mesh = sh.make_mesh()  # all (one) devices on data
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(sh.ShardingError, match="xla_force_host_platform_device_count=4"):
        sh.make_mesh(data=2, tensor=2)


def test_constrain_is_a_noop_without_a_mesh():
    x = jnp.ones((2, 3, 4))
    assert sh.constrain(x, ("batch", "seq", "act_embed")) is x
    jaxpr = jax.make_jaxpr(lambda y: sh.constrain(y, ("batch", "seq", "act_embed")))(x)
    assert "sharding_constraint" not in str(jaxpr)


def test_one_device_mesh_matches_plain_generate(tiny, cases):
    """The sharded path on a 1-device mesh (what a single GPU runs) gives the plain path's tokens."""
    from nld_jax.sharded import generate_sharded, shard_model

    prompts = [p["ids"][:n] for p, n in zip(cases["prompts"]["spec"], (24, 9, 17))]
    model = shard_model(tiny, sh.make_mesh())
    for mode, kw in [("ar", {}), ("diffusion", {"threshold": 0.9}), ("spec", {"use_lora": True})]:
        want = nld_jax.generate(tiny, prompts, mode=mode, max_new_tokens=16, block_length=8, **kw)
        got = generate_sharded(model, prompts, mode=mode, max_new_tokens=16, block_length=8, **kw)
        assert got.tokens == want.tokens and got.nfe == want.nfe, mode
    cache = model._cache_pool[next(iter(model._cache_pool))]
    assert isinstance(cache, KVCache) and cache.k.sharding.mesh.shape["data"] == 1


# --------------------------------------------------------------------------------------
# 8 fake devices, in a subprocess
# --------------------------------------------------------------------------------------

def run_check(*args: str, devices: int = 8, timeout: int = 600) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    # Share the suite's persistent compilation cache (CI sets these variables itself).
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".jax_cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_sharded_check.py"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"check failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def assert_sharded_equal(report: dict) -> None:
    assert report["devices"] == 8
    for mesh, entry in report["meshes"].items():
        for mode, kw, same in entry["tokens_equal"]:
            assert same, f"mesh {mesh}: {mode} {kw} tokens differ from one device"
        for mode, kw, same in entry["nfe_equal"]:
            assert same, f"mesh {mesh}: {mode} {kw} NFE differs from one device"
        assert entry["causal_max_abs_diff"] <= LOGIT_ATOL, (mesh, entry)
        assert entry["diffusion_max_abs_diff"] <= LOGIT_ATOL, (mesh, entry)
        assert entry["placed"] in (None, True), f"mesh {mesh}: load(mesh=) did not place weights as declared"


def test_golden_model_sharded_equals_one_device():
    """(8 data), (4 data x 2 tensor), (2 data x 4 tensor: KV heads replicated) and FSDP; weights
    loaded straight into their shardings by nld_jax.load(path, mesh=)."""
    report = run_check("--meshes", "data=8;data=4,tensor=2;data=2,tensor=4;fsdp=8", "--via-load")
    assert_sharded_equal(report)


@pytest.mark.slow
def test_golden_model_all_variants_and_mixed_mesh():
    report = run_check("--meshes", "data=2,fsdp=2,tensor=2;data=1,tensor=8;data=4,fsdp=2", "--variants", "all")
    assert_sharded_equal(report)


@pytest.mark.slow
def test_random_model_heads_sharded_and_vocab_fallback():
    # K=4 divides tensor=4 (KV heads sharded), vocab 500 does not divide tensor=8 (replicated).
    config = {"vocab_size": 500, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 16, "max_position_embeddings": 256,
              "mask_token_id": 3, "eos_token_id": 2, "bos_token_id": 1, "block_size": 8}
    report = run_check("--meshes", "data=2,tensor=4;tensor=8;data=2,fsdp=2,tensor=2", "--random", json.dumps(config))
    assert_sharded_equal(report)


@pytest.mark.slow
def test_kernels_run_on_local_shards_inside_shard_map():
    report = run_check("--meshes", "data=8;data=4,tensor=2;data=2,tensor=4", "--probe-kernels")
    assert_sharded_equal(report)
    # (local batch, query heads, KV heads, cache KV heads) per launch: data=8 -> 1 row, all heads;
    # 4x2 -> 2 rows, heads split in two; 2x4 -> KV heads replicated, so query heads are gathered.
    attention = {tuple(s) for s in report["probe"]["attention"]}
    assert {(1, 4, 2, 2), (2, 2, 1, 1), (4, 4, 2, 2)} <= attention
    # the greedy-head kernel runs per batch shard where the vocabulary is not split (data=8)
    assert [1, 512] in report["probe"]["greedy_head"]


@pytest.mark.slow
def test_orbax_checkpoint_restored_into_shardings(tmp_path):
    """nld_jax.load(converted_dir, mesh=) hands the shardings to the converter's restore."""
    convert = pytest.importorskip("checkpoints_convert")
    convert.convert_hf_to_orbax(str(GOLDEN_DIR), str(tmp_path / "orbax"), progress=False)
    report = run_check("--meshes", "data=2,tensor=4;fsdp=4,tensor=2", "--checkpoint", str(tmp_path / "orbax"),
                       "--via-load")
    assert_sharded_equal(report)
    assert all(entry["placed"] for entry in report["meshes"].values())


@pytest.mark.slow
def test_pallas_kernels_under_a_mesh():
    """The interpreted Pallas kernels (what TPU / GPU run compiled) inside shard_map."""
    pytest.importorskip("pallas_kernels.register")
    report = run_check("--meshes", "data=4,tensor=2;data=2,tensor=4", "--kernels", "pallas_interpret")
    assert_sharded_equal(report)


# --------------------------------------------------------------------------------------
# Memory plan
# --------------------------------------------------------------------------------------

def test_plan_8b_fits_one_h100_at_batch_8_and_8k(capsys):
    """The real 8B config, abstract shapes only, 1 device: fits an H100 at batch 8 and 8192 context."""
    from nld_jax.cli import plan

    assert plan.main(["--model", "8b", "--mesh", "data=1,tensor=1", "--batch", "8", "--max-len", "8192",
                      "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [m["mode"] for m in report["modes"]] == ["ar", "diffusion", "spec"]
    assert report["fits"]["h100"]["fits"], report["fits"]["h100"]
    assert not report["fits"]["v5e"]["fits"]  # 17 GB of bf16 weights alone exceed a 16 GB chip
    for m in report["modes"]:
        assert abs(m["weights"] - 2 * PRESETS["8b"].num_params()) < 1e6  # bf16, unsharded
        # [L, B, S, K, Dh] for k and v, bf16, with S <= 8192 slots
        assert m["kv_cache"] <= 2 * 34 * 8 * 8192 * 8 * 128 * 2 + 8 * 4  # + lengths [B] int32
        assert abs(m["argument_bytes"] - (m["weights"] + m["lora"] + m["kv_cache"] + m["inputs"])) < 1e6
        assert m["temporaries"] > 0 and m["compile_seconds"] > 0
    print(f"8B plan: {report['compile_seconds_total']:.1f} s to compile all three modes")


def test_plan_on_a_mesh_reexecs_with_fake_devices(capfd):
    from nld_jax.cli import plan

    assert plan.main(["--model", str(GOLDEN_DIR), "--mesh", "data=2,tensor=4", "--batch", "4", "--max-len", "256",
                      "--modes", "ar,spec", "--device", "v5e", "--json"]) == 0
    report = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert report["mesh"] == {"data": 2, "fsdp": 1, "tensor": 4}
    assert [m["mode"] for m in report["modes"]] == ["ar", "spec"] and list(report["fits"]) == ["v5e"]
    assert any("kv_heads=2" in n for n in report["notes"])  # the fallback is reported


def test_plan_table_output(capsys):
    from nld_jax.cli import plan

    plan.main(["--model", str(GOLDEN_DIR), "--batch", "2", "--max-len", "128", "--modes", "ar"])
    out = capsys.readouterr().out
    assert "per-device memory" in out and "kv_cache" in out and "compile s" in out
    assert "NVIDIA H100 80 GB" in out and "TPU v6e 32 GB" in out
