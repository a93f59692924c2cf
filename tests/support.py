"""Real processes for tests: redis-server, an S3 server, Celery workers and uvicorn."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from redis import Redis
from txt2img.settings import ClientSettings

from shared.apikeys import ApiKeyStore
from shared.records import new_job_id, utc_now
from shared.schema import GenerationRequest, JobRecord, JobStatus, SafetyAction
from shared.settings import _T2ISettings

REPO_ROOT = Path(__file__).resolve().parents[1]
REQUEST_TIMEOUT_S = 10


def setting_names() -> set[str]:
    """Every T2I_* environment variable a settings class reads, the client's included."""
    return {
        f"T2I_{name.upper()}"
        for settings in [*_T2ISettings.__subclasses__(), ClientSettings]
        for name in settings.model_fields
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _as_typed_at_a_terminal() -> None:
    """A command typed at a terminal starts with Ctrl-C's signals at their defaults, even when
    the tests run where they are ignored (a background job of a script ignores SIGINT, and a
    shell cannot trap a signal that was ignored when it started)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


@dataclass
class Process:
    """A child process whose output goes to a log file, shown when a test needs it."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen | None = None
    # Its own process group (and stderr in a file of its own), as a terminal runs a command.
    own_group: bool = False

    @property
    def stderr_path(self) -> Path:
        return self.log_path.with_suffix(".stderr")

    def start(self) -> "Process":
        log = self.log_path.open("ab")
        stderr = self.stderr_path.open("ab") if self.own_group else subprocess.STDOUT
        self.popen = subprocess.Popen(
            self.args,
            env=self.env,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=stderr,
            start_new_session=self.own_group,
            preexec_fn=_as_typed_at_a_terminal if self.own_group else None,
        )
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 15) -> None:
        if not self.alive():
            return
        assert self.popen is not None
        self.popen.terminate()
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def api_answers(api: Process, base_url: str) -> bool:
    """Whether the API answers /health; raises with its log if its process has exited."""
    if not api.alive():
        raise RuntimeError(f"the API exited:\n{api.log_tail()}")
    try:
        return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def service_env(**overrides: str) -> dict[str, str]:
    """The test process's environment without any T2I_* of the developer's, plus overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("T2I_")}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # Many workers run side by side: no metrics endpoint unless a test asks for its own port.
    env.update(T2I_METRICS_PORT="0", T2I_WEBHOOK_METRICS_PORT="0")
    env.update(overrides)
    return env


def start_redis(
    workdir: Path, port: int | None = None, append_only: bool = False, replica_of: int | None = None
) -> tuple[Process, int]:
    """A redis-server on loopback; with `append_only`, every write is on disk before it is
    acknowledged, and a restart on the same directory and port brings it all back; with
    `replica_of`, a replica of the server on that port."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    options = ["--appendfsync", "always"] if append_only else []
    if replica_of is not None:
        options += ["--replicaof", "127.0.0.1", str(replica_of)]
    process = Process(
        "redis",
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(workdir),
            "--save",
            "",
            "--appendonly",
            "yes" if append_only else "no",
            *options,
        ],
        service_env(),
        workdir / "redis.log",
    ).start()
    wait_until(lambda: port_open(port), 10, "redis-server")
    return process, port


def start_s3_server(workdir: Path) -> tuple[Process, str]:
    port = free_port()
    process = Process(
        "s3",
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        service_env(),
        workdir / "s3.log",
    ).start()
    wait_until(lambda: port_open(port), 30, "the moto S3 server")
    return process, f"http://127.0.0.1:{port}"


@dataclass
class Stack:
    """One worker and one API process sharing a Redis database and a storage backend."""

    env: dict[str, str]
    workdir: Path
    with_worker: bool = True
    with_webhooks: bool = False
    api_port: int = field(default_factory=free_port)
    worker: Process | None = None
    webhook_worker: Process | None = None
    api: Process | None = None
    api_key: str = ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self) -> "Stack":
        self.api_key = self.create_key("tests", rate_limit_per_min=100_000)
        env = {**self.env, "T2I_PORT": str(self.api_port)}
        if self.with_worker:
            self.worker = Process(
                "worker", [sys.executable, "-m", "worker"], env, self.workdir / "worker.log"
            ).start()
        if self.with_webhooks:
            self.webhook_worker = Process(
                "webhooks",
                [sys.executable, "-m", "worker.webhooks"],
                env,
                self.workdir / "webhooks.log",
            ).start()
        self.api = Process("api", [sys.executable, "-m", "api"], env, self.workdir / "api.log")
        self.api.start()
        # Without a worker /ready stays 503 by design; the API alone answers /health.
        probe = "/ready" if self.with_worker else "/health"
        wait_until(lambda: self._answers(probe), 120, f"the API to answer {probe}")
        return self

    def _answers(self, path: str) -> bool:
        for process in (self.worker, self.webhook_worker, self.api):
            if process is not None and not process.alive():
                raise RuntimeError(f"{process.name} exited:\n{process.log_tail()}")
        try:
            return httpx.get(f"{self.base_url}{path}", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def create_key(
        self,
        name: str,
        rate_limit_per_min: int,
        safety_action: SafetyAction | None = None,
        watermark_exempt: bool = False,
    ) -> str:
        """A new API key; `watermark_exempt` for tests that compare the pixels of two jobs (each
        job's watermark is its own)."""
        redis = Redis.from_url(self.env["T2I_REDIS_URL"])
        try:
            _, plain = ApiKeyStore(redis).create(
                name,
                rate_limit_per_min,
                safety_action=safety_action,
                watermark_exempt=watermark_exempt,
            )
            return plain
        finally:
            redis.close()

    def client(self, api_key: str | None = None) -> httpx.Client:
        """An HTTP client that authenticates with the stack's key (or `api_key`)."""
        return httpx.Client(
            base_url=self.base_url,
            timeout=REQUEST_TIMEOUT_S,
            headers={"Authorization": f"Bearer {api_key or self.api_key}"},
        )

    def stop(self) -> None:
        for process in (self.api, self.webhook_worker, self.worker):
            if process is not None:
                process.stop()


def wait_for_job(client: httpx.Client, job_id: str, timeout_s: float = 60) -> dict:
    """Poll as a client would until the job is terminal."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        if job["status"] in {"succeeded", "failed", "canceled", "expired"}:
            return job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout_s} s")


@dataclass
class SseEvent:
    id: str | None
    event: str
    data: dict


def read_sse(
    client: httpx.Client, path: str, last_event_id: str | None = None, stop_after: int | None = None
) -> list[SseEvent]:
    """Read a Server-Sent Events stream until it ends (or `stop_after` events, then hang up)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events: list[SseEvent] = []
    fields: dict[str, str] = {}
    with client.stream("GET", path, headers=headers, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith(":"):
                continue
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            if "event" in fields:
                events.append(
                    SseEvent(fields.get("id"), fields["event"], json.loads(fields["data"]))
                )
                if stop_after is not None and len(events) >= stop_after:
                    break
            fields = {}
    return events


def queued_record(owner: str | None) -> JobRecord:
    """A new queued job of `owner`, as the store's tests create them."""
    return JobRecord(
        id=new_job_id(),
        owner=owner,
        status=JobStatus.QUEUED,
        created_at=utc_now(),
        request=GenerationRequest(prompt="a cat", seed=1),
    )


class ImageServer:
    """A loopback HTTP server with one image at /init.png; it counts the requests it sees."""

    def __init__(self, body: bytes) -> None:
        self.port = free_port()
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests += 1
                found = self.path == "/init.png"
                self.send_response(200 if found else 404)
                self.send_header("content-length", str(len(body) if found else 0))
                self.end_headers()
                if found:
                    self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/init.png"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class ReceivedWebhook:
    headers: dict[str, str]
    body: bytes


class WebhookReceiver:
    """A real HTTP server on loopback that answers webhooks with scripted status codes."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.received: list[ReceivedWebhook] = []
        self.port = free_port()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = self.rfile.read(length)
                receiver.received.append(
                    ReceivedWebhook({k.lower(): v for k, v in self.headers.items()}, body)
                )
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/txt2img"

    def __enter__(self) -> "WebhookReceiver":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait_for(self, count: int, timeout_s: float = 30) -> list[ReceivedWebhook]:
        wait_until(lambda: len(self.received) >= count, timeout_s, f"{count} webhook(s)")
        return self.received
