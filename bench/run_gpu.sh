#!/usr/bin/env bash
# One command for a fresh GPU machine (torch and triton already installed): install this working tree,
# run the GPU test suite, every benchmark, and train.py on synthetic data (crate_base, triton vs
# reference), in about 10 minutes on an H100. Writes into OUT_DIR:
#   gpu_info.txt, gpu_tests.log, bench.log, <device>_torch<v>_triton<v>_{model,kernels}.json
#   (pytest-benchmark), train_synthetic_<impl>.jsonl (train.py's per-epoch metrics: img/s, MFU)
#
#   bash bench/run_gpu.sh OUT_DIR [STAGE ...]
#
# STAGEs (default: all, in this order): tests model train kernels data. Each takes 1-4 minutes on an
# H100; give a subset to split the work over several calls of a time-limited machine.
set -uo pipefail
OUT_DIR=$(realpath -m "${1:-bench/results}")
shift || true
STAGES=" ${*:-tests model train kernels data} "
want() { [[ "$STAGES" == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

$PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING" || true
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} | tee "$OUT_DIR/gpu_info.txt"

status=0
if want tests; then
    echo "== GPU tests (the AOT resource check runs on CPU machines too)"
    $PY -m pytest tests -q -p no:cacheprovider -p no:hypothesispytest -k "not aot" 2>&1 | tee "$OUT_DIR/gpu_tests.log" | tail -5
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

tag=$($PY -c "import sys; sys.path.insert(0, 'bench'); from conftest import device_tag, versions; \
v = versions(); print(f\"{device_tag()}_torch{v['torch']}_triton{v['triton']}\")")
# -p no:hypothesispytest: where hypothesis is installed, its plugin imports it at the end of a bench
# session, and on CPython 3.11.7 that import failed 2 times in 3 with "SystemError: AST constructor
# recursion depth mismatch" after every benchmark had passed (the run then reads as failed).
bench() {   # bench NAME [pytest args]: one bench file -> OUT_DIR/<tag>_NAME.json
    local name=$1; shift
    echo "== bench_$name"
    $PY -m pytest "bench/bench_$name.py" -q -p no:cacheprovider -p no:hypothesispytest \
        --benchmark-json="$OUT_DIR/${tag}_$name.json" \
        --benchmark-columns=median --benchmark-group-by=group "$@" 2>&1 | tee -a "$OUT_DIR/bench.log" \
        | grep -E "passed|failed"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
}
want model && bench model

if want train; then
    echo "== train.py, synthetic data, crate_base bf16 batch 256"
    for impl in triton reference; do
        run=$(mktemp -d)
        $PY train.py --arch crate_base --data synthetic --impl "$impl" --epochs 2 --synthetic-steps 25 \
            --batch-size 256 --out "$run" --log-every 1000 >> "$OUT_DIR/bench.log" 2>&1 || status=1
        cp "$run/metrics.jsonl" "$OUT_DIR/train_synthetic_$impl.jsonl" 2>/dev/null
        tail -1 "$run/metrics.jsonl" 2>/dev/null
        rm -rf "$run"
    done
fi

want kernels && bench kernels -k "not sdpa_math and not sdpa_efficient"
if want data && $PY -c "import ffcv" 2>/dev/null; then bench data; fi
exit $status
