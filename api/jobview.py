"""A job as clients see it: signed image URLs, queue position and ETA."""

import time

from api.deps import Services
from shared.queue import live_worker_count
from shared.schema import JobOut, JobRecord, JobStatus
from shared.views import public_job


def queue_eta_s(services: Services, position: int) -> float | None:
    """Seconds until a job with `position` jobs ahead finishes, from measured throughput."""
    now = time.time()
    rate, job_s = services.store.throughput(now)
    if rate:
        return round((position + 1) / rate, 2)
    if job_s is None:
        return None
    workers = live_worker_count(services.redis, services.core.worker_heartbeat_max_age_s, now)
    return round((position + 1) * job_s / max(workers, 1), 2)


def job_out(record: JobRecord, services: Services, base_url: str) -> JobOut:
    position = eta_s = None
    if record.status is JobStatus.QUEUED:
        position = services.store.queue_position(record.id)
        if position is not None:
            eta_s = queue_eta_s(services, position)
    elif record.status is JobStatus.RUNNING and record.progress is not None:
        eta_s = record.progress.eta_s
    return public_job(record, services.storage, base_url, position, eta_s)
