"""The kernels inside the model: greedy decoding with ``implementation=<a Pallas kernel>`` gives
the tokens of ``implementation="xla"`` in all three modes, and the GPU kernels lower for CUDA here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import nld_jax
from pallas_kernels.testing import GPU_ONLY


def _prompts(cases):
    ids = cases["prompts"]["batch"]["ids"]
    return [ids[0][:20], ids[1][:13]]  # ragged rows: different cache lengths in every step


def _generate(model, prompts, mode, implementation):
    kwargs = {} if mode == "ar" else dict(block_length=8, threshold=0.9 if mode == "diffusion" else 0.0)
    out = nld_jax.generate(model, prompts, mode=mode, max_new_tokens=16, implementation=implementation,
                           use_lora=mode == "spec" and model.lora is not None, **kwargs)
    return out.tokens, out.nfe


@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec"])
def test_interpreted_kernels_decode_like_xla(tiny, cases, mode):
    prompts = _prompts(cases)
    assert _generate(tiny, prompts, mode, "pallas_interpret") == _generate(tiny, prompts, mode, "xla")


@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec"])
@pytest.mark.parametrize("implementation", [pytest.param("pallas_triton", marks=GPU_ONLY),
                                            pytest.param("pallas_mosaic_gpu", marks=GPU_ONLY)])
def test_compiled_kernels_decode_like_xla(mode, implementation):
    """A random bf16 model whose shapes select the named kernel itself (head_dim 128, 8 x 4 query
    rows per KV head: the Mosaic GPU attention takes them; the tiny model's head_dim 32 would
    send it to its Triton fallback)."""
    from pallas_kernels.block_attention import resolve_implementation

    config = nld_jax.NLDConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                               num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                               max_position_embeddings=256, mask_token_id=3, bos_token_id=1, eos_token_id=2,
                               block_size=8)
    model = nld_jax.random_model(config, seed=3, dtype="bfloat16", std=0.05)
    for uniform in ("causal", "bidirectional"):
        assert resolve_implementation(implementation, (2, 8, 8, 128), 2, jnp.bfloat16, uniform=uniform) == implementation
    prompts = [[1, 5, 9, 200, 7, 3, 44, 12, 90, 17], [1, 8, 300, 41]]
    assert _generate(model, prompts, mode, implementation) == _generate(model, prompts, mode, "xla")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec"])
def test_interpreted_triton_kernels_decode_like_xla(tiny, cases, mode):
    prompts = _prompts(cases)
    assert _generate(tiny, prompts, mode, "pallas_triton_interpret") == _generate(tiny, prompts, mode, "xla")


# ------------------------------------------------------ compiled kernels, lowered on CPU
# Lowering for "cuda" runs the whole Pallas -> Triton IR / Mosaic GPU -> NVVM pipeline without a
# GPU, and lowering for "tpu" the Pallas -> Mosaic TPU one: block-shape, layout and
# unsupported-primitive errors surface here, leaving the hardware sessions only what the final
# compilers and the chips add.


def _lower_for_cuda(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _lower_for_tpu(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()


def _decode_args(B=2, T=32, H=32, K=8, Dh=128, S=1024, dtype=jnp.bfloat16):
    shape = lambda *s: jax.ShapeDtypeStruct(s, dtype)
    return (shape(B, T, H, Dh), shape(B, T, K, Dh), shape(B, T, K, Dh), shape(B, S, K, Dh), shape(B, S, K, Dh),
            jax.ShapeDtypeStruct((B,), jnp.int32))


def _pattern(kind: str, B: int, T: int):
    """The block pattern is a kernel operand (its values do not change the program); each kind
    is lowered anyway, so that no pattern can hide behind a lowering of another."""
    from pallas_kernels.block_attention import BlockPattern

    if kind == "causal":
        return BlockPattern.causal(B, T)
    if kind == "bidirectional":
        return BlockPattern.bidirectional(B, T)
    return BlockPattern.per_row(jnp.arange(B) % 2 == 0, T, valid=jnp.maximum(T // 2, 1))


@pytest.mark.parametrize("kind", ["causal", "bidirectional", "mixed"])
@pytest.mark.parametrize("T", [1, 8, 32])
def test_triton_attention_lowers_for_cuda(kind, T):
    from pallas_kernels.block_attention.kernel_triton import block_attention_triton

    assert "triton" in _lower_for_cuda(block_attention_triton, *_decode_args(T=T), _pattern(kind, 2, T))


def test_triton_head_and_block_diff_lower_for_cuda():
    from pallas_kernels.block_diff.kernel_triton import block_diff_backward_triton, block_diff_forward_triton
    from pallas_kernels.block_diff.mask import BlockDiffMask
    from pallas_kernels.greedy_head.kernel_triton import greedy_head_triton

    bf16 = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    assert "triton" in _lower_for_cuda(greedy_head_triton, bf16(8, 32, 4096), bf16(4096, 131072))
    mask = BlockDiffMask(512, 32)
    q, kv = bf16(1, 1024, 32, 128), bf16(1, 1024, 8, 128)
    assert "triton" in _lower_for_cuda(lambda *a: block_diff_forward_triton(*a, mask), q, kv, kv)
    lse = jax.ShapeDtypeStruct((1, 32, 1024), jnp.float32)
    assert "triton" in _lower_for_cuda(lambda *a: block_diff_backward_triton(*a, mask), q, kv, kv, q, lse, q)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T, B", [(8, 1), (32, 8), (1, 2)])
def test_mosaic_gpu_attention_lowers_for_cuda(causal, T, B):
    from pallas_kernels.block_attention.kernel_mgpu import block_attention_mgpu

    assert "mosaic_gpu" in _lower_for_cuda(lambda *a: block_attention_mgpu(*a, causal=causal),
                                           *_decode_args(B=B, T=T, S=2048))


@pytest.mark.parametrize("C", [4, 16, 32])
def test_quadratic_pattern_lowers_for_tpu_and_cuda(C):
    """Quadratic self-speculation's block (C + C*C queries, up to 1056): the block-key tile lists
    (a scalar-prefetched list per query tile on TPU, a loop over a loaded list in Triton) lower
    at the production tile sizes, where C = 32 has several query and block-key tiles."""
    from pallas_kernels.block_attention import BlockPattern
    from pallas_kernels.block_attention.kernel_tpu import block_attention_tpu
    from pallas_kernels.block_attention.kernel_triton import block_attention_triton

    T = C + C * C
    pattern = BlockPattern.quadratic(2, jnp.asarray([C, max(C // 2, 2)], jnp.int32), T)
    assert "tpu_custom_call" in _lower_for_tpu(block_attention_tpu, *_decode_args(T=T), pattern)
    assert "triton" in _lower_for_cuda(block_attention_triton, *_decode_args(T=T), pattern)


@pytest.mark.parametrize("kind", ["causal", "bidirectional", "mixed"])
def test_tpu_kernels_lower_for_tpu(kind):
    from pallas_kernels.block_attention.kernel_tpu import block_attention_tpu
    from pallas_kernels.block_diff.kernel_tpu import block_diff_backward_tpu, block_diff_forward_tpu
    from pallas_kernels.block_diff.mask import BlockDiffMask
    from pallas_kernels.greedy_head.kernel_tpu import greedy_head_tpu

    # A decode block, an AR step, an empty cache, and a prefill chunk of several block-key tiles.
    for T, S in ((32, 2048), (1, 1000), (8, 0), (512, 256)):
        assert "tpu_custom_call" in _lower_for_tpu(block_attention_tpu, *_decode_args(T=T, S=S),
                                                   _pattern(kind, 2, T))
    if kind == "causal":  # the other kernels once
        bf16 = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
        assert "tpu_custom_call" in _lower_for_tpu(greedy_head_tpu, bf16(2, 32, 4096), bf16(4096, 131072))
        mask = BlockDiffMask(512, 32)
        q, kv = bf16(1, 1024, 32, 128), bf16(1, 1024, 8, 128)
        lse = jax.ShapeDtypeStruct((1, 32, 1024, 1), jnp.float32)
        assert "tpu_custom_call" in _lower_for_tpu(lambda *a: block_diff_forward_tpu(*a, mask), q, kv, kv)
        assert "tpu_custom_call" in _lower_for_tpu(lambda *a: block_diff_backward_tpu(*a, mask), q, kv, kv, q, lse, q)
