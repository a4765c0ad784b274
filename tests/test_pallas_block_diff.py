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
from pallas_kernels.block_attention import api
from pallas_kernels.block_attention.block_diff_tpu import TpuBlockDiffSizes
from pallas_kernels.block_attention.block_diff_triton import TritonBlockDiffSizes
from pallas_kernels.block_attention.masks import EMPTY, FULL, PARTIAL, BlockDiffMask
from pallas_kernels.block_attention.reference import block_diff_attention_reference
from pallas_kernels.testing import COMPILED, INTERPRETED, assert_close

SIZES = {
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


# (G, dtype, L, b)
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


def _reference(b):
    def fn(q, k, v):
        with jax.default_matmul_precision("highest"):
            return block_diff_attention_reference(q, k, v, b)
    return fn


def _check_forward(impl, case, seed):
    G, dtype, L, b = case
    q, k, v, _ = _inputs(jax.random.key(seed), G, jnp.dtype(dtype), L, Dh=128 if impl == "pallas_tpu" else 32)
    kernel = functools.partial(api.block_diff_attention, block_size=b, implementation=impl, sizes=SIZES[impl],
                               poison=True)
    out = jax.jit(kernel)(q, k, v)
    ref = jax.jit(_reference(b))(q, k, v)
    assert out.dtype == ref.dtype
    assert_close(out, ref, dtype)


def _check_gradients(impl, case, seed):
    G, dtype, L, b = case
    q, k, v, d_out = _inputs(jax.random.key(seed), G, jnp.dtype(dtype), L, Dh=128 if impl == "pallas_tpu" else 32)
    kernel = functools.partial(api.block_diff_attention, block_size=b, implementation=impl, sizes=SIZES[impl])
    _, grads = _vjp(kernel, q, k, v, d_out)
    _, ref_grads = _vjp(_reference(b), q, k, v, d_out)
    tol = {} if dtype == jnp.float32 else dict(atol=8e-2, rtol=8e-2)  # bf16 gradients: longer sums
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype
        assert_close(got, want, dtype, **tol)


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=str)
@pytest.mark.parametrize("impl", INTERPRETED)
def test_interpreted_forward_matches_reference(impl, case):
    _check_forward(impl, case, CASES.index(case))


@pytest.mark.parametrize("impl", INTERPRETED)
def test_interpreted_gradients_match_reference(impl):
    _check_gradients(impl, CASES[2], 12)


@pytest.mark.slow
@pytest.mark.parametrize("impl", INTERPRETED)
def test_interpreted_kernels_all_cases(impl):
    for n, case in enumerate(CASES):
        _check_forward(impl, case, 20 + n)
        _check_gradients(impl, case, 30 + n)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("impl", COMPILED)
def test_compiled_kernels_match_reference(impl, case):
    _check_forward(impl, case, CASES.index(case))
    _check_gradients(impl, case, 10 + CASES.index(case))


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
    attention = lambda q, k, v: api.block_diff_attention(q, k, v, b, implementation=impl)
    logits = jax.jit(_train_logits, static_argnums=(1, 3))(tiny.params, tiny.config, tokens, attention)
    np.testing.assert_allclose(logits[:, :L], golden["logits"], atol=2e-4, rtol=2e-4)
    causal = logits[:, L:-1].reshape(-1, logits.shape[-1])
    np.testing.assert_allclose(causal, golden["causal_logits"], atol=2e-4, rtol=2e-4)
