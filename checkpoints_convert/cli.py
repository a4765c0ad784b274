"""``nld-convert SRC DST``: NVIDIA HF safetensors <-> Orbax (``python -m checkpoints_convert``)."""

from __future__ import annotations

import argparse
import re
import sys

__all__ = ["main", "build_parser"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """"5GB" -> 5e9, "500MiB" -> 500 * 2**20 (transformers' max_shard_size spelling)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 5GB or 500MiB)")
    unit = (m.group(2) or "B").upper().rstrip("B") or ""
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    base = 1024 if unit.endswith("I") else 1000
    return int(float(m.group(1)) * base**power)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nld-convert",
        description="Convert an NVIDIA Nemotron-Labs-Diffusion checkpoint (HF safetensors; text or vision-language, "
                    "NVIDIA's or transformers' Mistral3 tensor names) into an Orbax checkpoint that nld_jax.load "
                    "reads, or back with --reverse (NVIDIA's names).")
    p.add_argument("src", metavar="SRC",
                   help="the checkpoint directory to convert, the one with config.json (what nld-generate "
                        "--checkpoint takes): NVIDIA's HF safetensors format, or with --reverse a converted one")
    p.add_argument("dst", metavar="DST", help="the directory to write (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="dtype of the base weights (default: keep the source's, bf16 for NVIDIA's checkpoints)")
    p.add_argument("--quantize", choices=["int8", "fp8"], default=None,
                   help="store every matmul weight and the embedding quantized, one float32 scale per output "
                        "channel (int8 for every backend; fp8 = e4m3, for GPUs/TPUs that have it); the norms keep "
                        "--dtype, the draft LoRA stays float32 (default: not quantized)")
    p.add_argument("--no-lora", action="store_true", help="leave out the draft LoRA (linear_spec_lora/)")
    p.add_argument("--verify", action="store_true",
                   help="compare logits of source and result on a fixed prompt before publishing the result")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.add_argument("--reverse", action="store_true",
                   help="converted Orbax checkpoint -> HF safetensors shards + index (+ PEFT LoRA)")
    p.add_argument("--max-shard-size", type=parse_size, default=None, metavar="SIZE",
                   help="--reverse only: largest shard when the source layout is not recorded (default 5GB)")
    p.add_argument("--chunk-mib", type=float, default=8.0, metavar="MIB",
                   help="storage chunk size of the Orbax arrays (default 8): smaller chunks let a sharded "
                        "restore read closer to exactly what each device holds, larger ones mean fewer files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported here so that --help answers without loading JAX.
    from checkpoints_convert.atomic_output import DestinationExistsError
    from checkpoints_convert.to_hf import DEFAULT_MAX_SHARD_BYTES, convert_orbax_to_hf
    from checkpoints_convert.to_orbax import convert_hf_to_orbax
    from checkpoints_convert.verify import VerificationError

    common = dict(dtype=args.dtype, lora=not args.no_lora, overwrite=args.overwrite, verify=args.verify,
                  progress=not args.no_progress)
    try:
        if args.reverse:
            if args.quantize:
                raise ValueError("--quantize applies to the forward conversion (safetensors -> Orbax) only")
            report = convert_orbax_to_hf(args.src, args.dst, max_shard_bytes=args.max_shard_size
                                         or DEFAULT_MAX_SHARD_BYTES, **common)
        else:
            if args.max_shard_size is not None:
                raise ValueError("--max-shard-size applies to --reverse only")
            if not 0 < args.chunk_mib <= 2048:
                raise ValueError(f"--chunk-mib must be in (0, 2048], got {args.chunk_mib}")
            report = convert_hf_to_orbax(args.src, args.dst, chunk_bytes=int(args.chunk_mib * 2**20),
                                         quantize=args.quantize, **common)
    except DestinationExistsError as e:
        print(f"nld-convert: error: {e.path} already exists; pass --overwrite to replace it", file=sys.stderr)
        return 1
    # CheckpointError, ConfigError, SafetensorsError and NonFiniteError are ValueErrors;
    # FileNotFoundError, NotADirectoryError and PermissionError are OSErrors.
    except (ValueError, OSError, VerificationError) as e:
        print(f"nld-convert: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nld-convert: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
