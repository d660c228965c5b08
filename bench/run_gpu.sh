#!/usr/bin/env bash
# One command for a fresh GPU machine (torch and triton already installed): install this working tree,
# run the GPU test suite, then every benchmark, in under 10 minutes. Writes into OUT_DIR:
#   gpu_tests.log, aot_check.log, and <device>_torch<v>_triton<v>.json (pytest-benchmark format).
#
#   bash bench/run_gpu.sh OUT_DIR [extra pytest -k expression for bench/]
set -uo pipefail
OUT_DIR=$(realpath -m "${1:-bench/results}")
SELECT=${2:-}
cd "$(dirname "$0")/.."
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

$PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING" || true
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT_DIR/gpu_info.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" \
    | tee -a "$OUT_DIR/gpu_info.txt"

status=0
echo "== GPU tests"
$PY -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "$OUT_DIR/gpu_tests.log" | tail -15
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== benchmarks"
tag=$($PY -c "import sys; sys.path.insert(0, 'bench'); from conftest import device_tag, versions; \
v = versions(); print(f\"{device_tag()}_torch{v['torch']}_triton{v['triton']}\")")
$PY -m pytest bench -q -p no:cacheprovider ${SELECT:+-k "$SELECT"} --benchmark-json="$OUT_DIR/$tag.json" \
    --benchmark-columns=median,rounds --benchmark-group-by=group 2>&1 | tee "$OUT_DIR/bench.log" | tail -60
[ "${PIPESTATUS[0]}" = 0 ] || status=1
exit $status
