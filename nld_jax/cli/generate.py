"""``nld-generate``: generate text with an NLD checkpoint in any of the three modes.

Examples::

    nld-generate "def fibonacci(n):"                       # embedded default model, AR
    nld-generate --mode all "import os"                    # the three modes one after the other
    nld-generate --mode diffusion --block-length 8 "import os"
    nld-generate --checkpoint /ckpt/NLD-8B --mode spec --lora --json "Explain RoPE."
    nld-generate --prompt-ids 1,6,224,43 --mode spec
    nld-generate --checkpoint /ckpt/NLD-8B --chat           # interactive chat (chat template)
"""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT_PROMPT = "def fibonacci(n):"
MODES = ("ar", "diffusion", "spec")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nld-generate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="text prompts (default: %(default)s)")
    p.add_argument("--checkpoint", help="checkpoint directory (HF safetensors or converted Orbax); "
                                        "default: the embedded model")
    p.add_argument("--mode", choices=MODES + ("all",), default="ar",
                   help="decoding mode; 'all' runs ar, diffusion and spec in turn on the same prompts")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to generate (default 128, capped to the model's context)")
    p.add_argument("--block-length", type=int, default=None, help="default: the checkpoint's block_size")
    p.add_argument("--threshold", type=float, default=None,
                   help="unmasking confidence threshold (default: 0.9 in diffusion, 0.0 in spec); "
                        "'--threshold -1' selects the reference's top-k schedule in diffusion")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora", action="store_true", help="use the draft LoRA in draft/denoise forwards")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--prompt-ids", action="append", default=[],
                   help="a prompt as comma-separated token ids (repeatable)")
    p.add_argument("--chat", action="store_true", help="interactive chat using the chat template")
    p.add_argument("--kernels", default="auto", help="'auto', 'xla' or a registered kernel name")
    return p


def _threshold(args) -> float | None:
    if args.threshold is None:
        return 0.9 if args.mode == "diffusion" else None
    return None if args.threshold < 0 else args.threshold


def _max_new(args, model, prompts: list[list[int]]) -> int:
    room = model.config.max_position_embeddings - max(len(p) for p in prompts)
    if room < 1:
        raise SystemExit(f"error: the prompt fills the model's context of {model.config.max_position_embeddings}")
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    # spec may overshoot by block_length - 1 tokens; keep its budget inside the context too
    slack = 0 if args.mode == "ar" else (args.block_length or model.config.block_size)
    return max(1, min(128, room - slack))


def _run(args, model, prompts: list[list[int]], labels: list[str], out=None) -> None:
    import nld_jax

    out = out or sys.stdout

    stream = not args.json and len(prompts) == 1 and model.tokenizer is not None
    shown = {"text": ""}
    generated: list[int] = []

    def on_tokens(row: int, ids: list[int]) -> None:
        generated.extend(ids)
        text = model.tokenizer.decode(generated)
        # print only the new suffix; decoding can revise a partial UTF-8 tail, so re-sync on mismatch
        if text.startswith(shown["text"]):
            out.write(text[len(shown["text"]):])
            out.flush()
            shown["text"] = text

    result = nld_jax.generate(model, prompts, mode=args.mode, max_new_tokens=_max_new(args, model, prompts),
                              block_length=args.block_length, threshold=_threshold(args),
                              temperature=args.temperature, use_lora=args.lora, seed=args.seed,
                              kernels=args.kernels, on_tokens=on_tokens if stream else None)
    for row, label in enumerate(labels):
        tokens = result.tokens[row]
        text = result.text[row] if result.text is not None else None
        if args.json:
            record = {"prompt": label, "mode": args.mode, "tokens": tokens, "text": text,
                      "nfe": result.nfe[row], "tpf": round(result.tpf[row], 4),
                      "tokens_per_second": round(len(tokens) / max(result.seconds, 1e-9), 2),
                      "seconds": round(result.seconds, 4), "compile_seconds": round(result.compile_seconds, 3)}
            out.write(json.dumps(record) + "\n")
        elif stream:
            if text is not None and text != shown["text"]:
                out.write(text[len(shown["text"]):] if text.startswith(shown["text"]) else "\n" + text)
            out.write("\n")
            print(f"[{args.mode}] {len(tokens)} tokens, {result.nfe[row]} forwards, "
                  f"TPF {result.tpf[row]:.2f}, {result.tokens_per_second:.1f} tokens/s", file=sys.stderr)
        else:
            shown_text = text if text is not None else " ".join(map(str, tokens))
            out.write(f"=== {label}\n{shown_text}\n")
            out.write(f"[{args.mode}] {len(tokens)} tokens, {result.nfe[row]} forwards, TPF {result.tpf[row]:.2f}\n")


def _chat(args, model) -> None:
    tok = model.tokenizer
    if tok is None:
        raise SystemExit("error: --chat needs a tokenizer")
    if not tok.chat_template:
        print("note: this checkpoint has no chat template; turns are sent as plain text", file=sys.stderr)
    messages: list[dict] = []
    print("chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        ids = tok.apply_chat_template(messages) if tok.chat_template else tok.encode(line)
        print("nld> ", end="", flush=True)
        reply = _Capture(sys.stdout)
        _run(args, model, [ids], ["chat"], out=reply)
        messages.append({"role": "assistant", "content": "".join(reply.parts).strip()})


class _Capture:
    """A stdout stand-in that keeps what the model said (for the next chat turn)."""

    def __init__(self, stream):
        self.stream, self.parts = stream, []

    def write(self, s: str) -> None:
        self.parts.append(s)
        self.stream.write(s)

    def flush(self) -> None:
        self.stream.flush()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import nld_jax

    try:
        model = nld_jax.load(args.checkpoint, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.chat:
        if args.mode == "all":
            print("error: --chat needs one mode (ar, diffusion or spec)", file=sys.stderr)
            return 2
        _chat(args, model)
        return 0
    prompts: list[list[int]] = []
    labels: list[str] = []
    try:
        for spec in args.prompt_ids:
            prompts.append([int(t) for t in spec.replace(" ", "").split(",") if t])
            labels.append(spec)
        texts = args.prompts or ([] if prompts else [DEFAULT_PROMPT])
        if texts and model.tokenizer is None:
            print("error: this checkpoint has no tokenizer; use --prompt-ids", file=sys.stderr)
            return 2
        for text in texts:
            prompts.append(model.tokenizer.encode(text))
            labels.append(text)
        for mode in (MODES if args.mode == "all" else (args.mode,)):
            if args.mode == "all" and not args.json:
                print(f"--- {mode}", flush=True)
            _run(argparse.Namespace(**{**vars(args), "mode": mode}), model, prompts, labels)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
