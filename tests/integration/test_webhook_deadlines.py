"""A webhook receiver cannot hold a delivery: each attempt has one deadline for connecting,
sending and reading the whole response, and a `Retry-After` is capped by the retry schedule."""

import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from redis import Redis

from shared.apikeys import ApiKeyStore
from shared.jobstore import JobStore
from shared.logs import JobIdFilter
from shared.queue import make_celery
from shared.settings import CoreSettings, WebhookSettings
from shared.storage import LocalStorage
from shared.webhooks import DUE_KEY, Webhooks, _attempts_of, _delivery_key
from tests.support import free_port
from worker.webhooks import Sender

DEADLINE_S = 1.5
DRIP_BYTES = 40


class _Receiver:
    """A loopback receiver that answers `status` with `headers`, and drips its body one byte
    every half second when `drip` is set."""

    def __init__(self, status: int, headers: dict[str, str], drip: bool) -> None:
        self.port = free_port()
        self.posts = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.posts += 1
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(DRIP_BYTES if drip else 0))
                self.end_headers()
                try:
                    for _ in range(DRIP_BYTES if drip else 0):
                        self.wfile.write(b".")
                        self.wfile.flush()
                        time.sleep(0.5)
                except OSError:
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def sender(redis_client: Redis, redis_port: int, tmp_path: Path) -> Iterator[Sender]:
    core = CoreSettings(redis_url=f"redis://127.0.0.1:{redis_port}/15")
    settings = WebhookSettings(
        webhook_allowlist="127.0.0.1",
        webhook_timeout_s=DEADLINE_S,
        webhook_retry_delays_s="5,30,120",
    )
    webhooks = Webhooks(redis_client, make_celery(core), settings, 3600)
    yield Sender(
        webhooks,
        JobStore(redis_client, 3600),
        ApiKeyStore(redis_client),
        LocalStorage(tmp_path, "test-signing-secret", 60),
        settings,
        "http://127.0.0.1:1",
    )


def _delivery(redis: Redis, url: str, created_at: float) -> str:
    key, _ = ApiKeyStore(redis).create("hooks", rate_limit_per_min=60)
    delivery_id = f"msg_test{time.monotonic_ns()}"
    redis.hset(
        _delivery_key(delivery_id),
        mapping={
            "job_id": "job_test",
            "owner": key.id,
            "event": "completed",
            "url": url,
            "status": "pending",
            "attempts": 0,
            "created_at": created_at,
            "body": '{"type":"job.completed"}',
        },
    )
    return delivery_id


def _due_in(redis: Redis, delivery_id: str) -> float:
    due = redis.zscore(DUE_KEY, delivery_id)
    assert due is not None, "no retry was scheduled"
    return due - time.time()


def test_a_receiver_that_drips_its_response_is_cut_at_the_deadline(
    sender: Sender, redis_client: Redis
) -> None:
    receiver = _Receiver(200, {}, drip=True)
    try:
        delivery_id = _delivery(redis_client, receiver.url, time.time())
        started = time.monotonic()
        sender.deliver(delivery_id)
        took = time.monotonic() - started
    finally:
        receiver.close()
    # Every byte came within the per-read timeout; only the overall deadline stops it.
    assert took < DEADLINE_S + 1.5, f"the attempt took {took:.1f} s"
    # The delivery's job id does not stay on the lines this thread logs after it.
    after = logging.makeLogRecord({})
    JobIdFilter().filter(after)
    assert after.job_id is None
    assert receiver.posts == 1
    [attempt] = [json.loads(raw) for raw in redis_client.lrange(_attempts_of(delivery_id), 0, -1)]
    assert attempt["error"] == "timed out"
    assert sender.webhooks.get(delivery_id)["status"] == "retrying"
    assert 5 * 0.8 - 1 <= _due_in(redis_client, delivery_id) <= 5 * 1.2


def test_retry_after_is_capped_by_the_retry_schedule(sender: Sender, redis_client: Redis) -> None:
    receiver = _Receiver(503, {"retry-after": "999999999"}, drip=False)
    try:
        fresh = _delivery(redis_client, receiver.url, time.time())
        sender.deliver(fresh)
        # Near the end of its window (5 + 30 + 120 s since the first attempt).
        late = _delivery(redis_client, receiver.url, time.time() - 150)
        sender.deliver(late)
    finally:
        receiver.close()
    assert sender.webhooks.get(fresh)["status"] == "retrying"
    # Up to the largest configured delay, not 31 years.
    assert 100 < _due_in(redis_client, fresh) <= 120
    # The window's end, or the delay it would have had anyway.
    assert _due_in(redis_client, late) <= 5 * 1.2
