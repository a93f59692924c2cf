#!/usr/bin/env bash
# `make run`: Redis (unless T2I_REDIS_URL already answers), one worker and the API.
# Ctrl-C, or SIGTERM to make, stops everything this script started.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export T2I_DATA_DIR="${T2I_DATA_DIR:-data}"
export T2I_REDIS_URL="${T2I_REDIS_URL:-redis://127.0.0.1:6379/0}"
mkdir -p "$T2I_DATA_DIR"

children=()
stop_all() {
    trap - EXIT INT TERM
    if ((${#children[@]})); then
        kill -TERM "${children[@]}" 2>/dev/null || true
        wait "${children[@]}" 2>/dev/null || true
    fi
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

redis_answers() {
    "$PY" -c 'import os, redis; redis.Redis.from_url(os.environ["T2I_REDIS_URL"], socket_connect_timeout=1).ping()' 2>/dev/null
}

if ! redis_answers; then
    read -r host port < <("$PY" -c 'import os, urllib.parse as u; p = u.urlparse(os.environ["T2I_REDIS_URL"]); print(p.hostname, p.port or 6379)')
    if [[ $host != 127.0.0.1 && $host != localhost ]]; then
        echo "Redis at $T2I_REDIS_URL does not answer, and it is not on this machine to start." >&2
        exit 1
    fi
    mkdir -p "$T2I_DATA_DIR/redis"
    redis-server --bind 127.0.0.1 --port "$port" --dir "$T2I_DATA_DIR/redis" \
        --appendonly yes --appendfsync everysec --save "" --maxmemory-policy noeviction \
        --loglevel warning &
    children+=($!)
    for _ in $(seq 50); do redis_answers && break; sleep 0.1; done
    redis_answers || { echo "redis-server did not start on port $port" >&2; exit 1; }
fi

if [[ ${T2I_ENV:-development} == development ]]; then
    "$PY" -m shared.keyadmin dev --file "$T2I_DATA_DIR/dev-api-key"
    echo "  export T2I_API_KEY=\$(cat $T2I_DATA_DIR/dev-api-key)"
fi

"$PY" -m worker &
children+=($!)
"$PY" -m worker.webhooks &
children+=($!)
"$PY" -m api &
children+=($!)
echo "txt2img-service: API on http://${T2I_HOST:-127.0.0.1}:${T2I_PORT:-8000} (docs at /docs); Ctrl-C stops it."
# When any part exits (a worker that cannot load its model, say), stop the rest too.
wait -n
