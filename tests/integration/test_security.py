"""API keys, isolation, rate limits, input limits, internal errors and the Redis-down answer."""

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis import Redis

from tests.support import Stack, service_env, start_redis, wait_until

QUICK = {"width": 256, "height": 256, "num_inference_steps": 2}


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer t2i_000000000000_" + "x" * 43}, {"Authorization": "Basic abc"}],
)
def test_missing_or_bad_keys_get_401(local_stack: Stack, headers: dict) -> None:
    with httpx.Client(base_url=local_stack.base_url, headers=headers) as client:
        responses = [
            client.post("/v1/jobs", json={"prompt": "a cat", **QUICK}),
            client.get("/v1/jobs"),
            client.get("/v1/jobs/0123456789abcdef0123456789abcdef"),
            client.get("/v1/webhooks/secret"),
        ]
    for response in responses:
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"


def test_a_revoked_key_stops_working_within_the_auth_cache_time(local_stack: Stack) -> None:
    key = local_stack.create_key("short-lived", 100)
    redis = Redis.from_url(local_stack.env["T2I_REDIS_URL"])
    with local_stack.client(key) as client:
        assert client.get("/v1/jobs").status_code == 200
        key_id = key.split("_")[1]
        assert redis.delete(f"t2i:apikey:{key_id}") == 1
        # The default T2I_AUTH_CACHE_S is 5 s; the rest is a loaded machine's slack.
        wait_until(lambda: client.get("/v1/jobs").status_code == 401, 30, "the key to be refused")


def test_another_key_cannot_see_touch_or_list_a_job(local_stack: Stack) -> None:
    other = local_stack.create_key("other tenant", 100)
    with local_stack.client() as owner, local_stack.client(other) as intruder:
        job = owner.post("/v1/jobs", json={"prompt": "private", **QUICK}).json()
        attempts = [
            intruder.get(f"/v1/jobs/{job['id']}"),
            intruder.post(f"/v1/jobs/{job['id']}/cancel"),
            intruder.get(f"/v1/jobs/{job['id']}/events"),
            intruder.get(f"/v1/jobs/{job['id']}/webhooks"),
            intruder.post(f"/v1/jobs/{job['id']}/webhooks/redeliver"),
        ]
        listed = intruder.get("/v1/jobs", params={"limit": 100}).json()
        still_mine = owner.get(f"/v1/jobs/{job['id']}")
    for response in attempts:
        assert response.status_code == 404, response.text
        assert response.json()["error"]["type"] == "not_found"
    assert job["id"] not in {j["id"] for j in listed["data"]}
    assert still_mine.status_code == 200


def test_a_burst_past_the_limit_gets_429_while_another_key_is_served(local_stack: Stack) -> None:
    limited = local_stack.create_key("tight", 5)
    with local_stack.client(limited) as client, local_stack.client() as neighbour:
        answers = [client.post("/v1/jobs", json={"prompt": "burst", **QUICK}) for _ in range(8)]
        served = neighbour.post("/v1/jobs", json={"prompt": "unaffected", **QUICK})
    codes = [answer.status_code for answer in answers]
    assert codes[:5] == [202] * 5 and 429 in codes[5:]
    refused = answers[codes.index(429)]
    assert refused.json()["error"]["type"] == "rate_limited"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["ratelimit-limit"] == "5"
    assert refused.headers["ratelimit-remaining"] == "0"
    assert int(answers[0].headers["ratelimit-remaining"]) == 4
    assert served.status_code == 202


def test_a_full_queue_gets_429_with_retry_after(workerless_api: Stack) -> None:
    redis = Redis.from_url(workerless_api.env["T2I_REDIS_URL"])
    wait_until(lambda: redis.zcard("t2i:queue") == 0, 10, "earlier jobs to expire")
    with workerless_api.client() as client:
        answers = [client.post("/v1/jobs", json={"prompt": "fill", **QUICK}) for _ in range(4)]
    assert [a.status_code for a in answers] == [202, 202, 202, 429]
    assert answers[3].json()["error"]["type"] == "overloaded"
    assert int(answers[3].headers["retry-after"]) >= 1
    assert "ratelimit-limit" in answers[3].headers


def test_a_10_mb_body_gets_413_without_the_api_holding_it(local_stack: Stack) -> None:
    assert local_stack.api is not None and local_stack.api.popen is not None
    pid = local_stack.api.popen.pid
    before = _rss_kib(pid)
    size = 10 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", local_stack.api_port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: t\r\n"
            + b"Content-Type: application/json\r\n"
            + f"Authorization: Bearer {local_stack.api_key}\r\n".encode()
            + f"Content-Length: {size}\r\n\r\n".encode()
            + b'{"prompt": "'
        )
        # The server may close before taking it all: that is the point.
        with contextlib.suppress(OSError):
            sock.sendall(b"x" * size)
        reply = sock.recv(65536).decode(errors="replace")

    def chunks(megabytes: int) -> Iterator[bytes]:
        for _ in range(megabytes):
            yield b"y" * (1024 * 1024)

    json_body = {"content-type": "application/json"}
    with local_stack.client() as client:
        chunked = client.post("/v1/images/generations", content=chunks(10), headers=json_body)
        assert reply.startswith("HTTP/1.1 413"), reply[:200]
        assert '"payload_too_large"' in reply
        assert chunked.status_code == 413
        assert chunked.json()["error"]["type"] == "payload_too_large"
        assert _rss_kib(pid) - before < 5 * 1024
        # A job's body may carry two input images, and has a cap all the same.
        with_images = client.post("/v1/jobs", content=chunks(32), headers=json_body)
    assert with_images.status_code == 413
    assert with_images.json()["error"]["type"] == "payload_too_large"


def test_an_internal_error_is_a_500_envelope_with_an_id_in_the_logs(local_stack: Stack) -> None:
    redis = Redis.from_url(local_stack.env["T2I_REDIS_URL"])
    with local_stack.client() as client:
        job = client.post("/v1/jobs", json={"prompt": "soon corrupted", **QUICK}).json()
        redis.hset(f"t2i:job:{job['id']}", "timings", "{not json")
        response = client.get(f"/v1/jobs/{job['id']}")
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "internal_error"
    assert "Traceback" not in response.text and "JSONDecodeError" not in response.text
    error_id = error["details"]["error_id"]
    assert error_id in error["message"]
    assert local_stack.api is not None
    wait_until(lambda: error_id in local_stack.api.log_tail(200), 5, "the error id in the log")


def test_redis_unreachable_gets_503_at_once_and_cuts_streams_with_an_error_event(
    workdir: Path, model_cache: Path
) -> None:
    redis_process, port = start_redis(workdir / "doomed-redis")
    stack_dir = workdir / "doomed-stack"
    stack_dir.mkdir()
    env = service_env(
        T2I_REDIS_URL=f"redis://127.0.0.1:{port}/0",
        T2I_DATA_DIR=str(stack_dir / "data"),
        T2I_MODEL_CACHE_DIR=str(model_cache),
    )
    stack = Stack(env, stack_dir, with_worker=False).start()
    try:
        with stack.client() as client:
            job = client.post("/v1/jobs", json={"prompt": "waits forever", **QUICK}).json()
            with client.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=30) as stream:
                lines = stream.iter_lines()
                assert next(lines).startswith("id: ")
                redis_process.stop()
                rest = list(lines)
            started = time.monotonic()
            submit = client.post("/v1/jobs", json={"prompt": "no redis", **QUICK})
            read = client.get("/v1/jobs/0123456789abcdef0123456789abcdef")
            elapsed = time.monotonic() - started
            health = client.get("/health")
            ready = client.get("/ready")
    finally:
        stack.stop()
    assert submit.status_code == read.status_code == 503
    assert submit.json()["error"]["type"] == "unavailable"
    assert elapsed < 8
    assert health.status_code == 200 and ready.status_code == 503
    # The stream says why it ends instead of just stopping.
    events = [line for line in rest if line.startswith("event: ")]
    assert events[-1] == "event: error", rest
    assert '"type":"unavailable"' in rest[rest.index("event: error") + 1]


def test_a_huge_request_header_gets_431_without_the_api_holding_it(local_stack: Stack) -> None:
    assert local_stack.api is not None and local_stack.api.popen is not None
    pid = local_stack.api.popen.pid
    before = _rss_kib(pid)
    with socket.create_connection(("127.0.0.1", local_stack.api_port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Padding: ")
        # The server may close before taking it all: that is the point.
        with contextlib.suppress(OSError):
            for _ in range(50):
                sock.sendall(b"x" * (1024 * 1024))
        reply = sock.recv(65536).decode(errors="replace")
    with local_stack.client() as client:
        under_the_cap = client.get("/health", headers={"X-Padding": "x" * 8000})
    assert reply.startswith("HTTP/1.1 431"), reply[:200]
    assert '"headers_too_large"' in reply
    assert under_the_cap.status_code == 200
    assert _rss_kib(pid) - before < 5 * 1024


_HEAD_CAP = 16 * 1024  # T2I_MAX_HEADER_BYTES's default, which the test stacks keep


def _head(size: int) -> bytes:
    """A GET /health head of exactly `size` bytes that asks the server to close after it."""
    start, end = b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Padding: ", b"\r\n\r\n"
    return start + b"x" * (size - len(start) - len(end)) + end


def _exchange(stack: Stack, writes: list[bytes]) -> str:
    """Sends each write on one connection and reads until the server closes it."""
    received = b""
    with socket.create_connection(("127.0.0.1", stack.api_port), timeout=10) as sock:
        # The server may close before taking it all: that is the point.
        with contextlib.suppress(OSError):
            for write in writes:
                sock.sendall(write)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
    return received.decode(errors="replace")


@pytest.mark.parametrize("size", [_HEAD_CAP + 1, 20 * 1024, 100 * 1024])
def test_a_head_over_the_cap_in_one_write_gets_431(local_stack: Stack, size: int) -> None:
    reply = _exchange(local_stack, [_head(size)])
    assert reply.startswith("HTTP/1.1 431"), reply[:200]
    assert '"headers_too_large"' in reply


def test_a_head_over_the_cap_in_many_small_writes_gets_431(local_stack: Stack) -> None:
    head = _head(20 * 1024)
    writes = [head[at : at + 100] for at in range(0, len(head), 100)]
    reply = _exchange(local_stack, writes)
    assert reply.startswith("HTTP/1.1 431"), reply[:200]
    assert '"headers_too_large"' in reply


@pytest.mark.parametrize("size", [_HEAD_CAP, _HEAD_CAP - 500])
def test_a_head_at_or_under_the_cap_is_served(local_stack: Stack, size: int) -> None:
    in_one = _exchange(local_stack, [_head(size)])
    head = _head(size)
    in_pieces = _exchange(local_stack, [head[at : at + 1000] for at in range(0, len(head), 1000)])
    assert in_one.startswith("HTTP/1.1 200"), in_one[:200]
    assert in_pieces.startswith("HTTP/1.1 200"), in_pieces[:200]


def test_a_pipelined_head_over_the_cap_after_a_body_is_refused(local_stack: Stack) -> None:
    body = b'{"prompt": "a cat"}'
    post = (
        b"POST /v1/jobs HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    reply = _exchange(local_stack, [post + _head(20 * 1024)])
    assert "HTTP/1.1 431" in reply, reply[:400]
    assert "HTTP/1.1 200" not in reply, reply[:400]


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shared.keyadmin", *args],
        env=service_env(T2I_REDIS_URL=stack.env["T2I_REDIS_URL"]),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_keys_cli_creates_lists_and_revokes(local_stack: Stack) -> None:
    created = _cli(local_stack, "create", "--name", "cli-made", "--rate-limit", "7")
    assert created.returncode == 0, created.stderr
    new_key = created.stdout.strip().splitlines()[-1]
    key_id = new_key.split("_")[1]
    with local_stack.client(new_key) as client:
        assert client.get("/v1/jobs").status_code == 200
    listed = _cli(local_stack, "list")
    assert any(
        key_id in line and "cli-made" in line and "7" in line for line in listed.stdout.splitlines()
    )
    assert new_key not in listed.stdout
    redis = Redis.from_url(local_stack.env["T2I_REDIS_URL"])
    stored = redis.hgetall(f"t2i:apikey:{key_id}")
    assert new_key.encode() not in b"".join(stored.values())
    revoked = _cli(local_stack, "revoke", key_id)
    again = _cli(local_stack, "revoke", key_id)
    with local_stack.client(new_key) as client:
        # Within T2I_AUTH_CACHE_S (5 s), plus a loaded machine's slack.
        wait_until(lambda: client.get("/v1/jobs").status_code == 401, 30, "the key to be refused")
    assert revoked.returncode == 0 and again.returncode == 1
    assert again.stderr.startswith("txt2img-keys: error:") and "Traceback" not in again.stderr


def test_development_key_file_is_private_and_reused(local_stack: Stack, tmp_path: Path) -> None:
    path = tmp_path / "dev-api-key"
    first = _cli(local_stack, "dev", "--file", str(path))
    second = _cli(local_stack, "dev", "--file", str(path))
    key = path.read_text().strip()
    assert first.returncode == second.returncode == 0
    assert path.stat().st_mode & 0o777 == 0o600
    assert key in first.stdout and key in second.stdout
    with local_stack.client(key) as client:
        assert client.get("/v1/jobs").status_code == 200
