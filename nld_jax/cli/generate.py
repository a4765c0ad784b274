"""nld-generate: generate text with an NLD checkpoint in any of the four modes (ar, diffusion, spec, spec_quadratic).

Examples::

    nld-generate "copy: root node methods =" "add: 12 + 30 ="   # embedded default model, AR
    nld-generate --mode all "json: name=socket age=31 ="   # the four modes one after the other
    nld-generate --mode diffusion --block-length 8 "upper: handler array context ="
    nld-generate --checkpoint nld_jax/assets/stdlib-model "import os"   # the embedded Python-source model
    nld-generate --checkpoint /ckpt/NLD-8B --mode spec --lora --json "Explain RoPE."
    nld-generate --prompt-ids 1,6,224,43 --mode spec
    nld-generate --checkpoint /ckpt/NLD-8B --chat           # interactive chat (chat template)
    nld-generate --checkpoint /ckpt/NLD-VLM --image cat.png "Describe [IMG] in one line."
    nld-generate --checkpoint /ckpt/NLD-VLM --image a.png --image b.png "Compare [IMG] with [IMG]."

Images (a vision-language checkpoint): --image PATH (repeatable) gives images to the one prompt;
each [IMG] in the prompt is one image's place, in order, else the images go first. In --chat,
a line "/image PATH" attaches an image to your next message ("/images" lists the pending ones,
"/clear" drops them); --image attaches images to the first message. Without --checkpoint,
--image uses the embedded demo VLM (nld_jax/assets/demo-vlm) when there is one.

Each run prints, per mode, tokens, forwards, TPF (tokens per forward), tokens/s and ms per
forward. TPF depends only on the model and the prompts; tokens/s and ms per forward depend on
the machine and on its load (a busy machine gives a fraction of a quiet one's figures). Errors
are one line on stderr and exit code 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# A prompt of the embedded model's task mix (README, "The embedded default model")
DEFAULT_PROMPT = "json: name=socket age=31 city=path ="
DEFAULT_MAX_NEW = 128
MODES = ("ar", "diffusion", "spec", "spec_quadratic")  # of nld_jax.decode.MODES (not imported here: --help stays fast)
# The embedded demo vision-language model, used by --image when no --checkpoint is given.
DEMO_VLM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo-vlm")
TPF_NOTE = ("TPF = tokens per forward: tokens generated / forwards of the model. AR makes one token per forward "
            "(1.00); diffusion and spec make several where the model is sure of several at once")
LOAD_NOTE = ("note: tokens/s and ms per forward depend on this machine and its load (compare them only with runs "
             "on the same machine, quiet); TPF does not")


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one line like every other error of this CLI."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nld-generate", description=__doc__.split("\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("prompts", nargs="*", metavar="PROMPT",
                   help=f"text prompts (default: {DEFAULT_PROMPT!r} when no --prompt-ids are given either)")
    p.add_argument("--checkpoint", help="checkpoint directory (HF safetensors or converted Orbax); "
                                        "default: the embedded model (with --image: the embedded demo VLM)")
    p.add_argument("--mode", choices=MODES + ("all",), default="ar",
                   help="decoding mode (spec_quadratic: draft and verify in one forward); 'all' runs every mode "
                        "in turn on the same prompts")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"tokens to generate (default {DEFAULT_MAX_NEW}); more than the model's context leaves "
                        "room for is capped to what fits, with a note")
    p.add_argument("--block-length", type=int, default=None,
                   help="default: the checkpoint's generation_config.json, else its block_size (at most 8 in "
                        "spec_quadratic, whose forward holds k*(k+1) tokens)")
    p.add_argument("--threshold", default="auto",
                   help="unmasking confidence threshold in [0, 1]; 'auto' (default): the checkpoint's "
                        "generation_config.json, else 0.9 in diffusion and 0.0 (one-shot drafts) in spec; "
                        "'none' (or -1): NVIDIA's top-k schedule in diffusion")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 = off (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, in [0, 2**64) (default: 0)")
    p.add_argument("--lora", action="store_true", help="use the draft LoRA in draft/denoise forwards")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="(default: float32)")
    p.add_argument("--quantize", choices=("int8", "fp8"), default=None,
                   help="quantize the weights on load, one scale per output channel (default: not quantized)")
    p.add_argument("--kv-cache", choices=("int8",), default=None,
                   help="int8: cache keys and values as int8 with per-vector scales (default: --dtype)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--prompt-ids", action="append", default=[],
                   help="a prompt as comma-separated token ids (repeatable)")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image for the prompt (repeatable; a vision-language checkpoint, one prompt); each "
                        "[IMG] in the prompt marks one image's place, else they go first")
    p.add_argument("--chat", action="store_true",
                   help="interactive chat using the chat template; '/image PATH' attaches an image to your next "
                        "message")
    p.add_argument("--implementation", "--kernels", dest="implementation", default="auto",
                   help="attention / greedy-head implementation: 'auto' (default), 'xla' or a Pallas kernel name")
    return p


def _threshold(text: str):
    from nld_jax import validation

    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--threshold must be a number in [0, 1], 'auto' or 'none', got {text!r}") from None
    return None if value == -1 else validation.probability(value, "--threshold")


def _check(args) -> None:
    """The options, checked by the library's own rules but under their flag names (the library's
    messages name its Python arguments)."""
    from nld_jax import validation
    from nld_jax.generate import MAX_TEMPERATURE

    if args.max_new_tokens is not None:
        validation.integer(args.max_new_tokens, "--max-new-tokens", minimum=1)
    if args.block_length is not None:
        spec = args.mode in ("spec", "spec_quadratic", "all")
        validation.integer(args.block_length, "--block-length" + (" in spec mode" if spec else ""),
                           minimum=2 if spec else 1)
    _threshold(args.threshold)
    validation.number(args.temperature, "--temperature", minimum=0.0, maximum=MAX_TEMPERATURE)
    validation.probability(args.top_p, "--top-p", allow_zero=False)
    validation.integer(args.top_k, "--top-k", minimum=0)
    if args.lora and args.mode == "ar":
        print("note: --lora has no effect in ar mode (the LoRA serves draft and denoising forwards only)",
              file=sys.stderr)


def _max_new(args, model, prompts: list[list[int]]) -> int:
    """The requested budget, capped (with a note) to what the context leaves after the longest
    prompt (block modes may run block_length - 1 tokens past the budget)."""
    from nld_jax.decode import context_needed

    limit = model.config.max_position_embeddings
    longest = max(len(p) for p in prompts)
    block = args.block_length or getattr(getattr(model, "generation", None), "block_length", None) \
        or model.config.block_size
    requested = DEFAULT_MAX_NEW if args.max_new_tokens is None else args.max_new_tokens
    room = limit - (context_needed(longest, 0, args.mode, block))
    if room < 1:
        raise ValueError(f"the prompt ({longest} tokens) leaves no room in the model's context of {limit} positions"
                         + (f" with a {args.mode} block of {block}" if args.mode != "ar" else ""))
    if requested > room:
        what = f"--max-new-tokens {requested}" if args.max_new_tokens is not None else \
            f"the default --max-new-tokens {requested}"
        print(f"note: [{args.mode}] {what} capped to {room}: the model's context is {limit} positions"
              + (f" and a {args.mode} block may run {block - 1} past the budget" if args.mode != "ar" else ""),
              file=sys.stderr)
        return room
    return requested


def _forwards(mode: str, nfe: list[int]) -> int:
    """Forwards the batch ran: rows step together, and diffusion's NFE (NVIDIA's count) leaves
    out its prefill."""
    return max(nfe) + (1 if mode == "diffusion" else 0)


def _run(args, model, prompts: list[list[int]], labels: list[str], out=None, images=None) -> None:
    """``prompts`` hold their images' full layouts already (:func:`_place_images`) when ``images``
    (one list per prompt) are given."""
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
                              block_length=args.block_length, threshold=_threshold(args.threshold),
                              temperature=args.temperature, use_lora=args.lora, seed=args.seed, top_p=args.top_p,
                              top_k=args.top_k, implementation=args.implementation,
                              on_tokens=on_tokens if stream else None, kv_cache=args.kv_cache, images=images)
    ms_per_forward = 1e3 * result.seconds / max(_forwards(args.mode, result.nfe), 1)
    for row, label in enumerate(labels):
        tokens = result.tokens[row]
        text = result.text[row] if result.text is not None else None
        if args.json:
            record = {"prompt": label, "mode": args.mode, "tokens": tokens, "text": text,
                      "nfe": result.nfe[row], "tpf": round(result.tpf[row], 4),
                      "tokens_per_second": round(len(tokens) / max(result.seconds, 1e-9), 2),
                      "ms_per_forward": round(ms_per_forward, 3),
                      "seconds": round(result.seconds, 4), "compile_seconds": round(result.compile_seconds, 3)}
            out.write(json.dumps(record) + "\n")
        elif stream:
            if text is not None and text != shown["text"]:
                out.write(text[len(shown["text"]):] if text.startswith(shown["text"]) else "\n" + text)
            out.write("\n")
            print(f"[{args.mode}] {len(tokens)} tokens, {result.nfe[row]} forwards, TPF {result.tpf[row]:.2f}, "
                  f"{result.tokens_per_second:.1f} tokens/s, {ms_per_forward:.2f} ms per forward", file=sys.stderr)
        else:
            shown_text = text if text is not None else " ".join(map(str, tokens))
            out.write(f"=== {label}\n{shown_text}\n")
            out.write(f"[{args.mode}] {len(tokens)} tokens, {result.nfe[row]} forwards, TPF {result.tpf[row]:.2f}\n")
    if not args.json and not stream:
        n = len(labels)
        print(f"[{args.mode}] {n} prompt{'s' * (n != 1)}, {sum(len(t) for t in result.tokens)} tokens in "
              f"{result.seconds:.2f} s (batched): {result.tokens_per_second:.1f} tokens/s, {ms_per_forward:.2f} ms "
              "per forward", file=sys.stderr)


def _read_images(paths: list[str]) -> list:
    """Each ``--image`` opened with Pillow now, before the model loads: a missing or unreadable
    file, or one that is not an image, is an error naming it."""
    from nld_jax.vision.preprocess import load_image

    images = []
    for path in paths:
        try:
            images.append(load_image(path))
        except ValueError as e:  # ImageError: "PATH: no such image file" / "PATH: not a readable image (...)"
            raise ValueError(f"--image {e}") from None
    return images


def _place_images(model, prompts: list[list[int]], images: list[list]) -> list[list[int]]:
    """The prompts with their images' token layouts in place (so the token budget counts
    them); too many image tokens for the context is an error naming --image."""
    from nld_jax.vision.preprocess import preprocess_image
    from nld_jax.vision.prompts import placed_prompts

    vc = model.vision_config
    pixels = [[preprocess_image(im, vc) for im in row] for row in images]
    try:
        return placed_prompts(prompts, pixels, vc, model.config.bos_token_id, model.config.max_position_embeddings)
    except ValueError as e:
        raise ValueError(f"--image: {e}") from None


def _chat_command(line: str, pending: list) -> bool:
    """A chat line that is a command (``/image PATH``, ``/images``, ``/clear``): done here, True."""
    command, _, rest = line.partition(" ")
    if command == "/image":
        try:
            pending.extend(_read_images([rest.strip()]))
            print(f"(image {rest.strip()} attached to your next message)", file=sys.stderr)
        except ValueError as e:  # a wrong path in a chat is not the end of the chat
            print(f"error: {e}", file=sys.stderr)
        return True
    if command == "/images":
        print(f"({len(pending)} image(s) attached to your next message)", file=sys.stderr)
        return True
    if command == "/clear":
        pending.clear()
        return True
    return False


def _chat(args, model, images: list) -> None:
    from nld_jax.tokenizer import chat_images

    tok = model.tokenizer
    if tok is None:
        raise ValueError("--chat needs a tokenizer, and this checkpoint has none")
    if not tok.chat_template:
        print("note: this checkpoint has no chat template; turns are sent as plain text", file=sys.stderr)
    messages: list[dict] = []
    pending = list(images)  # images for the next user message
    image_id = None if model.vision_config is None else model.vision_config.image_token_id
    print("chat: empty line or Ctrl-D to quit" + ("; /image PATH attaches an image" if image_id is not None else ""),
          file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line.startswith("/") and _chat_command(line, pending):
            if pending and image_id is None:
                pending.clear()
                print("error: this checkpoint is text-only: it takes no images", file=sys.stderr)
            continue
        turn = pending[:]
        pending.clear()
        content = [{"type": "image", "image": im} for im in turn] + [{"type": "text", "text": line}]
        messages.append({"role": "user", "content": content if turn else line})
        if tok.chat_template:
            ids, all_images = tok.apply_chat_template(messages, image_token_id=image_id), chat_images(messages)
        else:  # plain text: this turn only, its images first
            ids, all_images = tok.encode(line), turn
        row_images = [all_images] if all_images else None
        if row_images:
            ids = _place_images(model, [ids], row_images)[0]
        print("nld> ", end="", flush=True)
        reply = _Capture(sys.stdout)
        _run(args, model, [ids], ["chat"], out=reply, images=row_images)
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


def _valid_text(text: str, what: str) -> str:
    """Arguments that are not valid UTF-8 reach Python as surrogate escapes: refuse them by name."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid UTF-8 text") from None
    return text


def _prompt_ids(spec: str) -> list[int]:
    """``1,6,224`` as ids; an empty item (``1,,2``, a trailing comma) is a typo, not skipped."""
    try:
        return [int(t) for t in spec.replace(" ", "").split(",")]
    except ValueError:
        raise ValueError(f"--prompt-ids {spec!r}: expected comma-separated integers such as 1,6,224") from None


def _checkpoint(args) -> str | None:
    """The checkpoint to load: --checkpoint, else with --image the embedded demo VLM, else None
    (the embedded default model)."""
    if args.checkpoint or not args.image:
        return args.checkpoint
    if not os.path.isdir(DEMO_VLM):
        raise ValueError("--image: no checkpoint given and no embedded demo VLM: pass --checkpoint")
    return DEMO_VLM


def _load(args):
    import nld_jax

    try:
        return nld_jax.load(_checkpoint(args), dtype=args.dtype, quantize=args.quantize)
    except (ValueError, OSError, KeyboardInterrupt):
        raise
    except Exception as e:  # a reader's own exception (e.g. a tokenizer library's): name the checkpoint
        where = args.checkpoint or "the embedded default model"
        raise ValueError(f"cannot load the checkpoint {where}: {type(e).__name__}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except (ValueError, OSError) as e:  # ConfigError, CheckpointError and NonFiniteError are ValueErrors
        print(f"nld-generate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nnld-generate: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the device failing (out of memory, ...): one line, not a traceback
        if type(e).__name__ not in ("JaxRuntimeError", "XlaRuntimeError"):
            raise
        print(f"nld-generate: error: the device failed: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2


def _main(args) -> int:
    from nld_jax import validation

    _check(args)
    if args.image and not args.chat and len(args.prompts) + len(args.prompt_ids) > 1:
        raise ValueError(f"--image: the images go with one prompt, and {len(args.prompts) + len(args.prompt_ids)} "
                         "were given; run one prompt at a time (or use nld_jax.generate(images=...) for a batch)")
    images = _read_images(args.image)
    model = _load(args)
    if images and model.vision is None:
        raise ValueError(f"--image: {args.checkpoint or 'the embedded default model'} is a text-only checkpoint "
                         "(its config.json has no vision_config); pass a vision-language checkpoint")
    if args.lora and model.lora is None:
        raise ValueError("--lora: this checkpoint has no draft LoRA (linear_spec_lora/)")
    if args.chat:
        if args.mode == "all":
            raise ValueError("--chat needs one mode (ar, diffusion or spec)")
        _chat(args, model, images)
        return 0
    prompts: list[list[int]] = []
    labels: list[str] = []
    names: list[str] = []  # how an error names each prompt
    for spec in args.prompt_ids:
        prompts.append(_prompt_ids(spec))
        labels.append(spec)
        names.append(f"--prompt-ids {spec!r}")
    texts = [_valid_text(t, f"prompt {i + 1}") for i, t in enumerate(args.prompts)] or \
        ([] if prompts else [DEFAULT_PROMPT])
    if texts and model.tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer; pass token ids with --prompt-ids")
    for i, text in enumerate(texts):
        prompts.append(model.tokenizer.encode(text))
        labels.append(text)
        names.append(f"prompt {i + 1}")
    validation.prompt_ids(prompts, vocab=model.config.vocab_size, row_names=names)
    # row b samples with seed + b: every row's seed must fit in 64 bits
    validation.integer(args.seed, "--seed", minimum=0, maximum=validation.MAX_SEED - (len(prompts) - 1))
    row_images = [images] if images else None
    if row_images:
        prompts = _place_images(model, prompts, row_images)
    for mode in (MODES if args.mode == "all" else (args.mode,)):
        if args.mode == "all" and not args.json:
            print(f"--- {mode}", flush=True)
        _run(argparse.Namespace(**{**vars(args), "mode": mode}), model, prompts, labels, images=row_images)
    if not args.json:
        print(TPF_NOTE, file=sys.stderr)
        print(LOAD_NOTE, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
