"""Job events as Server-Sent Events, read from the job's Redis stream (any API process can serve
any client, and `Last-Event-ID` resumes where a dropped connection stopped)."""

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError

from api.deps import CallerDep, Services, ServicesDep
from api.jobview import view_out
from api.openapi import error_responses
from shared.keys import events_key, job_key
from shared.schema import TERMINAL_STATES, JobStatus

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_BLOCK_MS = 1000
_KEEPALIVE_S = 15.0
# Redis stream ids are two 64-bit numbers; 19 digits always fit, so the pattern alone decides.
_STREAM_ID = r"^\d{1,19}(-\d{1,19})?$"
_TERMINAL = {status.value for status in TERMINAL_STATES}
_GONE = {"type": "not_found", "message": "the job no longer exists"}
_UNAVAILABLE = {
    "type": "unavailable",
    "message": "the job store is unavailable; reconnect with Last-Event-ID to resume",
}
EVENT_NAMES = ["queued", "position", "running", "progress", "preview", *sorted(_TERMINAL), "error"]
# One Server-Sent Event, as clients (and the fuzz tests) decode the stream.
EVENT_SCHEMA = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "id": {"type": "string", "description": "send as Last-Event-ID to resume after it"},
        "event": {"type": "string", "enum": EVENT_NAMES},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": "JSON: the change, or for a terminal event the whole job",
        },
    },
}


def sse(event_id: str | None, event: str, data: object) -> str:
    lines = [f"id: {event_id}"] if event_id else []
    lines += [f"event: {event}", f"data: {json.dumps(data, separators=(',', ':'))}"]
    return "\n".join(lines) + "\n\n"


async def _read(services: Services, job_id: str, after: str, block_ms: int) -> list[tuple]:
    reply = await services.async_redis.xread({events_key(job_id): after}, count=100, block=block_ms)
    return [
        (entry_id.decode(), fields[b"type"].decode(), json.loads(fields[b"data"]))
        for _, entries in reply
        for entry_id, fields in entries
    ]


async def wait_until_terminal(
    services: Services,
    job_id: str,
    timeout_s: float,
    give_up: Callable[[], Awaitable[bool]] | None = None,
) -> bool:
    """Whether the job reached a terminal state within `timeout_s` (and before `give_up`)."""
    deadline = time.monotonic() + timeout_s
    after = "0"
    while (remaining := deadline - time.monotonic()) > 0:
        if give_up is not None and await give_up():
            return False
        events = await _read(services, job_id, after, max(1, int(min(remaining, 1) * 1000)))
        for event_id, event_type, _ in events:
            after = event_id
            if event_type in _TERMINAL:
                return True
        if not events:
            # A job that finished a while ago has no events left to read.
            current = await services.async_redis.hget(job_key(job_id), "status")
            if current is None or current.decode() in _TERMINAL:
                return current is not None
    return False


async def _job_events(
    services: Services, request: Request, job_id: str, after: str
) -> AsyncIterator[str]:
    """The job's events from `after` on; a Redis failure ends the stream with an `error`."""
    try:
        async for event in _stream(services, request, job_id, after):
            yield event
    except RedisError as exc:
        log.warning("event stream of job %s cut: Redis unavailable: %s", job_id, exc)
        yield sse(None, "error", _UNAVAILABLE)


async def _stream(
    services: Services, request: Request, job_id: str, after: str
) -> AsyncIterator[str]:
    base_url = services.base_url(request)
    last_position: int | None = None
    last_preview_step = 0
    last_sent = time.monotonic()
    while not await request.is_disconnected():
        events = await _read(services, job_id, after, _BLOCK_MS)
        latest_marker = max(
            (index for index, event in enumerate(events) if event[1] == "preview"), default=-1
        )
        for index, (event_id, event_type, data) in enumerate(events):
            after = event_id
            if event_type in _TERMINAL:
                yield await _terminal_event(services, job_id, event_id, base_url)
                return
            if event_type == "preview":
                # The stream marks each preview; only the latest image is kept, so a client
                # that fell behind gets that one, once.
                preview = await services.jobs.preview(job_id) if index == latest_marker else None
                if preview is None or preview.step <= last_preview_step:
                    continue
                last_preview_step = preview.step
                data = preview.model_dump(mode="json")
            elif event_type == "progress":
                data = data.get("progress", data)
            yield sse(event_id, event_type, data)
            last_sent = time.monotonic()
        current = await services.async_redis.hget(job_key(job_id), "status")
        if current is None:
            yield sse(None, "error", _GONE)
            return
        if current.decode() in _TERMINAL and not events:
            # Resumed after the terminal event: send the job once more and end.
            yield await _terminal_event(services, job_id, after, base_url)
            return
        if current.decode() == JobStatus.QUEUED:
            (position,) = await services.jobs.positions([job_id])
            if position is not None and position != last_position:
                last_position = position
                eta_s = (await services.jobs.rates()).eta_s(position)
                yield sse(after, "position", {"queue_position": position, "eta_s": eta_s})
                last_sent = time.monotonic()
        if time.monotonic() - last_sent > _KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()


async def _terminal_event(services: Services, job_id: str, event_id: str, base_url: str) -> str:
    view = await services.jobs.read(job_id)
    if view is None:
        return sse(None, "error", _GONE)
    job = view_out(view, services, base_url)
    return sse(event_id, view.record.status.value, job.model_dump(mode="json"))


@router.get(
    "/{job_id}/events",
    summary="Stream a job's events (Server-Sent Events)",
    description=(
        "Events: `queued`, `position` (queue position and ETA, while queued), `running`, "
        "`progress` (step, total, eta_s), `preview` (with the request's `preview`: step, total, "
        "width, height and the image as a data: URL; the latest only, for a client that fell "
        "behind), then one terminal event (`succeeded`, `failed`, "
        "`canceled` or `expired`) whose data is the whole job, after which the stream ends. "
        "Reconnect with `Last-Event-ID` to resume."
    ),
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": EVENT_SCHEMA}},
            "description": "the events, until the job ends",
        },
        **error_responses(401, 404, 422, 503),
    },
)
async def job_events(
    job_id: str,
    services: ServicesDep,
    caller: CallerDep,
    request: Request,
    last_event_id: Annotated[str | None, Header(pattern=_STREAM_ID)] = None,
) -> StreamingResponse:
    await services.owned_view(job_id, caller)
    return StreamingResponse(
        _job_events(services, request, job_id, last_event_id or "0"),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
