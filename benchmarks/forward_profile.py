"""Where one block forward's time goes: each phase timed as its own jitted sub-program, side by side.

For a random NLD config (default the ~60M one of the speed goals; float32, batch 1) and each
block length C of ``--blocks``, times best-of-N (after a warm-up call) with the library's own
functions:

(a) the whole block forward (``forward_hidden``: embed + layers + final norm) with a cache of
    ``--cache-len`` valid entries held in a buffer of that length, of the length ``generate``
    allocates (``cache_size_for``), and of ``--long-cache`` slots: the XLA attention scores every
    slot of the buffer and masks the invalid ones, so this shows what touching the whole buffer
    costs;
(b) the layers split up, each phase scanned over all L layers: q/k/v projections, attention
    over the cache (``decode_attention``), o projection, MLP, and the whole ``decoder_layer``;
(c) the head over C rows: ``lm_head`` (logits), ``greedy_head`` with and without its
    confidence (max + logsumexp, no softmax array), and a full ``softmax`` of the logits;
(d) the selection (``select_transfer``) and one whole decode-loop iteration (``loop.step``) in
    each mode against its forward + greedy head alone: the difference is the loop's overhead
    (cache write, selection, state updates);
(e) the cache write: ``KVCache.write`` (what the loop does) against one ``dynamic_update_slice``
    of a donated buffer, and against the same update without donation (a full copy).

Floors: bandwidth = bytes the phase must read (its weights; the cache entries for attention)
/ the read bandwidth measured here; compute = its matmul FLOPs / the matmul rate measured here
at the LM head's shape with C rows. ``x floor`` divides by the larger. Times depend on the
machine's load; the floors are measured in the same run.

    python benchmarks/forward_profile.py                          # 60M, batch 1, C = 1, 8, 32
    python benchmarks/forward_profile.py --blocks 8 --repeats 20
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import nld_jax  # noqa: E402
from decode_bench import SIZES, bench_config, matmul_flops_per_second, read_bandwidth, read_bytes  # noqa: E402
from nld_jax import quant  # noqa: E402
from nld_jax.attention import BlockPattern, decode_attention  # noqa: E402
from nld_jax.decode import loop  # noqa: E402
from nld_jax.decode.options import DecodeInputs, DecodeOptions, cache_size_for, output_size_for  # noqa: E402
from nld_jax.decode.sampling import select_transfer  # noqa: E402
from nld_jax.decode.state import DecodeState, Track  # noqa: E402
from nld_jax.kv_cache import KVCache  # noqa: E402
from nld_jax.model import decoder_layer, forward_hidden, greedy_head, lm_head, rms_norm  # noqa: E402
from nld_jax.rope import rope_cos_sin  # noqa: E402
from nld_jax.runtime import DEFAULT_RUNTIME  # noqa: E402

__all__ = ["time_best", "profile", "main"]


def time_best(fn, *args, repeats: int = 10, fresh=None) -> float:
    """Best wall time (s) of ``fn(*args)`` after one warm-up call. ``fresh()`` (optional) makes
    new arguments for each call (a donated buffer cannot be passed twice)."""
    jax.block_until_ready(fn(*(fresh() if fresh else args)))
    best = float("inf")
    for _ in range(repeats):
        call_args = fresh() if fresh else args
        jax.block_until_ready(call_args)
        t = time.perf_counter()
        jax.block_until_ready(fn(*call_args))
        best = min(best, time.perf_counter() - t)
    return best


def _cache(config, batch, size, valid, seed=0):
    """A float32 cache of ``size`` slots with ``valid`` entries per row (random K/V)."""
    shape = (config.L, batch, size, config.K, config.Dh)
    k = jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)
    v = jax.random.normal(jax.random.PRNGKey(seed + 1), shape, jnp.float32)
    return KVCache(k, v, jnp.full((batch,), valid, jnp.int32))


TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)  # a smoke-test size (tests/test_forward_profile.py)


def _config(size: str):
    return dataclasses.replace(bench_config("60m"), **TINY) if size == "tiny" else bench_config(size)


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class Row:
    phase: str
    ms: float
    share: float | None = None  # of the block forward
    floor_ms: float | None = None

    def line(self) -> str:
        share = "" if self.share is None else f"{100 * self.share:.0f}%"
        floor = "" if self.floor_ms is None else f"{self.floor_ms:.3f}"
        ratio = "" if not self.floor_ms else f"{self.ms / self.floor_ms:.2f}"
        return f"| {self.phase} | {self.ms:.3f} | {share} | {floor} | {ratio} |"


def _mode_state(model, mode, C, prompt_len, new_tokens, threshold):
    """A decode state right after prefill + start, as ``loop.decode`` builds it (batch 1)."""
    config, params = model.config, model.params
    options = DecodeOptions(mode=mode, max_new_tokens=new_tokens, block_length=C,
                            use_threshold=mode == "diffusion" and threshold is not None)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(5, config.vocab_size, size=(1, prompt_len)), jnp.int32)
    inputs = DecodeInputs(tokens=tokens, lengths=jnp.asarray([prompt_len], jnp.int32),
                          temperature=jnp.zeros((1,), jnp.float32),
                          threshold=jnp.full((1,), threshold or 0.0, jnp.float32),
                          key=jnp.zeros((2,), jnp.uint32), stop_ids=jnp.full((1, 1), -1, jnp.int32))
    spec = loop.StepSpec.for_options(options)
    size = cache_size_for(prompt_len, options)

    @jax.jit
    def init(params):
        rows = loop.rows_for(inputs, options, config)
        cache = KVCache.empty(config, 1, size, jnp.float32)
        cache, last = loop.prefill(params, config, cache, inputs.tokens, inputs.lengths)
        track = loop.start(params, config, rows, Track.empty(1, output_size_for(options), spec.width), last, spec)
        return DecodeState(cache, rows, track)

    return init(params), spec, options


def profile(args) -> list[tuple[str, list[Row]]]:
    config = _config(args.size)
    model = nld_jax.random_model(config, seed=0, dtype="float32")
    params = model.params
    B, L, R = args.batch, config.L, args.repeats
    weight_bytes = read_bytes(params)
    bw = read_bandwidth(weight_bytes)
    layer = jax.tree.map(lambda x: x[0], params["layers"])
    head_bytes = _nbytes(params["embed_tokens"] if config.tie_word_embeddings else params["diffusion_head"])
    attn_w = _nbytes(layer["self_attn"])
    mlp_w = _nbytes(layer["mlp"])
    qkv_w = sum(_nbytes(layer["self_attn"][n]) for n in ("q_proj", "k_proj", "v_proj"))
    o_w = _nbytes(layer["self_attn"]["o_proj"])
    print(f"backend={jax.default_backend()} {args.size} ({config.num_params() / 1e6:.1f}M params) batch {B}, float32; "
          f"read bandwidth {bw / 1e9:.1f} GB/s; weights read per forward {weight_bytes / 2**20:.1f} MiB "
          f"(floor {1e3 * weight_bytes / bw:.2f} ms); best of {R}", flush=True)
    tables = []
    for C in args.blocks:
        flops_s = matmul_flops_per_second(config, B * C, jnp.float32)

        def floor(nbytes, matmul_weights=0, extra_flops=0.0):
            """ms: the larger of bytes / bandwidth and FLOPs / the matmul rate at B*C rows."""
            flops = 2.0 * B * C * matmul_weights / 4 + extra_flops  # float32 weights: 4 bytes each
            return 1e3 * max(nbytes / bw, flops / flops_s)

        rows: list[Row] = []
        rng = np.random.default_rng(C)
        tokens = jnp.asarray(rng.integers(5, config.vocab_size, size=(B, C)), jnp.int32)
        pattern = BlockPattern.causal(B, C) if C == 1 else BlockPattern.bidirectional(B, C)
        uniform = "causal" if C == 1 else "bidirectional"
        valid = args.cache_len
        gen_size = cache_size_for(args.prompt_len, DecodeOptions(mode="ar" if C == 1 else "diffusion",
                                                                 max_new_tokens=args.new_tokens, block_length=C))
        fwd = jax.jit(functools.partial(forward_hidden, config=config, pattern=pattern, uniform=uniform))
        attn_flops = 4.0 * B * C * config.H * config.Dh * (valid + C)  # scores + weighted values, valid keys
        cache_read = lambda n: 2 * L * B * n * config.K * config.Dh * 4  # noqa: E731
        fwd_floor = floor(weight_bytes + cache_read(valid), weight_bytes, L * attn_flops)
        base_ms = None
        for label, size in ((f"cache buffer = {valid} valid slots", valid),
                            (f"cache buffer = {gen_size} (generate's)", gen_size),
                            (f"cache buffer = {args.long_cache}", args.long_cache)):
            cache = _cache(config, B, size, valid)
            ms = 1e3 * time_best(lambda p, t, c: fwd(p, tokens=t, cache=c), params, tokens, cache, repeats=R)
            base_ms = ms if base_ms is None else base_ms
            rows.append(Row(f"(a) block forward, {label}", ms, ms / base_ms, fwd_floor))
        # the forward the rest is compared with: generate's buffer
        cache = _cache(config, B, gen_size, valid)
        fwd_ms = 1e3 * time_best(lambda p, t, c: fwd(p, tokens=t, cache=c), params, tokens, cache, repeats=R)

        # (b) phase by phase, each scanned over all L layers (every layer's weights read once, as in
        # the forward: one layer timed over and over would sit in the CPU's caches)
        x = jax.random.normal(jax.random.PRNGKey(1), (B, C, config.D), jnp.float32)
        positions = valid + jnp.arange(C, dtype=jnp.int32)[None, :].repeat(B, 0)
        cos, sin = rope_cos_sin(config, positions, jnp.float32)
        lengths = cache.lengths
        eps = config.rms_norm_eps
        layers = params["layers"]

        def over_layers(fn):
            """``fn(layer slice, x, *args)`` for every layer (x carried), outputs stacked."""
            def run(xs, x, *args):
                return lax.scan(lambda x, sl: (x, fn(sl, x, *args)), x, xs)[1]
            return jax.jit(run)

        def qkv_fn(layer, x):
            h = rms_norm(x, layer["input_layernorm"], eps)
            return tuple(quant.einsum("btd,dhk->bthk", h, layer["self_attn"][n]) for n in ("q_proj", "k_proj", "v_proj"))

        def attend_fn(cached, x, q, k, v, n):
            return decode_attention(q, k, v, cached[0], cached[1], n, pattern, uniform=uniform, runtime=DEFAULT_RUNTIME)

        def o_fn(layer, x, o):
            return x + quant.einsum("bthk,hkd->btd", o, layer["self_attn"]["o_proj"])

        def mlp_fn(layer, x):
            p = layer["mlp"]
            h = rms_norm(x, layer["post_attention_layernorm"], eps)
            gate, up = quant.einsum("btd,df->btf", h, p["gate_proj"]), quant.einsum("btd,df->btf", h, p["up_proj"])
            return x + quant.einsum("btf,fd->btd", jax.nn.silu(gate) * up, p["down_proj"])

        def layer_fn(sl, x, n):
            layer, (ck, cv) = sl
            return decoder_layer(config, layer, x, cos, sin, None, lambda q, k, v: decode_attention(
                q, k, v, ck, cv, n, pattern, uniform=uniform, runtime=DEFAULT_RUNTIME))[0]

        q, k, v = qkv_fn(jax.tree.map(lambda a: a[0], layers), x)
        attn_out = attend_fn((cache.k[0], cache.v[0]), x, q, k, v, lengths)
        layer_rows = [
            ("q/k/v projections (+ norm)", time_best(over_layers(qkv_fn), layers, x, repeats=R), floor(qkv_w, qkv_w)),
            (f"attention over the cache ({gen_size} slots, {valid} valid)",
             time_best(over_layers(attend_fn), (cache.k, cache.v), x, q, k, v, lengths, repeats=R),
             floor(cache_read(valid) / L, 0, attn_flops)),
            ("o projection", time_best(over_layers(o_fn), layers, x, attn_out, repeats=R), floor(o_w, o_w)),
            ("MLP (+ norm)", time_best(over_layers(mlp_fn), layers, x, repeats=R), floor(mlp_w, mlp_w)),
            ("whole decoder_layer", time_best(over_layers(layer_fn), (layers, (cache.k, cache.v)), x, lengths,
                                              repeats=R),
             floor(attn_w + mlp_w + cache_read(valid) / L, attn_w + mlp_w, attn_flops)),
        ]
        for name, s, fl in layer_rows:
            rows.append(Row(f"(b) {L} layers: {name}", 1e3 * s, 1e3 * s / fwd_ms, fl * L))

        # (c) the head over C rows
        hidden = jax.random.normal(jax.random.PRNGKey(2), (B, C, config.D), jnp.float32)
        head_floor = floor(head_bytes, head_bytes)
        logits_fn = jax.jit(lambda p, h: lm_head(p, config, h))
        greedy_conf = jax.jit(lambda p, h: greedy_head(p, config, h, with_confidence=True))
        greedy_plain = jax.jit(lambda p, h: greedy_head(p, config, h, with_confidence=False))
        softmax = jax.jit(lambda p, h: jnp.max(jax.nn.softmax(lm_head(p, config, h), axis=-1), axis=-1))
        for name, fn in (("LM head: logits [C, V]", logits_fn), ("greedy head, argmax only", greedy_plain),
                         ("greedy head, argmax + confidence (max, logsumexp)", greedy_conf),
                         ("LM head + full softmax + max", softmax)):
            ms = 1e3 * time_best(fn, params, hidden, repeats=R)
            rows.append(Row(f"(c) {name}", ms, ms / fwd_ms, head_floor))

        # (d) selection, and one loop iteration per mode against its forward + head alone
        conf = jax.random.uniform(jax.random.PRNGKey(3), (B, C))
        is_mask = jnp.ones((B, C), bool)
        select = jax.jit(select_transfer)
        ms = 1e3 * time_best(select, conf, is_mask, jnp.ones((B,), jnp.int32), jnp.full((B,), 0.9),
                             jnp.ones((B,), bool), repeats=R)
        rows.append(Row("(d) selection (select_transfer)", ms, ms / fwd_ms))
        modes = ["ar"] if C == 1 else ["diffusion", "spec"] + (["spec_quadratic"] if C <= args.quadratic_max else [])
        for mode in modes:
            state, spec, options = _mode_state(model, mode, C, args.prompt_len, args.new_tokens, args.threshold)
            W = spec.width
            step = jax.jit(functools.partial(loop.step, config=config, spec=spec), donate_argnums=(2,))
            holder = {"state": state}

            def one_step(params, _holder=holder, _step=step):
                _holder["state"] = _step(params, None, _holder["state"])
                return _holder["state"]

            step_ms = 1e3 * time_best(one_step, params, repeats=R)
            st = holder["state"]
            wtok = jnp.zeros((1, W), jnp.int32) + 7
            mode_pattern = BlockPattern.causal(1, W) if mode == "ar" else BlockPattern.bidirectional(1, W)

            @jax.jit
            def fwd_head(params, tokens, cache, _pattern=mode_pattern, _conf=spec.confidence):
                h, _, _ = forward_hidden(params, config, tokens, cache, pattern=_pattern, uniform=None)
                return greedy_head(params, config, h, with_confidence=_conf)

            alone_ms = 1e3 * time_best(fwd_head, params, wtok, st.cache, repeats=R)
            mfloor = floor(weight_bytes, weight_bytes * W / C)
            rows.append(Row(f"(d) {mode} (width {W}): forward + greedy head alone", alone_ms, alone_ms / fwd_ms,
                            mfloor))
            rows.append(Row(f"(d) {mode}: one loop.step (forward, head, cache write, selection, state)", step_ms,
                            step_ms / fwd_ms, mfloor))
            rows.append(Row(f"(d) {mode}: loop overhead (step - forward alone)", step_ms - alone_ms,
                            (step_ms - alone_ms) / fwd_ms))

        # (e) cache write of one block
        k_new = jax.random.normal(jax.random.PRNGKey(4), (L, B, C, config.K, config.Dh), jnp.float32)
        v_new = k_new + 1.0
        where = jnp.ones((B,), bool)
        block_bytes = 2 * _nbytes(k_new)

        def fresh_cache():
            return (_cache(config, B, gen_size, valid), k_new, v_new)

        write = jax.jit(lambda c, k, v: c.write(k, v, where=where), donate_argnums=(0,))
        dus = jax.jit(lambda c, k, v: (lax.dynamic_update_slice(c.k, k, (0, 0, c.lengths[0], 0, 0)),
                                       lax.dynamic_update_slice(c.v, v, (0, 0, c.lengths[0], 0, 0))),
                      donate_argnums=(0,))
        copy = jax.jit(lambda c, k, v: (lax.dynamic_update_slice(c.k, k, (0, 0, c.lengths[0], 0, 0)),
                                        lax.dynamic_update_slice(c.v, v, (0, 0, c.lengths[0], 0, 0))))
        for name, fn in (("KVCache.write, donated (the loop's)", write),
                         ("one dynamic_update_slice per K/V, donated", dus),
                         ("the same, not donated (full copy)", copy)):
            ms = 1e3 * time_best(fn, repeats=R, fresh=fresh_cache)
            rows.append(Row(f"(e) cache write: {name}", ms, ms / fwd_ms, 1e3 * block_bytes / bw))
        tables.append((f"C = {C} (block forward {fwd_ms:.2f} ms with generate's {gen_size}-slot cache, "
                       f"{valid} valid; matmul rate {flops_s / 1e9:.0f} GFLOP/s at {B * C} rows)", rows))
    return tables


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES) + ["tiny"], default="60m")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--blocks", default="1,8,32", help="block lengths C, comma-separated")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--cache-len", type=int, default=None,
                   help="valid cache entries (default prompt + half the new tokens)")
    p.add_argument("--long-cache", type=int, default=4096, help="a long cache buffer (slots), same valid entries")
    p.add_argument("--threshold", type=float, default=0.9, help="diffusion's unmasking threshold")
    p.add_argument("--quadratic-max", type=int, default=8,
                   help="largest C for spec_quadratic (its forward is C*(C+1) tokens wide)")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    args.blocks = [int(b) for b in str(args.blocks).split(",")]
    if args.cache_len is None:
        args.cache_len = args.prompt_len + args.new_tokens // 2
    tables = profile(args)
    for title, rows in tables:
        print(f"\n{title}\n\n| phase | ms | share of the forward | floor ms | x floor |\n|---|---:|---:|---:|---:|")
        for row in rows:
            print(row.line())
    return tables


if __name__ == "__main__":
    main()
