"""Log lines: text for people, one JSON object a line otherwise, the job id on lines about a job."""

import io
import json
import logging
import logging.config
from collections.abc import Iterator

import pytest

from shared.logs import RepeatedFailures, logging_config, set_current_job
from shared.settings import LogSettings


@pytest.fixture
def captured(request: pytest.FixtureRequest) -> Iterator[io.StringIO]:
    """The service's logging set up as `T2I_LOG_FORMAT` says, into a buffer; restored after."""
    stream = io.StringIO()
    config = logging_config(LogSettings(log_format=request.param))
    config["handlers"]["stderr"]["stream"] = stream
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    logging.config.dictConfig(config)
    yield stream
    set_current_job(None)
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("captured", ["json"], indirect=True)
def test_json_lines_carry_the_job_id_extras_and_the_exception(captured: io.StringIO) -> None:
    log = logging.getLogger("worker.jobs")
    log.info("no job yet")
    set_current_job("job-1")
    log.info("rendering %s", "job-1", extra={"batch_id": "b-7"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    log.warning("about another", extra={"job_id": "job-2"})
    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    assert [line.get("job_id") for line in lines] == [None, "job-1", "job-1", "job-2"]
    assert lines[1]["message"] == "rendering job-1" and lines[1]["batch_id"] == "b-7"
    assert lines[1]["logger"] == "worker.jobs" and lines[1]["level"] == "INFO"
    assert "ValueError: boom" in lines[2]["exception"]


@pytest.mark.parametrize("captured", ["text"], indirect=True)
def test_text_lines_name_the_job_where_the_message_does_not(captured: io.StringIO) -> None:
    log = logging.getLogger("worker.webhooks")
    set_current_job("job-3")
    log.info("webhook msg_1 delivered")
    log.info("job job-3 succeeded")
    first, second = captured.getvalue().splitlines()
    assert first.endswith("webhook msg_1 delivered [job job-3]")
    assert second.endswith("job job-3 succeeded")


@pytest.mark.parametrize("captured", ["text"], indirect=True)
def test_per_request_and_per_task_noise_stays_below_info(captured: io.StringIO) -> None:
    logging.getLogger("uvicorn.access").info('"GET /v1/jobs/x HTTP/1.1" 200')
    logging.getLogger("celery.worker.strategy").info("Task txt2img.render[...] received")
    logging.getLogger("celery.app.trace").error("Task txt2img.render[...] raised unexpected")
    assert captured.getvalue().count("\n") == 1 and "raised unexpected" in captured.getvalue()


def test_a_run_of_failures_logs_the_first_then_a_count_at_most_every_interval(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("shared.logs.time.monotonic", lambda: clock[0])
    failures = RepeatedFailures(logging.getLogger("t2i.test"), "the reaper", every_s=60)
    caplog.set_level(logging.INFO, logger="t2i.test")
    for _ in range(480):  # a minute of failures, eight a second
        failures.failed(ConnectionError("refused"), expected=True)
        clock[0] += 0.125
    failures.failed(ConnectionError("refused"), expected=True)
    failures.succeeded()
    failures.failed(KeyError("boom"), expected=False)
    lines = [(record.levelname, record.getMessage(), record.exc_info) for record in caplog.records]
    assert lines == [
        ("WARNING", "the reaper failed: refused", None),
        ("WARNING", "the reaper still failing (480 more times since the last line): refused", None),
        ("INFO", "the reaper works again after 481 failures", None),
        ("ERROR", "the reaper failed: 'boom'", lines[-1][2]),
    ]
    assert lines[-1][2] is not None  # a fault in the code keeps its traceback


def test_where_nothing_reports_success_a_quiet_interval_starts_a_new_run(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [0.0]
    monkeypatch.setattr("shared.logs.time.monotonic", lambda: clock[0])
    failures = RepeatedFailures(logging.getLogger("t2i.test"), "Redis, for requests", every_s=60)
    caplog.set_level(logging.INFO, logger="t2i.test")
    failures.failed(ConnectionError("down"), expected=True)
    failures.failed(ConnectionError("down"), expected=True)
    clock[0] = 3600.0
    failures.failed(ConnectionError("down again"), expected=True)
    assert [record.getMessage() for record in caplog.records] == [
        "Redis, for requests failed: down",
        "Redis, for requests failed: down again",
    ]
