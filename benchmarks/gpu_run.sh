#!/usr/bin/env bash
# One prepared run on a GPU machine (docs/performance.md, "One GPU run"):
#   bash benchmarks/gpu_run.sh OUT_DIR
# installs the wheels carried in .gpu_data/wheels, builds the HER2+ bundles, trains and scores the
# paper configuration, measures throughput, and writes at most 8 files into OUT_DIR. Every phase
# has a time budget (M2OST_GPU_RUN_BUDGET seconds in all, default 420); one that fails is logged
# and the next starts. Also runs on a CPU (device auto), only slower: M2OST_GPU_RUN_TINY=1 is the
# setting the test uses. Other settings: M2OST_GPU_DATA (default .gpu_data, from
# benchmarks/gpu_prepare.sh), M2OST_GPU_WORK (default /tmp/m2ost_gpu_work), PYTHON (python3).
set -uo pipefail
OUT=${1:?usage: gpu_run.sh OUT_DIR}
mkdir -p "$OUT"
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHON=$PY
"$PY" "$REPO/benchmarks/gpu_run.py" "$OUT" 2>&1 | tee "$OUT/console.log"
exit "${PIPESTATUS[0]}"
