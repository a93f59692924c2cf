"""A container health check: `python -m shared.probe api|worker|webhooks` exits 0 when that
process, on this machine, answers its probe (the API: alive; a worker: taking jobs)."""

import sys
import urllib.request
from collections.abc import Callable

from shared.settings import api_settings, webhook_settings, worker_settings

_TIMEOUT_S = 3
_ANY_ADDRESS = {"0.0.0.0", "::", ""}

# Each process: where it listens (host, port) and the path that says it is well.
PROBES: dict[str, Callable[[], tuple[str, int, str]]] = {
    "api": lambda: (api_settings().host, api_settings().port, "/health"),
    "worker": lambda: (worker_settings().metrics_host, worker_settings().metrics_port, "/ready"),
    "webhooks": lambda: (
        webhook_settings().metrics_host,
        webhook_settings().webhook_metrics_port,
        "/ready",
    ),
}


def probe_url(target: str) -> str:
    host, port, path = PROBES[target]()
    if host in _ANY_ADDRESS:
        host = "127.0.0.1"
    return f"http://{host}:{port}{path}"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in PROBES:
        print(f"usage: python -m shared.probe {{{'|'.join(PROBES)}}}", file=sys.stderr)
        return 2
    url = probe_url(argv[0])
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S):
            return 0
    except OSError as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
