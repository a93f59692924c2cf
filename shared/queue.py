"""The Celery app both sides share: broker settings and the task names the API sends by."""

import json

from celery import Celery
from redis import Redis

from shared.settings import CoreSettings

RENDER_TASK = "txt2img.render"
WORKERS_KEY = "t2i:workers"
_WORKER_INFO_PREFIX = "t2i:worker:"


def make_celery(settings: CoreSettings) -> Celery:
    app = Celery("txt2img", broker=settings.redis_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_default_queue=settings.queue_name,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "socket_connect_timeout": settings.redis_timeout_s,
        },
    )
    return app


def make_redis(settings: CoreSettings) -> Redis:
    return Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.redis_timeout_s,
        socket_timeout=settings.redis_timeout_s,
        health_check_interval=30,
    )


def worker_alive(redis: Redis, name: str, max_age_s: float, now: float) -> bool:
    last_seen = redis.zscore(WORKERS_KEY, name)
    return last_seen is not None and now - last_seen <= max_age_s


def live_worker_count(redis: Redis, max_age_s: float, now: float) -> int:
    """Workers whose heartbeat is younger than `max_age_s`."""
    return int(redis.zcount(WORKERS_KEY, now - max_age_s, "+inf"))


def worker_info_key(name: str) -> str:
    """Where a worker describes itself (a JSON object with at least its `model`)."""
    return _WORKER_INFO_PREFIX + name


def worker_model(redis: Redis, name: str) -> str | None:
    """The model a worker announced, while its description lasts."""
    raw = redis.get(worker_info_key(name))
    return None if raw is None else json.loads(raw)["model"]


def live_models(redis: Redis, max_age_s: float, now: float) -> list[str]:
    """The models that workers with a heartbeat younger than `max_age_s` serve, sorted."""
    names = redis.zrangebyscore(WORKERS_KEY, now - max_age_s, "+inf")
    if not names:
        return []
    described = redis.mget([worker_info_key(name.decode()) for name in names])
    return sorted({json.loads(raw)["model"] for raw in described if raw is not None})


def consume(app: Celery, queue: str, concurrency: int, hostname: str) -> None:
    """Run a Celery worker in this process: a thread pool on one queue, until it is stopped."""
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={concurrency}",
            f"--queues={queue}",
            f"--hostname={hostname}",
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
        ]
    )
