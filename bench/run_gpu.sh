#!/usr/bin/env bash
# One command for a fresh GPU machine (torch and triton already installed): install this working tree,
# run the GPU test suite, every benchmark, train.py on synthetic data and a profile of the step, within
# 8 minutes (each stage has a time limit; what a stage finished before its limit is kept). Writes into OUT_DIR:
#   gpu_info.txt, gpu_tests.log, bench.log, <device>_torch<v>_triton<v>_{model,gpt,kernels}.json
#   (pytest-benchmark: reference, torch, triton, compile (regional), graphs (--cuda-graph's GraphedStep)),
#   train_synthetic_<impl>.jsonl (train.py's per-epoch metrics: img/s, MFU), profile_<arch>.txt
#   (bench/profile_step.py: each op's share of the step's device time, the next fusions)
#
#   bash bench/run_gpu.sh OUT_DIR [STAGE ...]
#
# STAGEs (default: all, in this order, with their limits in seconds): tests 150, model 120, gpt 60,
# train 60, kernels 60, profile 30, data 60 (with FFCV only). Give a subset to split the work over
# several calls of a time-limited machine.
set -uo pipefail
OUT_DIR=$(realpath -m "${1:-bench/results}")
shift || true
STAGES=" ${*:-tests model gpt train kernels profile data} "
want() { [[ "$STAGES" == *" $1 "* ]]; }
limit() { timeout --signal=INT --kill-after=10 "$@"; }     # SIGINT: pytest still writes what it measured
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
    # The full-size GPU tests, then every kernel and family test natively (NaN propagation included)
    limit 150 $PY -m pytest tests/test_gpu_shapes.py tests/test_triton_ops.py tests/test_mssa.py tests/test_odl.py \
        tests/test_ista.py tests/test_crate_gpt.py tests/test_compile.py -q -p no:cacheprovider -p no:hypothesispytest 2>&1 \
        | tee "$OUT_DIR/gpu_tests.log" | tail -5
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

tag=$($PY -c "import sys; sys.path.insert(0, 'bench'); from conftest import device_tag, versions; \
v = versions(); print(f\"{device_tag()}_torch{v['torch']}_triton{v['triton']}\")")
# -p no:hypothesispytest: where hypothesis is installed, its plugin imports it at the end of a bench
# session, and on CPython 3.11.7 that import failed 2 times in 3 with "SystemError: AST constructor
# recursion depth mismatch" after every benchmark had passed (the run then reads as failed).
bench() {   # bench NAME SECONDS [pytest args]: one bench file -> OUT_DIR/<tag>_NAME.json
    local name=$1 seconds=$2; shift 2
    echo "== bench_$name"
    limit "$seconds" $PY -m pytest "bench/bench_$name.py" -q -p no:cacheprovider -p no:hypothesispytest \
        --benchmark-json="$OUT_DIR/${tag}_$name.json" \
        --benchmark-columns=median --benchmark-group-by=group "$@" 2>&1 | tee -a "$OUT_DIR/bench.log" \
        | grep -E "passed|failed"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
}
want model && bench model 120
want gpt && bench gpt 60

if want train; then
    echo "== train.py, synthetic data, crate_base bf16 batch 256: triton eager, triton --cuda-graph, reference"
    for variant in triton triton_graph reference; do
        run=$(mktemp -d)
        flags=(--impl "${variant%_graph}"); [ "$variant" = triton_graph ] && flags+=(--cuda-graph)
        limit 20 $PY train.py --arch crate_base --data synthetic "${flags[@]}" --epochs 2 --synthetic-steps 25 \
            --batch-size 256 --out "$run" --log-every 1000 >> "$OUT_DIR/bench.log" 2>&1 || status=1
        cp "$run/metrics.jsonl" "$OUT_DIR/train_synthetic_$variant.jsonl" 2>/dev/null
        tail -1 "$run/metrics.jsonl" 2>/dev/null
        rm -rf "$run"
    done
fi

want kernels && bench kernels 60 -k "not sdpa_math and not sdpa_efficient"
if want profile; then
    echo "== profile of the train step (bench/profile_step.py)"
    for arch in crate_base crate_gpt_base; do
        limit 15 $PY bench/profile_step.py --arch "$arch" --impl triton --batch $([ $arch = crate_base ] && echo 256 || echo 8) \
            > "$OUT_DIR/profile_$arch.txt" 2>&1 || status=1
        head -8 "$OUT_DIR/profile_$arch.txt"
    done
fi
if want data && $PY -c "import ffcv" 2>/dev/null; then bench data 60; fi
exit $status
