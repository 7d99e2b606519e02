#!/usr/bin/env bash
# The one prepared GPU session of issue 20 (at most 2 + 6 minutes on an H100/H200):
#   1. the pallas-gpu numerics tests with the real kernels (on the GPU, not the
#      interpreter; stopped after 110 s), log in $OUT/pallas_gpu_test.log;
#   2. scripts/gpu_bench.py: bench_inference dense vs sparse at batch 1/8/32/128
#      (pallas-gpu float32 and bfloat16, xla float32), the roofline of each pallas-gpu
#      call, the train step gated vs dense; JSON named by the GPU in $OUT (default
#      docs/bench).
# Usage, from the repository root:  OUT=/some/dir bash scripts/gpu_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-docs/bench}"
# A GPU image may have only python3 and no installed ccjax: run from the checkout.
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" || {
  echo "gpu_bench.sh: no GPU here (check the script on a CPU with:" \
       "CCJAX_PALLAS_INTERPRET=1 python scripts/gpu_bench.py --tiny)" >&2
  exit 2
}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
# XLA's optimizations stay on (the test suite turns them off to compile faster on CPU).
CCJAX_TEST_XLA_OPT=1 timeout 110 "$PYTHON" -m pytest -q -p no:cacheprovider \
  tests/pallas_gpu_test.py -k "not lowers" > "$OUT/pallas_gpu_test.log" 2>&1
echo "pallas_gpu_test: exit $? (log: $OUT/pallas_gpu_test.log)" >&2
OUT="$OUT" "$PYTHON" scripts/gpu_bench.py --out_dir="$OUT"
