"""The Celery app both sides share: broker settings and the task names the API sends by."""

import base64
import json
import logging
import os
import socket
import uuid
import warnings
from collections.abc import Callable

from celery import Celery
from celery.apps.worker import install_worker_term_handler
from celery.exceptions import SecurityWarning
from celery.signals import worker_ready, worker_shutting_down
from redis import Redis

from shared.clock import redis_now
from shared.info import WorkerInfo
from shared.redisconn import broker_sentinel_options, broker_url
from shared.settings import CoreSettings

RENDER_TASK = "txt2img.render"
WORKERS_KEY = "t2i:workers"
_WORKER_INFO_PREFIX = "t2i:worker:"
# Who sent a message, as Celery's own publisher names itself.
_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"

log = logging.getLogger(__name__)
# kombu's Redis transport polls the queue with a blocking pop of this many seconds.
_BROKER_POLL_S = 1.0


def make_celery(settings: CoreSettings) -> Celery:
    app = Celery("txt2img", broker=broker_url(settings))
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_default_queue=settings.queue_name,
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=settings.redis_timeout_s,
        broker_transport_options={
            # The last resort only: a lost worker's jobs come back through their lapsed leases.
            "visibility_timeout": settings.visibility_timeout_s,
            "socket_connect_timeout": settings.redis_timeout_s,
            # Above the transport's 1 s blocking poll, so only a dead connection times out.
            "socket_timeout": max(settings.redis_timeout_s, 2 * _BROKER_POLL_S),
            "socket_keepalive": True,
            "health_check_interval": 10,
            **broker_sentinel_options(settings),
        },
    )
    check_forgeable(app)
    return app


class BrokerSetupError(RuntimeError):
    """The broker is set up so that the messages the job store's scripts push would reach no
    worker."""


def check_forgeable(app: Celery) -> None:
    """Refuse a broker set-up that the fair scheduler's scripts do not follow: they push each
    message, as kombu's Redis transport would, onto a Redis list named after its queue."""
    scheme = str(app.conf.broker_url or "").split(":", 1)[0]
    if scheme not in ("redis", "rediss", "sentinel"):
        raise BrokerSetupError(
            f"the broker must be Redis (or Redis Sentinel), not {scheme!r}: jobs are sent by "
            "scripts that push onto the Redis list of the queue"
        )
    prefix = (app.conf.broker_transport_options or {}).get("global_keyprefix")
    if prefix:
        raise BrokerSetupError(
            f"broker_transport_options global_keyprefix={prefix!r} is not supported: the job "
            "store's scripts push messages onto the unprefixed queue list, where a worker with "
            "the prefix would never look"
        )


# Sends the message for one attempt of a job.
SendRender = Callable[[str, int], None]


def render_queue(settings: CoreSettings, model: str | None) -> str:
    """The Celery queue of a model's jobs: T2I_QUEUE_NAME for the deployment's default model,
    and `<T2I_QUEUE_NAME>@<model>` for any other, so a worker only receives jobs it can render."""
    if model is None or model == settings.deployment_model:
        return settings.queue_name
    return f"{settings.queue_name}@{model}"


def lane_model(settings: CoreSettings, queue: str) -> str | None:
    """The model whose jobs `queue` holds (`render_queue` the other way round); None for a queue
    of another name."""
    if queue == settings.queue_name:
        return settings.deployment_model
    model = queue.removeprefix(f"{settings.queue_name}@")
    return model if model != queue and model else None


def send_render(app: Celery, queue: str, job_id: str, attempt: int) -> None:
    """Tell the workers about one attempt of a job; raises when the broker cannot take it."""
    app.send_task(
        RENDER_TASK,
        kwargs={"job_id": job_id, "attempt": attempt},
        queue=queue,
        retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2},
    )


def render_message(
    app: Celery,
    queue: str,
    job_id: str,
    attempt: int,
    task_id: str | None = None,
    delivery_tag: str | None = None,
    origin: str = _ORIGIN,
) -> str:
    """The message `send_render` would publish, as the broker's Redis transport stores it: a
    normal Celery task message (the fair scheduler's scripts fill in a template of it)."""
    task_id = task_id or str(uuid.uuid4())
    kwargs = {"job_id": job_id, "attempt": attempt}
    task = app.amqp.as_task_v2(
        task_id,
        RENDER_TASK,
        args=(),
        kwargs=kwargs,
        origin=origin,
        ignore_result=None,
        # Given, so Celery does not build them with its (slow) safe repr.
        argsrepr="()",
        kwargsrepr=repr(kwargs),
    )
    body = json.dumps(task.body).encode()
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": task.headers,
            "properties": {
                **task.properties,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": delivery_tag or str(uuid.uuid4()),
            },
        }
    )


def live_worker_count(redis: Redis, max_age_s: float) -> int:
    """Workers whose heartbeat is younger than `max_age_s` by Redis's clock, which stamps them."""
    return int(redis.zcount(WORKERS_KEY, redis_now(redis) - max_age_s, "+inf"))


def worker_info_key(name: str) -> str:
    """Where a worker describes itself (its WorkerInfo as JSON)."""
    return _WORKER_INFO_PREFIX + name


def live_workers(redis: Redis, max_age_s: float) -> list[WorkerInfo]:
    """The workers whose heartbeat is younger than `max_age_s` by Redis's clock, as they describe
    themselves."""
    now = redis_now(redis)
    seen = redis.zrangebyscore(WORKERS_KEY, now - max_age_s, "+inf", withscores=True)
    if not seen:
        return []
    described = redis.mget([worker_info_key(name.decode()) for name, _ in seen])
    return [
        WorkerInfo.model_validate_json(raw).model_copy(
            update={"last_seen_s": round(max(0.0, now - last_seen), 3)}
        )
        for (_, last_seen), raw in zip(seen, described, strict=True)
        # A worker that has just stopped may leave its score a moment longer than its description.
        if raw is not None
    ]


def worker_model(redis: Redis, name: str) -> str | None:
    """The model a worker announced, while its description lasts."""
    raw = redis.get(worker_info_key(name))
    return None if raw is None else WorkerInfo.model_validate_json(raw).model


def live_models(redis: Redis, max_age_s: float) -> list[str]:
    """The models that workers with a heartbeat younger than `max_age_s` serve, sorted."""
    return sorted({worker.model for worker in live_workers(redis, max_age_s)})


def queue_depth(redis: Redis, queue: str) -> int:
    """Messages waiting in a Celery queue (what an autoscaler scales on)."""
    return int(redis.llen(queue))


def _quiet_shutdown_handlers(sender: object, **_: object) -> None:
    """Celery's SIGTERM and SIGINT handlers print their own line to stdout; install the same warm
    shutdown without it (the line is logged below instead)."""
    worker = sender.controller  # type: ignore[attr-defined]
    for signal_name in ("SIGTERM", "SIGINT"):
        install_worker_term_handler(worker, sig=signal_name, verbose=False)


def _log_shutdown(sig: str, **_: object) -> None:
    log.info("%s: warm shutdown, finishing the tasks in hand", sig)


def consume(app: Celery, queue: str, concurrency: int, hostname: str) -> None:
    """Run a Celery worker in this process: a thread pool on one queue, until it is stopped."""
    # Accepting only JSON, a root worker is no risk; containers run it as a user anyway.
    warnings.filterwarnings("ignore", category=SecurityWarning)
    worker_ready.connect(_quiet_shutdown_handlers, weak=False)
    worker_shutting_down.connect(_log_shutdown, weak=False)
    app.worker_main(
        [
            # No start-up banner: the process logs its own ready line.
            "--quiet",
            "worker",
            "--pool=threads",
            f"--concurrency={concurrency}",
            f"--queues={queue}",
            f"--hostname={hostname}",
            # Celery sets the root logger's level to this: keep the one T2I_LOG_LEVEL chose.
            f"--loglevel={logging.getLevelName(logging.getLogger().getEffectiveLevel())}",
            "--without-gossip",
            "--without-mingle",
        ]
    )
