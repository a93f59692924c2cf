"""The webhook worker: a CPU-only Celery worker that signs and sends webhook deliveries, and
retries them with backoff. `python -m worker.webhooks`. Imports no torch."""

import asyncio
import json
import logging
import os
import random
import socket
import sys
import time
from datetime import UTC, datetime
from typing import Any

import httpx
from celery import Celery
from prometheus_client import Counter

from shared.apikeys import ApiKeyStore
from shared.jobstore import JobStore
from shared.logs import configure_logging, set_current_job
from shared.queue import consume, make_celery
from shared.redisconn import make_redis
from shared.settings import (
    WebhookSettings,
    api_settings,
    core_settings,
    log_settings,
    storage_settings,
    webhook_settings,
)
from shared.storage import ObjectStorage, make_storage
from shared.views import public_job
from shared.webhooks import (
    DELIVER_TASK,
    Target,
    WebhookRefused,
    Webhooks,
    check_webhook_url,
    pinned_url,
    signed_headers,
)
from worker.metrics_server import MetricsPortInUse, WorkerProbes
from worker.periodic import Periodic

log = logging.getLogger("worker.webhooks")

DELIVERY_ATTEMPTS = Counter(
    "txt2img_webhook_deliveries_total",
    "Webhook delivery attempts by outcome: delivered, retrying, failed (given up), gone (410)",
    ["outcome"],
)

_JITTER = 0.2
_RETRY_STATUSES = {429} | set(range(500, 600))
_SCHEDULER_POLL_S = 0.1


class Sender:
    """One delivery attempt at a time: build the body once, sign, send, decide what next."""

    def __init__(
        self,
        webhooks: Webhooks,
        store: JobStore,
        keys: ApiKeyStore,
        storage: ObjectStorage,
        settings: WebhookSettings,
        base_url: str,
    ) -> None:
        self.webhooks = webhooks
        self.store = store
        self.keys = keys
        self.storage = storage
        self.settings = settings
        self.base_url = base_url

    def deliver(self, delivery_id: str) -> None:
        delivery = self.webhooks.get(delivery_id)
        if delivery is None or delivery["status"] in {"delivered", "gone"}:
            return
        set_current_job(delivery["job_id"])
        try:
            self._attempt(delivery_id, delivery)
        finally:
            set_current_job(None)

    def _attempt(self, delivery_id: str, delivery: dict[str, str]) -> None:
        body = delivery.get("body")
        if body is None:
            body = self._body(delivery)
            if body is None:
                self._finish(delivery_id, "failed", error="the job no longer exists")
                return
            self.webhooks.update(delivery_id, body=body)
        secrets = self.keys.webhook_secrets(delivery["owner"]) if delivery["owner"] else None
        if secrets is None:
            self._finish(delivery_id, "failed", error="the API key that made the job is revoked")
            return
        attempt = int(delivery["attempts"]) + 1
        try:
            target = check_webhook_url(delivery["url"], self.settings)
        except WebhookRefused as exc:
            self._finish(delivery_id, "failed", attempt=attempt, error=f"refused: {exc}")
            return
        now = int(time.time())
        headers = signed_headers(secrets.signing_secrets(now), delivery_id, now, body.encode())
        started = time.monotonic()
        status_code, error, retry_after = self._post(target, body, headers)
        outcome: dict[str, Any] = {
            "attempt": attempt,
            "status_code": status_code,
            "error": error,
            "duration_ms": round((time.monotonic() - started) * 1000, 1),
        }
        if status_code is not None and 200 <= status_code < 300:
            self._finish(delivery_id, "delivered", **outcome)
        elif status_code == 410:
            self._finish(delivery_id, "gone", **outcome)
        elif status_code is None or status_code in _RETRY_STATUSES:
            created_at = float(delivery.get("created_at") or time.time())
            self._retry_or_give_up(delivery_id, attempt, retry_after, created_at, outcome)
        else:
            self._finish(delivery_id, "failed", **outcome)

    def _body(self, delivery: dict[str, str]) -> str | None:
        record = self.store.get(delivery["job_id"])
        if record is None:
            return None
        job = public_job(record, self.storage, self.base_url)
        payload = {
            "type": f"job.{delivery['event']}",
            "timestamp": datetime.now(UTC).isoformat(),
            "data": job.model_dump(mode="json"),
        }
        return json.dumps(payload, separators=(",", ":"))

    def _post(
        self, target: Target, body: str, headers: dict[str, str]
    ) -> tuple[int | None, str | None, float | None]:
        """(status code, error, Retry-After seconds), connecting to the checked address only, all
        of it (connecting, sending, the whole response) within T2I_WEBHOOK_TIMEOUT_S."""
        try:
            return asyncio.run(self._post_within_deadline(target, body, headers))
        except (TimeoutError, httpx.TimeoutException):
            return None, "timed out", None
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}", None

    async def _post_within_deadline(
        self, target: Target, body: str, headers: dict[str, str]
    ) -> tuple[int | None, str | None, float | None]:
        url, pinned_headers, extensions = pinned_url(target)
        deadline = self.settings.webhook_timeout_s
        async with (
            asyncio.timeout(deadline),
            httpx.AsyncClient(timeout=deadline, follow_redirects=False) as http,
        ):
            response = await http.post(
                url,
                content=body.encode(),
                headers={
                    **headers,
                    "content-type": "application/json",
                    **pinned_headers,
                    "user-agent": "txt2img-service-webhooks",
                },
                extensions=extensions,
            )
        return response.status_code, None, _retry_after(response)

    def _retry_or_give_up(
        self,
        delivery_id: str,
        attempt: int,
        retry_after: float | None,
        created_at: float,
        outcome: dict,
    ) -> None:
        delays = self.settings.retry_delays_s
        if attempt > len(delays):
            self._finish(delivery_id, "failed", **outcome)
            return
        now = time.time()
        delay = delays[attempt - 1] * random.uniform(1 - _JITTER, 1 + _JITTER)
        due = now + delay
        if retry_after is not None and retry_after > delay:
            # A receiver may ask for a longer wait, but not one past the retry window.
            window_end = created_at + sum(delays)
            due = max(due, min(now + min(retry_after, max(delays)), window_end))
        self.webhooks.record_attempt(
            delivery_id, {**outcome, "at": _now_iso(), "next_attempt_at": _iso(due)}
        )
        self.webhooks.update(delivery_id, status="retrying")
        self.webhooks.schedule_retry(delivery_id, due)
        DELIVERY_ATTEMPTS.labels(outcome="retrying").inc()

    def _finish(self, delivery_id: str, status: str, **outcome: Any) -> None:
        if outcome:
            self.webhooks.record_attempt(
                delivery_id, {"status_code": None, **outcome, "at": _now_iso()}
            )
        self.webhooks.update(delivery_id, status=status)
        DELIVERY_ATTEMPTS.labels(outcome=status).inc()
        log.info("webhook %s %s %s", delivery_id, status, outcome.get("error") or "")


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


def _now_iso() -> str:
    return _iso(time.time())


def requeue_due(webhooks: Webhooks) -> None:
    """Put deliveries whose retry time has come back onto the queue."""
    for delivery_id in webhooks.claim_due(time.time()):
        webhooks.send_now(delivery_id)


def register_webhook_task(app: Celery, sender: Sender) -> None:
    @app.task(name=DELIVER_TASK)
    def deliver(delivery_id: str) -> None:
        sender.deliver(delivery_id)


def main() -> int:
    configure_logging(log_settings())
    core, settings = core_settings(), webhook_settings()
    try:
        probes = WorkerProbes(
            settings.metrics_host, settings.webhook_metrics_port, "T2I_WEBHOOK_METRICS_PORT"
        )
    except MetricsPortInUse as exc:
        log.error("%s", exc)
        return 2
    redis = make_redis(core)
    app = make_celery(core)
    webhooks = Webhooks(redis, app, settings, core.retention_s)
    sender = Sender(
        webhooks,
        JobStore(redis, core.retention_s),
        ApiKeyStore(redis),
        make_storage(storage_settings()),
        settings,
        api_settings().own_base_url,
    )
    register_webhook_task(app, sender)
    scheduler = Periodic("webhook-retries", _SCHEDULER_POLL_S, lambda: requeue_due(webhooks))
    probes.ready_while_consuming(scheduler.start, scheduler.stop)
    hostname = f"webhooks@{socket.gethostname()}.{os.getpid()}"
    consume(app, settings.webhook_queue, settings.webhook_concurrency, hostname)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
