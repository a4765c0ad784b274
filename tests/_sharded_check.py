"""Sharded == unsharded, run in a process of its own with N fake CPU devices.

The test suite runs in one process with one device, and the device count is fixed when JAX
starts, so tests/test_sharding.py launches this script with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` and reads one JSON object back.

    python tests/_sharded_check.py --meshes "data=8;data=4,tensor=2" [--checkpoint DIR | --random]

For every mesh: greedy tokens and NFE of all three modes (and of each listed variant) must
equal the single-device ones exactly; causal and diffusion logits are compared by max |diff|
(the test applies the float32 tolerance). ``--probe-kernels`` also runs a registered "kernel"
(the XLA reference in disguise) to check that kernels see local shards inside shard_map.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "data", "nld-tiny")

# (mode, generate kwargs): the three modes; "all" adds the top-k schedule and threshold drafting.
VARIANTS = {
    "fast": [("ar", {}), ("diffusion", {"threshold": 0.9}), ("spec", {"use_lora": True})],
    "all": [("ar", {}), ("diffusion", {"threshold": 0.9}), ("diffusion", {"block_length": 4}), ("spec", {}),
            ("spec", {"use_lora": True, "threshold": 0.5})],
}


def prompts_for(model, rows: int) -> list[list[int]]:
    """Ragged prompts (lengths 5..40) from the golden cases, or random ids."""
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    if os.path.exists(os.path.join(TINY, "golden", "cases.json")) and vocab == 512:
        with open(os.path.join(TINY, "golden", "cases.json")) as f:
            cases = json.load(f)
        pool = [p for p in cases["prompts"]["batch"]["ids"]] + [p["ids"] for p in cases["prompts"]["spec"]]
    else:
        pool = [rng.integers(4, vocab, 40).tolist() for _ in range(4)]
    lengths = [40, 24, 17, 9, 31, 5, 12, 20, 7, 33][:rows]
    return [pool[i % len(pool)][:n] for i, n in enumerate(lengths)]


def register_probe():
    """A "kernel" that records the shapes it is traced with (local shards under shard_map)."""
    from nld_jax.attention import attention_xla
    from nld_jax.model import greedy_head_xla
    from nld_jax.ops import ATTENTION, GREEDY_HEAD

    import jax

    seen = {"attention": set(), "greedy_head": set(), "outside_shard_map": set()}

    def record(name, shape):
        # Only what runs inside shard_map is a kernel launch; the wrapper also traces the
        # kernel once on global shapes (eval_shape) and the single-device reference runs it whole.
        manual = jax.sharding.get_abstract_mesh().manual_axes
        seen[name if manual else "outside_shard_map"].add(shape)

    def attention_probe(q, k, v, ck, cv, lengths, *, causal):
        record("attention", (q.shape[0], q.shape[2], k.shape[2], ck.shape[2]))
        return attention_xla(q, k, v, ck, cv, lengths, causal=causal)

    def greedy_probe(hidden, weight):
        record("greedy_head", (hidden.shape[0], weight.shape[1]))
        return greedy_head_xla(hidden, weight)

    ATTENTION.register("probe", attention_probe)
    GREEDY_HEAD.register("probe", greedy_probe)
    return seen


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--meshes", required=True, help="';'-separated mesh specs")
    p.add_argument("--checkpoint", default=TINY)
    p.add_argument("--random", default=None, help="JSON of NLDConfig overrides: a random model instead")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--variants", choices=sorted(VARIANTS), default="fast")
    p.add_argument("--probe-kernels", action="store_true")
    p.add_argument("--kernels", default="auto", help="kernel implementation for the sharded runs")
    p.add_argument("--via-load", action="store_true", help="also load the checkpoint with nld_jax.load(mesh=)")
    args = p.parse_args()

    import jax

    import nld_jax
    from nld_jax.config import NLDConfig
    from nld_jax.sharded import block_logits_sharded, forward_sharded, generate_sharded, model_mesh, shard_model
    from nld_jax.sharding import ShardingFallbackWarning, make_mesh, param_shardings, parse_mesh

    warnings.simplefilter("ignore", ShardingFallbackWarning)
    if args.random:
        config = NLDConfig(**json.loads(args.random))
        model = nld_jax.random_model(config, seed=1, lora_rank=4, std=0.2)
    else:
        model = nld_jax.load(args.checkpoint, dtype="float32")
    prompts = prompts_for(model, args.rows)
    seen = register_probe() if args.probe_kernels else None
    kernels = "probe" if args.probe_kernels else args.kernels

    variants = VARIANTS[args.variants]
    # Single device references.
    ref = [nld_jax.generate(model, prompts, mode=m, max_new_tokens=args.max_new_tokens, **({"block_length": 8} | kw))
           for m, kw in variants]
    causal_in = np.asarray([q[:5] for q in prompts])
    ref_causal = np.asarray(nld_jax.forward(model, causal_in))
    block = np.full((len(prompts), 8), model.config.mask_token_id, np.int32)
    block[:, 0] = causal_in[:, -1]
    ref_block = np.asarray(nld_jax.block_logits(model, causal_in, block, use_lora=model.lora is not None))

    report = {"devices": jax.device_count(), "meshes": {}}
    for spec in args.meshes.split(";"):
        mesh = make_mesh(**parse_mesh(spec))
        if args.via_load and not args.random:
            sharded = nld_jax.load(args.checkpoint, dtype="float32", mesh=mesh)
            expected = jax.tree.leaves(param_shardings(sharded.config, mesh))
            placed = all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(jax.tree.leaves(sharded.params), expected))
            placed = placed and model_mesh(sharded) == mesh
        else:
            sharded, placed = shard_model(model, mesh), None
        entry = {"tokens_equal": [], "nfe_equal": [], "placed": placed}
        for (mode, kw), want in zip(variants, ref):
            got = generate_sharded(sharded, prompts, mode=mode, max_new_tokens=args.max_new_tokens, kernels=kernels,
                                   **({"block_length": 8} | kw))
            entry["tokens_equal"].append([mode, kw, got.tokens == want.tokens])
            entry["nfe_equal"].append([mode, kw, got.nfe == want.nfe])
        causal = np.asarray(jax.device_get(forward_sharded(sharded, causal_in)))
        diff = np.asarray(jax.device_get(block_logits_sharded(sharded, causal_in, block,
                                                              use_lora=model.lora is not None)))
        entry["causal_max_abs_diff"] = float(np.abs(causal - ref_causal).max())
        entry["diffusion_max_abs_diff"] = float(np.abs(diff - ref_block).max())
        entry["logit_scale"] = float(np.abs(ref_causal).max())
        report["meshes"][spec] = entry
    if seen is not None:
        report["probe"] = {k: sorted(v) for k, v in seen.items()}
    print("RESULT " + json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
