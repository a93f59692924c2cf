#!/usr/bin/env bash
# Every GPU check in one call on a lent CUDA machine (bench/README.md): the benchmark against
# plain diffusers (`bench`: it builds the model and fills the compile cache the others reuse),
# the service end to end (`service`), the VAE's levers (`vae`), the opt-in levers against the
# defaults (`levers`: LEVERS names them), the mixed-traffic benchmark (`mixed`), the GPU tests
# (`tests`), the benchmark against plain diffusers with SDXL base's architecture at 1024x1024
# (`sdxl`: SDXL_ARGS are its arguments) and the render core's GPU tests with SDXL base's
# architecture (`sdxl-tests`). Each writes its JSON after each phase, so a check cut short keeps
# what it measured. CHECKS picks and orders them (default: bench service vae levers mixed tests
# sdxl sdxl-tests; more than one 10-minute call holds: split them, e.g. CHECKS="bench service"
# then CHECKS="vae levers tests");
# CHECKS_BUDGET_S bounds them all together, and <CHECK>_TIMEOUT_S each. Arguments go to the
# pipeline benchmarks (bench, vae, levers, mixed), SERVICE_ARGS to the service's. Logs and the
# new JSON go to $OUT when set (the device tool), else to bench/results.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
started=$SECONDS
budget=${CHECKS_BUDGET_S:-520}
stamp=$(mktemp)
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu \
    --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__)'

# Seconds for a check: its own limit or what is left of the budget, whichever is smaller; fails
# when too little is left to start it.
limit() {
    local left=$((budget - (SECONDS - started)))
    local seconds=$((left < $2 ? left : $2))
    if ((seconds < 30)); then
        echo "$1: skipped, ${left} s of the budget left" >&2
        return 1
    fi
    echo "$1: up to ${seconds} s" >&2
    echo "$seconds"
}

done_check() {
    echo "$1: exit status $2 at $((SECONDS - started)) s"
}

for check in ${CHECKS:-bench service vae levers mixed tests sdxl sdxl-tests}; do
    case $check in
    service)
        seconds=$(limit service "${SERVICE_TIMEOUT_S:-240}") || continue
        # shellcheck disable=SC2086
        timeout "$seconds" python3 -m bench.gpu_service ${SERVICE_ARGS:-} 2>&1 >/dev/null |
            tee "$out/service.log"
        done_check service "${PIPESTATUS[0]}"
        ;;
    levers)
        seconds=$(limit levers "${LEVERS_TIMEOUT_S:-420}") || continue
        timeout "$seconds" python3 -m bench.gpu_pipeline --levers "${LEVERS:-fp8,int8,deepcache2,deepcache3,autotune}" \
            "$@" 2>&1 >/dev/null | tee "$out/levers.log"
        done_check levers "${PIPESTATUS[0]}"
        ;;
    vae)
        seconds=$(limit vae "${VAE_TIMEOUT_S:-150}") || continue
        timeout "$seconds" python3 -m bench.gpu_pipeline --vae "$@" 2>&1 >/dev/null |
            tee "$out/vae.log"
        done_check vae "${PIPESTATUS[0]}"
        ;;
    mixed)
        seconds=$(limit mixed "${MIXED_TIMEOUT_S:-360}") || continue
        timeout "$seconds" python3 -m bench.gpu_pipeline --mixed "$@" 2>&1 >/dev/null |
            tee "$out/mixed.log"
        done_check mixed "${PIPESTATUS[0]}"
        ;;
    tests)
        seconds=$(limit tests "${TESTS_TIMEOUT_S:-240}") || continue
        timeout "$seconds" python3 -m pytest --noconftest -p no:cacheprovider -q -m gpu -rA \
            tests/gpu 2>&1 | tee "$out/gpu-tests.log" | tail -60
        done_check tests "${PIPESTATUS[0]}"
        ;;
    bench)
        seconds=$(limit bench "${BENCH_TIMEOUT_S:-360}") || continue
        timeout "$seconds" python3 -m bench.gpu_pipeline "$@" 2>&1 >/dev/null |
            tee "$out/bench.log"
        done_check bench "${PIPESTATUS[0]}"
        ;;
    sdxl)
        # A guess, not a measurement: no SDXL run has been timed on a card yet.
        seconds=$(limit sdxl "${SDXL_TIMEOUT_S:-540}") || continue
        # shellcheck disable=SC2086
        timeout "$seconds" python3 -m bench.gpu_pipeline --family sdxl ${SDXL_ARGS:-} 2>&1 \
            >/dev/null | tee "$out/sdxl.log"
        done_check sdxl "${PIPESTATUS[0]}"
        ;;
    sdxl-tests)
        # A guess, not a measurement: these tests have not run with SDXL on a card yet.
        seconds=$(limit sdxl-tests "${SDXL_TESTS_TIMEOUT_S:-540}") || continue
        T2I_GPU_FAMILY=sdxl timeout "$seconds" python3 -m pytest --noconftest -p no:cacheprovider \
            -q -m gpu -rA tests/gpu/test_gpu_render_core.py 2>&1 |
            tee "$out/sdxl-gpu-tests.log" | tail -60
        done_check sdxl-tests "${PIPESTATUS[0]}"
        ;;
    *)
        echo "unknown check $check (bench, service, vae, levers, mixed, tests, sdxl, sdxl-tests)" >&2
        ;;
    esac
done

# Only the figures of this run: at most 8 files come back from $OUT.
new=$(find bench/results -name '*.json' -newer "$stamp")
if [[ -n "$new" && "$out" != bench/results ]]; then
    cp $new "$out"/
fi
for file in $new; do
    echo "== $file"
    cat "$file"
done
rm -f "$stamp"
