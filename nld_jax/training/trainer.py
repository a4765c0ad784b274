"""The jitted train step, Orbax training checkpoints with resume, and the training loop.

Three modes share one step function:

* ``pretrain``: NVIDIA's joint AR + block-diffusion objective on packed text;
* ``sft``: the same objective with a loss mask (prompt tokens are never masked nor AR targets);
* ``lora``: only the draft LoRA trains, on the bidirectional draft objective; the base model is
  a frozen argument of the step (not part of the optimiser state).

Master weights stay float32; ``compute_dtype=bfloat16`` casts them for the forward/backward
pass (mixed precision; softmax, norms and logits stay float32 inside the model).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nld_jax.config import NLDConfig
from nld_jax.partitioning import DEFAULT_RULES, ShardingRules
from nld_jax.runtime import Runtime
from nld_jax.training.objective import LossConfig, draft_loss, mask_tokens, nld_loss

__all__ = ["TrainConfig", "TrainState", "make_train_step", "init_state", "CheckpointIO", "train_loop"]

MODES = ("pretrain", "sft", "lora")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    mode: str = "pretrain"
    loss: LossConfig = LossConfig()
    compute_dtype: str = "float32"  # or "bfloat16" (mixed precision)
    block_lengths: tuple[int, ...] = (32,)  # one is drawn per step (NVIDIA: 64 pretraining, 32 SFT)
    # The block_diff attention (pallas_kernels.block_diff): "xla" computes only the visible parts
    # of the mask; a Pallas name ("pallas_tpu", "pallas_triton", ...) runs the block-sparse kernel;
    # "auto" follows pallas_kernels.policy. All need a static block length, so one step is compiled
    # per block length; with trace_block_length the XLA dense mask takes it traced (one program).
    implementation: str = "xla"
    trace_block_length: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown training mode {self.mode!r}; choose one of {MODES}")
        if self.trace_block_length and self.implementation not in ("xla", "auto"):
            raise ValueError("trace_block_length needs implementation='xla' (the kernels need a static block length)")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    trainable: Any  # base params (pretrain/sft) or {"A", "B"} (lora)
    opt_state: Any
    key: jax.Array


def init_state(trainable, optimizer: optax.GradientTransformation, seed: int = 0) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable), jax.random.PRNGKey(seed))


def _global_norm(tree):
    norm = getattr(getattr(optax, "tree", None), "norm", None)  # optax >= 0.2.5; global_norm is deprecated
    return norm(tree) if norm is not None else optax.global_norm(tree)


def _cast(tree, dtype: str):
    if dtype == "float32":
        return tree
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, tree)


def make_train_step(config: NLDConfig, train: TrainConfig, optimizer: optax.GradientTransformation,
                    lora_scale: float | None = None, in_shardings=None, out_shardings=None, *, mesh=None,
                    rules: ShardingRules = DEFAULT_RULES, inputs: Callable | None = None) -> Callable:
    """``step(state, frozen, batch, block_length) -> (state, metrics)``, jitted, state donated.

    ``batch`` holds ``tokens [B, L]`` and, for SFT, ``loss_mask [B, L]``. ``frozen`` is the base
    model in ``lora`` mode and None otherwise. Shardings, when given, are passed to ``jax.jit``;
    ``mesh`` / ``rules`` make the model pin its activations to their shardings inside the step.
    ``inputs(trainable, batch) -> (text params, embeddings [B, L, D])`` (pretrain / sft, optional)
    makes the input embeddings from more than the tokens -- a vision-language model's image
    features (:func:`nld_jax.training.vision.vlm_inputs`), trained jointly with the text model.
    """
    runtime = Runtime(train.implementation, mesh, rules)

    def loss_fn(trainable, frozen, batch, block_length, key):
        tokens, loss_mask = batch["tokens"], batch.get("loss_mask")
        if train.mode == "lora":
            lora = {**_cast(trainable, "float32"), "scale": jnp.float32(lora_scale)}
            loss, metrics = draft_loss(lora, _cast(frozen, train.compute_dtype), config, tokens, block_length,
                                       train.loss.remat, loss_mask, runtime=runtime)
            return loss, metrics
        masked, p_mask = mask_tokens(key, tokens, train.loss.eps, loss_mask)
        model, embeddings = _cast(trainable, train.compute_dtype), None
        if inputs is not None:
            model, embeddings = inputs(model, batch)
        loss_sum, count, aux = nld_loss(model, config, tokens, masked, p_mask, block_length, train.loss,
                                        ar_mask=loss_mask, runtime=runtime, embeddings=embeddings)
        n_masked = jnp.maximum(aux["n_masked"], 1)
        B, L = tokens.shape
        n_ar = B * (L - 1) if loss_mask is None else jnp.maximum(jnp.sum(loss_mask[:, 1:]), 1)
        metrics = {"diffusion_per_token": aux["diffusion_sum"] / n_masked, "ar_per_token": aux["ar_sum"] / n_ar,
                   "masked_fraction": aux["n_masked"] / tokens.size}
        return loss_sum / count, metrics

    def step(state: TrainState, frozen, batch, block_length):
        key, sub = jax.random.split(state.key)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable, frozen, batch,
                                                                          block_length, sub)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": _global_norm(grads)}
        return TrainState(state.step + 1, trainable, opt_state, key), metrics

    if train.trace_block_length:
        return jax.jit(step, donate_argnums=(0,), in_shardings=in_shardings, out_shardings=out_shardings)
    if in_shardings is not None:
        in_shardings = tuple(in_shardings[:3])  # the static block length takes no sharding
    jitted = jax.jit(step, donate_argnums=(0,), static_argnums=(3,), in_shardings=in_shardings,
                     out_shardings=out_shardings)
    return lambda state, frozen, batch, block_length: jitted(state, frozen, batch, int(block_length))


class CheckpointIO:
    """Orbax training checkpoints (state only; the frozen base model is reloaded from its source)."""

    def __init__(self, directory: str, keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.manager = ocp.CheckpointManager(os.path.abspath(directory),
                                             options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState) -> None:
        self.manager.save(int(state.step), args=self._ocp.args.StandardSave(state))

    def restore(self, like: TrainState) -> TrainState:
        abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, like)
        return self.manager.restore(self.latest_step(), args=self._ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _to_python(metrics) -> dict:
    return {k: float(np.asarray(v)) for k, v in metrics.items()}


def train_loop(step_fn: Callable, state: TrainState, frozen, batch_iter: Iterator[dict], total_steps: int,
               block_lengths: tuple[int, ...], *, log_path: str | None = None, checkpoint: CheckpointIO | None = None,
               checkpoint_every: int = 500, log_every: int = 10, seed: int = 0,
               schedule: Callable | None = None, progress: bool = True,
               stop_after_seconds: float | None = None, stop_at_step: int | None = None) -> TrainState:
    """Run ``step_fn`` until ``total_steps``, logging JSON lines and checkpointing periodically.

    The block length of each step is drawn from ``block_lengths`` by a generator seeded with the step
    number, so a resumed run draws the same sequence. ``stop_at_step`` ends the run early (with a
    checkpoint) at that step, the schedule still that of ``total_steps``: a run in sittings.
    """
    from tqdm import tqdm

    log = open(log_path, "a") if log_path else None
    start_step = int(state.step)
    bar = tqdm(total=total_steps, initial=start_step, disable=not progress, unit="step", dynamic_ncols=True)
    t0, tokens_seen = time.perf_counter(), 0
    try:
        for step in range(start_step, total_steps):
            batch = next(batch_iter)
            block = int(np.random.default_rng(seed * 1_000_003 + step).choice(block_lengths))
            state, metrics = step_fn(state, frozen, {k: jnp.asarray(v) for k, v in batch.items()}, jnp.int32(block))
            tokens_seen += batch["tokens"].size
            done = step + 1
            if done % log_every == 0 or done == total_steps:
                m = _to_python(metrics)
                elapsed = time.perf_counter() - t0
                record = {"step": done, **{k: round(v, 5) for k, v in m.items()}, "block_length": block,
                          "lr": float(schedule(step)) if schedule else None,
                          "tokens_per_second": round(tokens_seen / elapsed, 1), "elapsed": round(elapsed, 1)}
                if log:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{tokens_seen / elapsed:.0f}")
            bar.update(1)
            if checkpoint is not None and (done % checkpoint_every == 0 or done == total_steps):
                checkpoint.save(state)
            if (stop_after_seconds is not None and time.perf_counter() - t0 > stop_after_seconds) or \
                    done == stop_at_step:
                if checkpoint is not None:
                    checkpoint.save(state)
                break
    finally:
        bar.close()
        if log:
            log.close()
        if checkpoint is not None:
            checkpoint.manager.wait_until_finished()
    return state


def run_training(step_fn: Callable, trainable, optimizer: optax.GradientTransformation, batches_from: Callable,
                 total_steps: int, block_lengths: tuple[int, ...], work_dir: str, *, name: str, frozen=None,
                 seed: int = 0, schedule: Callable | None = None, checkpoint_every: int = 500,
                 progress: bool = True, stop_at_step: int | None = None) -> tuple[Any, float]:
    """A resumable run of :func:`train_loop`: ``(trainable after total_steps, seconds)``.

    Training checkpoints go to ``work_dir/<name>_ckpt`` and the JSON-lines log to
    ``work_dir/<name>_log.jsonl``; a run that finds a checkpoint there resumes from it, and
    ``batches_from(step)`` gives the batches from that step on (so a resumed run sees the data
    a straight run would). Give a resumed run the same ``total_steps``: its schedule depends on it.
    """
    ckpt = CheckpointIO(os.path.join(work_dir, f"{name}_ckpt"))
    state = init_state(trainable, optimizer, seed=seed)
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state)
        print(f"resumed {name} training at step {int(state.step)}", flush=True)
    t0 = time.perf_counter()
    try:
        state = train_loop(step_fn, state, frozen, batches_from(int(state.step)), total_steps, block_lengths,
                           log_path=os.path.join(work_dir, f"{name}_log.jsonl"), checkpoint=ckpt,
                           checkpoint_every=checkpoint_every, schedule=schedule, seed=seed, progress=progress,
                           stop_at_step=stop_at_step)
    finally:
        ckpt.close()
    return state.trainable, time.perf_counter() - t0
