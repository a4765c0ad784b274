"""Sharding rules, sharded == unsharded decoding on CPU-device meshes, and the memory plan.

The suite's process has 8 CPU devices (tests/conftest.py), so meshes of up to 8 run in-process;
single-device runs use the first one. Rule tests use ``jax.sharding.AbstractMesh``.
"""

from __future__ import annotations

import json
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

import checkpoints_convert
import nld_jax
import pallas_kernels.block_attention.api
import pallas_kernels.greedy_head.api
from nld_jax import partitioning as sh
from nld_jax.config import NLDConfig, PRESETS
from nld_jax.params import CACHE_AXES, flatten_tree, param_specs
from nld_jax.programs import PROGRAMS
from nld_jax.runtime import Runtime
from nld_jax.sharding import make_mesh, mesh_from_spec, parse_mesh, shard_model

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
    cache = sh.partition_spec(CACHE_AXES["k"], (34, 8, 1024, 8, 128), mesh)
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
    assert parse_mesh("data=4,tensor=2") == {"data": 4, "fsdp": 1, "tensor": 2}
    assert parse_mesh(None) == {"data": -1, "fsdp": 1, "tensor": 1}
    for bad, match in [("data=4,pipe=2", "unknown mesh axis"), ("data", "name=size"), ("data=x", "not an integer"),
                       ("data=-1,tensor=-1", "at most one"), ("data=0", "positive")]:
        with pytest.raises(sh.ShardingError, match=match):
            parse_mesh(bad)
    mesh = make_mesh()  # all devices on data
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(sh.ShardingError, match="xla_force_host_platform_device_count=16"):
        make_mesh(data=4, tensor=4)


def test_constrain_is_a_noop_without_a_mesh():
    x = jnp.ones((2, 3, 4))
    runtime = Runtime()
    assert runtime.constrain(x, ("batch", "seq", "act_embed")) is x
    jaxpr = jax.make_jaxpr(lambda y: runtime.constrain(y, ("batch", "seq", "act_embed")))(x)
    assert "sharding_constraint" not in str(jaxpr)


# --------------------------------------------------------------------------------------
# Sharded == one device, in-process
# --------------------------------------------------------------------------------------

# (mode, generate kwargs): the three modes; "all" adds the top-k schedule and threshold drafting.
FAST = [("ar", {}), ("diffusion", {"threshold": 0.9}), ("spec", {"use_lora": True})]
ALL = FAST + [("diffusion", {"block_length": 4, "threshold": None}), ("spec", {}),
              ("spec", {"use_lora": True, "threshold": 0.5})]


def _prompts(model, rows: int = 8) -> list[list[int]]:
    """Ragged prompts (lengths 5..40) from the golden cases, or random ids."""
    vocab = model.config.vocab_size
    if vocab == 512:
        with open(GOLDEN_DIR / "golden" / "cases.json") as f:
            cases = json.load(f)
        pool = list(cases["prompts"]["batch"]["ids"]) + [p["ids"] for p in cases["prompts"]["spec"]]
    else:
        rng = np.random.default_rng(0)
        pool = [rng.integers(4, vocab, 40).tolist() for _ in range(4)]
    lengths = [40, 24, 17, 9, 31, 5, 12, 20, 7, 33][:rows]
    return [pool[i % len(pool)][:n] for i, n in enumerate(lengths)]


def _logit_inputs(model, prompts):
    causal_in = np.asarray([q[:5] for q in prompts])
    block = np.full((len(prompts), 8), model.config.mask_token_id, np.int32)
    block[:, 0] = causal_in[:, -1]
    return causal_in, block


def _reference(model, prompts, variants):
    causal_in, block = _logit_inputs(model, prompts)
    use_lora = model.lora is not None
    return ([nld_jax.generate(model, prompts, mode=m, max_new_tokens=20, **({"block_length": 8} | kw))
             for m, kw in variants],
            np.asarray(nld_jax.forward(model, causal_in)),
            np.asarray(nld_jax.block_logits(model, causal_in, block, use_lora=use_lora)))


def assert_sharded_equal(model, sharded, mesh, prompts, variants, reference, implementation="auto"):
    """Greedy tokens and NFE equal one device's exactly; logits within the float32 tolerance."""
    ref_out, ref_causal, ref_block = reference
    for (mode, kw), want in zip(variants, ref_out):
        got = nld_jax.generate(sharded, prompts, mode=mode, max_new_tokens=20, implementation=implementation,
                               **({"block_length": 8} | kw))
        assert got.tokens == want.tokens, f"{dict(mesh.shape)}: {mode} {kw} tokens differ from one device"
        assert got.nfe == want.nfe, f"{dict(mesh.shape)}: {mode} {kw} NFE differs from one device"
    causal_in, block = _logit_inputs(model, prompts)
    causal = nld_jax.forward(sharded, causal_in, implementation=implementation)
    diff = nld_jax.block_logits(sharded, causal_in, block, use_lora=model.lora is not None,
                                implementation=implementation)
    assert causal.sharding.mesh == mesh  # the result stays on the weights' mesh
    np.testing.assert_allclose(np.asarray(causal), ref_causal, atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(diff), ref_block, atol=LOGIT_ATOL, rtol=0)


def _placed_as_declared(model, mesh) -> bool:
    expected = flatten_tree(sh.param_shardings(model.config, mesh))
    return all(x.sharding.is_equivalent_to(expected[path], x.ndim) for path, x in flatten_tree(model.params).items())


@pytest.fixture(scope="module")
def golden_reference(tiny):
    prompts = _prompts(tiny)
    return prompts, _reference(tiny, prompts, FAST)


@pytest.mark.parametrize("spec", ["data=2,tensor=4", "fsdp=8"] + [pytest.param(s, marks=pytest.mark.slow)
                                                                 for s in ("data=8", "data=4,tensor=2")])
def test_golden_model_sharded_equals_one_device(tiny, golden_reference, spec):
    """(8 data), (4 data x 2 tensor), (2 data x 4 tensor: KV heads replicated) and FSDP; weights
    loaded straight into their shardings by nld_jax.load(path, mesh=)."""
    prompts, reference = golden_reference
    mesh = mesh_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sh.ShardingFallbackWarning)
        sharded = nld_jax.load(GOLDEN_DIR, dtype="float32", mesh=mesh)
        assert _placed_as_declared(sharded, mesh) and sh.mesh_of(sharded.params) == mesh
        assert all(x.sharding.mesh == mesh for x in jax.tree.leaves(sharded.lora))
        assert_sharded_equal(tiny, sharded, mesh, prompts, FAST, reference)


def test_one_device_mesh_matches_plain_generate(tiny, cases):
    """The mesh path on a 1-device mesh (what a single GPU runs) gives the plain path's tokens."""
    prompts = [p["ids"][:n] for p, n in zip(cases["prompts"]["spec"], (24, 9, 17))]
    mesh = make_mesh(data=1)
    model = shard_model(tiny, mesh)
    for mode, kw in FAST:
        want = nld_jax.generate(tiny, prompts, mode=mode, max_new_tokens=16, block_length=8, **kw)
        got = nld_jax.generate(model, prompts, mode=mode, max_new_tokens=16, block_length=8, **kw)
        assert got.tokens == want.tokens and got.nfe == want.nfe, mode


def test_forward_and_block_logits_under_a_mesh_compile_once(tiny):
    """Bug: the sharded logit entry points re-jitted and recompiled on every call."""
    mesh = mesh_from_spec("data=2,tensor=2")
    model = shard_model(tiny, mesh)
    tokens, block = np.asarray([[1, 5, 9, 7], [1, 8, 3, 2]]), np.asarray([[7, 3, 3], [2, 3, 3]])
    first = (nld_jax.forward(model, tokens), nld_jax.block_logits(model, tokens, block))
    compiled = PROGRAMS.compilations
    again = (nld_jax.forward(model, tokens), nld_jax.block_logits(model, tokens, block))
    assert PROGRAMS.compilations == compiled
    for a, b in zip(first, again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_programs_are_keyed_by_shardings(tiny):
    """Bug: the program cache was keyed by shapes and dtypes only, so the same shapes on another
    mesh reused a program compiled for the first one."""
    tokens = np.asarray([[1, 5, 9, 7], [1, 8, 3, 2]])
    outs = {}
    for spec in ("data=2", "tensor=2"):
        mesh = mesh_from_spec(spec)
        outs[spec] = nld_jax.forward(shard_model(tiny, mesh), tokens)
        assert outs[spec].sharding.mesh == mesh, spec
    assert outs["data=2"].sharding.spec != outs["tensor=2"].sharding.spec
    np.testing.assert_allclose(np.asarray(outs["data=2"]), np.asarray(outs["tensor=2"]), atol=LOGIT_ATOL)


@pytest.mark.slow
def test_kernels_run_on_local_shards_inside_shard_map(tiny, golden_reference, monkeypatch):
    """The interpreted Pallas kernels (what TPU / GPU run compiled) under a mesh: tokens equal one
    device's, and every kernel launch inside shard_map sees local shards: data=8 -> 1 row, all
    heads; data=4 x tensor=2 -> 2 rows and half the heads; 2 x 4 -> KV heads replicated (2 do
    not split 4 ways), so the query heads are gathered and each launch runs all heads."""
    seen = {"attention": set(), "greedy_head": set()}
    attention, head = pallas_kernels.block_attention.api.block_attention, pallas_kernels.greedy_head.api.greedy_head

    def record(name, shape):
        if jax.sharding.get_abstract_mesh().manual_axes:  # only launches inside shard_map are kernel shards
            seen[name].add(shape)

    def attention_probe(q, k, v, cache_k, *args, **kwargs):
        record("attention", (q.shape[0], q.shape[2], k.shape[2], cache_k.shape[2]))
        return attention(q, k, v, cache_k, *args, **kwargs)

    def head_probe(hidden, weight, **kwargs):
        record("greedy_head", (hidden.shape[0], weight.shape[1]))
        return head(hidden, weight, **kwargs)

    monkeypatch.setattr("nld_jax.attention.block_attention", attention_probe)
    monkeypatch.setattr("nld_jax.model._greedy_head", head_probe)
    PROGRAMS.clear()  # programs compiled without the probes must be traced again
    prompts, reference = golden_reference
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sh.ShardingFallbackWarning)
        for spec in ("data=8", "data=4,tensor=2", "data=2,tensor=4"):
            mesh = mesh_from_spec(spec)
            assert_sharded_equal(tiny, shard_model(tiny, mesh), mesh, prompts, FAST, reference, "pallas_interpret")
    PROGRAMS.clear()
    assert {(1, 4, 2, 2), (2, 2, 1, 1), (4, 4, 2, 2)} <= seen["attention"], seen
    # The greedy head runs per batch shard where the vocabulary is not split (data=8); with the
    # vocabulary over tensor it runs in XLA, which the partitioner splits.
    assert (1, 512) in seen["greedy_head"], seen


@pytest.mark.slow
def test_golden_model_all_variants_and_mixed_mesh(tiny):
    prompts = _prompts(tiny)
    reference = _reference(tiny, prompts, ALL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sh.ShardingFallbackWarning)
        for spec in ("data=2,fsdp=2,tensor=2", "data=1,tensor=8", "data=4,fsdp=2"):
            mesh = mesh_from_spec(spec)
            assert_sharded_equal(tiny, shard_model(tiny, mesh), mesh, prompts, ALL, reference)


@pytest.mark.slow
def test_random_model_heads_sharded_and_vocab_fallback():
    # K=4 divides tensor=4 (KV heads sharded), vocab 500 does not divide tensor=8 (replicated).
    config = NLDConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=256,
                       mask_token_id=3, eos_token_id=2, bos_token_id=1, block_size=8)
    model = nld_jax.random_model(config, seed=1, lora_rank=4, std=0.2)
    prompts = _prompts(model)
    reference = _reference(model, prompts, FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sh.ShardingFallbackWarning)
        for spec in ("data=2,tensor=4", "tensor=8", "data=2,fsdp=2,tensor=2"):
            mesh = mesh_from_spec(spec)
            assert_sharded_equal(model, shard_model(model, mesh), mesh, prompts, FAST, reference)


@pytest.mark.slow
def test_orbax_checkpoint_restored_into_shardings(tiny, golden_reference, tmp_path):
    """nld_jax.load(converted_dir, mesh=) restores every weight straight into its sharding."""
    checkpoints_convert.convert_hf_to_orbax(str(GOLDEN_DIR), str(tmp_path / "orbax"), progress=False)
    prompts, reference = golden_reference
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sh.ShardingFallbackWarning)
        for spec in ("data=2,tensor=4", "fsdp=4,tensor=2"):
            mesh = mesh_from_spec(spec)
            sharded = nld_jax.load(tmp_path / "orbax", dtype="float32", mesh=mesh)
            assert _placed_as_declared(sharded, mesh)
            assert_sharded_equal(tiny, sharded, mesh, prompts, FAST, reference)


# --------------------------------------------------------------------------------------
# Memory plan
# --------------------------------------------------------------------------------------

@pytest.mark.slow
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


def test_plan_on_a_mesh(capfd):
    from nld_jax.cli import plan

    rc = plan.main(["--model", str(GOLDEN_DIR), "--mesh", "data=2,tensor=4", "--batch", "4", "--max-len", "256",
                    "--modes", "ar,spec", "--device", "v5e", "--json"])
    captured = capfd.readouterr()
    assert rc == 0, captured.err
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert report["mesh"] == {"data": 2, "fsdp": 1, "tensor": 4}
    assert [m["mode"] for m in report["modes"]] == ["ar", "spec"] and list(report["fits"]) == ["v5e"]
    assert any("kv_heads=2" in n for n in report["notes"])  # the fallback is reported


def test_plan_table_output(capsys):
    from nld_jax.cli import plan

    plan.main(["--model", str(GOLDEN_DIR), "--batch", "2", "--max-len", "128", "--modes", "ar"])
    out = capsys.readouterr().out
    assert "per-device memory" in out and "kv_cache" in out and "compile s" in out
    assert "NVIDIA H100 80 GB" in out and "TPU v6e 32 GB" in out


def test_plan_sharding_fallbacks_are_notes_once_not_warnings(capfd):
    """Bug: a mesh axis that does not divide the KV heads (8 heads on tensor=16 for the 8B) printed
    five warnings with their source lines. They are notes now, each once, and nothing comes out of
    the warnings module (the tiny checkpoint has 2 KV heads: tensor=4 shows the same)."""
    from nld_jax.cli import plan

    assert plan.main(["--checkpoint", str(GOLDEN_DIR), "--mesh", "tensor=4", "--batch", "2", "--max-len", "128"]) == 0
    captured = capfd.readouterr()
    assert "Warning" not in captured.err and "warn(" not in captured.err, captured.err
    notes = [l for l in captured.out.splitlines() if l.startswith("note:")]
    assert len(notes) == len(set(notes)) and any("kv_heads=2" in n for n in notes), captured.out
