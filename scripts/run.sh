#!/usr/bin/env bash
# `make run`: Redis (unless T2I_REDIS_URL already answers), WORKERS render workers (1 unless set),
# a webhook worker and the API. EXTRA_MODELS (model ids, space-separated, e.g. "tiny-xl") adds one
# render worker per model, each on that model's own queue; T2I_MODEL_ID stays the deployment's
# default model (T2I_DEFAULT_MODEL, set for every process). Every port is checked before anything starts: a taken one stops
# it, named. Ctrl-C, or SIGTERM to make or its process group, stops everything this script
# started; a second Ctrl-C kills it all at once.
set -euo pipefail
# Each part in a process group of its own: Ctrl-C reaches this script alone, which stops the
# services first, while Redis still answers them, and Redis last.
set -m
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export T2I_DATA_DIR="${T2I_DATA_DIR:-data}"
export T2I_REDIS_URL="${T2I_REDIS_URL:-redis://127.0.0.1:6379/0}"
# transformers warns about optional packages as it is imported, before the worker can route
# its lines through the service's log format.
export TRANSFORMERS_VERBOSITY="${TRANSFORMERS_VERBOSITY:-error}"
mkdir -p "$T2I_DATA_DIR"

services=()
redis_pid=""
stopping=""
stop_all() {
    stopping=yes
    trap - EXIT
    # A second Ctrl-C does not wait for the jobs in hand.
    trap 'for group in "${services[@]}" $redis_pid; do kill -KILL -- "-$group" 2>/dev/null || true; done' INT
    if ((${#services[@]})); then
        kill -TERM "${services[@]}" 2>/dev/null || true
        wait_for_exit "${services[@]}"
    fi
    if [[ -n $redis_pid ]]; then
        kill -TERM "$redis_pid" 2>/dev/null || true
        wait_for_exit "$redis_pid"
    fi
}
# `wait` returns early when a signal comes in (make passes its SIGTERM on a second time).
wait_for_exit() {
    local pid
    for pid in "$@"; do
        while kill -0 "$pid" 2>/dev/null; do wait "$pid" 2>/dev/null || true; done
    done
}
trap stop_all EXIT
trap '[[ -n $stopping ]] || { stop_all; exit 130; }' INT
trap '[[ -n $stopping ]] || { stop_all; exit 143; }' TERM

redis_answers() {
    "$PY" -c 'import os, redis; redis.Redis.from_url(os.environ["T2I_REDIS_URL"], socket_connect_timeout=1).ping()' 2>/dev/null
}

workers="${WORKERS:-1}"
if ! [[ $workers =~ ^[1-9][0-9]?$ ]]; then
    echo "WORKERS=$workers: give a number of render workers from 1 to 99" >&2
    exit 2
fi
read -r -a extra_models <<<"${EXTRA_MODELS:-}"
all_workers=$((workers + ${#extra_models[@]}))
if ((${#extra_models[@]})); then
    # Every process agrees on the default model, so each extra worker takes its own model's
    # queue (<T2I_QUEUE_NAME>@<model>), not the default one.
    default_model="${T2I_MODEL_NAME:-${T2I_MODEL_ID:-$("$PY" -c 'from shared.settings import DEFAULT_MODEL_ID as m; print(m)')}}"
    export T2I_DEFAULT_MODEL="${T2I_DEFAULT_MODEL:-$default_model}"
fi
# Before anything starts: a taken port fails here, named, instead of in a process's log.
metrics_ports=$("$PY" -m shared.ports --workers "$all_workers") || exit 1

if redis_answers; then
    echo "txt2img-service: using the Redis that answers at $T2I_REDIS_URL"
else
    read -r host port < <("$PY" -c 'import os, urllib.parse as u; p = u.urlparse(os.environ["T2I_REDIS_URL"]); print(p.hostname, p.port or 6379)')
    if [[ $host != 127.0.0.1 && $host != localhost ]]; then
        echo "Redis at $T2I_REDIS_URL does not answer, and it is not on this machine to start." >&2
        exit 1
    fi
    if why=$("$PY" -c 'import sys; from shared.ports import port_taken; print(port_taken("127.0.0.1", int(sys.argv[1])) or "")' "$port") && [[ -n $why ]]; then
        echo "port $port on 127.0.0.1 is taken ($why) by something that is not Redis; set T2I_REDIS_URL to a free port" >&2
        exit 1
    fi
    mkdir -p "$T2I_DATA_DIR/redis"
    redis-server --bind 127.0.0.1 --port "$port" --dir "$T2I_DATA_DIR/redis" \
        --appendonly yes --appendfsync everysec --save "" --maxmemory-policy noeviction \
        --loglevel warning &
    redis_pid=$!
    for _ in $(seq 50); do redis_answers && break; sleep 0.1; done
    redis_answers || { echo "redis-server did not start on port $port" >&2; exit 1; }
fi

# The tiny model comes with its tiny LoRA adapters and canny ControlNet, so the README's LoRA and
# ControlNet examples work on a machine with no network.
if [[ ${T2I_MODEL_ID:-} == tiny ]]; then
    if [[ -z ${T2I_LORA_DIR:-} ]]; then
        # With a tiny SDXL worker beside, one registry of both families' tiny adapters.
        T2I_LORA_DIR=$("$PY" -m worker.tiny_customization "${extra_models[@]}")
        export T2I_LORA_DIR
    fi
    export T2I_CONTROLNETS="${T2I_CONTROLNETS:-{\"canny\": \"tiny\"\}}"
fi

if [[ ${T2I_ENV:-development} == development ]]; then
    "$PY" -m shared.keyadmin dev --file "$T2I_DATA_DIR/dev-api-key"
    echo "  export T2I_API_KEY=\$(cat $T2I_DATA_DIR/dev-api-key)"
fi

# The API reports this at /health: the API that answers is the one started here.
export T2I_INSTANCE="make-run-$$-$RANDOM"
"$PY" -m api &
services+=($!)
"$PY" -m worker.webhooks &
services+=($!)
if ((all_workers > 1)) && [[ -z ${T2I_TORCH_THREADS:-} ]]; then
    # Workers rendering on this machine's CPUs each take their share of the cores.
    cores=$(getconf _NPROCESSORS_ONLN)
    export T2I_TORCH_THREADS=$((cores / all_workers > 0 ? cores / all_workers : 1))
fi
mapfile -t worker_ports <<<"$metrics_ports"
for metrics_port in "${worker_ports[@]:0:workers}"; do
    T2I_METRICS_PORT=$metrics_port "$PY" -m worker &
    services+=($!)
done
# Each extra model's worker: its own model and name; a ControlNet fits one family, so only the
# tiny SDXL model's own comes along (the LoRA registry is the deployment's, as the API's: with the
# tiny models, both families' tiny adapters).
for index in "${!extra_models[@]}"; do
    model=${extra_models[index]}
    controlnets=()
    [[ $model == tiny-xl ]] && controlnets=(T2I_CONTROLNETS='{"canny": "tiny-xl"}')
    env -u T2I_MODEL_NAME -u T2I_CONTROLNETS T2I_MODEL_ID="$model" "${controlnets[@]}" \
        T2I_METRICS_PORT="${worker_ports[workers + index]}" "$PY" -m worker &
    services+=($!)
done

api_url="http://${T2I_HOST:-127.0.0.1}:${T2I_PORT:-8000}"
if ((${#extra_models[@]})); then
    echo "txt2img-service: starting $workers worker(s) of $T2I_DEFAULT_MODEL and one each of" \
        "${extra_models[*]}; ready once each has loaded its model..."
else
    echo "txt2img-service: starting $workers worker(s); ready once each has loaded its model..."
fi
# Ready when the API started here answers, and each worker has loaded and warmed its model and
# takes jobs (a worker's /ready, or the API's /ready for any worker where workers have none).
until "$PY" - "$api_url" "$T2I_INSTANCE" $metrics_ports <<'PROBE' 2>/dev/null; do
import json, sys, urllib.request
api_url, instance, *ports = sys.argv[1:]
api_url = api_url.replace("//0.0.0.0:", "//127.0.0.1:")
with urllib.request.urlopen(f"{api_url}/health", timeout=2) as answer:
    if json.load(answer).get("instance") != instance:
        sys.exit(3)
probes = [f"http://127.0.0.1:{port}/ready" for port in ports if port != "0"] or [f"{api_url}/ready"]
for probe in probes:
    urllib.request.urlopen(probe, timeout=2)
PROBE
    if (($? == 3)); then
        echo "${api_url} answers, but not as the API this make run started: is another service on port ${T2I_PORT:-8000}?" >&2
        exit 1
    fi
    for part in "${services[@]}" $redis_pid; do
        # A part exited before the service was ready (a model that cannot load, say).
        kill -0 "$part" 2>/dev/null || { wait "$part"; exit $?; }
    done
    sleep 0.5
done
webhook_port="${T2I_WEBHOOK_METRICS_PORT:-9102}"
echo "txt2img-service ready: API on $api_url (docs at /docs, metrics at /metrics); worker" \
    "metrics on port(s)" $metrics_ports"; webhook worker on $webhook_port; Ctrl-C stops it."
# When any part exits, stop the rest too.
wait -n
