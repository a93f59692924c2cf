"""The ports this machine's processes listen on, checked before anything starts:
`python -m shared.ports [--workers N]` exits 1 naming each port that is taken (and the setting
that moves it), else prints the metrics port of each of N workers, one a line."""

import argparse
import errno
import socket
import sys
from collections.abc import Sequence

from shared.settings import api_settings, webhook_settings, worker_settings


def port_taken(host: str, port: int) -> str | None:
    """Why `port` cannot be listened on at `host` (None: it can), tried as the servers do."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As uvicorn and the metrics servers bind: a port in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
    return None


def worker_metrics_ports(first: int, count: int, taken: set[int]) -> list[int]:
    """One metrics port per worker on this machine, from `first` upwards past `taken`;
    0 (no endpoint) for each when `first` is 0."""
    if first == 0:
        return [0] * count
    ports: list[int] = []
    candidate = first
    while len(ports) < count:
        if candidate not in taken:
            ports.append(candidate)
        candidate += 1
    return ports


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.ports", description=__doc__)
    parser.add_argument("--workers", type=int, default=1, help="render workers on this machine")
    args = parser.parse_args(argv)
    api, webhooks, worker = api_settings(), webhook_settings(), worker_settings()
    wanted = [(api.host, api.port, "T2I_PORT")]
    if webhooks.webhook_metrics_port:
        wanted.append(
            (webhooks.metrics_host, webhooks.webhook_metrics_port, "T2I_WEBHOOK_METRICS_PORT")
        )
    reserved = {port for _, port, _ in wanted}
    workers = worker_metrics_ports(worker.metrics_port, args.workers, reserved)
    wanted += [(worker.metrics_host, port, "T2I_METRICS_PORT") for port in workers if port]
    problems = [
        f"port {port} on {host} is taken ({why}); set {setting} to a free port"
        for host, port, setting in wanted
        if (why := port_taken(host, port))
    ]
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    print(*workers, sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
