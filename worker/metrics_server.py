"""A worker process's own small HTTP server: /metrics for Prometheus, /health and /ready for
probes. Celery workers are separate processes, so each serves its own. Imports no torch."""

import json
import logging
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from celery.signals import worker_ready, worker_shutdown
from prometheus_client import REGISTRY, CollectorRegistry, disable_created_metrics, make_wsgi_app

log = logging.getLogger(__name__)

_StartResponse = Callable[..., Any]


class MetricsPortInUse(Exception):
    """The metrics port cannot be bound (another worker on this machine has it?)."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    """No line per scrape or probe."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _json(start_response: _StartResponse, status: str, body: dict[str, str]) -> Iterable[bytes]:
    start_response(status, [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]


def serve_metrics(
    host: str,
    port: int,
    setting: str,
    is_ready: Callable[[], bool],
    registry: CollectorRegistry = REGISTRY,
) -> WSGIServer | None:
    """Serve on a daemon thread: /metrics; /health (the process answers); /ready (it takes
    jobs, i.e. its model is loaded and its consumer runs). Port 0: nothing."""
    if not port:
        return None
    # `_created` series double every counter and histogram for little use.
    disable_created_metrics()
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: _StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)
        if path == "/health":
            return _json(start_response, "200 OK", {"status": "ok"})
        if path == "/ready":
            if is_ready():
                return _json(start_response, "200 OK", {"status": "ready"})
            return _json(start_response, "503 Service Unavailable", {"status": "not ready"})
        return _json(start_response, "404 Not Found", {"status": "no such path"})

    try:
        server = make_server(host, port, app, _ThreadingServer, handler_class=_QuietHandler)
    except OSError as exc:
        raise MetricsPortInUse(
            f"cannot serve /metrics on {host}:{port} ({exc.strerror}); "
            f"set {setting} to a free port (0: no metrics endpoint)"
        ) from exc
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics", host, port)
    return server


class WorkerProbes:
    """A worker process's /metrics, /health and /ready; ready while Celery consumes its queue."""

    def __init__(self, host: str, port: int, setting: str) -> None:
        self._taking_jobs = threading.Event()
        serve_metrics(host, port, setting, self._taking_jobs.is_set)

    def ready_while_consuming(self, start: Callable[[], None], stop: Callable[[], None]) -> None:
        """Once Celery consumes: `start`, then ready. When it shuts down: not ready, then `stop`."""

        def on_ready(**_: object) -> None:
            start()
            self._taking_jobs.set()

        def on_shutdown(**_: object) -> None:
            self._taking_jobs.clear()
            stop()

        worker_ready.connect(on_ready, weak=False)
        worker_shutdown.connect(on_shutdown, weak=False)
