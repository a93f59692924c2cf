"""The API's Prometheus metrics: HTTP requests, submitted jobs, and the queues and workers as Redis
sees them. `python -m api` runs prometheus-client in multiprocess mode, so whichever uvicorn
process answers a scrape reports the sum over all of them."""

import time
from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.openapi import error_responses
from shared.apikeys import KEY_INDEX
from shared.backlog import read_backlog
from shared.info import Backlog
from shared.jobstore import JobStore
from shared.keys import QUEUE_KEY, status_index_key
from shared.queue import live_workers
from shared.schema import JobStatus
from shared.settings import CoreSettings

HTTP_REQUESTS = Counter(
    "txt2img_http_requests_total",
    "HTTP requests answered, by method, route template and status code",
    ["method", "route", "status"],
)
HTTP_REQUEST_SECONDS = Histogram(
    "txt2img_http_request_duration_seconds",
    "Time to answer an HTTP request (an event stream: until it ends)",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
JOBS_SUBMITTED = Counter(
    "txt2img_jobs_submitted_total", "Jobs created by POST /v1/jobs (idempotent replays excluded)"
)

JOBS_DELETED = Counter(
    "txt2img_jobs_deleted_total", "Jobs deleted with their images after their retention"
)

_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


def _route(scope: Scope) -> str:
    """The route template that served the request, so job ids never become label values."""
    route = scope.get("route")
    if route is not None:
        return route.path
    for candidate in scope["app"].router.routes:
        if candidate.matches(scope)[0] is Match.FULL:
            return candidate.path
    return "unmatched"


class HttpMetrics:
    """Counts and times every HTTP request by route template and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        # An exception that escapes here becomes a 500 further out.
        status = 500

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            method = scope["method"] if scope["method"] in _METHODS else "other"
            route = _route(scope)
            HTTP_REQUESTS.labels(method, route, str(status)).inc()
            HTTP_REQUEST_SECONDS.labels(method, route).observe(time.perf_counter() - started)


class QueueCollector(Collector):
    """Queue depth, each model's backlog, live workers and the retention backlog, read from Redis
    at scrape time (once, whichever process answers), so every API process reports the same
    numbers."""

    def __init__(
        self, redis: Redis, store: JobStore, settings: CoreSettings, key_labels: bool = False
    ) -> None:
        self._redis = redis
        self._store = store
        self._settings = settings
        # Key ids as label values only when the operator asks: one series per key.
        self._key_labels = key_labels

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            depth = self._redis.zcard(QUEUE_KEY)
            max_age_s = self._settings.worker_heartbeat_max_age_s
            workers = live_workers(self._redis, max_age_s)
            backlog = read_backlog(self._store, self._settings, workers)
            per_key = self._jobs_per_key()
            past_retention, retention_lag_s = self._store.retention_backlog(time.time())
        except RedisError:
            return
        yield GaugeMetricFamily("txt2img_queue_depth", "Jobs waiting for a worker", value=depth)
        yield _backlog_metric(backlog)
        yield from self._key_metrics(per_key)
        alive = GaugeMetricFamily(
            "txt2img_workers_alive", "Render workers with a recent heartbeat", labels=["model"]
        )
        for model in sorted({worker.model for worker in workers}):
            alive.add_metric([model], sum(worker.model == model for worker in workers))
        yield alive
        yield GaugeMetricFamily(
            "txt2img_retention_backlog_jobs",
            "Jobs past their retention not yet deleted (0 while the sweeper keeps up)",
            value=past_retention,
        )
        yield GaugeMetricFamily(
            "txt2img_retention_lag_seconds",
            "How long past its retention the oldest job not yet deleted is (0: none)",
            value=retention_lag_s,
        )

    def _jobs_per_key(self) -> dict[str, tuple[int, int]]:
        """(queued, running) of every key with either."""
        key_ids = sorted(key_id.decode() for key_id in self._redis.smembers(KEY_INDEX))
        with self._redis.pipeline(transaction=False) as pipe:
            for key_id in key_ids:
                pipe.zcard(status_index_key(key_id, JobStatus.QUEUED))
                pipe.zcard(status_index_key(key_id, JobStatus.RUNNING))
            counts = pipe.execute()
        pairs = zip(counts[::2], counts[1::2], strict=True)
        return {
            key_id: (queued, running)
            for key_id, (queued, running) in zip(key_ids, pairs, strict=True)
            if queued or running
        }

    def _key_metrics(self, per_key: dict[str, tuple[int, int]]) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "txt2img_keys_with_queued_jobs",
            "API keys with jobs waiting: how many share the pool",
            value=sum(queued > 0 for queued, _ in per_key.values()),
        )
        most = GaugeMetricFamily(
            "txt2img_key_jobs_max",
            "The most jobs any one API key has, by status",
            labels=["status"],
        )
        most.add_metric(["queued"], max((queued for queued, _ in per_key.values()), default=0))
        most.add_metric(["running"], max((running for _, running in per_key.values()), default=0))
        yield most
        if self._key_labels:
            jobs = GaugeMetricFamily(
                "txt2img_key_jobs", "Jobs of each API key, by status", labels=["key", "status"]
            )
            for key_id, (queued, running) in per_key.items():
                jobs.add_metric([key_id, "queued"], queued)
                jobs.add_metric([key_id, "running"], running)
            yield jobs


def _backlog_metric(backlog: Backlog) -> GaugeMetricFamily:
    jobs = GaugeMetricFamily(
        "txt2img_backlog_jobs",
        "Jobs of each model's queue by state: queued (not started) or running; the worker "
        "autoscaler scales on their sum",
        labels=["queue", "model", "state"],
    )
    for queue, entry in backlog.queues.items():
        jobs.add_metric([queue, entry.model, "queued"], entry.queued)
        jobs.add_metric([queue, entry.model, "running"], entry.running)
    return jobs


def _exposition(queue: QueueCollector) -> bytes:
    if values.ValueClass is values.MutexValue:
        # One process (the app built in-process, as in tests): its own registry is the truth.
        counted = REGISTRY
    else:
        counted = CollectorRegistry()
        MultiProcessCollector(counted)
    state = CollectorRegistry()
    state.register(queue)
    return generate_latest(counted) + generate_latest(state)


def metrics_router(queue: QueueCollector) -> APIRouter:
    router = APIRouter(tags=["system"])

    @router.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={
            200: {
                "description": "the Prometheus text exposition format",
                "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
            },
            **error_responses(),
        },
    )
    async def metrics(request: Request) -> Response:
        body = await run_in_threadpool(_exposition, queue)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return router
