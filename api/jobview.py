"""A job as clients see it: signed image URLs, queue position and ETA."""

from api.deps import Services
from shared.asyncstore import JobView
from shared.rates import QueueRates
from shared.schema import JobOut, JobRecord, JobStatus
from shared.views import public_job


def view_out(view: JobView, services: Services, base_url: str) -> JobOut:
    """The job as read with its position and the queue's rates: no further reads."""
    record = view.record
    position = eta_s = None
    if record.status is JobStatus.QUEUED and view.position is not None:
        position = view.position
        eta_s = view.rates.eta_s(position)
    elif record.status is JobStatus.RUNNING and record.progress is not None:
        eta_s = record.progress.eta_s
    return public_job(record, services.storage, base_url, position, eta_s)


def job_out(record: JobRecord, services: Services, base_url: str) -> JobOut:
    """The job, reading its position and the queue's rates when it is queued (blocking)."""
    position = None
    rates = QueueRates(None, None, 0)
    if record.status is JobStatus.QUEUED:
        position = services.store.queue_position(record.id)
        rates = services.store.queue_rates(services.core.worker_heartbeat_max_age_s)
    return view_out(JobView(record, position, rates), services, base_url)
