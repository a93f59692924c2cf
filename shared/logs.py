"""Logging for every service process: text for people or one JSON object a line, and every line
logged while a job is handled carries that job's id."""

import contextvars
import json
import logging
import logging.config
import threading
import time
from datetime import UTC, datetime
from typing import Any

from shared.settings import LogSettings

_current_job: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)

# Lines per task and per outgoing request at INFO: a line for every message received and every
# task finished, every webhook POST, every credential lookup. The job lines say it with the id.
QUIET_LOGGERS = ("celery.worker.strategy", "celery.app.trace", "httpx", "botocore", "urllib3")

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# uvicorn adds `color_message`, the same line with terminal colours.
_STANDARD_FIELDS = {
    *vars(logging.makeLogRecord({})),
    *("message", "asctime", "job_id", "taskName", "color_message"),
}


def set_current_job(job_id: str | None) -> None:
    """Lines logged from now on in this thread (or task) are about `job_id`."""
    _current_job.set(job_id)


class JobIdFilter(logging.Filter):
    """Gives each record a `job_id`: its own `extra`, else the job this thread is handling."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            record.job_id = _current_job.get()
        return True


class TextFormatter(logging.Formatter):
    """One line for people; the job id is appended where the message does not name it."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        job_id = getattr(record, "job_id", None)
        if job_id and job_id not in record.getMessage():
            line += f" [job {job_id}]"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, job_id, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if job_id := getattr(record, "job_id", None):
            entry["job_id"] = job_id
        entry.update(
            (name, value)
            for name, value in vars(record).items()
            if name not in _STANDARD_FIELDS and not name.startswith("_")
        )
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def logging_config(settings: LogSettings) -> dict[str, Any]:
    """A `logging.config.dictConfig` dict; uvicorn applies it in each of its processes too."""
    formatter = JsonFormatter if settings.log_format == "json" else TextFormatter
    quiet: dict[str, Any] = {name: {"level": "WARNING"} for name in QUIET_LOGGERS}
    access_level = "INFO" if settings.access_log else "WARNING"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"job": {"()": f"{__name__}.{JobIdFilter.__name__}"}},
        "formatters": {"service": {"()": f"{__name__}.{formatter.__name__}"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "service",
                "filters": ["job"],
            }
        },
        "root": {"level": settings.log_level, "handlers": ["stderr"]},
        "loggers": {
            **quiet,
            # uvicorn's own loggers carry handlers of their own unless told to pass lines on.
            "uvicorn": {"handlers": [], "propagate": True},
            "uvicorn.error": {"handlers": [], "propagate": True},
            "uvicorn.access": {"handlers": [], "propagate": True, "level": access_level},
        },
    }


def configure_logging(settings: LogSettings) -> None:
    logging.config.dictConfig(logging_config(settings))
    # Library warnings become log lines too, so JSON output stays one object a line.
    logging.captureWarnings(True)


class RepeatedFailures:
    """The log of something that fails the same way again and again (a loop while Redis is down,
    each request during a storage outage): the first failure of a run is logged (with its
    traceback unless it is an outage we expect), then one line at most every `every_s` while the
    failures go on, with how many there were, and one line when it works again. Where nothing
    reports success (requests), a failure after a quiet `every_s` starts a new run."""

    def __init__(self, logger: logging.Logger, what: str, every_s: float = 60.0) -> None:
        self._log = logger
        self._what = what
        self._every_s = every_s
        self._lock = threading.Lock()
        self._failures = 0
        self._unlogged = 0
        self._last_logged = 0.0
        self._last_failure = 0.0

    def failed(self, exc: BaseException, *, expected: bool) -> None:
        """One failure; `expected`: an outage (no traceback), not a fault in our code."""
        now = time.monotonic()
        with self._lock:
            if now - self._last_failure > self._every_s:
                self._failures = self._unlogged = 0
            self._last_failure = now
            self._failures += 1
            first = self._failures == 1
            if not first and now - self._last_logged < self._every_s:
                self._unlogged += 1
                return
            unlogged, self._unlogged, self._last_logged = self._unlogged, 0, now
        if first:
            self._log.log(
                logging.WARNING if expected else logging.ERROR,
                "%s failed: %s",
                self._what,
                exc,
                exc_info=None if expected else exc,
            )
        else:
            self._log.warning(
                "%s still failing (%d more times since the last line): %s",
                self._what,
                unlogged + 1,
                exc,
            )

    def succeeded(self) -> None:
        with self._lock:
            failures, self._failures, self._unlogged = self._failures, 0, 0
        if failures:
            self._log.info("%s works again after %d failures", self._what, failures)
