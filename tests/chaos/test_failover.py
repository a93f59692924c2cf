"""Redis Sentinel: the primary killed with kill -9 mid-burst, its replica promoted. Every job the
API accepted ends, each rendered and stored once; clients see 503 (never 500) while no primary
can confirm a job, and retry with their idempotency key."""

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from redis import Redis
from redis.exceptions import RedisError
from redis.sentinel import Sentinel

from shared.apikeys import ApiKeyStore
from shared.keys import index_key, job_key
from tests.chaos.conftest import (
    BUCKET,
    Cluster,
    TcpProxy,
    assert_all_succeeded,
    assert_stored_once,
    renders_of,
    succeeded_events,
)
from tests.support import Process, free_port, service_env, start_redis, start_s3_server, wait_until

MASTER = "txt2img"
# A primary silent this long is down to a sentinel; two of three must agree. Above Sentinel's
# one-second PING period: at 1000, on a loaded machine, the sentinels can judge the just-promoted
# primary down within a second of the switch and fail over again, onto the restarted old primary
# while it is still an empty replica: every key lost, and a valid API key answered 401.
DOWN_AFTER_MS = 2000


@dataclass
class RedisGroup:
    """A primary, one replica and three sentinels watching them, on loopback."""

    workdir: Path
    servers: dict[int, Process] = field(default_factory=dict)
    sentinel_ports: list[int] = field(default_factory=list)
    sentinels: list[Process] = field(default_factory=list)

    def start(self) -> None:
        primary, replica = free_port(), free_port()
        self.start_server(primary)
        self.start_server(replica, replica_of=primary)
        for _ in range(3):
            self._start_sentinel(free_port(), primary)
        wait_until(lambda: self._replicas_seen() >= 1, 30, "the sentinels to find the replica")

    def start_server(self, port: int, replica_of: int | None = None) -> None:
        self.servers[port], _ = start_redis(
            self.workdir / f"redis-{port}", port=port, replica_of=replica_of
        )

    def _start_sentinel(self, port: int, primary: int) -> None:
        config = self.workdir / f"sentinel-{port}.conf"
        # Sentinel rewrites its file as it learns the group, so each has its own.
        config.write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {port}",
                    f"dir {self.workdir}",
                    f"sentinel monitor {MASTER} 127.0.0.1 {primary} 2",
                    f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}",
                    f"sentinel failover-timeout {MASTER} 3000",
                    f"sentinel parallel-syncs {MASTER} 1",
                    "",
                ]
            )
        )
        process = Process(
            f"sentinel-{port}",
            ["redis-server", str(config), "--sentinel"],
            service_env(),
            self.workdir / f"sentinel-{port}.log",
        ).start()
        self.sentinel_ports.append(port)
        self.sentinels.append(process)

    def _replicas_seen(self) -> int:
        with contextlib.suppress(RedisError):
            return min(
                len(Redis(port=port, socket_timeout=2).sentinel_slaves(MASTER))
                for port in self.sentinel_ports
            )
        return 0

    @property
    def addresses(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def primary_port(self) -> int | None:
        """The primary the sentinels name now."""
        with contextlib.suppress(RedisError):
            address = Redis(port=self.sentinel_ports[0], socket_timeout=2).sentinel_master(MASTER)
            return int(address["port"])
        return None

    def kill(self, port: int) -> None:
        process = self.servers.pop(port)
        assert process.popen is not None
        process.popen.kill()
        process.popen.wait()

    def stop(self) -> None:
        for process in (*self.servers.values(), *self.sentinels):
            process.stop()


@dataclass
class FailoverCluster(Cluster):
    """The chaos cluster with its Redis behind sentinels: every process follows the primary,
    and a new job or a job's end is answered only once a replica holds it."""

    group: RedisGroup | None = None
    key_id: str = ""

    @property
    def env(self) -> dict[str, str]:
        assert self.group is not None
        return {
            **super().env,
            "T2I_REDIS_SENTINELS": self.group.addresses,
            "T2I_REDIS_SENTINEL_MASTER": MASTER,
            "T2I_REDIS_REPLICA_ACKS": "1",
            # Leases outlast a failover (about three seconds here), so no render is redone.
            "T2I_LEASE_S": "15",
        }

    def redis(self) -> Redis:
        assert self.group is not None
        sentinels = [("127.0.0.1", port) for port in self.group.sentinel_ports]
        return Sentinel(sentinels, socket_timeout=5).master_for(MASTER, socket_timeout=5)

    def start_redis(self) -> None:
        self.group = RedisGroup(self.workdir / "redis")
        self.group.workdir.mkdir()
        self.group.start()

    def stop(self) -> None:
        super().stop()
        if self.group is not None:
            self.group.stop()


@pytest.fixture(scope="module")
def failover(
    tmp_path_factory: pytest.TempPathFactory, model_cache: Path
) -> Iterator[FailoverCluster]:
    workdir = tmp_path_factory.mktemp("failover")
    s3, endpoint = start_s3_server(workdir)
    proxy = TcpProxy(int(endpoint.rpartition(":")[2]))
    proxy.accept()
    cluster = FailoverCluster(workdir, model_cache, 0, s3, endpoint, proxy, api_port=free_port())
    try:
        cluster.s3_client().create_bucket(Bucket=BUCKET)
        cluster.start_redis()
        key, cluster.api_key = ApiKeyStore(cluster.redis()).create("failover", 1_000_000)
        cluster.key_id = key.id
        cluster.start_api()
        yield cluster
    finally:
        cluster.stop()


def submit_paced(cluster: Cluster, count: int, interval_s: float, answers: list[int]) -> list[str]:
    """One job every `interval_s`, each retried through the outage with its idempotency key."""
    job_ids = []
    for n in range(count):
        job_ids.append(cluster.submit(f"failover {n}", answers=answers))
        time.sleep(interval_s)
    return job_ids


def test_the_primary_killed_mid_burst_fails_over_and_every_accepted_job_ends_once(
    failover: FailoverCluster,
) -> None:
    assert failover.group is not None
    failover.start_ready_worker()
    old_primary = failover.group.primary_port()
    assert old_primary is not None
    answers: list[int] = []
    with ThreadPoolExecutor(1) as pool:
        submitted = pool.submit(submit_paced, failover, 60, 0.1, answers)
        wait_until(lambda: len(failover.log_lines(" succeeded")) >= 5, 60, "the burst under way")
        answered_before_kill = len(answers)
        failover.group.kill(old_primary)
        killed_at = time.monotonic()
        wait_until(
            lambda: failover.group.primary_port() not in (None, old_primary),  # type: ignore[union-attr]
            30,
            "a sentinel to promote the replica",
        )
        promoted_after_s = time.monotonic() - killed_at
        new_primary = failover.group.primary_port()
        # Its supervisor restarts the old primary, as a replica of the new one; until a replica
        # confirms them, new jobs are answered 202 with `X-Replication: pending`.
        failover.group.start_server(old_primary, replica_of=new_primary)
        job_ids = submitted.result()
    exits: list[int] = []
    records = failover.wait_terminal(job_ids, 120, exits)
    outage = answers[answered_before_kill:]
    print(
        f"\npromoted {promoted_after_s:.1f} s after the kill; "
        f"{sum(code != 202 for code in outage)} of {len(outage)} answers after it were not 202"
    )
    # Celery's threads pool can crash on reconnecting; such a worker exits non-zero for its
    # supervisor to restart it.
    assert 0 not in exits, exits
    # While there was no primary to confirm a job, 503 (or no answer): never a 500, never a 4xx.
    assert set(outage) <= {0, 200, 202, 503}, outage
    assert len(set(job_ids)) == len(job_ids) == 60
    # No retry made a second job: the key's index holds exactly the sixty.
    assert failover.redis().zcard(index_key(failover.key_id)) == 60
    assert_all_succeeded(records)
    assert_stored_once(failover, records)
    for record in records:
        assert succeeded_events(failover, record.id) == 1
        assert len(renders_of(failover, record.id)) == 1, record.id


@dataclass
class SentinelOnlyCluster(FailoverCluster):
    """The sentinels named and T2I_REDIS_REPLICA_ACKS left unset, as an operator who sets up
    Sentinel and nothing more runs it."""

    @property
    def env(self) -> dict[str, str]:
        env = {key: value for key, value in super().env.items() if key != "T2I_REDIS_REPLICA_ACKS"}
        return {
            **env,
            "T2I_REDIS_REPLICA_ACK_TIMEOUT_S": "0.2",
            "T2I_WEBHOOK_ALLOWLIST": "127.0.0.1",
        }


def test_under_sentinel_a_job_ends_only_once_a_replica_holds_its_end(
    tmp_path: Path, model_cache: Path
) -> None:
    """With its replica stopped, the primary has the job's end but the worker writes it again
    and announces nothing (no `completed` webhook) until the replica, running again, holds it."""
    s3, endpoint = start_s3_server(tmp_path)
    proxy = TcpProxy(int(endpoint.rpartition(":")[2]))
    proxy.accept()
    cluster = SentinelOnlyCluster(
        tmp_path, model_cache, 0, s3, endpoint, proxy, api_port=free_port()
    )
    try:
        cluster.s3_client().create_bucket(Bucket=BUCKET)
        cluster.start_redis()
        _, cluster.api_key = ApiKeyStore(cluster.redis()).create("ends", 1_000)
        cluster.start_api()
        cluster.start_ready_worker()
        assert cluster.group is not None
        primary = cluster.group.primary_port()
        [replica_port] = [port for port in cluster.group.servers if port != primary]
        replica = cluster.group.servers[replica_port].popen
        assert replica is not None
        redis = cluster.redis()
        os.kill(replica.pid, signal.SIGSTOP)
        try:
            job_id = cluster.submit(
                "an end a replica must hold",
                webhook={"url": f"http://127.0.0.1:{free_port()}/hooks"},
            )
            wait_until(lambda: redis.hget(job_key(job_id), "status") == b"succeeded", 60, "the end")
            wait_until(
                lambda: len(cluster.log_lines(f"no replica confirmed that job {job_id}")) >= 3,
                30,
                "the end written again",
            )
            assert redis.llen(f"t2i:job:{job_id}:webhooks") == 0
        finally:
            os.kill(replica.pid, signal.SIGCONT)
        wait_until(
            lambda: redis.llen(f"t2i:job:{job_id}:webhooks") == 1, 30, "the completed webhook"
        )
        on_replica = Redis(port=replica_port, socket_timeout=5).hget(job_key(job_id), "status")
        assert on_replica == b"succeeded"
    finally:
        cluster.stop()
