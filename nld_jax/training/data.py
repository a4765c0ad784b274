"""Training data: text files or JSONL -> tokenized, packed sequences; SFT JSONL -> masked rows.

* Pretraining: every document becomes ``[BOS] + tokens + [EOS]``; documents are concatenated
  and cut into rows of ``seq_len`` (packing, no padding).
* SFT: JSONL lines ``{"prompt": ..., "response": ...}`` become one row each,
  ``[BOS] + prompt + response + [EOS]`` padded with EOS, with a loss mask that is 1 on the
  response (and its EOS) only: prompt tokens are never masked and never AR targets.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Iterable, Iterator

import numpy as np

from nld_jax.tokenizer import Tokenizer

__all__ = ["read_documents", "pack_documents", "sft_rows", "batches", "train_bpe_tokenizer"]


def read_documents(paths: Iterable[str], text_field: str = "text") -> Iterator[str]:
    """Documents from files, directories and globs: ``.jsonl`` lines (``text_field``), or whole files."""
    for pattern in paths:
        matches = sorted(glob.glob(pattern, recursive=True)) if any(c in pattern for c in "*?[") else [pattern]
        for path in matches:
            if os.path.isdir(path):
                yield from read_documents([os.path.join(path, "**", "*")], text_field)
                continue
            if not os.path.isfile(path):
                continue
            if path.endswith(".jsonl"):
                with open(path, encoding="utf-8") as f:
                    for line in f:
                        if line.strip():
                            yield json.loads(line)[text_field]
            else:
                try:
                    with open(path, encoding="utf-8") as f:
                        yield f.read()
                except UnicodeDecodeError:
                    continue


def pack_documents(token_lists: Iterable[list[int]], seq_len: int, bos: int | None, eos: int | None) -> np.ndarray:
    """``[N, seq_len]`` int32 rows cut from the concatenation of ``[BOS] + doc + [EOS]``."""
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(([bos] if bos is not None else []) + list(ids) + ([eos] if eos is not None else []))
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"not enough text for one sequence of {seq_len} tokens ({len(stream)} tokens)")
    return np.asarray(stream[: n * seq_len], np.int32).reshape(n, seq_len)


def sft_rows(path: str, tokenizer: Tokenizer, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens [N, seq_len], loss_mask [N, seq_len])`` from a prompt/response JSONL file."""
    rows, masks = [], []
    eos = tokenizer.eos_id
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "prompt" not in record or "response" not in record:
                raise ValueError(f"{path}:{lineno}: SFT lines need 'prompt' and 'response'")
            prompt = tokenizer.encode(record["prompt"])  # with BOS
            response = tokenizer.encode(record["response"], add_special_tokens=False) + [eos]
            ids = (prompt + response)[:seq_len]
            mask = ([0] * len(prompt) + [1] * len(response))[:seq_len]
            pad = seq_len - len(ids)
            rows.append(ids + [eos] * pad)
            masks.append(mask + [0] * pad)
    if not rows:
        raise ValueError(f"{path} has no examples")
    return np.asarray(rows, np.int32), np.asarray(masks, np.int32)


def batches(arrays: dict[str, np.ndarray], batch_size: int, seed: int, start_step: int = 0) -> Iterator[dict]:
    """Endless shuffled batches (epoch after epoch); ``start_step`` skips ahead for resumption."""
    n = next(iter(arrays.values())).shape[0]
    if n < batch_size:
        raise ValueError(f"{n} rows are fewer than batch_size={batch_size}")
    per_epoch = n // batch_size
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        order = np.random.default_rng(seed + epoch).permutation(n)
        idx = order[offset * batch_size:(offset + 1) * batch_size]
        yield {k: v[idx] for k, v in arrays.items()}
        step += 1


SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<mask>")  # ids 0..3: unk, bos, eos, mask


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str, model_max_length: int) -> Tokenizer:
    """Train a byte-level BPE ``tokenizer.json`` (+ ``tokenizer_config.json``) in ``out_dir``."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, trainers

    from nld_jax.tokenizer import load_tokenizer

    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "mask_token": "<mask>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
                   "clean_up_tokenization_spaces": False, "model_max_length": model_max_length}, f, indent=2)
    return load_tokenizer(out_dir)
