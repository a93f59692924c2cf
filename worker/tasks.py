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
    def render(job_id: str, attempt: int | None = None) -> None:
        if _runner is None:
            raise RuntimeError("the worker started its consumer before loading the pipeline")
        # A message without an attempt (from an older sender) stands for the current one.
        _runner.run(job_id, attempt)
