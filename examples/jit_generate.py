"""Compose NLD generation inside your own ``jax.jit``.

One compiled program generates a batch of prompts in all three modes and scores the outputs
(here: agreement of each mode with AR, and tokens per forward). The generate functions are pure
(``nld_jax.decode``): config and options are static arguments, weights and inputs are traced, so
calling the program again with new prompts of the same shape, a new threshold or a new key
reuses the compiled program. The script prints how many times the program was traced.

    python examples/jit_generate.py [--checkpoint DIR]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import nld_jax
from nld_jax import DecodeInputs, DecodeOptions, KVCache, decode
from nld_jax.decode import cache_size_for

MAX_NEW = 32
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def __init__(self):"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None)
    args = p.parse_args(argv)
    model = nld_jax.load(args.checkpoint)
    config, block = model.config, model.config.block_size
    modes = {
        "ar": DecodeOptions(mode="ar", max_new_tokens=MAX_NEW),
        "diffusion": DecodeOptions(mode="diffusion", max_new_tokens=MAX_NEW, block_length=block, use_threshold=True),
        "spec": DecodeOptions(mode="spec", max_new_tokens=MAX_NEW, block_length=block),
    }
    traces = []

    @jax.jit
    def generate_and_score(params, lora, prompts, lengths, threshold, key):
        traces.append(1)  # runs only while tracing
        results = {}
        for name, opts in modes.items():
            cache = KVCache.empty(config, prompts.shape[0], cache_size_for(prompts.shape[1], opts), params["norm"].dtype)
            inputs = DecodeInputs(prompts, lengths, temperature=jnp.float32(0.0), threshold=threshold, key=key)
            out, _ = decode(params, lora, cache, inputs, config=config, options=opts)
            results[name] = out
        ar = results["ar"]
        scores = {}
        for name, out in results.items():
            n = jnp.minimum(jnp.minimum(out.num_tokens, ar.num_tokens), MAX_NEW)
            valid = jnp.arange(MAX_NEW)[None, :] < n[:, None]
            agree = jnp.sum((out.tokens[:, :MAX_NEW] == ar.tokens[:, :MAX_NEW]) & valid, axis=1) / jnp.maximum(n, 1)
            scores[name] = {"agreement_with_ar": agree, "tpf": out.num_tokens / out.nfe, "tokens": out.tokens}
        return scores

    ids = [model.tokenizer.encode(t) for t in PROMPTS]
    width = 16 * ((max(map(len, ids)) + 15) // 16)
    prompts = jnp.asarray([i + [0] * (width - len(i)) for i in ids], jnp.int32)
    lengths = jnp.asarray([len(i) for i in ids], jnp.int32)
    for threshold, seed in ((0.9, 0), (0.7, 1)):
        scores = generate_and_score(model.params, model.lora, prompts, lengths, jnp.float32(threshold),
                                    jax.random.PRNGKey(seed))
        print(f"threshold {threshold}:")
        for name, s in scores.items():
            print(f"  {name:<10} agreement with AR {[round(float(a), 2) for a in s['agreement_with_ar']]}"
                  f"  TPF {[round(float(t), 2) for t in s['tpf']]}")
    print(f"traced {len(traces)} time(s) for {2} calls")
    assert len(traces) == 1


if __name__ == "__main__":
    main()
