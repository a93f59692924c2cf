"""The jobs waiting for and held by each model's workers: the number their autoscaler reads."""

from shared.info import Backlog, QueueBacklog, WorkerInfo
from shared.jobstore import JobStore
from shared.queue import lane_model, render_queue
from shared.settings import CoreSettings


def read_backlog(store: JobStore, settings: CoreSettings, workers: list[WorkerInfo]) -> Backlog:
    """Every model's queue: the default model's, those of the models the live `workers` serve,
    and any other that has had jobs."""
    served = [worker.model for worker in workers]
    lanes = {render_queue(settings, model) for model in [settings.deployment_model, *served]}
    queues = {}
    for lane, counts in sorted(store.backlog(sorted(lanes)).items()):
        model = lane_model(settings, lane)
        # A queue of another deployment (another T2I_QUEUE_NAME) on the same Redis.
        if model is None:
            continue
        queues[lane] = QueueBacklog(
            model=model,
            default=model == settings.deployment_model,
            queued=counts.queued,
            running=counts.running,
            jobs=counts.queued + counts.running,
            workers=served.count(model),
        )
    return Backlog(queues=queues)
