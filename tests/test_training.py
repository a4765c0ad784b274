"""Training: loss parity with NVIDIA's training forward, masking, modes, checkpoints, export."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nld_jax
import _oracles
from nld_jax.checkpoint.hf_write import save_hf_checkpoint
from nld_jax.checkpoint.safetensors_io import SafetensorsFile
from nld_jax.params import init_lora
from nld_jax.params import flatten_tree
from nld_jax.runtime import Runtime
from nld_jax.training import (CheckpointIO, LossConfig, OptimConfig, TrainConfig, batches, draft_loss, init_state, make_optimizer, make_train_step, mask_tokens, nld_loss,
                              pack_documents, run_training, sft_rows, train_loop)
from pallas_kernels.block_diff import block_diff_mask


def _golden_c(golden_dir):
    return np.load(golden_dir / "golden" / "c_train_block_diff.npz")


def test_loss_parity_with_nvidia_training_forward(tiny, golden_dir, cases):
    c = _golden_c(golden_dir)
    meta = cases["c_train_block_diff"]
    loss_sum, count, aux = nld_loss(tiny.params, tiny.config, jnp.asarray(c["input_ids"], jnp.int32),
                                    jnp.asarray(c["masked_indices"]), jnp.asarray(c["p_mask"]), meta["block_size"],
                                    LossConfig(dlm_weight=meta["dlm_loss_weight"], ar_weight=meta["ar_loss_weight"]))
    np.testing.assert_allclose(np.asarray(aux["logits"]), c["logits"], rtol=1e-5, atol=1e-4)
    L = c["input_ids"].shape[1]
    causal = np.asarray(aux["causal_logits"])[:, :-1].reshape(-1, c["causal_logits"].shape[-1])
    np.testing.assert_allclose(causal, c["causal_logits"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(float(loss_sum), float(c["loss_sum"]), rtol=1e-5)
    assert int(count) == int(c["loss_count"]) == int(c["masked_indices"].sum()) + L
    np.testing.assert_allclose(meta["dlm_loss_weight"] * float(aux["diffusion_sum"]) / int(aux["n_masked"]),
                               meta["model.loss_diffusion"], rtol=1e-5)
    np.testing.assert_allclose(float(aux["ar_sum"]) / L, meta["model.loss_ar"], rtol=1e-5)


@pytest.mark.parametrize("L,b", [(12, 4), (12, 5), (24, 32)])  # also a partial last block
def test_block_diff_mask_matches_the_spec_rules(L, b):
    m = np.asarray(block_diff_mask(L, b))
    for q in range(2 * L):
        for k in range(2 * L):
            qc, kc = q >= L, k >= L
            qb, kb = (q % L) // b, (k % L) // b
            want = ((not qc and not kc and qb == kb) or (not qc and kc and qb > kb) or (qc and kc and q >= k))
            assert m[q, k] == want, (q, k)


def test_masking_statistics_and_loss_mask():
    tokens = jnp.ones((4000, 64), jnp.int32)
    masked, p = mask_tokens(jax.random.PRNGKey(0), tokens, 1e-3)
    p_row = np.asarray(p[:, 0])
    assert 1e-3 <= p_row.min() and p_row.max() <= 1.0
    np.testing.assert_allclose(np.asarray(masked).mean(1), p_row, atol=0.2)  # per row ~ Binomial(64, p)
    assert abs(np.asarray(masked).mean() - 0.5) < 0.02  # E[p] = 0.5
    loss_mask = np.zeros((4000, 64), np.int32)
    loss_mask[:, 32:] = 1
    masked, _ = mask_tokens(jax.random.PRNGKey(1), tokens, 1e-3, jnp.asarray(loss_mask))
    assert not np.asarray(masked)[:, :32].any() and np.asarray(masked)[:, 32:].any()


def _tiny_data(tiny, cases, seq_len=32):
    docs = [p for group in ("batch", "eos_batch") for p in cases["prompts"][group]["ids"]]
    docs += [p["ids"] for p in cases["prompts"]["spec"]]
    return pack_documents([d[1:] for d in docs] * 4, seq_len, tiny.config.bos_token_id, tiny.config.eos_token_id)


def test_pretrain_steps_reduce_loss_and_resume_exactly(tiny, cases, tmp_path):
    rows = _tiny_data(tiny, cases)
    opt_cfg = OptimConfig(lr=3e-3, total_steps=12, warmup_steps=2)
    optimizer = make_optimizer(opt_cfg)
    train = TrainConfig(mode="pretrain", block_lengths=(4, 8))
    step = make_train_step(tiny.config, train, optimizer)
    state = init_state(jax.tree.map(jnp.array, tiny.params), optimizer, seed=0)
    ckpt = CheckpointIO(str(tmp_path / "ckpt"))
    state = train_loop(step, state, None, batches({"tokens": rows}, 4, seed=0), 6, train.block_lengths,
                       log_path=str(tmp_path / "log.jsonl"), checkpoint=ckpt, checkpoint_every=6, log_every=1,
                       progress=False)
    full = train_loop(step, state, None, batches({"tokens": rows}, 4, seed=0, start_step=6), 12, train.block_lengths,
                      log_path=str(tmp_path / "log.jsonl"), log_every=1, progress=False)
    log = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert np.mean([r["loss"] for r in log[-3:]]) < np.mean([r["loss"] for r in log[:3]])
    # resume from the step-6 checkpoint: the continuation is bit-identical
    fresh = init_state(jax.tree.map(jnp.array, tiny.params), optimizer, seed=123)
    resumed = CheckpointIO(str(tmp_path / "ckpt")).restore(fresh)
    assert int(resumed.step) == 6
    resumed = train_loop(step, resumed, None, batches({"tokens": rows}, 4, seed=0, start_step=6), 12,
                         train.block_lengths, progress=False)
    for a, b in zip(jax.tree.leaves(full.trainable), jax.tree.leaves(resumed.trainable)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ckpt.close()


def test_run_training_in_two_sittings_equals_one(tiny, cases, tmp_path):
    """run_training stopped at a step (stop_at_step) and run again in the same work directory
    resumes from its checkpoint and ends where one straight run ends, bit for bit."""
    rows = _tiny_data(tiny, cases)
    opt_cfg = OptimConfig(lr=3e-3, total_steps=6, warmup_steps=1)
    optimizer = make_optimizer(opt_cfg)
    train = TrainConfig(mode="pretrain", block_lengths=(4, 8))
    step = make_train_step(tiny.config, train, optimizer)
    data = lambda start: batches({"tokens": rows}, 4, seed=0, start_step=start)  # noqa: E731
    params = lambda: jax.tree.map(jnp.array, tiny.params)  # noqa: E731
    straight, _ = run_training(step, params(), optimizer, data, 6, train.block_lengths, str(tmp_path / "one"),
                               name="t", checkpoint_every=100, progress=False)
    first, _ = run_training(step, params(), optimizer, data, 6, train.block_lengths, str(tmp_path / "two"),
                            name="t", checkpoint_every=100, progress=False, stop_at_step=2)
    second, _ = run_training(step, params(), optimizer, data, 6, train.block_lengths, str(tmp_path / "two"),
                             name="t", checkpoint_every=100, progress=False)
    log = [json.loads(l) for l in open(tmp_path / "two" / "t_log.jsonl")]
    assert [r["step"] for r in log] == [6]  # logged every 10 steps and at the end
    changed = any(not np.array_equal(np.asarray(a), np.asarray(b))
                  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)))
    assert changed, "the second sitting trained nothing"
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(second)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_lora_mode_trains_only_the_adapter(tiny, cases):
    rows = _tiny_data(tiny, cases)
    optimizer = make_optimizer(OptimConfig(lr=1e-2, total_steps=8, warmup_steps=1, weight_decay=0.0))
    lora = init_lora(tiny.config, jax.random.PRNGKey(0), rank=4, alpha=16.0)  # PEFT init: B = 0
    trainable = {"A": lora["A"], "B": lora["B"]}
    base_before = jax.tree.map(np.asarray, tiny.params)
    step = make_train_step(tiny.config, TrainConfig(mode="lora", block_lengths=(8,)), optimizer, lora_scale=4.0)
    state = init_state(trainable, optimizer)
    first = None
    for i, batch in zip(range(8), batches({"tokens": rows}, 4, seed=1)):
        state, metrics = step(state, tiny.params, {"tokens": jnp.asarray(batch["tokens"])}, jnp.int32(8))
        first = float(metrics["loss"]) if first is None else first
    assert float(metrics["loss"]) < first
    assert np.abs(np.asarray(state.trainable["B"])).max() > 0
    for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(tiny.params)):
        np.testing.assert_array_equal(a, np.asarray(b))


@pytest.fixture(scope="module")
def numpy_model(golden_dir):
    """The golden checkpoint read by the float64 numpy oracle (tests/_oracles.py)."""
    return _oracles.load_checkpoint(golden_dir)


def test_numpy_oracle_reproduces_nvidias_training_logits(numpy_model, golden_dir, cases):
    """The oracle that checks the draft loss below is itself checked: NVIDIA's training forward
    (golden case c: block_diff layout, L = 48 so the llama-4 query scale is on) gives these logits."""
    config, weights, _ = numpy_model
    c = _golden_c(golden_dir)
    noisy = np.where(c["masked_indices"], config["mask_token_id"], c["input_ids"])
    block = cases["c_train_block_diff"]["block_size"]
    logits, causal = _oracles.train_logits(config, weights, noisy, c["input_ids"], block)
    # measured: max |error| 1.5e-5 (logits up to 29); without the llama-4 query scale it would be 0.54
    np.testing.assert_allclose(logits, c["logits"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(causal[:, :-1].reshape(-1, causal.shape[-1]), c["causal_logits"], rtol=0, atol=1e-4)


def test_draft_loss_uses_the_adapter_on_draft_tokens_only(tiny, cases, numpy_model):
    """draft_loss equals the numpy oracle's draft objective (adapter on the noisy half only), for
    two rows of three blocks; with the adapter on both halves, or off, the oracle's value differs
    by 100x the tolerance or more, so the comparison tells them apart."""
    config, weights, lora = numpy_model
    tokens = np.asarray(_tiny_data(tiny, cases, seq_len=24)[:2])
    loss, metrics = draft_loss(tiny.lora, tiny.params, tiny.config, jnp.asarray(tokens, jnp.int32), 8)
    want, accuracy = _oracles.draft_loss(config, weights, lora, tokens, 8)
    # measured: relative error 2.6e-8 (float32 against float64); the alternatives below move the
    # loss by 1.5e-4 (adapter on the clean half too) and 2.1e-2 (adapter off), relative
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["draft_accuracy"]), accuracy, rtol=0, atol=1e-6)
    # the alternatives the test must reject
    masked = np.broadcast_to(np.arange(24) % 8 != 0, tokens.shape)
    noisy = np.where(masked, config["mask_token_id"], tokens)
    for other in (dict(lora=lora, lora_on_noisy_only=False), dict(lora=None)):
        logits, _ = _oracles.train_logits(config, weights, noisy, tokens, 8, **other)
        assert abs(_oracles.cross_entropy(logits, tokens)[masked].mean() - want) > 100 * 1e-6 * want, other


def test_sft_rows_mask_the_prompt(tiny, tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "def f(x):", "response": "    return x"}) + "\n")
    tokens, mask = sft_rows(str(path), tiny.tokenizer, 24)
    prompt = tiny.tokenizer.encode("def f(x):")
    assert tokens[0, :len(prompt)].tolist() == prompt and not mask[0, :len(prompt)].any()
    n_resp = len(tiny.tokenizer.encode("    return x", add_special_tokens=False)) + 1
    assert mask[0].sum() == n_resp and tokens[0, len(prompt) + n_resp - 1] == tiny.config.eos_token_id


def test_hf_export_round_trips_bit_exactly(tiny, golden_dir, tmp_path):
    save_hf_checkpoint(str(tmp_path / "out"), tiny.config, tiny.params, lora=tiny.lora, tokenizer_dir=str(golden_dir))
    for rel in ("model.safetensors", "linear_spec_lora/adapter_model.safetensors"):
        a, b = SafetensorsFile(golden_dir / rel), SafetensorsFile(tmp_path / "out" / rel)
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            assert a.dtype(k) == b.dtype(k) and a.shape(k) == b.shape(k)
            assert a.get(k).tobytes() == b.get(k).tobytes(), k
    again = nld_jax.load(tmp_path / "out")
    assert again.config == tiny.config
    out = nld_jax.generate(again, [[1, 6, 224, 43]], mode="spec", max_new_tokens=8, use_lora=True)
    ref = nld_jax.generate(tiny, [[1, 6, 224, 43]], mode="spec", max_new_tokens=8, use_lora=True)
    assert out.tokens == ref.tokens


def test_training_gradients_with_the_pallas_block_diff_kernel_equal_xla(tiny, cases):
    """The loss and every weight gradient of the joint objective with the interpreted
    block-sparse kernel (forward and backward) equal the XLA attention's, in float32."""
    rows = jnp.asarray(_tiny_data(tiny, cases, seq_len=16)[:2])
    masked, p_mask = mask_tokens(jax.random.PRNGKey(5), rows, 1e-3)

    def loss(params, implementation):
        total, count, _ = nld_loss(params, tiny.config, rows, masked, p_mask, 8, LossConfig(),
                                   runtime=Runtime(implementation))
        return total / count

    results = {impl: jax.jit(jax.value_and_grad(loss), static_argnums=1)(tiny.params, impl)
               for impl in ("xla", "pallas_interpret")}
    (ref_loss, ref_grads), (loss_k, grads_k) = results["xla"], results["pallas_interpret"]
    np.testing.assert_allclose(float(loss_k), float(ref_loss), rtol=1e-6)
    flat_ref = flatten_tree(ref_grads)
    for path, grad in flatten_tree(grads_k).items():
        scale = float(np.abs(np.asarray(flat_ref[path])).max())
        assert scale > 0, path  # every weight gets a gradient: the comparison is not vacuous
        np.testing.assert_allclose(np.asarray(grad), np.asarray(flat_ref[path]), rtol=1e-4, atol=1e-5 * scale,
                                   err_msg=path)


@pytest.mark.parametrize("block", [16, pytest.param(32, marks=pytest.mark.slow)])
def test_train_step_with_a_partial_last_block(tiny, cases, block):
    """A sequence the block size does not divide (24 tokens, blocks of 16 or 32) trains, with the
    same loss as the dense-mask step whose block rule (position // block) defines partial blocks."""
    rows = _tiny_data(tiny, cases, seq_len=24)[:2]
    optimizer = make_optimizer(OptimConfig(lr=1e-3, total_steps=4, warmup_steps=1))
    losses = []
    for traced in (False, True):  # the structured / per-block XLA form, and the dense mask with a traced block
        step = make_train_step(tiny.config, TrainConfig(block_lengths=(block,), trace_block_length=traced), optimizer)
        state = init_state(jax.tree.map(jnp.array, tiny.params), optimizer, seed=3)
        _, metrics = step(state, None, {"tokens": jnp.asarray(rows)}, jnp.int32(block))
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses[0])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
