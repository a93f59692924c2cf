"""The client's pure parts: SSE decoding, error envelopes, file naming, CLI arguments."""

import io
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest

from shared.schema import GenerationRequest, Progress
from txt2img import (
    Conflict,
    NotFound,
    RateLimited,
    ServerError,
    Txt2ImgError,
    Unavailable,
    ValidationError,
)
from txt2img._core import GenerationFields, Requests, SSEDecoder, image_paths
from txt2img.cli import ProgressBar, _generation_fields, build_parser
from txt2img.errors import error_from_response


def decode(text: str) -> list:
    decoder = SSEDecoder()
    return [event for line in text.split("\n") if (event := decoder.feed(line)) is not None]


def test_sse_decoder_follows_the_event_stream_rules() -> None:
    events = decode(
        ": keep-alive\n\n"
        'id: 1-0\nevent: progress\ndata: {"step": 2, "total": 4, "eta_s": 0.5}\n\n'
        "event: note\ndata: first\ndata:second\n\n"
        "id: 2-0\nevent: succeeded\ndata: {}\n\n"
        "event: ignored-without-data\n\n"
        "data: 7\n\n"
    )
    assert [(event.id, event.event) for event in events] == [
        ("1-0", "progress"),
        ("1-0", "note"),
        ("2-0", "succeeded"),
        ("2-0", "message"),
    ]
    assert events[0].progress == Progress(step=2, total=4, eta_s=0.5)
    assert events[1].data == "first\nsecond" and events[1].progress is None
    assert events[2].is_terminal and events[3].data == 7


def envelope(status: int, error_type: str, **headers: str) -> httpx.Response:
    body = {"error": {"type": error_type, "message": "nope", "details": [{"loc": ["x"]}]}}
    return httpx.Response(status, json=body, headers=headers)


@pytest.mark.parametrize(
    ("status", "error_type", "expected"),
    [
        (422, "validation_error", ValidationError),
        (404, "not_found", NotFound),
        (409, "conflict", Conflict),
        (500, "internal_error", ServerError),
        (503, "overloaded", Unavailable),
        (418, "something_new", Txt2ImgError),
    ],
)
def test_envelopes_become_typed_errors(status: int, error_type: str, expected: type) -> None:
    error = error_from_response(envelope(status, error_type))
    assert type(error) is expected
    assert (error.status_code, error.type, error.message) == (status, error_type, "nope")
    assert error.details == [{"loc": ["x"]}]
    assert str(error) == f"{error_type}: nope"


def test_rate_limited_carries_retry_after_in_seconds_or_as_a_date() -> None:
    error = error_from_response(envelope(429, "rate_limited", **{"Retry-After": "12"}))
    assert isinstance(error, RateLimited) and error.retry_after == 12
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    dated = error_from_response(envelope(429, "rate_limited", **{"Retry-After": later}))
    assert isinstance(dated, RateLimited) and 25 < (dated.retry_after or 0) <= 30
    assert error_from_response(envelope(429, "rate_limited")).retry_after is None


def test_an_answer_without_an_envelope_is_typed_by_its_status() -> None:
    proxy_page = error_from_response(httpx.Response(502, text="<html>bad gateway</html>"))
    assert type(proxy_page) is ServerError and proxy_page.status_code == 502
    assert proxy_page.message == "HTTP 502 Bad Gateway"
    s3_refusal = error_from_response(httpx.Response(404, text="<Error>NoSuchKey</Error>"))
    assert type(s3_refusal) is NotFound and s3_refusal.type == "not_found"


def test_generation_fields_name_every_optional_request_field() -> None:
    optional = set(GenerationRequest.model_fields) - {"prompt"}
    assert set(GenerationFields.__annotations__) == optional


def test_several_images_get_index_suffixes() -> None:
    assert image_paths("out/cat.png", 1) == [Path("out/cat.png")]
    assert image_paths("out/cat.png", 2) == [Path("out/cat_0.png"), Path("out/cat_1.png")]


def test_cli_sends_only_the_fields_given_and_takes_the_format_from_the_suffix() -> None:
    parser = build_parser()
    args = parser.parse_args(["generate", "a cat", "-o", "cat.JPG", "-W", "256", "--seed", "0"])
    assert _generation_fields(args) == {"width": 256, "seed": 0, "output_format": "jpeg"}
    explicit = parser.parse_args(["generate", "a cat", "-o", "cat.jpg", "-f", "webp"])
    assert _generation_fields(explicit) == {"output_format": "webp"}
    assert _generation_fields(parser.parse_args(["generate", "a cat"])) == {}


def test_progress_bar_redraws_one_line_and_ends_it() -> None:
    stream = io.StringIO()
    bar = ProgressBar(stream, width=10)
    bar(Progress(step=5, total=10, eta_s=1.25))
    bar(Progress(step=10, total=10))
    bar.finish()
    assert stream.getvalue() == "\r[#####.....] 5/10 eta 1.2s   \r[##########] 10/10   \n"


def test_requests_carry_the_key_from_the_environment_but_downloads_do_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("T2I_API_URL", "http://api.example:9000/")
    monkeypatch.setenv("T2I_API_KEY", "sk-test")
    requests = Requests(None, None, None)
    assert requests.base_url == "http://api.example:9000"
    for spec in (requests.get("a"), requests.cancel("a"), requests.events("a", "1-0", 5)):
        assert spec.headers["Authorization"] == "Bearer sk-test"
    assert requests.events("a", "1-0", 5).headers["Last-Event-ID"] == "1-0"
    assert "Authorization" not in Requests.download("http://bucket.example/x.png").headers
    explicit = Requests("http://other:1", "", None)
    assert "Authorization" not in explicit.get("a").headers
