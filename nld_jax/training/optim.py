"""Optimiser and learning-rate schedules (optax): AdamW with warm-up, then WSD or cosine decay."""

from __future__ import annotations

import dataclasses

import jax
import optax

__all__ = ["OptimConfig", "make_schedule", "make_optimizer"]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """NVIDIA's published recipe by default: AdamW, beta2 0.95, weight decay 0.1, clip 1.0."""

    lr: float = 3e-4
    total_steps: int = 1000
    warmup_steps: int = 100
    schedule: str = "wsd"  # "wsd" (warm-up, stable, decay) | "cosine" | "constant"
    decay_fraction: float = 0.2  # WSD: the last 20% of steps decay linearly
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    clip_norm: float = 1.0


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    rest = max(cfg.total_steps - cfg.warmup_steps, 1)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, rest, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "wsd":
        decay = max(int(rest * cfg.decay_fraction), 1)
        after = optax.join_schedules([optax.constant_schedule(cfg.lr),
                                      optax.linear_schedule(cfg.lr, floor, decay)], [rest - decay])
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r} (wsd, cosine, constant)")
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


_NO_DECAY = {"input_layernorm", "post_attention_layernorm", "norm", "scale"}


def _decay_mask(params):
    # Weight decay on matrices only, not on norm weights (nor the LoRA scale), by parameter name:
    # stacked per-layer norms are 2-D arrays, so ndim alone cannot tell them apart.
    def decays(path, _):
        return getattr(path[-1], "key", None) not in _NO_DECAY

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=_decay_mask),
    )
