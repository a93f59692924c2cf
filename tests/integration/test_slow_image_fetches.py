"""A slow input image server cannot starve the API: a URL fetch has one deadline for all of it,
runs on the event loop (no pool thread), and one key may only run so many at once."""

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.support import Stack, free_port, service_env, start_redis

DEADLINE_S = 10
SLOW_FETCHES = 40
# Generous for a loaded two-core machine; a starved API answers after the drip ends (30 s).
PROMPT_S = 4.0
QUICK = {"width": 256, "height": 256, "num_inference_steps": 2}


class _DripServer:
    """Serves a 'PNG' one byte a second: every read arrives within any per-read timeout."""

    def __init__(self) -> None:
        self.port = free_port()
        self.connections = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.connections += 1
                self.send_response(200)
                self.send_header("content-type", "image/png")
                self.send_header("content-length", "1000")
                self.end_headers()
                try:
                    for _ in range(30):
                        self.wfile.write(b"\x89")
                        self.wfile.flush()
                        time.sleep(1)
                except OSError:
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._server.request_queue_size = 128
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def url(self, n: int) -> str:
        return f"http://127.0.0.1:{self.port}/slow-{n}.png"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def drip() -> Iterator[_DripServer]:
    server = _DripServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def fetch_stack(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Stack]:
    """An API (no worker) that may fetch from loopback, forty fetches a key at most."""
    workdir = tmp_path_factory.mktemp("slow-fetches")
    redis, port = start_redis(workdir / "redis")
    env = service_env(
        T2I_REDIS_URL=f"redis://127.0.0.1:{port}/0",
        T2I_MODEL_ID="tiny",
        T2I_MODEL_CACHE_DIR=str(model_cache),
        T2I_DATA_DIR=str(workdir / "data"),
        T2I_WEBHOOK_ALLOWLIST="127.0.0.1",
        T2I_INPUT_IMAGE_TIMEOUT_S=str(DEADLINE_S),
        T2I_INPUT_IMAGE_FETCHES_PER_KEY=str(SLOW_FETCHES),
    )
    stack = Stack(env, workdir, with_worker=False)
    try:
        yield stack.start()
    finally:
        stack.stop()
        redis.stop()


def _image_job(client: httpx.Client, url: str) -> httpx.Response:
    body = {"prompt": "slow", "init_image": url, "strength": 0.5, **QUICK}
    return client.post("/v1/jobs", json=body, timeout=60)


def test_a_slow_fetch_fails_at_its_deadline(fetch_stack: Stack, drip: _DripServer) -> None:
    with fetch_stack.client() as client:
        started = time.monotonic()
        response = _image_job(client, drip.url(0))
        took = time.monotonic() - started
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["details"][0]["type"] == "image_fetch_timeout"
    assert f"longer than {DEADLINE_S} s" in error["message"]
    assert DEADLINE_S * 0.9 <= took < DEADLINE_S + 4, f"it took {took:.1f} s"


def _timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def test_forty_slow_fetches_of_one_key_leave_other_keys_served(
    fetch_stack: Stack, drip: _DripServer
) -> None:
    slow_key = fetch_stack.create_key("slow", rate_limit_per_min=100_000)
    other_key = fetch_stack.create_key("other", rate_limit_per_min=100_000)
    before = drip.connections
    with ThreadPoolExecutor(SLOW_FETCHES + 1) as pool, fetch_stack.client(slow_key) as slow:
        slow_jobs = [pool.submit(_image_job, slow, drip.url(n)) for n in range(SLOW_FETCHES)]
        deadline = time.monotonic() + DEADLINE_S / 2
        while drip.connections - before < SLOW_FETCHES and time.monotonic() < deadline:
            time.sleep(0.1)
        in_flight = drip.connections - before
        with fetch_stack.client(other_key) as other:
            health, health_s = _timed(lambda: other.get("/health", timeout=30))
            made, post_s = _timed(
                lambda: other.post("/v1/jobs", json={"prompt": "fast", **QUICK}, timeout=30)
            )
            assert made.status_code == 202, made.text
            read, get_s = _timed(lambda: other.get(f"/v1/jobs/{made.json()['id']}", timeout=30))
        one_more = _image_job(slow, drip.url(SLOW_FETCHES))
        answers = [job.result() for job in slow_jobs]
    print(
        f"in flight {in_flight}: /health {health_s:.2f} s, POST {post_s:.2f} s, GET {get_s:.2f} s"
    )
    assert in_flight == SLOW_FETCHES
    assert health.status_code == 200 and read.status_code == 200, read.text
    assert max(health_s, post_s, get_s) < PROMPT_S, (health_s, post_s, get_s)
    # The key's forty-first fetch at once is refused at once, with a reason.
    assert one_more.status_code == 429, one_more.text
    assert one_more.json()["error"]["type"] == "rate_limited"
    assert "input image" in one_more.json()["error"]["message"]
    assert {answer.status_code for answer in answers} == {422}
