"""Contracts of the user-facing layer that a review of the whole house found broken (each test
fails on the code before the fix): prompt shapes, per-generation streaming, the KV-cache bound,
the context check. The sharding ones (programs keyed by shardings, logit entry points that
recompiled on every call, the train step's activation constraints) are in test_sharding.py and
test_training_sharded.py.
"""

from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nld_jax
from nld_jax.decode import DecodeInputs, DecodeOptions, cache_size_for, decode
from nld_jax.kv_cache import KVCache


@pytest.mark.parametrize("make", [np.asarray, jnp.asarray, lambda ids: [np.int64(t) for t in ids],
                                  lambda ids: np.asarray(ids, np.int32)],
                         ids=["numpy-1d", "jax-1d", "list-of-numpy-ints", "numpy-int32"])
def test_a_one_dimensional_prompt_is_one_prompt(tiny, cases, make):
    """Bug: a 1-D array (or a list of numpy ints) became one single-token prompt per id, and a
    1-D jax array was refused."""
    ids = cases["prompts"]["batch"]["ids"][0][:12]
    want = nld_jax.generate(tiny, [ids], mode="ar", max_new_tokens=6)
    got = nld_jax.generate(tiny, make(ids), mode="ar", max_new_tokens=6)
    assert got.tokens == want.tokens and len(got.tokens) == 1
    batch = nld_jax.generate(tiny, np.asarray([ids, ids]), mode="ar", max_new_tokens=6)
    assert batch.tokens == want.tokens * 2  # a 2-D array is a batch


def test_concurrent_streams_get_their_own_tokens(tiny, cases):
    """Bug: the streaming listener was process-global, so two generations in two threads got each
    other's tokens. Generation 0's listener is slow (it sleeps), so generation 1 runs while 0 is
    still streaming; each stream must deliver exactly its own result."""
    prompts = [cases["prompts"]["batch"]["ids"][0][:20], cases["prompts"]["batch"]["ids"][1][:11]]
    nld_jax.generate(tiny, [prompts[0]], mode="ar", max_new_tokens=24, on_tokens=lambda r, t: None)  # compile
    streams: list[list[int]] = [[], []]
    results = [None, None]
    started = threading.Event()

    def listener(i):
        def on_tokens(row, new):
            if i == 0:
                started.set()
                time.sleep(0.02)
            streams[i].extend(new)
        return on_tokens

    def run(i):
        if i == 1:
            started.wait(timeout=60)
        results[i] = nld_jax.generate(tiny, [prompts[i]], mode="ar", max_new_tokens=24, on_tokens=listener(i))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None for r in results)
    assert results[0].tokens[0] != results[1].tokens[0]  # the two generations differ: a mix-up would show
    for i in range(2):
        assert streams[i] == results[i].tokens[0], i


def test_listeners_are_routed_by_stream_id():
    """The mechanism itself: two listeners registered at once each receive only the snapshots
    tagged with their own stream id."""
    from nld_jax.decode.listeners import TokenStream, _host_emit, listening

    got = {0: [], 1: []}
    streams = [TokenStream(lambda row, new, i=i: got[i].extend(new)) for i in range(2)]
    with listening(streams[0]) as id0, listening(streams[1]) as id1:
        assert id0 != id1
        _host_emit(np.int32(id1), np.asarray([[7, 8, 9]]), np.asarray([2]))
        _host_emit(np.int32(id0), np.asarray([[4, 5, 6]]), np.asarray([3]))
    assert got == {0: [4, 5, 6], 1: [7, 8]}


@pytest.mark.parametrize("mode", ["ar", "diffusion"])
def test_finished_rows_never_write_the_cache(tiny, cases, mode):
    """Bug: rows that had finished kept writing their block's K/V at their length, past the slots
    ``cache_size_for`` provides (a clamped write that only did no harm because the cache was
    thrown away). A finished row's cache past its length must stay as it was (zeros here)."""
    # The EOS batch: in AR row 0 meets EOS after 25 tokens; in diffusion (blocks of 16) row 1
    # after two blocks while row 0 runs a third.
    prompts = np.asarray(cases["prompts"]["eos_batch"]["ids"], np.int32)
    B, P = prompts.shape
    options = DecodeOptions(mode=mode, max_new_tokens=48, block_length=16, use_threshold=mode == "diffusion")
    cache = KVCache.empty(tiny.config, B, cache_size_for(P, options))
    inputs = DecodeInputs(tokens=jnp.asarray(prompts), lengths=jnp.full((B,), P, jnp.int32),
                          temperature=jnp.zeros((B,)), threshold=jnp.full((B,), 0.9), key=jax.random.PRNGKey(0))
    run = jax.jit(decode, static_argnames=("config", "options", "runtime"))
    out, cache = run(tiny.params, None, cache, inputs, config=tiny.config, options=options)
    n, lengths = np.asarray(out.num_tokens), np.asarray(cache.lengths)
    assert n.min() < 48 and lengths.min() < lengths.max()  # one row finished while the other decoded on
    for b in range(B):
        assert not np.asarray(cache.k[:, b, lengths[b]:]).any(), f"row {b} wrote past its length"
        assert not np.asarray(cache.v[:, b, lengths[b]:]).any(), f"row {b} wrote past its length"


def test_context_check_counts_the_block_overshoot(tiny):
    """Bug: the context check ignored that spec (and diffusion's last block) may run block_length
    - 1 positions past prompt + max_new_tokens."""
    limit, block, new = tiny.config.max_position_embeddings, 8, 16
    fits = [1] * (limit - new - (block - 1))
    nld_jax.generate(tiny, [fits], mode="spec", max_new_tokens=new, block_length=block)
    too_long = [1] * (limit - new - 3)  # prompt + max_new_tokens fit; the overshoot does not
    nld_jax.generate(tiny, [too_long], mode="ar", max_new_tokens=new)
    for mode in ("spec", "diffusion"):
        with pytest.raises(ValueError, match="block may run past the budget"):
            nld_jax.generate(tiny, [too_long], mode=mode, max_new_tokens=new, block_length=block)



@pytest.mark.parametrize("mode", ["spec", "spec_quadratic", "diffusion"])
def test_what_a_row_streams_is_what_it_returns_and_spec_overshoots_as_nvidia_does(tiny, cases, mode):
    """NVIDIA's spec emits a whole verified run, so a row may end up to ``block_length - 1``
    tokens past ``max_new_tokens`` (its golden case returns 66 tokens for 64; the context check
    counts that overshoot). The output buffer is bucketed to a block multiple: it must hold the
    overshoot, the streamed tokens must be exactly the returned ones, and the first
    ``max_new_tokens`` must be greedy AR's."""
    prompts = [p["ids"][:n] for p, n in zip(cases["prompts"]["spec"], (24, 9, 17))]
    block = 8
    for budget in (20, 24):
        ar = nld_jax.generate(tiny, prompts, mode="ar", max_new_tokens=budget + block)
        got: list = []
        out = nld_jax.generate(tiny, prompts, mode=mode, max_new_tokens=budget, block_length=block,
                               on_tokens=lambda row, ids: got.append((row, list(ids))))
        assert all(budget <= len(t) <= budget + block - 1 for t in out.tokens), [len(t) for t in out.tokens]
        assert [sum((ids for r, ids in got if r == b), []) for b in range(len(prompts))] == out.tokens
        if mode != "diffusion":
            assert all(t == a[:len(t)] for t, a in zip(out.tokens, ar.tokens))
