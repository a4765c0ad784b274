"""Block attention (a decode block of queries over the KV cache and the block's own keys): one
suite, run against every implementation, the XLA one included, and an independent float64 oracle.

Interpreted kernels run on CPU, compiled ones on their hardware (``-m gpu`` on the GPU machine).
Kernels get NaN in the cache slots past each row's length and start their outputs from NaN
(``poison=True``); lengths include 0 and S. bf16 results are held to an error bound derived from
bf16 rounding (``tests/_oracles.py``), tight enough that dropping one key fails. The block-key
tile lists the kernels skip with are checked exact against the dense oracle mask, and the
quadratic self-speculation pattern (mostly empty tiles) shows that the kernels follow them.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_attention import BlockPattern, api, chunked
from pallas_kernels.block_attention.chunked import block_attention_xla_chunked
from pallas_kernels.block_attention.kernel_mgpu import MosaicBlockSizes
from pallas_kernels.block_attention.kernel_tpu import TpuBlockSizes
from pallas_kernels.block_attention.kernel_triton import TritonBlockSizes
from pallas_kernels.block_attention.mask import BlockTileList, CacheBlockMask
from pallas_kernels.testing import COMPILED, INTERPRETED, block_inputs
import _oracles

# "xla_chunked": the XLA implementation's long-buffer path (pallas_kernels/block_attention/chunked.py),
# called directly with 16-slot windows so that these small caches span several windows and a
# ragged last one (the dispatcher takes it only for buffers of chunked.MIN_SLOTS slots or more).
IMPLEMENTATIONS = ["xla", "xla_chunked", *INTERPRETED, *COMPILED]

# Small tiles force many tiles, ragged last tiles, several query tiles and several splits.
SMALL_SIZES = {
    "xla": None,
    "xla_chunked": 16,
    "pallas_interpret": TpuBlockSizes(block_q=16, block_kv=16, block_kv_new=8),
    "pallas_tpu": TpuBlockSizes(block_q=128, block_kv=128, block_kv_new=128),
    "pallas_triton_interpret": TritonBlockSizes(block_q=16, block_kv=16, block_kv_new=16, num_splits=3),
    "pallas_triton": TritonBlockSizes(block_q=16, block_kv=16, block_kv_new=16, num_splits=3),
    "pallas_mosaic_gpu": MosaicBlockSizes(block_kv=64, num_splits=3),
}

# (G, C, mode, dtype, S, Dh): every G, every C, both uniform modes, both dtypes, in 4 runs per
# implementation (the slow sweep runs the full product, mixed batches included; mixed and
# structured patterns also have their own test).
CASES = [
    (1, 1, "causal", jnp.float32, 40, 32),
    (2, 8, "bidirectional", jnp.bfloat16, 77, 64),
    (4, 16, "causal", jnp.bfloat16, 50, 32),
    (8, 32, "bidirectional", jnp.float32, 24, 32),
]


def _case_id(case):
    G, C, mode, dtype, S, Dh = case
    return f"G{G}-C{C}-{mode}-{jnp.dtype(dtype).name}-S{S}-Dh{Dh}"


def _pattern(mode: str, B: int, T: int, rng) -> tuple[BlockPattern, str | None]:
    """``(pattern, uniform)``: a uniform batch, or (``"mixed"``) causal and bidirectional rows
    at random, the bidirectional ones over a random valid prefix."""
    if mode == "causal":
        return BlockPattern.causal(B, T), mode
    if mode == "bidirectional":
        return BlockPattern.bidirectional(B, T), mode
    causal = jnp.asarray(rng.integers(0, 2, B), bool)
    return BlockPattern.per_row(causal, T, valid=jnp.asarray(rng.integers(1, T + 1, B), jnp.int32)), None


def _mixed_pattern(T: int) -> BlockPattern:
    """Five rows of different patterns: causal; bidirectional; bidirectional over its first 5
    positions (padding past them); quadratic-spec-like (3 causal drafts, then groups of 3 masks
    that see a prefix of the drafts and each other); and one group spread over the block
    (``group = t % 3``: query 0 sees the last keys, so the key extent is not the position's)."""
    t = np.arange(T)
    drafts = t < 3
    structured = (np.where(drafts, t, 100 + (t - 3) // 3), np.where(drafts, t, 1 + (t - 3) // 3))
    rows = [BlockPattern.causal(1, T), BlockPattern.bidirectional(1, T), BlockPattern.bidirectional(1, T, valid=5),
            BlockPattern(*(jnp.asarray(x[None], jnp.int32) for x in structured)),
            BlockPattern(jnp.asarray(t[None] % 3, jnp.int32), jnp.zeros((1, T), jnp.int32))]
    return BlockPattern(*(jnp.concatenate([getattr(p, f) for p in rows]) for f in ("group", "reach")))


def _check(impl, args, pattern, uniform, dtype, sizes=None, visible=None):
    """``impl`` against the float64 oracle under the block visibility ``visible [B, T, T]``
    (default: the pattern's, by the oracle's own predicate)."""
    if impl == "xla_chunked":
        run = functools.partial(block_attention_xla_chunked, chunk=sizes or 16)
    else:
        run = functools.partial(api.block_attention, uniform=uniform, implementation=impl, sizes=sizes,
                                poison=impl != "xla")
    out = jax.jit(run)(*args, pattern)
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    if visible is None:
        visible = _oracles.block_visible(pattern.group, pattern.reach)
    expected, weighted = _oracles.decode_attention(*args, visible)
    if jnp.dtype(dtype) == jnp.bfloat16:
        bound = _oracles.bf16_bound(expected, weighted)
    else:
        bound = 2e-5 * (np.abs(expected) + weighted) + 2e-6
    _oracles.assert_within(out, expected, bound)


def _inputs(impl, seed, *, B, T, G, S, Dh, lengths, dtype, uniform):
    """Decode inputs for ``impl`` (skipped where a compiled kernel cannot take them)."""
    if impl in ("pallas_tpu", "pallas_mosaic_gpu"):
        Dh = 128  # the compiled kernels' head-size granule
    K = 2 if G < 8 else 1
    if impl not in INTERPRETED and impl not in ("xla", "xla_chunked"):
        reason = api.unsupported_reason(impl, (B, T, K * G, Dh), K, dtype, uniform)
        if reason:
            pytest.skip(reason)
    # Stale slots are NaN for the kernels; the XLA implementation (like the Mosaic GPU kernel,
    # whose tensor-core P @ V reads V from SMEM) relies on finite stale slots, which KVCache
    # guarantees: it gets large finite garbage (wrongly used, it would still show).
    garbage = jnp.nan if impl not in ("xla", "xla_chunked", "pallas_mosaic_gpu") else 1e4
    return block_inputs(seed, B=B, T=T, H=K * G, K=K, Dh=Dh, S=S, lengths=lengths, dtype=dtype, garbage=garbage)


def _run(impl, case, seed, sizes="small"):
    G, C, mode, dtype, S, Dh = case
    rng = np.random.default_rng(seed)
    pattern, uniform = _pattern(mode, 3, C, rng)
    lengths = [0, S, int(rng.integers(1, S))]  # empty, full and ragged rows in one batch
    args = _inputs(impl, seed, B=3, T=C, G=G, S=S, Dh=Dh, lengths=lengths, dtype=dtype, uniform=uniform)
    _check(impl, args, pattern, uniform, dtype, SMALL_SIZES[impl] if sizes == "small" else sizes)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_implementation_matches_oracle(impl, case):
    _run(impl, case, seed=CASES.index(case))


def test_xla_takes_the_chunked_path_for_long_buffers_and_agrees(monkeypatch):
    """A buffer of chunked.MIN_SLOTS slots or more runs chunked (only the windows up to the longest
    valid prefix), shorter ones dense; on a long buffer with short valid prefixes both agree with
    the float64 oracle."""
    calls = []
    real = chunked.block_attention_xla_chunked
    monkeypatch.setattr(api, "block_attention_xla_chunked", lambda *a, **k: calls.append(1) or real(*a, **k))
    S = chunked.MIN_SLOTS
    args = _inputs("xla", 5, B=3, T=8, G=2, S=S, Dh=32, lengths=[0, 300, 41], dtype=jnp.float32,
                   uniform="bidirectional")
    _check("xla", args, BlockPattern.bidirectional(3, 8), "bidirectional", jnp.float32)
    assert calls, "a long buffer did not take the chunked path"
    calls.clear()
    short = _inputs("xla", 5, B=1, T=8, G=2, S=S - 1, Dh=32, lengths=[7], dtype=jnp.float32, uniform="causal")
    jax.jit(functools.partial(api.block_attention, implementation="xla"))(*short, BlockPattern.causal(1, 8))
    assert not calls


@pytest.mark.parametrize("impl", INTERPRETED)
def test_interpreted_kernel_default_sizes(impl):
    # The production tile sizes (one tile per axis at these shapes) and a prefill-sized block.
    _run(impl, (4, 32, "causal", jnp.bfloat16, 200, 32), seed=11, sizes=None)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", *INTERPRETED])
def test_full_sweep(impl):
    """Every GQA ratio x block size, modes (causal, bidirectional, mixed batches) and dtypes
    alternating so that each G and each C meets every mode and both dtypes; random cache sizes."""
    rng = np.random.default_rng(0)
    for n, (gi, ci) in enumerate(itertools.product(range(4), range(4))):
        G, C = (1, 2, 4, 8)[gi], (1, 8, 16, 32)[ci]
        mode = ("causal", "bidirectional", "mixed")[(gi + ci) % 3]
        dtype = (jnp.float32, jnp.bfloat16)[(gi + ci // 2) % 2]
        _run(impl, (G, C, mode, dtype, int(rng.integers(8, 90)), 32), seed=100 + n)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("G", [1, 2, 4, 8])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_mixed_and_structured_patterns(impl, G, dtype):
    """Every implementation takes a pattern per row (:func:`_mixed_pattern`), with ragged lengths
    (0, S and two between), NaN stale slots and small tiles: several query tiles, block-key tiles
    and cache tiles, so the data-driven skipping of block-key tiles is exercised."""
    T, S = 20, 37
    args = _inputs(impl, 7 + G, B=5, T=T, G=G, S=S, Dh=32, lengths=[0, S, 11, 30, 1], dtype=dtype, uniform=None)
    _check(impl, args, _mixed_pattern(T), None, dtype, SMALL_SIZES[impl])


# --------------------------------------------- quadratic self-speculation: a block-sparse pattern
# Blocks of C + C*C queries: the seed and C-1 drafts causal, then C groups of C masks, group j
# seeing block keys 0..j and itself. Most block-key tiles of a group's query tile are empty, and
# the kernels skip them. The oracle's visibility comes from the description
# (``_oracles.quadratic_visible``), not from ``BlockPattern.quadratic``.

# (G, C of the program, C per row (smaller ones leave padding), dtype, S). With SMALL_SIZES the
# C=16 block has 34 block-key tiles of 8 keys (TPU) / 17 of 16 (Triton), most of them empty.
QUAD_CASES = [
    (1, 4, (4, 2, 4), jnp.float32, 30),
    (2, 8, (8, 8, 5), jnp.bfloat16, 45),
    (4, 16, (16, 11, 16), jnp.float32, 21),
]


def _quad_id(case):
    G, C, row_C, dtype, S = case
    return f"G{G}-C{C}-rows{'.'.join(map(str, row_C))}-{jnp.dtype(dtype).name}-S{S}"


def _run_quadratic(impl, case, seed, sizes):
    G, C, row_C, dtype, S = case
    W = C + C * C
    pattern = BlockPattern.quadratic(len(row_C), jnp.asarray(row_C, jnp.int32), W)
    visible = _oracles.quadratic_visible(row_C, W)
    lengths = [0, S, int(np.random.default_rng(seed).integers(1, S))][:len(row_C)]
    args = _inputs(impl, seed, B=len(row_C), T=W, G=G, S=S, Dh=32, lengths=lengths, dtype=dtype, uniform=None)
    _check(impl, args, pattern, None, dtype, sizes, visible=visible)


@pytest.mark.parametrize("case", QUAD_CASES, ids=_quad_id)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_quadratic_pattern_matches_oracle(impl, case):
    """Ragged lengths (0, S, between), rows of different C in one batch, NaN stale slots,
    poisoned outputs, small tiles: many block-key tiles, most of a group tile's skipped."""
    _run_quadratic(impl, case, 200 + QUAD_CASES.index(case), SMALL_SIZES[impl])


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", *INTERPRETED])
def test_quadratic_full_sweep(impl):
    """Every C (4, 8, 16, 32) x G (1, 2, 4), dtypes alternating, random cache sizes and row Cs;
    C = 32 (1056 queries) with medium tiles (17 / 33 block-key tiles) to keep the interpreter's
    grid small."""
    rng = np.random.default_rng(1)
    medium = {"xla": None, "pallas_interpret": TpuBlockSizes(block_q=128, block_kv=32, block_kv_new=64),
              "pallas_triton_interpret": TritonBlockSizes(block_q=64, block_kv=32, block_kv_new=32, num_splits=2)}
    for n, (C, G) in enumerate(itertools.product((4, 8, 16, 32), (1, 2, 4))):
        row_C = (C, int(rng.integers(2, C + 1)), C)
        dtype = (jnp.float32, jnp.bfloat16)[n % 2]
        case = (G, C, row_C, dtype, int(rng.integers(8, 60)))
        _run_quadratic(impl, case, 300 + n, medium[impl] if C == 32 else SMALL_SIZES[impl])


def test_quadratic_pattern_is_the_description_and_spec_quadratics():
    """``BlockPattern.quadratic`` is the description (the oracle's) and what the decode mode asks
    for (``spec_quadratic.request`` for rows in the QUAD phase, of different C in one program)."""
    import dataclasses

    import nld_jax
    from nld_jax.decode import Rows, Track
    from nld_jax.decode import spec_quadratic as quad

    for C in (2, 4, 8, 16):
        W = C + C * C
        np.testing.assert_array_equal(BlockPattern.quadratic(2, C).visible(), _oracles.quadratic_visible((C, C), W))
    row_C = (8, 3, 5)
    W = quad.width_for(8)
    pattern = BlockPattern.quadratic(3, jnp.asarray(row_C, jnp.int32), W)
    np.testing.assert_array_equal(pattern.visible(), _oracles.quadratic_visible(row_C, W))
    B, z = len(row_C), jnp.zeros((len(row_C),), jnp.int32)
    rows = Rows(mode=z, block_length=jnp.asarray(row_C, jnp.int32), max_new_tokens=z + 9,
                temperature=jnp.zeros((B,)), threshold=jnp.zeros((B,)), use_threshold=jnp.zeros((B,), bool),
                top_p=jnp.ones((B,)), top_k=z, use_lora=jnp.zeros((B,), bool), key=jnp.zeros((B, 2), jnp.uint32),
                stop_ids=jnp.full((B, 1), -1, jnp.int32))
    track = dataclasses.replace(Track.empty(B, 8, W), phase=z + quad.QUAD, done=jnp.zeros((B,), bool))
    config = nld_jax.NLDConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                               num_attention_heads=1, num_key_value_heads=1, head_dim=8, mask_token_id=3)
    requested = quad.request(rows, track, config).pattern
    np.testing.assert_array_equal(requested.group, pattern.group)
    np.testing.assert_array_equal(requested.reach, pattern.reach)


@pytest.mark.parametrize("G", [1, 4])
def test_quadratic_tile_lists_skip_most_tiles(G):
    """At C = 16 the lists are exact and visit far fewer block-key tiles than the extent bound
    (every tile up to a query tile's largest key), itself below the dense grid: about a fifth
    at the test's small tiles (where the kernel tests run), a half or less at the Triton
    kernel's defaults (32-key tiles)."""
    C, T = 16, 272
    pattern = BlockPattern.quadratic(1, C)
    visible = _oracles.quadratic_visible((C,), T)
    for bq, bkn, most in ((16, 8, 0.25), (16, 16, 0.25), (128, 32, 0.55)):
        count, extent = _check_tile_list(CacheBlockMask(T).block_tile_list(pattern, G, bq, bkn), visible, G, bq, bkn)
        dense = count.size * -(-T // bkn)
        assert count.sum() < most * extent.sum() and extent.sum() < dense, (bq, bkn, count.sum(), extent.sum())


@pytest.mark.parametrize("mutation", ["one_fewer", "count_prefix"])
@pytest.mark.parametrize("impl", INTERPRETED)
def test_a_kernel_that_skips_a_listed_tile_fails(impl, mutation, monkeypatch):
    """The kernels follow the lists, and the quadratic test catches a wrong one: visiting one
    fewer listed tile (``one_fewer``: the last listed tile of every query tile with several), or
    the first ``count`` tiles instead of the listed ones (``count_prefix``: what a kernel that
    reads only the count would visit) fails the oracle comparison."""
    case = (2, 8, (8, 8, 5), jnp.float32, 45)
    _run_quadratic(impl, case, 7, SMALL_SIZES[impl])  # the lists as built pass
    build = CacheBlockMask.block_tile_list

    def mutated(self, *a, **kw):
        tiles = build(self, *a, **kw)
        if mutation == "one_fewer":
            return BlockTileList(tiles.index, jnp.maximum(tiles.count - 1, 1))
        prefix = jnp.minimum(jnp.arange(tiles.index.shape[-1]), tiles.count[..., None] - 1)
        return BlockTileList(prefix.astype(jnp.int32), tiles.count)

    monkeypatch.setattr(CacheBlockMask, "block_tile_list", mutated)
    with pytest.raises(AssertionError, match="exceeds the bound"):
        _run_quadratic(impl, case, 7, SMALL_SIZES[impl])


def test_empty_cache_and_prefill_shapes():
    """S = 0 (a prefill from scratch) and a block longer than the tiles, uniform and mixed."""
    args = block_inputs(5, B=2, T=24, H=4, K=2, Dh=32, S=0, lengths=[0, 0], dtype=jnp.float32)
    mixed = BlockPattern.per_row(jnp.asarray([False, True]), 24, valid=jnp.asarray([9, 24]))
    for impl in ["xla", *INTERPRETED]:
        _check(impl, args, BlockPattern.causal(2, 24), "causal", jnp.float32)
        _check(impl, args, mixed, None, jnp.float32)


def test_one_dropped_key_is_caught_at_bf16():
    """The bf16 bound is tight enough to fail an attention that skips one of 77 cache slots."""
    args = block_inputs(2, B=1, T=8, H=4, K=2, Dh=64, S=77, lengths=[77], dtype=jnp.bfloat16)
    pattern = BlockPattern.bidirectional(1, 8)
    dropped = (*args[:5], jnp.asarray([76], jnp.int32))  # the last valid slot left out
    out = api.block_attention(*dropped, pattern, uniform="bidirectional", implementation="xla")
    expected, weighted = _oracles.decode_attention(*args, _oracles.block_visible(pattern.group, pattern.reach))
    with pytest.raises(AssertionError, match="exceeds the bound"):
        _oracles.assert_within(out, expected, _oracles.bf16_bound(expected, weighted))


def _metadata_patterns(T: int, B: int) -> BlockPattern:
    """``B`` rows cycling through :func:`_mixed_pattern`'s five and two quadratic-spec rows (the
    block lengths whose QUAD block fits ``T``: ``C = 3`` and ``C = 2``, padding after them)."""
    base = _mixed_pattern(T)
    quad = BlockPattern.quadratic(2, jnp.asarray([3, 2]), T)
    rows = [jnp.concatenate([getattr(base, f), getattr(quad, f)]) for f in ("group", "reach")]
    return BlockPattern(*(jnp.resize(x, (B, T)) for x in rows))


def _check_tile_list(tiles, visible, G: int, bq: int, bkn: int):
    """A :class:`BlockTileList` is exact against the oracle's dense mask: the tiles it visits are
    those holding a key one of the query tile's rows sees (skipped tiles fully invisible, visited
    ones not empty), listed in ascending order, padded by repeating the last one; never more than
    the extent bound visits. Returns ``(visited, extent)`` tile counts per (row, query tile)."""
    index, count = np.asarray(tiles.index), np.asarray(tiles.count)
    want = _oracles.tile_visible(visible, G, bq, bkn)
    assert index.shape == want.shape and count.shape == want.shape[:2]
    assert index.dtype == count.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(tiles.visited()), want)
    np.testing.assert_array_equal(count, want.sum(axis=-1))
    for b, i in itertools.product(*map(range, count.shape)):
        listed = index[b, i, :count[b, i]]
        np.testing.assert_array_equal(listed, np.nonzero(want[b, i])[0])
        assert (index[b, i, count[b, i]:] == listed[-1]).all()  # padding re-requests the last tile
    extent = _oracles.extent_tiles(visible, G, bq, bkn)
    assert (count >= 1).all() and (count <= extent).all()
    return count, extent


def test_mask_tile_metadata_is_exact():
    """The kernels' predicate is the oracle's, and their tile metadata is exact (skipping neither
    unsafe nor wasteful): cache tiles from the length, block-key tile lists from the pattern
    (:func:`_check_tile_list`), for every row pattern of :func:`_metadata_patterns`, GQA rows and
    tile sizes that cut the block into one to several tiles. Causal and bidirectional rows visit
    exactly what the extent bound visits (they cost no more than before the lists)."""
    S, T, G = 45, 20, 4
    lengths = jnp.arange(0, S + 1, 3, dtype=jnp.int32)  # 16 rows: the 7 patterns, cycled
    pattern = _metadata_patterns(T, lengths.shape[0])
    mask = CacheBlockMask(T)
    dense = np.asarray(mask.materialize(lengths, pattern, S))  # [B, T, S + T]
    oracle_block = _oracles.block_visible(pattern.group, pattern.reach)
    np.testing.assert_array_equal(dense[:, :, S:], oracle_block)
    valid = np.arange(S)[None, None, :] < np.asarray(lengths)[:, None, None]
    np.testing.assert_array_equal(dense[:, :, :S], np.broadcast_to(valid, dense[:, :, :S].shape))

    for bk in (8, 16):
        n_cache = np.asarray(mask.cache_tiles(lengths, bk))
        for b, length in enumerate(np.asarray(lengths)):
            visible_cache = dense[b, :, :S].any(axis=0)
            assert not visible_cache[n_cache[b] * bk:].any()
            if length:
                assert visible_cache[(n_cache[b] - 1) * bk:].any()
    uniform_rows = np.isin(np.arange(lengths.shape[0]) % 7, (0, 1))  # causal, bidirectional
    for bq, bkn in ((8, 4), (16, 8), (48, 16), (16, 32), (12, 3)):
        count, extent = _check_tile_list(mask.block_tile_list(pattern, G, bq, bkn), oracle_block, G, bq, bkn)
        np.testing.assert_array_equal(count[uniform_rows], extent[uniform_rows])
    # Skipping happens: the first query tile of the causal row visits one block tile and the
    # bidirectional row's all; the quadratic rows visit fewer than their extent.
    count, extent = _check_tile_list(mask.block_tile_list(pattern, G, 8, 4), oracle_block, G, 8, 4)
    assert count[0, 0] == 1 and count[1, 0] == -(-T // 4)
    assert count[5:7].sum() < extent[5:7].sum()


def test_dispatch():
    args = block_inputs(1, B=1, T=4, H=2, K=1, Dh=32, S=8, lengths=[5], dtype=jnp.float32)
    causal = BlockPattern.causal(1, 4)
    shape = (1, 4, 2, 32)
    if jax.default_backend() == "cpu":
        assert api.resolve_implementation("auto", shape, 1, jnp.float32, uniform="causal") == "xla"
        with pytest.raises(NotImplementedError, match="needs a TPU"):
            api.block_attention(*args, causal, uniform="causal", implementation="pallas_tpu")
        with pytest.raises(NotImplementedError, match="needs a GPU"):
            api.block_attention(*args, causal, implementation="pallas_triton")
        assert api.resolve_implementation("pallas_tpu", shape, 1, jnp.float32, uniform="causal",
                                          fallback=True) == "xla"
    # The TPU and Triton kernels take any pattern (uniform=None); the Mosaic GPU kernel only a
    # uniform one: named for a mixed batch it says why, and fallback goes on to Triton.
    for impl in INTERPRETED:
        assert api.resolve_implementation(impl, shape, 1, jnp.float32, uniform=None) == impl
    with pytest.raises(NotImplementedError, match="batch-uniform"):
        api.resolve_implementation("pallas_mosaic_gpu", (1, 4, 2, 128), 1, jnp.bfloat16, uniform=None)
    assert api.resolve_implementation("pallas_mosaic_gpu", (1, 4, 2, 128), 1, jnp.bfloat16, uniform=None,
                                      fallback=True) == ("pallas_triton" if jax.default_backend() == "gpu" else "xla")
    with pytest.raises(ValueError, match="uniform must be"):
        api.resolve_implementation("xla", shape, 1, jnp.float32, uniform="sparse")
    with pytest.raises(NotImplementedError, match="power of two"):
        api.resolve_implementation("pallas_triton_interpret", (1, 4, 2, 48), 1, jnp.float32, uniform="causal")
    with pytest.raises(ValueError, match="unknown"):
        api.resolve_implementation("cudnn", shape, 1, jnp.float32)


def test_the_model_reaches_the_kernel_it_names():
    """``nld_jax.attention.decode_attention`` runs the implementation of its Runtime: an
    interpreted kernel gives the XLA result on a mixed batch, and a kernel that cannot take the
    call is refused."""
    from nld_jax.attention import decode_attention
    from nld_jax.runtime import Runtime

    args = block_inputs(4, B=2, T=8, H=4, K=2, Dh=32, S=20, lengths=[3, 20], dtype=jnp.float32, garbage=0.0)
    pattern = BlockPattern.per_row(jnp.asarray([True, False]), 8)
    outs = {impl: jax.jit(lambda *a, impl=impl: decode_attention(*a, pattern, uniform=None,
                                                                 runtime=Runtime(impl)))(*args)
            for impl in ("xla", "pallas_interpret")}
    np.testing.assert_allclose(outs["pallas_interpret"], outs["xla"], atol=2e-5, rtol=2e-5)
    with pytest.raises(NotImplementedError, match="batch-uniform"):
        decode_attention(*args, pattern, uniform=None, runtime=Runtime("pallas_mosaic_gpu"))
