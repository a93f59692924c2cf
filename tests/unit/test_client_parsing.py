"""The client's pure parts: SSE decoding, answers, error envelopes, file naming, CLI arguments."""

import argparse
import io
import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import get_args

import httpx
import pytest
import txt2img
import txt2img.models
from txt2img import (
    Conflict,
    NotFound,
    RateLimited,
    ServerError,
    Txt2ImgError,
    Unavailable,
    ValidationError,
)
from txt2img._core import (
    Deadline,
    EventStream,
    GenerationFields,
    Requests,
    SSEDecoder,
    WaitTimeout,
    image_paths,
)
from txt2img.cli import ProgressBar, _generation_fields, build_parser
from txt2img.errors import error_from_response
from txt2img.models import SCHEDULERS, JobOut, Progress

from shared import schema
from shared.schema import GenerationRequest


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


def test_a_busy_stream_still_ends_the_wait_at_its_deadline_but_a_final_event_is_kept() -> None:
    stream = EventStream(Requests("http://api", "", None), "job", None, Deadline("job", 0))
    for line in ("id: 1-0", "event: progress", 'data: {"step": 1, "total": 9}'):
        assert stream.feed(line) is None
    with pytest.raises(WaitTimeout):
        stream.feed("")
    with pytest.raises(WaitTimeout):
        for line in (": keep-alive", ""):
            stream.feed(line)
    for line in ("id: 2-0", "event: canceled", "data: {}"):
        stream.feed(line)
    final = stream.feed("")
    assert final is not None and final.is_terminal and stream.last_event_id == "2-0"


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


def test_cli_defaults_are_the_servers_and_the_format_follows_the_suffix() -> None:
    parser = build_parser()
    # What the CLI has no option for is left out of its requests, as the server's default is;
    # so are the model and its size, which the server picks by the model's family.
    unset = {
        "prompt",
        "webhook",
        "model",
        "width",
        "height",
        "safety_action",
        "init_image",
        "mask_image",
        "strength",
        "loras",
        "control",
    }
    server_defaults = GenerationRequest(prompt="a cat").model_dump(exclude=unset)
    defaults = _generation_fields(parser.parse_args(["generate", "a cat"]))
    # Without --preview the CLI asks for none, as the server's default is.
    assert {**defaults, "seed": None, "output_format": "png", "preview": None} == server_defaults
    assert "seed" not in defaults and "output_format" not in defaults
    assert "preview" not in defaults
    assert not {"model", "width", "height"} & set(defaults)
    args = parser.parse_args(
        ["generate", "a cat", "-o", "cat.JPG", "-W", "256", "--seed", "0", "-m", "sdxl-base"]
    )
    fields = _generation_fields(args)
    assert (fields["width"], fields["seed"], fields["output_format"]) == (256, 0, "jpeg")
    assert fields["model"] == "sdxl-base" and "height" not in fields
    explicit = parser.parse_args(["generate", "a cat", "-o", "cat.jpg", "-f", "webp"])
    assert _generation_fields(explicit)["output_format"] == "webp"


def _options(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.Action]]:
    """Every option of the parser and of its subcommands, with the command it belongs to."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                found += [(f"{name} {option}", item) for option, item in _options(subparser)]
        elif action.option_strings and action.dest != "help":
            found.append((action.option_strings[-1], action))
    return found


def test_every_cli_option_has_help_that_shows_its_default() -> None:
    parser = build_parser()
    options = _options(parser)
    assert len(options) >= 15
    for name, action in options:
        if action.dest == "version":
            continue
        shown = parser.formatter_class("txt2img")._get_help_string(action)
        assert action.help and "default" in shown, name


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"txt2img {txt2img.__version__}"


def test_answers_with_fields_the_client_does_not_know_still_parse() -> None:
    job = {
        "id": "j1",
        "status": "succeeded",
        "created_at": "2026-11-26T10:00:00Z",
        "request": {
            "prompt": "a cat",
            "width": 512,
            "height": 512,
            "num_inference_steps": 25,
            "guidance_scale": 7.5,
            "scheduler": "a_future_sampler",
            "seed": 3,
            "num_images": 1,
            "output_format": "png",
            "model": "sd-2",
        },
        "images": [
            {
                "url": "http://x/0.png",
                "width": 512,
                "height": 512,
                "seed": 3,
                "content_type": "image/png",
                "nsfw": False,
            }
        ],
        "timings": {"render_s": 1.0, "gpu_s": 0.9},
        "a_new_top_level_field": {"anything": [1, 2]},
    }
    parsed = JobOut.model_validate_json(json.dumps(job))
    assert parsed.images[0].seed == 3 and parsed.request.scheduler == "a_future_sampler"
    assert parsed.error is None and parsed.progress is None


@pytest.mark.parametrize(
    ("client_model", "server_model"),
    [
        (JobOut, schema.JobOut),
        (txt2img.JobList, schema.JobList),
        (txt2img.ImageOut, schema.ImageOut),
        (Progress, schema.Progress),
        (txt2img.JobError, schema.JobError),
        (txt2img.models.JobRequest, schema.GenerationRequest),
        (txt2img.models.Timings, schema.Timings),
        (txt2img.models.BatchInfo, schema.BatchInfo),
        (txt2img.models.KeyUsage, schema.KeyUsage),
    ],
)
def test_the_client_reads_every_field_the_server_sends(
    client_model: type, server_model: type
) -> None:
    assert set(client_model.model_fields) == set(server_model.model_fields)


def test_the_clients_choices_are_the_servers() -> None:
    assert get_args(schema.Scheduler) == SCHEDULERS
    assert [status.value for status in txt2img.JobStatus] == [s.value for s in schema.JobStatus]


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
