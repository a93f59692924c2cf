"""The Celery app both sides share: broker settings and the task names the API sends by."""

from collections.abc import Callable

from celery import Celery
from redis import Redis

from shared.settings import CoreSettings

RENDER_TASK = "txt2img.render"
WORKERS_KEY = "t2i:workers"
# kombu's Redis transport polls the queue with a blocking pop of this many seconds.
_BROKER_POLL_S = 1.0


def make_celery(settings: CoreSettings) -> Celery:
    app = Celery("txt2img", broker=settings.redis_url)
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
        },
    )
    return app


# Sends the message for one attempt of a job.
SendRender = Callable[[str, int], None]


def send_render(app: Celery, queue: str, job_id: str, attempt: int) -> None:
    """Tell the workers about one attempt of a job; raises when the broker cannot take it."""
    app.send_task(
        RENDER_TASK,
        kwargs={"job_id": job_id, "attempt": attempt},
        queue=queue,
        retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2},
    )


def make_redis(settings: CoreSettings) -> Redis:
    return Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.redis_timeout_s,
        socket_timeout=settings.redis_timeout_s,
        health_check_interval=30,
    )


def live_worker_count(redis: Redis, max_age_s: float, now: float) -> int:
    """Workers whose heartbeat is younger than `max_age_s`."""
    return int(redis.zcount(WORKERS_KEY, now - max_age_s, "+inf"))


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
