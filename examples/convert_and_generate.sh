#!/usr/bin/env bash
# From an NVIDIA HF checkpoint directory to generated text.
#
#   examples/convert_and_generate.sh SRC_HF_DIR [WORK_DIR]
#
# SRC_HF_DIR is a Nemotron-Labs-Diffusion checkpoint as NVIDIA ships it (config.json,
# model*.safetensors [+ index], tokenizer files, linear_spec_lora/), e.g. downloaded with
#   huggingface-cli download nvidia/Nemotron-Labs-Diffusion-8B --local-dir /ckpt/NLD-8B
# The tests run this script on the golden tiny checkpoint.
set -euo pipefail
SRC=${1:?usage: $0 SRC_HF_DIR [WORK_DIR]}
WORK=${2:-$(mktemp -d)}
ORBAX="$WORK/orbax"
BACK="$WORK/hf-again"

echo "== 1. HF safetensors -> Orbax (bf16 kept), checked by a forward on both"
nld-convert "$SRC" "$ORBAX" --verify --overwrite --no-progress

echo "== 2. generate from the Orbax checkpoint in the three modes"
nld-generate --checkpoint "$ORBAX" --mode all --max-new-tokens 24 --json "def main():"

echo "== 3. Orbax -> HF safetensors again (for PyTorch / vLLM / SGLang after fine-tuning)"
nld-convert "$ORBAX" "$BACK" --reverse --overwrite --no-progress
ls "$BACK"
