#!/usr/bin/env bash
# Every GPU check in one call on a lent CUDA machine (bench/README.md): the benchmark first, so
# its figures survive if time runs out, then the GPU tests, which reuse its model and compile
# cache. Logs and the JSON go to $OUT when set (the device tool), else to bench/results.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu \
    --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__)'

timeout "${BENCH_TIMEOUT_S:-360}" python3 -m bench.gpu_pipeline "$@" \
    2> >(tee "$out/bench.log" >&2) >/dev/null
echo "benchmark exit status $?"
if [[ "$out" != bench/results ]]; then
    cp bench/results/*.json "$out"/ 2>/dev/null
fi

timeout "${TESTS_TIMEOUT_S:-200}" python3 -m pytest --noconftest -p no:cacheprovider -q -m gpu \
    -rA tests/gpu 2>&1 | tee "$out/gpu-tests.log" | tail -40
echo "GPU tests exit status ${PIPESTATUS[0]}"
cat bench/results/*.json 2>/dev/null
