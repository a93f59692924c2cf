"""A cluster whose parts the chaos tests kill, stop and restart: its own redis-server (append-only
file, fsync on every write), its own S3 server, one API and any number of workers."""

import contextlib
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from shared.apikeys import ApiKeyStore
from shared.jobstore import JobStore
from shared.keys import LEASES_KEY, QUEUE_KEY, events_key
from shared.queue import WORKERS_KEY
from shared.schema import JobRecord, JobStatus
from tests.support import (
    REQUEST_TIMEOUT_S,
    Process,
    api_answers,
    free_port,
    port_open,
    service_env,
    start_redis,
    start_s3_server,
    wait_until,
)

BUCKET = "chaos"
TERMINAL = {"succeeded", "failed", "canceled", "expired"}
# Small jobs: a burst of fifty renders in seconds on the tiny model.
SMALL = {"width": 256, "height": 256, "num_inference_steps": 4}


class TcpProxy:
    """A TCP forwarder on loopback in front of a server: `refuse` makes the server look stopped
    (connections refused, open ones cut) without losing its state; `accept` brings it back."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None

    def accept(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port), reuse_port=True)
        self._listener = listener
        threading.Thread(target=self._serve, args=(listener,), daemon=True).start()

    def refuse(self) -> None:
        assert self._listener is not None
        self._listener.close()
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
                connection.close()
            self._connections.clear()

    def _serve(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


@dataclass
class Cluster:
    workdir: Path
    model_cache: Path
    redis_port: int
    s3: Process
    s3_endpoint: str
    # The services reach S3 through this, so a test can make it refuse connections.
    s3_proxy: TcpProxy
    redis_process: Process | None = None
    api: Process | None = None
    api_port: int = 0
    api_key: str = ""
    workers: list[Process] = field(default_factory=list)
    workers_started: int = 0
    # Workers kept across tests (restarted when one dies), not stopped after each test.
    shared: list[Process] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return service_env(
            T2I_REDIS_URL=f"redis://127.0.0.1:{self.redis_port}/0",
            T2I_MODEL_ID="tiny",
            T2I_MODEL_CACHE_DIR=str(self.model_cache),
            T2I_DATA_DIR=str(self.workdir / "data"),
            T2I_STORAGE="s3",
            T2I_S3_ENDPOINT_URL=f"http://127.0.0.1:{self.s3_proxy.port}",
            T2I_S3_BUCKET=BUCKET,
            T2I_S3_ACCESS_KEY_ID="test",
            T2I_S3_SECRET_ACCESS_KEY="test",
            T2I_PORT=str(self.api_port),
            T2I_HEARTBEAT_INTERVAL_S="1",
            T2I_WORKER_HEARTBEAT_MAX_AGE_S="5",
            T2I_LEASE_S="4",
            T2I_REAP_INTERVAL_S="0.5",
            T2I_REDISPATCH_AFTER_S="3",
            T2I_JOB_MAX_RETRIES="2",
            # A dead worker's unacknowledged messages come back soon: the tests see them dropped.
            T2I_VISIBILITY_TIMEOUT_S="3",
            T2I_MAX_BATCH_IMAGES="4",
            T2I_BATCH_WAIT_MS="50",
            T2I_DEBUG_FAULTS="true",
            T2I_MAX_QUEUE_DEPTH="10000",
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def redis(self) -> Redis:
        return Redis(port=self.redis_port, socket_timeout=5)

    def store(self) -> JobStore:
        return JobStore(self.redis(), retention_s=3600)

    def start_redis(self) -> None:
        self.redis_process, _ = start_redis(
            self.workdir / "redis", port=self.redis_port, append_only=True
        )
        wait_until(self._redis_answers, 30, "redis to load its append-only file")

    def _redis_answers(self) -> bool:
        try:
            return bool(self.redis().ping())
        except RedisConnectionError:
            return False

    def kill_redis(self) -> None:
        assert self.redis_process is not None and self.redis_process.popen is not None
        self.redis_process.popen.kill()
        self.redis_process.popen.wait()

    def shut_redis_down(self) -> None:
        """A clean SHUTDOWN: Redis writes what it has and exits."""
        assert self.redis_process is not None and self.redis_process.popen is not None
        with contextlib.suppress(RedisConnectionError):
            self.redis().shutdown()
        self.redis_process.popen.wait(30)

    def start_api(self) -> None:
        self.api = Process(
            "api", [sys.executable, "-m", "api"], self.env, self.workdir / "api.log"
        ).start()
        wait_until(self._api_answers, 60, "the API to answer /health")

    def _api_answers(self) -> bool:
        assert self.api is not None
        return api_answers(self.api, self.base_url)

    def kill_api(self) -> None:
        assert self.api is not None and self.api.popen is not None
        self.api.popen.kill()
        self.api.popen.wait()

    def start_worker(self, **env: str) -> Process:
        self.workers_started += 1
        name = f"worker-{self.workers_started}"
        worker = Process(
            name,
            [sys.executable, "-m", "worker"],
            {**self.env, **env},
            self.workdir / f"{name}.log",
        ).start()
        self.workers.append(worker)
        return worker

    def shared_worker(self) -> Process:
        """A live worker that outlasts the test; started (again) when there is none."""
        self.shared = [worker for worker in self.shared if worker.alive()]
        if not self.shared:
            self.shared.append(self.start_ready_worker())
        return self.shared[0]

    def end_unfinished_jobs(self) -> None:
        """Cancel what an earlier test left queued or running, so it is no later test's load."""
        store = self.store()
        for key in (QUEUE_KEY, LEASES_KEY):
            for job_id in self.redis().zrange(key, 0, -1):
                store.transition(job_id.decode(), JobStatus.CANCELED)

    def start_ready_worker(self, **env: str) -> Process:
        worker = self.start_worker(**env)
        self.wait_ready(worker)
        return worker

    def wait_ready(self, worker: Process, timeout_s: float = 120) -> None:
        """Until the worker reports itself alive."""

        def ready() -> bool:
            if not worker.alive():
                raise RuntimeError(f"{worker.name} exited:\n{worker.log_tail()}")
            return self.redis().zscore(WORKERS_KEY, self.worker_name(worker)) is not None

        wait_until(ready, timeout_s, f"{worker.name} to be ready")

    def worker_name(self, worker: Process) -> str:
        assert worker.popen is not None
        return f"render@{socket.gethostname()}.{worker.popen.pid}"

    def held_by(self, worker_name: str) -> list[JobRecord]:
        """The jobs a worker holds a lease on."""
        store = self.store()
        held = [store.get(job_id.decode()) for job_id in self.redis().zrange(LEASES_KEY, 0, -1)]
        return [record for record in held if record is not None and record.worker == worker_name]

    def kill(self, worker: Process) -> None:
        assert worker.popen is not None
        worker.popen.send_signal(signal.SIGKILL)
        worker.popen.wait()

    def empty_bucket(self) -> None:
        s3 = self.s3_client()
        for key in self.stored_keys():
            s3.delete_object(Bucket=BUCKET, Key=key)

    def stop_workers(self, keep: list[Process] | None = None) -> None:
        for worker in [worker for worker in self.workers if worker not in (keep or [])]:
            worker.stop()
            self.workers.remove(worker)

    def client(self, timeout_s: float = REQUEST_TIMEOUT_S) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url,
            timeout=timeout_s,
            headers={"Authorization": f"Bearer {self.api_key}"},
        )

    def s3_client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )

    def stored_keys(self) -> set[str]:
        s3 = self.s3_client()
        return {
            item["Key"]
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for item in page.get("Contents", [])
        }

    def submit(self, prompt: str, answers: list[int] | None = None, **fields: object) -> str:
        """Submit until the API answers (retrying through outages with one idempotency key);
        each answer's status (0: no answer) goes to `answers`."""
        body = {"prompt": prompt, **SMALL, **fields}
        key = uuid.uuid4().hex
        deadline = time.monotonic() + 60
        while True:
            try:
                with self.client() as client:
                    response = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
                if answers is not None:
                    answers.append(response.status_code)
                if response.status_code in (200, 202):
                    return response.json()["id"]
                assert response.status_code >= 500, response.text
            except httpx.HTTPError:
                if answers is not None:
                    answers.append(0)
            if time.monotonic() > deadline:
                raise TimeoutError(f"the API did not take job {prompt!r}")
            time.sleep(0.2)

    def submit_burst(self, prompts: list[str], **fields: object) -> list[str]:
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda prompt: self.submit(prompt, **fields), prompts))

    def records(self, job_ids: list[str]) -> list[JobRecord]:
        store = self.store()
        records = [store.get(job_id) for job_id in job_ids]
        assert all(record is not None for record in records)
        return records  # type: ignore[return-value]

    def wait_terminal(
        self, job_ids: list[str], timeout_s: float, exits: list[int] | None = None
    ) -> list[JobRecord]:
        """Until every job has ended, read from Redis (the API may be the part that is down).
        With `exits`, a worker that exits meanwhile is started again, as its supervisor would,
        and its exit status is added to `exits`."""

        def ended() -> bool:
            if exits is not None:
                for worker in [worker for worker in self.workers if not worker.alive()]:
                    assert worker.popen is not None
                    exits.append(worker.popen.returncode)
                    self.workers.remove(worker)
                    replacement = self.start_worker()
                    if worker in self.shared:
                        self.shared[self.shared.index(worker)] = replacement
            return all(record.status in TERMINAL for record in self.records(job_ids))

        wait_until(ended, timeout_s, f"{len(job_ids)} jobs to end")
        return self.records(job_ids)

    def log_lines(self, text: str, exited_too: bool = False) -> list[str]:
        """Lines of every running worker's log (or every worker's, `exited_too`) with `text`."""
        paths = (
            sorted(self.workdir.glob("worker-*.log"))
            if exited_too
            else [worker.log_path for worker in self.workers]
        )
        return [
            line
            for path in paths
            for line in path.read_text(errors="replace").splitlines()
            if text in line
        ]

    def stop(self) -> None:
        for process in (*self.workers, self.api, self.redis_process, self.s3):
            if process is not None:
                process.stop()


def assert_all_succeeded(records: list[JobRecord], context: str = "") -> None:
    """Every job succeeded; if not, the failure names the ones that did not and why."""
    others = [
        f"{record.id} {record.status.value} attempt {record.attempt}"
        + (f": {record.error.type.value}: {record.error.message}" if record.error else "")
        for record in records
        if record.status is not JobStatus.SUCCEEDED
    ]
    assert not others, f"{context}{len(others)} of {len(records)} did not succeed:\n" + "\n".join(
        others
    )


def assert_stored_once(cluster: Cluster, records: list[JobRecord]) -> None:
    """Each job's images lie under its last attempt, and the bucket holds nothing else but what
    earlier attempts of these jobs stored before their workers were lost (kept until the job's
    retention ends: such an attempt may have ended, and its end been undone by a failover)."""
    expected = {image.key for record in records for image in record.images}
    for record in records:
        assert len(record.images) == record.request.num_images
        assert all(f"/{record.id}/{record.attempt}/" in image.key for image in record.images)
    stored = cluster.stored_keys()
    assert expected <= stored
    earlier = {
        f"/{record.id}/{attempt}/" for record in records for attempt in range(1, record.attempt)
    }
    for key in stored - expected:
        assert any(part in key for part in earlier), key


def succeeded_events(cluster: Cluster, job_id: str) -> int:
    entries = cluster.redis().xrange(events_key(job_id))
    return sum(fields[b"type"] == b"succeeded" for _, fields in entries)


def renders_of(cluster: Cluster, job_id: str) -> list[str]:
    return cluster.log_lines(f"rendered job {job_id} ", exited_too=True)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("chaos")
    s3, endpoint = start_s3_server(workdir)
    proxy = TcpProxy(int(endpoint.rpartition(":")[2]))
    proxy.accept()
    cluster = Cluster(workdir, model_cache, free_port(), s3, endpoint, proxy, api_port=free_port())
    try:
        cluster.s3_client().create_bucket(Bucket=BUCKET)
        cluster.start_redis()
        cluster.api_key = ApiKeyStore(cluster.redis()).create("chaos", 1_000_000)[1]
        cluster.start_api()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def fresh(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster with an empty bucket; the workers a test starts are stopped after it.

    The job store is not emptied: each test follows its own jobs, and a running worker keeps
    the broker's queue bindings that an emptied Redis would lose."""
    assert cluster.api is not None and cluster.api.alive()
    assert port_open(cluster.redis_port)
    cluster.end_unfinished_jobs()
    cluster.empty_bucket()
    yield cluster
    cluster.stop_workers(keep=cluster.shared)
