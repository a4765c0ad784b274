"""Weight-only quantization (nld_jax.quant): error bounds per channel, the quantized matmul against
dequantize-then-matmul, host (converter) and device quantization bit for bit, quantize-on-load
== quantize(load()), the converter's round trip of a quantized checkpoint, greedy invariants
(spec == AR, quadratic spec == AR, the serving engine == generate) on the golden tiny model under
int8, a sharded quantized model == one device, memory plans, and the errors."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import nld_jax
from nld_jax import quant
from nld_jax.checkpoint import orbax
from nld_jax.checkpoint.errors import CheckpointError
from nld_jax.params import flatten_tree, quantized_leaves

MAX_NEW = 24


def _same_tree(a, b) -> bool:
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(x.dtype == y.dtype and np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def tiny_int8(tiny):
    return nld_jax.quantize(tiny, "int8")


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_error_per_channel_is_within_the_scheme_bound(scheme):
    rng = np.random.default_rng(0)
    # Channels of very different magnitudes, one all-zero channel, one with a single outlier.
    w = rng.standard_normal((48, 6, 8)).astype(np.float32) * np.logspace(-3, 2, 48)[:, None, None].astype(np.float32)
    w = np.moveaxis(w, 0, -1)  # [6, 8, 48]: contracting (6, 8), 48 output channels
    w[..., 5] = 0.0
    w[0, 0, 7] = 1e3
    q = quant.quantize_array(jnp.asarray(w), (-3, -2), scheme)
    assert q.w.dtype == quant.SCHEMES[scheme].storage and q.scale.shape == (48,) and q.scale.dtype == jnp.float32
    back = np.asarray(quant.dequantize(q))
    scale = np.asarray(q.scale)
    err = np.abs(back - w)
    if scheme == "int8":
        bound = 0.5 * scale * (1 + 1e-6)  # half a step of the channel's own grid
    else:  # e4m3: 3 mantissa bits (relative 2**-4), subnormal spacing 2**-9 of the scale
        bound = np.maximum(2.0**-4 * np.abs(w), 2.0**-10 * scale) * (1 + 1e-6)
    assert (err <= bound[None, None] if scheme == "int8" else err <= bound).all()
    assert np.all(back[..., 5] == 0) and np.all(scale[5] == 0)
    assert np.isclose(np.abs(back).max(axis=(0, 1)), np.abs(w).max(axis=(0, 1)), rtol=1e-6).all()  # max kept


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_host_rows_and_device_quantization_agree_bit_for_bit(scheme):
    rng = np.random.default_rng(1)
    rows = (rng.standard_normal((300, 257)) * np.logspace(-4, 3, 300)[:, None]).astype(ml_dtypes.bfloat16)
    rows[7] = 0
    q_host, s_host = quant.quantize_rows(rows, scheme, block_rows=64)  # blocks must not change anything
    q_dev = quant.quantize_array(jnp.asarray(rows), (-1,), scheme)
    assert np.array_equal(q_host.view(np.uint8), np.asarray(q_dev.w).view(np.uint8))
    assert np.array_equal(s_host, np.asarray(q_dev.scale))


@pytest.mark.parametrize("spec,x_shape,w_shape,contracting", [
    ("btd,dhk->bthk", (2, 3, 16), (16, 4, 8), (-3,)),  # q/k/v
    ("bthk,hkd->btd", (2, 3, 4, 8), (4, 8, 16), (-3, -2)),  # o_proj: two contracting axes
    ("btf,fd->btd", (2, 3, 24), (24, 16), (-2,)),  # down_proj
    ("...d,dv->...v", (5, 16), (16, 40), (-2,)),  # LM head
])
def test_quantized_einsum_equals_dequantize_then_matmul(spec, x_shape, w_shape, contracting):
    key = jax.random.key(0)
    x = jax.random.normal(key, x_shape, jnp.float32)
    w = quant.quantize_array(jax.random.normal(jax.random.fold_in(key, 1), w_shape), contracting, "int8")
    got = quant.einsum(spec, x, w, preferred_element_type=jnp.float32)
    want = jnp.einsum(spec, x, quant.dequantize(w), precision="highest")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_tied_head_and_embedding_lookup_use_the_per_row_scales():
    table = quant.quantize_array(jax.random.normal(jax.random.key(2), (40, 16)), (-1,), "int8")
    ids = jnp.asarray([[0, 5, 39], [3, 3, 1]])
    np.testing.assert_array_equal(np.asarray(quant.take(table, ids)), np.asarray(quant.dequantize(table))[ids])
    h = jax.random.normal(jax.random.key(3), (3, 16))
    head = table.T  # [D, V], contracting the model dimension, one scale per vocabulary row
    assert head.contracting == (-2,) and head.shape == (16, 40)
    np.testing.assert_allclose(np.asarray(quant.einsum("...d,dv->...v", h, head, preferred_element_type=jnp.float32)),
                               np.asarray(h @ quant.dequantize(table).T), rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------------- loading and converting


def test_load_quantize_equals_quantize_of_load(golden_dir, tiny, tiny_int8):
    assert _same_tree(nld_jax.load(golden_dir, quantize="int8").params, tiny_int8.params)
    assert tiny_int8.quantization == quant.Quantization("int8", "float32") and tiny_int8.dtype == jnp.float32
    assert tiny_int8.lora is tiny.lora  # the draft LoRA stays float32, untouched
    leaves = flatten_tree(tiny_int8.params)
    assert set(k for k, v in leaves.items() if isinstance(v, quant.QuantizedArray)) == set(quantized_leaves(tiny.config))
    assert leaves["norm"].dtype == jnp.float32
    bf16 = nld_jax.load(golden_dir, dtype="bfloat16", quantize="int8")
    assert bf16.dtype == jnp.bfloat16
    # The stored integers do not depend on the compute dtype (bf16 weights upcast exactly).
    assert np.array_equal(np.asarray(bf16.params["diffusion_head"].w), np.asarray(tiny_int8.params["diffusion_head"].w))


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_converter_round_trip_of_a_quantized_checkpoint(golden_dir, tmp_path, scheme):
    from checkpoints_convert.cli import main as convert

    dst = tmp_path / "q"
    assert convert([str(golden_dir), str(dst), "--quantize", scheme, "--verify", "--no-progress"]) == 0
    meta = json.loads((dst / "nld_metadata.json").read_text())
    assert meta["format_version"] == 2 and meta["quantization"]["scheme"] == scheme
    assert meta["dtype"]["params"]["norm"] == "bfloat16" and meta["dtype"]["lora"]["A"] == "float32"
    for dtype in ("float32", "bfloat16"):
        loaded = nld_jax.load(dst, dtype=dtype)
        assert loaded.quantization.scheme == scheme
        assert _same_tree(loaded.params, nld_jax.load(golden_dir, dtype=dtype, quantize=scheme).params)
    assert nld_jax.load(dst, dtype=None).dtype == jnp.bfloat16  # the stored compute dtype (the norms')


def test_save_orbax_writes_a_quantized_model_as_the_converter_does(golden_dir, tmp_path, tiny_int8):
    from checkpoints_convert.orbax_io import save_orbax

    save_orbax(tiny_int8, tmp_path / "saved")
    assert _same_tree(nld_jax.load(tmp_path / "saved").params, tiny_int8.params)


def test_errors_say_what_is_wrong(golden_dir, tmp_path, tiny, tiny_int8):
    from checkpoints_convert.cli import main as convert

    with pytest.raises(ValueError, match="unknown quantization scheme 'int4'; choose one of int8, fp8"):
        nld_jax.quantize(tiny, "int4")
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        nld_jax.load(golden_dir, quantize="nf4")
    with pytest.raises(ValueError, match=r"already quantized \(int8\)"):
        nld_jax.quantize(tiny_int8, "int8")
    dst = tmp_path / "q"
    assert convert([str(golden_dir), str(dst), "--quantize", "int8", "--no-progress"]) == 0
    with pytest.raises(ValueError, match=r"already quantized \(int8\)"):
        nld_jax.load(dst, quantize="int8")
    with pytest.raises(CheckpointError, match=r"already quantized \(int8\)"):
        from checkpoints_convert.to_orbax import convert_hf_to_orbax
        convert_hf_to_orbax(dst, tmp_path / "twice", quantize="int8", progress=False)
    with pytest.raises(CheckpointError, match="lossy"):
        from checkpoints_convert.to_hf import convert_orbax_to_hf
        convert_orbax_to_hf(dst, tmp_path / "back", progress=False)
    assert not (tmp_path / "back").exists() and not (tmp_path / "twice").exists()
    # int8 arrays only where the declarations put a scale: without the metadata naming the scheme
    # the same files are refused, by array.
    plain = tmp_path / "unlabelled"
    shutil.copytree(dst, plain)
    meta = json.loads((plain / "nld_metadata.json").read_text())
    del meta["quantization"]
    (plain / "nld_metadata.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"missing array\(s\) 'embed_tokens'"):
        nld_jax.load(plain)
    # A declared scale stored in another dtype, or integers where no scale is declared.
    shapes, exact = orbax.quantized_item_shapes(tiny.config, "int8")
    dtypes = {k: exact.get(k, np.dtype(np.float32)) for k in shapes}
    for leaf, dtype, message in [("embed_tokens.scale", np.float16, "stores it as float32"),
                                 ("norm", np.int8, "has dtype int8; weights must be one of")]:
        with pytest.raises(CheckpointError, match=message):
            orbax.check_item("x", shapes, {**dtypes, leaf: np.dtype(dtype)}, shapes, exact_dtypes=exact)


def test_converter_names_a_non_finite_weight_when_quantizing(golden_dir, tmp_path):
    from checkpoints_convert.to_orbax import convert_hf_to_orbax
    from tests._corpus import copy_tiny, rewrite_tensors

    ckpt = copy_tiny(tmp_path)
    key = "encoder.layers.1.mlp.up_proj.weight"

    def plant(tensors):
        tensors[key] = tensors[key].copy()
        tensors[key][3, 5] = np.inf
    rewrite_tensors(ckpt / "model.safetensors", plant)
    with pytest.raises(CheckpointError, match=r"up_proj.weight' \(layer 1\) holds NaN or Inf \(first at \[3, 5\]\)"):
        convert_hf_to_orbax(ckpt, tmp_path / "out", quantize="int8", progress=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- decoding


def _prompts(cases):
    return [p["ids"][:n] for p, n in zip(cases["prompts"]["spec"], (24, 9, 17))]


@pytest.mark.parametrize("scheme", ["int8", pytest.param("fp8", marks=pytest.mark.slow)])
def test_greedy_spec_and_quadratic_spec_equal_greedy_ar_under_quantization(tiny, cases, scheme):
    """Every mode runs the same quantized weights, so self-speculation is still exact."""
    model = nld_jax.quantize(tiny, scheme)
    prompts = _prompts(cases)
    ar = nld_jax.generate(model, prompts, mode="ar", max_new_tokens=MAX_NEW)
    for mode, extra in [("spec", {}), ("spec", {"use_lora": True}), ("spec_quadratic", {})]:
        out = nld_jax.generate(model, prompts, mode=mode, max_new_tokens=MAX_NEW, block_length=4, **extra)
        assert [t[:MAX_NEW] for t in out.tokens] == ar.tokens, (mode, extra)
    diff = nld_jax.generate(model, prompts, mode="diffusion", max_new_tokens=8, block_length=4)
    assert all(len(t) == 8 for t in diff.tokens)


def test_quantized_int8_logits_stay_close_to_float32(tiny, tiny_int8, cases):
    prompts = _prompts(cases)
    n = min(len(p) for p in prompts)
    ids = [p[:n] for p in prompts]
    ref, got = np.asarray(nld_jax.forward(tiny, ids)), np.asarray(nld_jax.forward(tiny_int8, ids))
    assert (ref.argmax(-1) == got.argmax(-1)).mean() >= 0.95
    assert np.abs(ref - got).max() < 0.1 * np.abs(ref).max()


def test_greedy_head_takes_the_quantized_head(tiny_int8):
    from nld_jax.model import greedy_head, lm_head

    hidden = jax.random.normal(jax.random.key(4), (3, 2, tiny_int8.config.D))
    logits = lm_head(tiny_int8.params, tiny_int8.config, hidden)
    tokens, prob = greedy_head(tiny_int8.params, tiny_int8.config, hidden)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(logits.argmax(-1)))
    np.testing.assert_allclose(np.asarray(prob), np.asarray(jax.nn.softmax(logits, -1).max(-1)), rtol=1e-5)


# Compiles every engine program again for int8 weights (~14 s): slow step of CI.
@pytest.mark.slow
def test_serving_engine_decodes_what_generate_does_on_quantized_weights(tiny_int8, cases):
    from nld_jax.generate import resolve_settings
    from nld_jax.serving.engine import Engine, EngineConfig, SlotSettings
    from nld_jax.serving.scheduler import Request, Scheduler

    engine = Engine(tiny_int8, EngineConfig(slots=2, max_new_tokens=16, prefill_chunk=16))
    scheduler = Scheduler(engine).start()
    try:
        for prompt, mode in zip(_prompts(cases)[:2], ("ar", "spec")):
            s = resolve_settings(tiny_int8, mode, 12, 4, "auto", 0.0, False)
            settings = SlotSettings(mode=s.mode, max_new_tokens=s.max_new_tokens, block_length=s.block_length,
                                    threshold=s.threshold, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                    use_lora=s.use_lora)
            job = scheduler.submit(Request(prompt, settings)).result(60.0)
            alone = nld_jax.generate(tiny_int8, [prompt], mode=mode, max_new_tokens=12, block_length=4)
            assert job.tokens == alone.tokens[0][:12], mode
    finally:
        scheduler.stop(drain=False)


@pytest.mark.filterwarnings("ignore::nld_jax.partitioning.ShardingFallbackWarning")
@pytest.mark.slow
def test_sharded_quantized_model_equals_one_device(golden_dir, tiny_int8, cases):
    prompts = _prompts(cases)[:2]
    n = min(len(p) for p in prompts)
    one = np.asarray(nld_jax.forward(tiny_int8, [p[:n] for p in prompts]))
    ar = nld_jax.generate(tiny_int8, prompts, mode="spec", max_new_tokens=16, block_length=4)
    mesh = nld_jax.make_mesh(data=2, fsdp=2, tensor=2)
    loaded = nld_jax.load(golden_dir, quantize="int8", mesh=mesh)
    o_proj = loaded.params["layers"]["self_attn"]["o_proj"]
    assert o_proj.w.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", None, "fsdp")
    assert o_proj.scale.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")  # its output channels' axes
    np.testing.assert_allclose(np.asarray(nld_jax.forward(loaded, [p[:n] for p in prompts])), one, atol=1e-4)
    sharded = nld_jax.generate(nld_jax.shard_model(tiny_int8, mesh), prompts, mode="spec", max_new_tokens=16,
                               block_length=4)
    assert sharded.tokens == ar.tokens


def test_memory_plan_counts_quantized_weights(tiny):
    from nld_jax.planning import plan

    mesh = nld_jax.make_mesh(tensor=2, devices=jax.devices()[:2])
    kw = dict(batch=2, prompt_len=16, max_new_tokens=16, block_length=8, lora_rank=0, dtype=jnp.bfloat16,
              modes=("ar",))
    plain, = plan(tiny.config, mesh, **kw)
    int8, = plan(tiny.config, mesh, **kw, quantize="int8")
    matrices = sum(np.prod(s.shape) for k, s in flatten_tree(
        nld_jax.params.abstract_params(tiny.config)).items() if k in quantized_leaves(tiny.config))
    # bf16 -> int8 halves every matrix; float32 scales add one per output channel.
    assert int8.weights < plain.weights - matrices / 2 * 0.9


# ----------------------------------------------------------------------------- int8 KV cache


def _decode_with_cache(model, prompts, mode, cache_dtype, block=4, max_new=MAX_NEW):
    from nld_jax.decode import cache_size_for

    n = max(len(p) for p in prompts)
    tokens = jnp.asarray([p + [0] * (n - len(p)) for p in prompts], jnp.int32)
    options = nld_jax.DecodeOptions(mode=mode, max_new_tokens=max_new, block_length=block)
    cache = nld_jax.KVCache.empty(model.config, len(prompts), cache_size_for(n, options), cache_dtype)
    B = len(prompts)
    inputs = nld_jax.DecodeInputs(tokens, jnp.asarray([len(p) for p in prompts], jnp.int32),
                                  temperature=jnp.zeros((B,)), threshold=jnp.zeros((B,)),
                                  key=jnp.zeros((B, 2), jnp.uint32))
    out, cache = nld_jax.decode_jit(model.params, model.lora, cache, inputs, config=model.config, options=options)
    return [np.asarray(out.tokens)[b, :max_new].tolist() for b in range(B)], cache


def test_int8_kv_cache_decodes_like_the_float_cache_and_keeps_spec_exact(tiny_int8, cases):
    prompts = _prompts(cases)
    ar, cache = _decode_with_cache(tiny_int8, prompts, "ar", jnp.int8)
    assert cache.k.dtype == jnp.int8 and cache.k_scale.shape == cache.k.shape[:-1]
    ref, _ = _decode_with_cache(tiny_int8, prompts, "ar", jnp.float32)
    assert ar == ref  # on the golden model an 8-bit cache changes no greedy token
    spec, _ = _decode_with_cache(tiny_int8, prompts, "spec", jnp.int8)
    assert spec == ar
    # The prompt's keys (the prefill computes them before reading any cache) dequantize to within
    # half a step of each vector's grid.
    k = np.asarray(nld_jax.kv_cache.dequantize_kv(cache.k, cache.k_scale, jnp.float32))
    _, full = _decode_with_cache(tiny_int8, prompts, "ar", jnp.float32)
    n = min(len(p) for p in prompts)
    err = np.abs(k[:, :, :n] - np.asarray(full.k)[:, :, :n])
    assert (err <= 0.5 * np.asarray(cache.k_scale)[:, :, :n, :, None] * 1.001 + 1e-6).all()


def test_memory_plan_of_an_int8_kv_cache(tiny):
    from nld_jax.planning import plan

    mesh = nld_jax.make_mesh(data=2, devices=jax.devices()[:2])
    kw = dict(batch=2, prompt_len=16, max_new_tokens=64, block_length=8, lora_rank=0, dtype=jnp.float32,
              modes=("spec",))
    plain, = plan(tiny.config, mesh, **kw)
    int8, = plan(tiny.config, mesh, **kw, kv_cache="int8")
    # int8 values plus one float32 scale per Dh=32 vector: (1 + 4/32) / 4 of the float32 cache.
    assert int8.kv_cache == pytest.approx(plain.kv_cache * (1 + 4 / 32) / 4, rel=0.01)


def test_generate_with_an_int8_kv_cache_on_one_device_and_on_a_mesh(tiny_int8, cases):
    """``generate(kv_cache="int8")``: greedy spec still equals greedy AR (both read the same
    8-bit cache), and a data=2 mesh (the cache's scales sharded over rows) decodes the same."""
    prompts = _prompts(cases)
    ar = nld_jax.generate(tiny_int8, prompts, mode="ar", max_new_tokens=24, kv_cache="int8")
    spec = nld_jax.generate(tiny_int8, prompts, mode="spec", max_new_tokens=24, block_length=8, kv_cache="int8")
    assert [t[:24] for t in spec.tokens] == ar.tokens  # spec may run past the budget, as NVIDIA's does
    mesh = nld_jax.make_mesh(data=2, devices=jax.devices()[:2])
    sharded = nld_jax.generate(tiny_int8, prompts, mode="ar", max_new_tokens=24, kv_cache="int8", mesh=mesh)
    assert sharded.tokens == ar.tokens
    with pytest.raises(ValueError, match="kv_cache"):
        nld_jax.generate(tiny_int8, prompts, kv_cache="int4")
