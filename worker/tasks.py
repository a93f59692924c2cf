"""Celery tasks: messaging only; the work is in JobRunner."""

from celery import Celery

from shared.queue import RENDER_TASK
from worker.jobs import JobRunner

_runner: JobRunner | None = None


def install_runner(runner: JobRunner) -> None:
    global _runner
    _runner = runner


def register_tasks(app: Celery) -> None:
    @app.task(name=RENDER_TASK)
    def render(job_id: str) -> None:
        if _runner is None:
            raise RuntimeError("the worker started its consumer before loading the pipeline")
        _runner.run(job_id)
