"""Fine-tuning and pretraining NLD with optax: the joint AR + block-diffusion objective, SFT and
the self-speculation draft LoRA (see trainer.py for the modes)."""

from nld_jax.training.data import batches, pack_documents, read_documents, sft_rows, train_bpe_tokenizer
from nld_jax.training.objective import LossConfig, draft_loss, draft_mask, mask_tokens, nld_loss, train_hidden
from nld_jax.training.optim import OptimConfig, make_optimizer, make_schedule
from nld_jax.training.trainer import (CheckpointIO, TrainConfig, TrainState, init_state, make_train_step, run_training,
                                     train_loop)
from nld_jax.training.vision import make_vlm_inputs, vlm_batch, vlm_inputs, vlm_rows

__all__ = ["LossConfig", "OptimConfig", "TrainConfig", "TrainState", "CheckpointIO", "draft_mask", "mask_tokens", "nld_loss", "draft_loss", "train_hidden", "make_optimizer",
           "make_schedule", "make_train_step", "init_state", "train_loop", "run_training", "read_documents", "pack_documents",
           "sft_rows", "batches", "train_bpe_tokenizer", "vlm_rows", "vlm_batch", "vlm_inputs", "make_vlm_inputs"]
