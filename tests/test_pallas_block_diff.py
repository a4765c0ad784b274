"""The training ``block_diff`` mask, its block-sparse metadata and the kernels that use it.

The mask is checked against the four rules of NLD_SPEC.md section 4 and, end to end, against
NVIDIA's own training forward on the tiny golden checkpoint; the kernels (forward and
gradients) against the dense reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nld_jax.model import rms_norm
from nld_jax.rope import apply_rope, llama4_query_scale, rope_cos_sin
from pallas_kernels.block_diff import api
from pallas_kernels.block_diff.kernel_tpu import TpuBlockDiffSizes
from pallas_kernels.block_diff.kernel_triton import TritonBlockDiffSizes
from pallas_kernels.block_diff.mask import BlockDiffMask
from pallas_kernels.block_sparse import EMPTY, FULL, PARTIAL
from pallas_kernels.testing import COMPILED, INTERPRETED

import _oracles

IMPLEMENTATIONS = ["xla", *INTERPRETED, *COMPILED]

SIZES = {
    "xla": None,
    "pallas_interpret": TpuBlockDiffSizes(block_q=16, block_kv=8),
    "pallas_tpu": TpuBlockDiffSizes(block_q=128, block_kv=128),
    "pallas_triton_interpret": TritonBlockDiffSizes(block_q=16, block_kv=16),
    "pallas_triton": TritonBlockDiffSizes(block_q=16, block_kv=16),
    "pallas_mosaic_gpu": TritonBlockDiffSizes(block_q=16, block_kv=16),
}


def _spec_rule(q: int, k: int, L: int, b: int) -> bool:
    blk = lambda i: (i % L) // b
    if q < L and k < L:
        return blk(q) == blk(k)
    if q < L:
        return blk(q) > blk(k)
    if k >= L:
        return q >= k
    return False


@pytest.mark.parametrize("L, b", [(12, 4), (10, 3), (8, 8), (9, 1)])
def test_mask_follows_the_spec_rules(L, b):
    dense = BlockDiffMask(L, b).materialize()
    expected = np.array([[_spec_rule(q, k, L, b) for k in range(2 * L)] for q in range(2 * L)])
    np.testing.assert_array_equal(dense, expected)
    assert dense.diagonal().all()  # no query is ever fully masked


@pytest.mark.parametrize("L, b, bq, bk", [(24, 8, 8, 8), (20, 8, 16, 8), (33, 4, 16, 32), (64, 16, 32, 16)])
def test_block_sparse_metadata_matches_dense(L, b, bq, bk):
    mask = BlockDiffMask(L, b)
    dense = mask.materialize()
    n = 2 * L
    info = mask.block_info(bq, bk)
    for i in range(info.kind.shape[0]):
        for j in range(info.kind.shape[1]):
            tile = dense[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            ragged = (j + 1) * bk > n
            expected = EMPTY if not tile.any() else (FULL if tile.all() and not ragged else PARTIAL)
            assert info.kind[i, j] == expected, (i, j)
    for (index, kind, count), table in ((info.by_query, info.kind), (info.by_key, info.kind.T)):
        for r in range(table.shape[0]):
            visited = list(index[r, :count[r]])
            assert visited == list(np.nonzero(table[r])[0])
            assert (kind[r, count[r]:] == EMPTY).all()
            if count[r]:  # padding repeats the last tile: no new DMA on TPU
                assert (index[r, count[r]:] == index[r, count[r] - 1]).all()


def test_block_sparsity_at_training_shapes():
    # 2L = 4096, block 32, 128 x 128 tiles: about a third of the tiles hold visible keys.
    info = BlockDiffMask(2048, 32).block_info(128, 128)
    assert info.density < 0.4
    assert (info.kind == FULL).sum() > (info.kind == PARTIAL).sum()


def _spec_mask(L: int, b: int) -> np.ndarray:
    return np.array([[_spec_rule(q, k, L, b) for k in range(2 * L)] for q in range(2 * L)])


# (G, dtype, L, b): b dividing L (the structured XLA form) and not (the dense form, a partial block).
CASES = [(1, jnp.float32, 20, 8), (2, jnp.bfloat16, 24, 4), (4, jnp.float32, 17, 5), (8, jnp.bfloat16, 16, 16)]


@functools.partial(jax.jit, static_argnames=("G", "dtype", "L", "Dh"))
def _inputs(key, G, dtype, L, Dh=32):
    K = 2 if G < 8 else 1
    keys = jax.random.split(key, 4)
    normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dtype)
    return (normal(keys[0], (2, 2 * L, K * G, Dh)), normal(keys[1], (2, 2 * L, K, Dh)),
            normal(keys[2], (2, 2 * L, K, Dh)), normal(keys[3], (2, 2 * L, K * G, Dh)))


def _vjp(fn, q, k, v, d_out):
    """Output and input gradients of ``fn(q, k, v)`` in one compiled program."""

    @jax.jit
    def run(q, k, v, d_out):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(d_out)

    return run(q, k, v, d_out)


def _dense_f32(mask):
    """The gradient oracle: dense masked attention in float32 at the highest matmul precision,
    written here from the spec's mask (not the code under test)."""

    def fn(q, k, v):
        B, T, H, Dh = q.shape
        K = k.shape[2]
        with jax.default_matmul_precision("highest"):
            s = jnp.einsum("btkgd,bukd->bkgtu", q.reshape(B, T, K, H // K, Dh), k) / Dh ** 0.5
            p = jax.nn.softmax(jnp.where(jnp.asarray(mask), s, -jnp.inf), axis=-1)
            return jnp.einsum("bkgtu,bukd->btkgd", p, v).reshape(B, T, H, Dh)

    return fn


def _skip_unsupported(impl, q, b):
    if impl not in INTERPRETED and impl != "xla":
        reason = api.unsupported_reason(impl, q.shape, b)
        if reason:
            pytest.skip(reason)


def _check_forward(impl, case, seed):
    G, dtype, L, b = case
    q, k, v, _ = _inputs(jax.random.key(seed), G, jnp.dtype(dtype), L, Dh=128 if impl == "pallas_tpu" else 32)
    _skip_unsupported(impl, q, b)
    kernel = functools.partial(api.block_diff_attention, block_length=b, implementation=impl, sizes=SIZES[impl],
                               poison=impl != "xla")
    out = jax.jit(kernel)(q, k, v)
    assert out.dtype == q.dtype and out.shape == q.shape
    expected, weighted = _oracles.masked_attention(q, k, v, _spec_mask(L, b))
    if jnp.dtype(dtype) == jnp.bfloat16:
        bound = _oracles.bf16_bound(expected, weighted)
    else:
        bound = 2e-5 * (np.abs(expected) + weighted) + 2e-6
    _oracles.assert_within(out, expected, bound)


def _check_gradients(impl, case, seed):
    """float32: elementwise against the float32 oracle; bf16: the normwise error of each gradient
    against the float32 gradients of the same bf16 inputs, within a few bf16 ulps."""
    G, dtype, L, b = case
    q, k, v, d_out = _inputs(jax.random.key(seed), G, jnp.dtype(dtype), L, Dh=128 if impl == "pallas_tpu" else 32)
    _skip_unsupported(impl, q, b)
    kernel = functools.partial(api.block_diff_attention, block_length=b, implementation=impl, sizes=SIZES[impl])
    _, grads = _vjp(kernel, q, k, v, d_out)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, d_out)]  # exact: the same (bf16-valued) inputs
    _, ref_grads = _vjp(_dense_f32(_spec_mask(L, b)), *f32)
    for name, got, want in zip("qkv", grads, ref_grads):
        assert got.dtype == q.dtype, name
        got, want = _oracles.as64(got), _oracles.as64(want)
        assert np.isfinite(got).all(), name
        if jnp.dtype(dtype) == jnp.float32:
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4, err_msg=f"d{name}")
        else:
            relative = np.linalg.norm(got - want) / np.linalg.norm(want)
            assert relative < 4 * _oracles.BF16_EPS, f"d{name}: normwise error {relative:.4f}"


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_forward_matches_oracle(impl, case):
    _check_forward(impl, case, CASES.index(case))


@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=str)  # the float32 cases, by default
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_float32_gradients_match_oracle(impl, case):
    _check_gradients(impl, case, 10 + CASES.index(case))


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=str)
@pytest.mark.parametrize("impl", ["xla", *COMPILED])  # the interpreted kernels: test_interpreted_bfloat16_gradients
def test_bfloat16_gradients_match_oracle(impl, case):
    _check_gradients(impl, case, 10 + CASES.index(case))


@pytest.mark.slow
@pytest.mark.parametrize("impl", INTERPRETED)
def test_interpreted_bfloat16_gradients(impl):
    for case in (CASES[1], CASES[3]):
        _check_gradients(impl, case, 30 + CASES.index(case))


def _train_logits(params, config, tokens, attention):
    """NVIDIA's ``block_diff`` training forward: ``[noisy | clean]``, RoPE positions ``0..L-1``
    for each half, the llama-4 scale from ``0..2L-1``."""
    B, n = tokens.shape
    L = n // 2
    dtype = params["embed_tokens"].dtype
    cos, sin = rope_cos_sin(config, jnp.tile(jnp.arange(L), 2)[None].repeat(B, 0), dtype)
    q_scale = llama4_query_scale(config, jnp.arange(n)[None].repeat(B, 0))
    x = jnp.take(params["embed_tokens"], tokens, axis=0)
    eps = config.rms_norm_eps
    for layer in range(config.L):
        p = jax.tree.map(lambda a: a[layer], params["layers"])
        h = rms_norm(x, p["input_layernorm"], eps)
        q = apply_rope(jnp.einsum("btd,dhk->bthk", h, p["self_attn"]["q_proj"]), cos, sin)
        k = apply_rope(jnp.einsum("btd,dhk->bthk", h, p["self_attn"]["k_proj"]), cos, sin)
        v = jnp.einsum("btd,dhk->bthk", h, p["self_attn"]["v_proj"])
        q = q * q_scale[:, :, None, None].astype(dtype)
        x = x + jnp.einsum("bthk,hkd->btd", attention(q, k, v), p["self_attn"]["o_proj"])
        h = rms_norm(x, p["post_attention_layernorm"], eps)
        mlp = p["mlp"]
        x = x + jnp.einsum("btf,fd->btd", jax.nn.silu(h @ mlp["gate_proj"]) * (h @ mlp["up_proj"]), mlp["down_proj"])
    x = rms_norm(x, params["norm"], eps)
    return jnp.einsum("btd,dv->btv", x, params["diffusion_head"], preferred_element_type=jnp.float32)


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_golden_training_forward(tiny, golden_dir, cases, impl):
    """NVIDIA's training forward (flex attention with its block_diff mask) on the tiny model:
    the mask object and the kernel reproduce its noisy-half and clean-half logits."""
    golden = np.load(golden_dir / "golden" / "c_train_block_diff.npz")
    b = cases["c_train_block_diff"]["block_size"]
    x, masked = jnp.asarray(golden["input_ids"], jnp.int32), jnp.asarray(golden["masked_indices"])
    L = x.shape[1]
    tokens = jnp.concatenate([jnp.where(masked, tiny.config.mask_token_id, x), x], axis=1)
    attention = lambda q, k, v: api.block_diff_attention(q, k, v, b, implementation=impl)  # noqa: E731
    logits = jax.jit(_train_logits, static_argnums=(1, 3))(tiny.params, tiny.config, tokens, attention)
    np.testing.assert_allclose(logits[:, :L], golden["logits"], atol=2e-4, rtol=2e-4)
    causal = logits[:, L:-1].reshape(-1, logits.shape[-1])
    np.testing.assert_allclose(causal, golden["causal_logits"], atol=2e-4, rtol=2e-4)
