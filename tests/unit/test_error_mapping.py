"""Which Redis failures the API answers as an outage (503) and which as its own fault (500)."""

import logging

import pytest
from redis import exceptions as redis_errors
from starlette.requests import Request

from api.errors import as_service_error
from shared.errors import ErrorType
from shared.redisconn import NotReplicated


def _request() -> Request:
    return Request({"type": "http", "method": "POST", "path": "/v1/jobs", "headers": []})


@pytest.mark.parametrize(
    "exc",
    [
        redis_errors.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."),
        redis_errors.TimeoutError("Timeout reading from socket"),
        redis_errors.BusyLoadingError("Redis is loading the dataset in memory"),
        redis_errors.ReadOnlyError("You can't write against a read only replica."),
        redis_errors.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
        redis_errors.ResponseError("MISCONF Redis is configured to save RDB snapshots"),
        redis_errors.ResponseError("NOREPLICAS Not enough good replicas to write."),
        NotReplicated("0 of 1 replicas confirmed the new job"),
    ],
)
def test_redis_being_unavailable_is_a_503(exc: Exception, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="api.errors"):
        error = as_service_error(_request(), exc)
    assert error.status_code == 503
    assert error.error_type is ErrorType.UNAVAILABLE
    assert all(record.exc_info is None for record in caplog.records)


@pytest.mark.parametrize(
    "exc",
    [
        redis_errors.DataError(
            "Invalid input of type: 'NoneType'. Convert to a bytes, string, int or float first."
        ),
        redis_errors.ResponseError("ERR user_script:12: Script attempted to access nonexistent"),
        redis_errors.NoScriptError("No matching script. Please use EVAL."),
    ],
)
def test_a_redis_error_from_our_own_code_is_a_500_with_its_traceback_logged(
    exc: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="api.errors"):
        error = as_service_error(_request(), exc)
    assert error.status_code == 500
    assert error.error_type is ErrorType.INTERNAL_ERROR
    error_id = error.details["error_id"]
    [logged] = [record for record in caplog.records if error_id in record.getMessage()]
    assert logged.exc_info is not None and logged.exc_info[1] is exc
