"""Celery tasks: messaging only; the work is in JobRunner."""

from celery import Celery
from celery.exceptions import Reject
from celery.signals import task_postrun, task_prerun

from shared.logs import set_current_job
from shared.queue import RENDER_TASK
from worker.jobs import JobRunner, WorkerStopping

_runner: JobRunner | None = None


def install_runner(runner: JobRunner) -> None:
    global _runner
    _runner = runner


def register_tasks(app: Celery) -> None:
    @app.task(name=RENDER_TASK)
    def render(job_id: str, attempt: int | None = None) -> None:
        if _runner is None:
            raise RuntimeError("the worker started its consumer before loading the pipeline")
        try:
            # A message without an attempt (from an older sender) stands for the current one.
            _runner.run(job_id, attempt)
        except WorkerStopping as stopping:
            raise Reject("the worker is stopping", requeue=True) from stopping

    # Around the task rather than inside it: Celery logs a task's failure after the body has
    # returned, and that line is about the job too.
    task_prerun.connect(
        lambda kwargs=None, **_: set_current_job((kwargs or {}).get("job_id")), weak=False
    )
    task_postrun.connect(lambda **_: set_current_job(None), weak=False)
