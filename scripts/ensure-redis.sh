#!/usr/bin/env bash
# Make `redis-server` available: Debian's package when missing and running as root.
set -euo pipefail
command -v redis-server >/dev/null && exit 0
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "installing redis-server from the Debian packages..."
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    exit 0
fi
cat >&2 <<'MSG'
redis-server is not installed and this script cannot install it (it needs root and apt-get).
Install it with your package manager (Debian/Ubuntu: sudo apt-get install redis-server;
macOS: brew install redis), or point T2I_REDIS_URL at a running Redis 6.2 or newer.
MSG
exit 1
