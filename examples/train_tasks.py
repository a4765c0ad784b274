"""Train the embedded default model: a small byte-level NLD, from scratch, on a mix of text tasks.

Why this data: NLD decodes many tokens per forward where the model is sure of many tokens at once.
Free-running Python source is not such a place for a small model (the stdlib model of
train_tiny.py reaches diffusion TPF ~1.05 there); an answer the prompt determines is. Seven tasks,
each ``<task>: <input> =`` followed by a space, the answer and EOS:

    copy: <words> =                  -> the words, unchanged
    upper: <words> =                 -> the words in upper case
    sort: <numbers> =                -> the numbers in ascending order, space-separated
    add: <a> + <b> =                 -> the sum
    json: k=v k=v ... =              -> {"k": "v", "k": v} (json.dumps; integers unquoted)
    table: k1=a k2=b; k1=c k2=d ... = -> a markdown table: header, | --- | --- |, one line per record
    letter: to=A from=B item=C day=D = -> dear A, thank you for the C. see you on D. best wishes, B

Inputs: 3-6 lowercase words of 3-9 letters (from the stdlib's own vocabulary, one in five random
letters), 3-7 integers 0-99 (sort), two integers 0-99 (add), 2-4 pairs of fixed keys (json: name,
city, role, lang, team, color, tag, user take a word; age, id, score, year, count, size an
integer), 2-3 records of a fixed key pair (table: name/age, city/score, user/id, team/count,
lang/year), a weekday (letter). The mix is chosen to be honest, not flattering: the answers range
from mostly fixed text (letter, table: their template bytes are free, their values are copies) to
all-content answers a small model must compute byte by byte (add, sort) or locate (copy, upper);
the evaluation reports TPF and exact match per task, so each task shows where parallel decoding
pays and where it does not. Python standard-library source fills each row's space after its task
examples and 5% of the rows, so that free-form prompts still produce Python-shaped text.

Each task example is padded with EOS to a multiple of 32 tokens (LLaDA's SFT padding: at inference
the slots of a block after the answer's EOS are masks, and the model learns to fill them with EOS,
so the block ends in one step) and its prompt is never masked nor an AR target (the model learns
to answer, not to ask).

Held out: an example is held out iff ``crc32(prompt) % 16 == 0``; training never sees one, the
evaluation draws its examples from another seed and keeps only those.

    python examples/train_tasks.py --out /tmp/nld-tasks                      # the shipped model (see below)
    python examples/train_tasks.py --evaluate nld_jax/assets/default-model   # re-measure the report
    python examples/train_tasks.py --out /tmp/smoke --size smoke --minutes 1 --lora-minutes 0.5

Training is resumable (``OUT.work/base_ckpt``, Orbax; give ``--steps`` the printed count when
resuming) and prints a progress bar; the evaluation is greedy and batch 1: exact match, TPF and
tokens/s per task and mode, and whether spec's output equals AR's.

The shipped model (nld_jax/assets/default-model) was made in two sittings on 2 CPU cores:

    python examples/train_tasks.py --out /tmp/tasks-1 --words 0 --random-word-share 0.2 --steps 4000 \
        --stop-at 1600 --lora-minutes 8                       # 28 min; its LoRA and evaluation unused
    python examples/train_tasks.py --init /tmp/tasks-1 --out /tmp/tasks-2 --steps 2600 --lr 2e-3 \
        --warmup-steps 50 --lora-minutes 6                    # 42 + 4 min

The first sitting (every stdlib word seen 10+ times, one word in five random letters) learned the
answers' shapes but copied nothing: a 2.7M model does not learn to copy arbitrary byte strings in
that budget (nor did an earlier 45-minute attempt continuing the stdlib model). With a 256-word
vocabulary it learns to find a word and spell it: held-out exact match 79% in AR (100% on copy,
upper, json, table, letter; sort 50%, add 5%), spec TPF 3.76 (3.99 with the draft LoRA) with
AR's output, quadratic spec 4.34; diffusion at threshold 0.99 TPF 2.35 at 72% (the README has
the whole report and what it means).
"""

from __future__ import annotations

import argparse
import builtins
import collections
import dataclasses
import functools
import itertools
import json
import keyword
import os
import re
import sys
import time
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_tiny  # noqa: E402  (the stdlib corpus, the training and timing helpers: one implementation each)

import nld_jax  # noqa: E402
from nld_jax.checkpoint.hf_write import save_hf_checkpoint  # noqa: E402
from nld_jax.training import train_bpe_tokenizer  # noqa: E402

HELD_OUT_EVERY = 16
WORDS = 256  # the task vocabulary's size
WORDS_FILE = "words.txt"
RECOMMENDED_THRESHOLD = 0.99  # diffusion, written to generation_config.json
DEFAULT_STEPS = 4000
PAD_TO = 32
TASKS = ("copy", "upper", "sort", "add", "json", "table", "letter")
KEYS_STR = ("name", "city", "role", "lang", "team", "color", "tag", "user")
KEYS_INT = ("age", "id", "score", "year", "count", "size")
TABLE_KEYS = (("name", "age"), ("city", "score"), ("user", "id"), ("team", "count"), ("lang", "year"))
LETTER_FIELDS = ("to", "from", "item", "day")
SIZES = {
    # 2.7M parameters with the 260-token byte vocabulary: the shipped model
    "default": dict(hidden_size=192, intermediate_size=576, num_hidden_layers=6, num_attention_heads=3,
                    num_key_value_heads=1, head_dim=64),
    "smoke": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32),
}
DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def word_list(texts: list[str], size: int = WORDS) -> list[str]:
    """The task vocabulary: the ``size`` most frequent lowercase words of 3-9 letters in ``texts``
    (the training stdlib sources), Python keywords and builtins and weekdays left out; sorted.
    ``size=0``: every lowercase word of 3-9 letters seen at least 10 times (the first sitting's)."""
    if size == 0:
        counts = collections.Counter(w for t in texts for w in re.findall(r"\b[a-z]{3,9}\b", t))
        return sorted(w for w, c in counts.items() if c >= 10)
    skip = set(keyword.kwlist) | {n.lower() for n in dir(builtins)} | set(DAYS)
    counts = collections.Counter(w for t in texts for w in re.findall(r"\b[a-z]{3,9}\b", t) if w not in skip)
    return sorted(w for w, _ in counts.most_common(size))


def read_words(model_dir: str) -> list[str] | None:
    """A model's task vocabulary (``words.txt``), or None without one."""
    path = os.path.join(model_dir, WORDS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return [w for w in f.read().split() if w]


def _word(rng, *, words, random_share: float = 0.0):
    """A word of the task vocabulary, or (a ``random_share`` of them) 3-9 random lowercase letters."""
    if random_share and rng.random() < random_share:
        return "".join(chr(97 + int(c)) for c in rng.integers(0, 26, int(rng.integers(3, 10))))
    return words[int(rng.integers(len(words)))]


def _words(rng, word, lo: int, hi: int) -> str:
    return " ".join(word(rng) for _ in range(int(rng.integers(lo, hi + 1))))


def _numbers(rng, lo: int, hi: int) -> list[int]:
    return [int(v) for v in rng.integers(0, 100, int(rng.integers(lo, hi + 1)))]


def make_example(task: str, rng, word) -> tuple[str, str]:
    """``(prompt, answer)``: the prompt is ``<task>: <input> =``, the answer a space and the output;
    ``word(rng)`` draws an input word."""
    if task == "copy":
        x = _words(rng, word, 3, 6)
        return f"copy: {x} =", f" {x}"
    if task == "upper":
        x = _words(rng, word, 3, 6)
        return f"upper: {x} =", f" {x.upper()}"
    if task == "sort":
        xs = _numbers(rng, 3, 7)
        return f"sort: {' '.join(map(str, xs))} =", " " + " ".join(map(str, sorted(xs)))
    if task == "add":
        a, b = (int(v) for v in rng.integers(0, 100, 2))
        return f"add: {a} + {b} =", f" {a + b}"
    if task == "json":
        keys = list(rng.choice(KEYS_STR + KEYS_INT, size=int(rng.integers(2, 5)), replace=False))
        pairs = [(k, int(rng.integers(0, 100)) if k in KEYS_INT else word(rng)) for k in keys]
        return f"json: {' '.join(f'{k}={v}' for k, v in pairs)} =", " " + json.dumps(dict(pairs))
    if task == "table":
        k1, k2 = TABLE_KEYS[int(rng.integers(len(TABLE_KEYS)))]
        rows = [(word(rng), int(rng.integers(0, 100))) for _ in range(int(rng.integers(2, 4)))]
        prompt = f"table: {'; '.join(f'{k1}={a} {k2}={b}' for a, b in rows)} ="
        lines = [f"| {k1} | {k2} |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in rows]
        return prompt, " " + "\n".join(lines)
    if task == "letter":
        to, sender, item = word(rng), word(rng), word(rng)
        day = DAYS[int(rng.integers(len(DAYS)))]
        return (f"letter: to={to} from={sender} item={item} day={day} =",
                f" dear {to}, thank you for the {item}. see you on {day}. best wishes, {sender}")
    raise ValueError(f"unknown task {task!r}")


def is_held_out(prompt: str) -> bool:
    return zlib.crc32(prompt.encode()) % HELD_OUT_EVERY == 0


def examples(seed: int, words, held_out: bool, random_share: float = 0.0):
    """Endless ``(task, prompt, answer)``: the training side (``held_out=False``) or the held-out side;
    ``random_share`` of the input words are random letters instead of ``words``."""
    rng = np.random.default_rng(seed)
    word = functools.partial(_word, words=words, random_share=random_share)
    while True:
        task = TASKS[int(rng.integers(len(TASKS)))]
        prompt, answer = make_example(task, rng, word)
        if is_held_out(prompt) == held_out:
            yield task, prompt, answer


def task_rows(tok, words, code: list[list[int]], n_rows: int, seq_len: int, seed: int, code_rows: float = 0.05,
              random_share: float = 0.0):
    """``{"tokens", "loss_mask"} [n_rows, seq_len]``: task examples packed whole into rows (each
    ``BOS prompt answer EOS`` padded with EOS to a multiple of PAD_TO; loss mask 0 on BOS + prompt),
    the rest of each row filled with a window of Python source (loss mask 1); a ``code_rows``
    share of rows is Python source only."""
    rng = np.random.default_rng(seed + 1)
    it = examples(seed, words, held_out=False, random_share=random_share)
    tokens = np.full((n_rows, seq_len), tok.eos_id, np.int32)
    mask = np.zeros((n_rows, seq_len), np.int32)
    pending = None
    for r in range(n_rows):
        pos = 0
        while rng.random() >= code_rows:
            if pending is None:
                _, prompt, answer = next(it)
                p = tok.encode(prompt)  # with BOS
                a = tok.encode(answer, add_special_tokens=False) + [tok.eos_id]
                width = -(-(len(p) + len(a)) // PAD_TO) * PAD_TO
                pending = (p, a, width)
            p, a, width = pending
            if pos + width > seq_len:
                break
            tokens[r, pos:pos + len(p) + len(a)] = p + a  # the padding is already EOS
            mask[r, pos + len(p):pos + width] = 1
            pos += width
            pending = None
        if pos < seq_len:  # Python source for the rest of the row
            doc = code[int(rng.integers(len(code)))]
            n = seq_len - pos - 1
            start = int(rng.integers(0, max(len(doc) - n, 0) + 1))
            window = [tok.bos_id] + doc[start:start + n]
            tokens[r, pos:pos + len(window)] = window
            mask[r, pos:seq_len] = 1
    return {"tokens": tokens, "loss_mask": mask}


# ---------------------------------------------------------------------------------------- evaluation
def held_out_examples(words, per_task: int, seed: int = 10_000) -> list[tuple[str, str, str]]:
    """``per_task`` held-out ``(task, prompt, answer)`` of every task, in TASKS order."""
    by_task = {t: [] for t in TASKS}
    for task, prompt, answer in examples(seed, words, held_out=True):
        if len(by_task[task]) < per_task:
            by_task[task].append((task, prompt, answer))
        if all(len(v) == per_task for v in by_task.values()):
            break
    return [e for t in TASKS for e in by_task[t]]


def eval_settings(thresholds) -> dict[str, dict]:
    settings = {"ar": dict(mode="ar")}
    for th in thresholds:
        for b in (8, 32):
            settings[f"diffusion_b{b}_t{th}"] = dict(mode="diffusion", block_length=b, threshold=th)
    settings.update({"spec_b32": dict(mode="spec", block_length=32),
                     "spec_b32_lora": dict(mode="spec", block_length=32, use_lora=True),
                     "spec_quadratic_b8": dict(mode="spec_quadratic", block_length=8),
                     "spec_quadratic_b8_lora": dict(mode="spec_quadratic", block_length=8, use_lora=True)})
    return settings


def _answer(tok, ids: list[int]) -> str:
    return tok.decode(ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids)


def evaluate(model_dir: str, words, per_task: int, thresholds=(0.9,), new_tokens: int = 96) -> dict:
    """Greedy, batch 1, on held-out examples: exact match, TPF and tokens/s per task and mode, and
    whether every spec output equals AR's."""
    model = nld_jax.load(model_dir)
    tok = model.tokenizer
    items = held_out_examples(words, per_task)
    report = {"eval_examples_per_task": per_task, "tasks": list(TASKS), "new_tokens": new_tokens,
              "held_out_rule": f"crc32(prompt) % {HELD_OUT_EVERY} == 0, examples drawn with seed 10000",
              "modes": {}}
    settings = eval_settings(thresholds)
    outputs, speed = train_tiny.measure_modes(model, [tok.encode(p) for _, p, _ in items], settings, new_tokens)
    for name, results in outputs.items():
        counts = {t: collections.Counter() for t in TASKS}
        for (task, _, answer), r in zip(items, results):
            c = counts[task]
            c["hits"] += _answer(tok, r.tokens[0]) == answer
            c["tokens"] += len(r.tokens[0])
            c["nfe"] += r.nfe[0]
        hits = sum(c["hits"] for c in counts.values())
        entry = {**settings[name], **speed[name], "exact_match": hits / len(items),
                 "per_task": {t: {"exact_match": c["hits"] / per_task, "tpf": c["tokens"] / c["nfe"]}
                              for t, c in counts.items()}}
        if f"{name}_equals_ar" in speed:
            entry["equals_ar"] = speed[f"{name}_equals_ar"]
        report["modes"][name] = entry
        print(f"  {name:<24} exact {entry['exact_match']:.3f} | "
              + " ".join(f"{t} {v['exact_match']:.2f}/{v['tpf']:.1f}" for t, v in entry["per_task"].items()),
              flush=True)
    report["samples"] = [{"task": t, "prompt": p, "answer": a,
                          **{n: _answer(tok, outputs[n][i].tokens[0]) for n in ("ar", "spec_b32") if n in outputs}}
                         for i, (t, p, a) in enumerate(items) if i % per_task == 0]
    return report


# ------------------------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="output checkpoint directory")
    p.add_argument("--write-report", action="store_true",
                   help="with --evaluate: write the evaluation into CKPT/train_report.json (keeping its training "
                        "record)")
    p.add_argument("--evaluate", metavar="CKPT", help="only evaluate an existing checkpoint on held-out examples")
    p.add_argument("--init", metavar="CKPT", help="start from this byte-level checkpoint (train_tiny.py's); "
                   "default: a new model of --size (and a new byte tokenizer)")
    p.add_argument("--work", default=None, help="scratch directory (training checkpoints, logs)")
    p.add_argument("--size", choices=sorted(SIZES), default="default", help="without --init")
    p.add_argument("--vocab", type=int, default=260, help="tokenizer size without --init; 260 = bytes only")
    p.add_argument("--stop-at", type=int, default=None,
                   help="end the base training at this step (the schedule still that of --steps) and write the model")
    p.add_argument("--words", type=int, default=WORDS,
                   help="task vocabulary: the N most frequent stdlib words (0: every word seen 10+ times, the "
                        "first sitting's)")
    p.add_argument("--random-word-share", type=float, default=0.0,
                   help="share of input words made of random letters instead of the word list (first sitting: 0.2)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--minutes", type=float, default=None,
                   help="time budget of the base training (calibrated to a step count); default: --steps")
    p.add_argument("--lora-minutes", type=float, default=8.0, help="time budget of the draft-LoRA training")
    p.add_argument("--steps", type=int, default=None,
                   help=f"base training steps (default {DEFAULT_STEPS} without --minutes; give the printed count "
                        "when resuming an interrupted run, so its learning-rate schedule is unchanged)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--lora-lr", type=float, default=3e-3)
    p.add_argument("--block-lengths", default="8,16,32")
    p.add_argument("--compute-dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--eval-per-task", type=int, default=20)
    p.add_argument("--thresholds", default="0.9,0.95,0.98,0.99", help="diffusion thresholds to evaluate, comma-separated")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    def stdlib_texts() -> list[str]:
        train_files = [f for f in train_tiny.stdlib_files() if not train_tiny.is_held_out(f)]
        return [t for t in map(train_tiny.read, train_files) if t]

    thresholds = tuple(float(t) for t in args.thresholds.split(","))
    if args.evaluate:  # the model's own words.txt; the stdlib is read only for a model without one
        words = read_words(args.evaluate) or word_list(stdlib_texts(), args.words)
        report = evaluate(args.evaluate, words, args.eval_per_task, thresholds)
        print(json.dumps(report, indent=1))
        if args.write_report:  # the evaluation replaces the report's, the training record stays
            path = os.path.join(args.evaluate, "train_report.json")
            with open(path) as f:
                previous = json.load(f)
            with open(path, "w") as f:
                json.dump({**previous, **report}, f, indent=1)
            print(f"wrote {path}")
        return
    if not args.out:
        p.error("--out is required (or --evaluate CKPT)")
    texts = stdlib_texts()
    words = word_list(texts, args.words)
    work = args.work or args.out + ".work"
    os.makedirs(work, exist_ok=True)
    block_lengths = tuple(int(b) for b in args.block_lengths.split(","))

    if args.init:
        base = nld_jax.load(args.init, dtype="float32")
        config, params, tok, tok_dir = base.config, base.params, base.tokenizer, args.init
    else:
        tok_dir = os.path.join(work, "tokenizer")
        # byte-level BPE over task examples and stdlib source (--vocab 260: bytes only, no merges)
        sample = [p + a for _, p, a in itertools.islice(examples(args.seed + 99, words, held_out=False, random_share=args.random_word_share),
                                                           30_000)]
        tok = train_bpe_tokenizer(sample + texts[:300] if args.vocab > 260 else texts[:1], args.vocab, tok_dir,
                                  model_max_length=4 * args.seq_len)
        config = dataclasses.replace(train_tiny.model_config("smoke", tok.vocab_size, args.seq_len,
                                                             block=max(block_lengths)), **SIZES[args.size])
        params = None
    code = [e.ids for e in tok._backend.encode_batch(texts, add_special_tokens=False)]
    t = time.perf_counter()
    # enough rows for the base run and the LoRA run never to repeat one (at ~1.4 s per step of 8 rows)
    if args.steps is None and args.minutes is None:
        args.steps = DEFAULT_STEPS
    base_steps = args.steps or int(args.minutes * 60 / 0.3)  # no faster than 0.3 s per step
    n_rows = args.batch * (base_steps + int(args.lora_minutes * 60 / 0.3) + 100)
    data = task_rows(tok, words, code, n_rows, args.seq_len, args.seed, random_share=args.random_word_share)
    print(f"data: {n_rows} rows of {args.seq_len} ({time.perf_counter() - t:.0f} s), {len(words)} words; "
          f"model: {config.num_params() / 1e6:.1f}M parameters", flush=True)
    params, total, base_seconds = train_tiny.train_base(args, config, data, block_lengths, work, params=params)
    lora, lora_steps, lora_seconds = None, 0, 0.0
    if args.lora_minutes > 0:
        lora, lora_steps, lora_seconds = train_tiny.train_lora(args, config, params, data, work)
    save_hf_checkpoint(args.out, config, params, lora=lora, tokenizer_dir=tok_dir)
    with open(os.path.join(args.out, WORDS_FILE), "w") as f:
        f.write("\n".join(words) + "\n")
    # diffusion's default threshold for this model: the evaluation's best accuracy (README)
    gen_path = os.path.join(args.out, "generation_config.json")
    with open(gen_path) as f:
        gen = json.load(f)
    with open(gen_path, "w") as f:
        json.dump({**gen, "threshold": RECOMMENDED_THRESHOLD}, f, indent=2)
    print("evaluating on held-out examples:", flush=True)
    report = evaluate(args.out, words, args.eval_per_task, thresholds)
    report.update({"parameters": config.num_params(), "init": args.init, "base_steps": total,
                   "base_minutes": round(base_seconds / 60, 1), "lora_steps": lora_steps,
                   "lora_minutes": round(lora_seconds / 60, 1), "tokens_seen": int(total * args.batch * args.seq_len),
                   "words": len(words), "config": dataclasses.asdict(config), "args": vars(args)})
    with open(os.path.join(args.out, "train_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k not in ("config", "args", "samples")}, indent=1))


if __name__ == "__main__":
    main()
