"""Fine-tune an NLD checkpoint: SFT on prompt/response JSONL, the draft LoRA, or continued pretraining.

    # supervised fine-tuning (joint AR + diffusion loss on the responses only)
    python examples/finetune.py --checkpoint CKPT --data sft.jsonl --mode sft --out CKPT-sft --steps 200
    # train (or retrain) the self-speculation draft LoRA on plain text; the base stays frozen
    python examples/finetune.py --checkpoint CKPT --data 'corpus/*.py' --mode lora --out CKPT-lora --steps 300
    # continued pretraining on text files or JSONL {"text": ...}
    python examples/finetune.py --checkpoint CKPT --data corpus.jsonl --mode pretrain --out CKPT-cpt --steps 500

The result is a complete checkpoint directory in NVIDIA's format (loadable by nld_jax.load and by
NVIDIA's PyTorch code). Training state is checkpointed under --out + ".work" (finetune_ckpt, log in
finetune_log.jsonl) and resumed.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp

import nld_jax
from nld_jax.checkpoint.hf_write import save_hf_checkpoint, save_hf_lora
from nld_jax.params import init_lora
from nld_jax.training import (LossConfig, OptimConfig, TrainConfig, batches, make_optimizer, make_schedule,
                              make_train_step, pack_documents, read_documents, run_training, sft_rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--checkpoint", default=None, help="base checkpoint (default: the embedded model)")
    p.add_argument("--data", required=True, nargs="+", help="SFT JSONL (--mode sft) or text files/globs/JSONL")
    p.add_argument("--mode", choices=("sft", "lora", "pretrain"), default="sft")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-4 (sft, pretrain), 1e-3 (lora)")
    p.add_argument("--block-lengths", "--block-sizes", dest="block_lengths", default="32", help="comma-separated; one drawn per step")
    p.add_argument("--lora-rank", type=int, default=None, help="new LoRA rank (default: the existing one, or 32)")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    model = nld_jax.load(args.checkpoint, dtype="float32")
    if model.tokenizer is None:
        raise SystemExit("error: the checkpoint has no tokenizer")
    config, tok = model.config, model.tokenizer
    block_lengths = tuple(int(b) for b in args.block_lengths.split(","))
    if args.mode == "sft":
        if len(args.data) != 1:
            raise SystemExit("error: --mode sft takes one JSONL file")
        tokens, loss_mask = sft_rows(args.data[0], tok, args.seq_len)
        arrays = {"tokens": tokens, "loss_mask": loss_mask}
    else:
        docs = [tok.encode(t, add_special_tokens=False) for t in read_documents(args.data)]
        arrays = {"tokens": pack_documents(docs, args.seq_len, tok.bos_id, tok.eos_id)}
    print(f"{arrays['tokens'].shape[0]} rows of {args.seq_len} tokens", flush=True)

    lr = args.lr or (1e-3 if args.mode == "lora" else 1e-4)
    opt_cfg = OptimConfig(lr=lr, total_steps=args.steps, warmup_steps=max(args.steps // 20, 1),
                          schedule="cosine", weight_decay=0.0 if args.mode == "lora" else 0.1)
    optimizer = make_optimizer(opt_cfg)
    train = TrainConfig(mode=args.mode, loss=LossConfig(), compute_dtype=args.compute_dtype, block_lengths=block_lengths)
    lora_scale = None
    if args.mode == "lora":
        if model.lora is not None and args.lora_rank in (None, model.lora["A"].shape[-1]):
            trainable = {"A": model.lora["A"], "B": model.lora["B"]}
            lora_scale = float(model.lora["scale"])
        else:
            rank = args.lora_rank or 32
            fresh = init_lora(config, jax.random.PRNGKey(args.seed), rank, alpha=4.0 * rank)
            trainable, lora_scale = {"A": fresh["A"], "B": fresh["B"]}, 4.0
        frozen = model.params
    else:
        trainable, frozen = model.params, None
    step = make_train_step(config, train, optimizer, lora_scale=lora_scale)
    trained, _ = run_training(step, trainable, optimizer,
                              lambda start: batches(arrays, args.batch, args.seed, start_step=start), args.steps,
                              block_lengths, args.out + ".work", name="finetune", frozen=frozen, seed=args.seed,
                              schedule=make_schedule(opt_cfg), checkpoint_every=max(args.steps // 4, 1))

    source = args.checkpoint or nld_jax.loading.DEFAULT_CHECKPOINT
    if args.mode == "lora":
        save_hf_checkpoint(args.out, config, model.params, tokenizer_dir=source)
        save_hf_lora(os.path.join(args.out, "linear_spec_lora"), config,
                     {**trained, "scale": jnp.float32(lora_scale)})
    else:
        save_hf_checkpoint(args.out, config, trained, lora=model.lora, tokenizer_dir=source)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
