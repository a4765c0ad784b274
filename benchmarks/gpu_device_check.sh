#!/usr/bin/env bash
# One call on a lent GPU machine (H100 / H200) checks the GPU kernels end to end:
#   1. the GPU-only tests (compiled Pallas Triton and Mosaic GPU kernels vs the jnp references),
#   2. the benchmark tables (8B shapes; kernels vs jax.nn.dot_product_attention xla / cudnn and
#      the HBM floor; fused greedy head; decode-step forwards).
# Sized for one `run(command="bash benchmarks/gpu_device_check.sh", timeout_s=600)`: every stage
# has its own timeout and together they stay under 9.5 minutes; logs in $OUT (or /tmp/nld_gpu_check).
# It uses the machine's python3 (jax with CUDA) and imports this tree through PYTHONPATH; no
# install, no network. The Mosaic GPU kernel is tested and timed in processes of its own, after
# the Triton ones, so a hang or a compile failure there cannot cost the Triton results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/nld_gpu_check}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=/tmp/nld_jax_cache XLA_PYTHON_CLIENT_PREALLOCATE=false

stage() { echo; echo "== $1 ($(date +%T))"; }

stage "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/device.txt"
if ! "$PY" -c "import jax, pallas_kernels.block_attention, nld_jax; print('jax', jax.__version__, jax.devices())" 2>&1 \
    | tee -a "$OUT/device.txt"; then
  echo "cannot import jax / the kernels with $PY: nothing else to do"; exit 1
fi

TIMEOUT_ARGS=()
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARGS=(--timeout 120)
TESTS=(tests/test_pallas_block_attention.py tests/test_pallas_block_diff.py tests/test_pallas_greedy_head.py
       tests/test_pallas_integration.py)

stage "GPU tests: Triton kernels"
timeout 150 "$PY" -m pytest -q -ra -p no:cacheprovider -m gpu -k "not mosaic" "${TIMEOUT_ARGS[@]}" "${TESTS[@]}" 2>&1 \
  | tee "$OUT/tests_triton.txt"
TRITON_TESTS=${PIPESTATUS[0]}

stage "GPU tests: Mosaic GPU kernel"
timeout 60 "$PY" -m pytest -q -ra -p no:cacheprovider -m gpu -k "mosaic" "${TIMEOUT_ARGS[@]}" "${TESTS[@]}" 2>&1 \
  | tee "$OUT/tests_mosaic.txt"
MOSAIC_TESTS=${PIPESTATUS[0]}

stage "benchmark: Triton kernels and baselines"
timeout 200 "$PY" benchmarks/attention_bench.py --impls pallas_triton --reps 10 2>&1 | tee "$OUT/bench_triton.txt"
TRITON_BENCH=${PIPESTATUS[0]}

stage "benchmark: decode-step forwards (4-layer 8B-shaped model, batch 1, 8k prefix)"
timeout 90 "$PY" benchmarks/attention_bench.py --impls pallas_triton --reps 10 --prefixes 8192 --batches 1 \
  --blocks 32 --no-baselines --no-head --e2e 2>&1 | tee "$OUT/bench_e2e.txt"
E2E_BENCH=${PIPESTATUS[0]}

stage "benchmark: Mosaic GPU attention"
timeout 60 "$PY" benchmarks/attention_bench.py --impls pallas_mosaic_gpu --reps 10 --no-head --no-baselines \
  2>&1 | tee "$OUT/bench_mosaic.txt"
MOSAIC_BENCH=${PIPESTATUS[0]}

stage "summary"
echo "exit codes (124 = timed out): triton tests $TRITON_TESTS, mosaic tests $MOSAIC_TESTS," \
     "triton bench $TRITON_BENCH, e2e bench $E2E_BENCH, mosaic bench $MOSAIC_BENCH; logs in $OUT"
[ "$TRITON_TESTS" -eq 0 ] && [ "$TRITON_BENCH" -eq 0 ]
