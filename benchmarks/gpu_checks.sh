#!/usr/bin/env bash
# Issue 16's GPU checks in one call on a lent GPU machine (see docs/benchmarks.md): the CUDA tests, then the
# real-size benchmarks. Outputs go to $OUT (the device tool brings them back). Each step has its own time limit so
# that the whole run fits a short lease; a step that runs out is reported, and the next one still runs.
#   bash benchmarks/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then  # newer wheels than the machine's (transformers), carried with the tree
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
step() {  # name, seconds, command...
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n "${TAIL:-25}" "$OUT/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
TAIL=15 step pytest_gpu "${PYTEST_LIMIT:-90}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py -k "not compiled"
step bench_gpu "${BENCH_LIMIT:-110}" python3 benchmarks/bench_gpu.py --tiles 7 --decode-layers 4 --context 1024 --no-compile
step bench_dummy_heads "${HEADS_LIMIT:-50}" python3 benchmarks/bench_dummy_heads.py --full-size --no-compile --repeats 3
TAIL=8 step pytest_gpu_compiled "${COMPILE_LIMIT:-60}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py -k compiled
