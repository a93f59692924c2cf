"""What the sync and async clients share: requests, response parsing, SSE decoding, waiting."""

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Generic, Literal, TypedDict, TypeVar

import httpx

from txt2img.errors import (
    APIConnectionError,
    JobFailed,
    NotFound,
    StreamUnavailable,
    WaitTimeout,
    error_from_response,
)
from txt2img.models import (
    TERMINAL_STATES,
    ImageOut,
    JobList,
    JobOut,
    JobStatus,
    OutputFormat,
    Preview,
    Progress,
    Scheduler,
    Verification,
)
from txt2img.settings import ClientSettings
from txt2img.version import __version__

USER_AGENT = f"txt2img-client/{__version__}"
EVENTS_PATH = "/v1/jobs/{job_id}/events"
DEFAULT_TIMEOUT_S = 30.0
# The API sends a keep-alive comment every 15 s; a quieter stream is a dead one.
STREAM_READ_TIMEOUT_S = 45.0
MAX_STREAM_RETRIES = 5
POLL_INTERVAL_S = (0.2, 2.0)
TERMINAL_EVENTS = frozenset(status.value for status in TERMINAL_STATES)

ProgressCallback = Callable[[Progress], object]
PreviewCallback = Callable[[Preview], object]


class GenerationFields(TypedDict, total=False):
    """Optional fields of a generation request; the server fills in what is left out."""

    negative_prompt: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: Scheduler
    seed: int
    num_images: int
    output_format: OutputFormat
    webhook: dict[str, Any]
    priority: Literal["interactive", "batch"]
    model: str
    # "flag", "blur" or "block": only ever stricter than the key's and the server's.
    safety_action: str
    # Image-to-image: base64 (or a data: URL) or an https URL; inpainting adds a mask.
    init_image: str
    mask_image: str
    strength: float
    # LoRA adapters, [{"name": ..., "scale": ...}], and ControlNet, {"type": ..., "image": ...}.
    loras: list[dict[str, Any]]
    control: dict[str, Any]
    # Live previews: {"every_n_steps": 5, "format": "webp", "max_size": 256}.
    preview: dict[str, Any]


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event of a job, its `data` decoded from JSON."""

    event: str
    data: Any
    id: str | None = None

    @property
    def is_terminal(self) -> bool:
        return self.event in TERMINAL_EVENTS

    @property
    def job(self) -> JobOut | None:
        """The final job, carried by the terminal event."""
        return JobOut.model_validate(self.data) if self.is_terminal else None

    @property
    def progress(self) -> Progress | None:
        return Progress.model_validate(self.data) if self.event == "progress" else None

    @property
    def preview(self) -> Preview | None:
        return Preview.model_validate(self.data) if self.event == "preview" else None


@dataclass
class RequestSpec:
    """The arguments of one `build_request` call, the same for httpx's sync and async clients."""

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    json: Any = None
    params: dict[str, Any] | None = None
    timeout: httpx.Timeout | None = None
    files: dict[str, tuple[str, bytes]] | None = None

    def build(self, http: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        kwargs: dict[str, Any] = {"headers": self.headers, "json": self.json, "params": self.params}
        if self.files is not None:
            kwargs["files"] = self.files
        if self.timeout is not None:
            kwargs["timeout"] = self.timeout
        return http.build_request(self.method, self.url, **kwargs)


class Requests:
    """Builds every API request of a client: its base URL, key and timeouts."""

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        timeout: float | None,
        events_path: str = EVENTS_PATH,
    ) -> None:
        settings = ClientSettings()
        self.events_path = events_path
        self.base_url = (base_url or settings.api_url).rstrip("/")
        self.api_key = settings.api_key if api_key is None else api_key
        self.timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout

    def http_options(self) -> dict[str, Any]:
        """Keyword arguments for the httpx client; no auth there, so downloads never carry it."""
        return {
            "base_url": self.base_url,
            "timeout": self.timeout,
            "headers": {"User-Agent": USER_AGENT},
        }

    def _headers(self, **extra: str) -> dict[str, str]:
        headers = {"Accept": "application/json", **extra}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def submit(
        self,
        prompt: str,
        fields: GenerationFields,
        idempotency_key: str | None,
        wait_s: float | None,
    ) -> RequestSpec:
        headers = self._headers()
        timeout = None
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        if wait_s:
            headers["Prefer"] = f"wait={round(wait_s)}"
            timeout = httpx.Timeout(self.timeout, read=self.timeout + wait_s)
        return RequestSpec("POST", "/v1/jobs", headers, {"prompt": prompt, **fields}, None, timeout)

    def get(self, job_id: str) -> RequestSpec:
        return RequestSpec("GET", f"/v1/jobs/{job_id}", self._headers())

    def list(self, status: str | None, limit: int, cursor: str | None) -> RequestSpec:
        params: dict[str, Any] = {"limit": limit}
        if status is not None:
            params["status"] = str(status)
        if cursor is not None:
            params["cursor"] = cursor
        return RequestSpec("GET", "/v1/jobs", self._headers(), params=params)

    def cancel(self, job_id: str) -> RequestSpec:
        return RequestSpec("POST", f"/v1/jobs/{job_id}/cancel", self._headers())

    def events(self, job_id: str, last_event_id: str | None, read_timeout_s: float) -> RequestSpec:
        headers = self._headers(Accept="text/event-stream", **{"Cache-Control": "no-cache"})
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        timeout = httpx.Timeout(self.timeout, read=read_timeout_s)
        path = self.events_path.format(job_id=job_id)
        return RequestSpec("GET", path, headers, timeout=timeout)

    def verify(self, image: str | Path | bytes) -> RequestSpec:
        """A multipart upload of the image (a path, or its bytes) to check its provenance."""
        if isinstance(image, bytes):
            name, data = "image", image
        else:
            name, data = Path(image).name, Path(image).read_bytes()
        return RequestSpec(
            "POST", "/v1/provenance/verify", self._headers(), files={"image": (name, data)}
        )

    @staticmethod
    def download(image: str | ImageOut) -> RequestSpec:
        # A plain GET: the URL is signed, and S3 refuses a presigned URL with an Authorization.
        url = image.url if isinstance(image, ImageOut) else image
        if url is None:
            raise ValueError("the image was filtered by the safety checker; it has no file")
        return RequestSpec("GET", url)


def checked(response: httpx.Response) -> httpx.Response:
    """The response if it is a success, else its typed error raised."""
    if response.is_success:
        return response
    response.read()
    raise error_from_response(response)


async def achecked(response: httpx.Response) -> httpx.Response:
    """`checked` for a streamed response of the async client."""
    if not response.is_success:
        await response.aread()
    return checked(response)


def parse_job(response: httpx.Response) -> JobOut:
    return JobOut.model_validate_json(checked(response).content)


def parse_list(response: httpx.Response) -> JobList:
    return JobList.model_validate_json(checked(response).content)


def parse_verification(response: httpx.Response) -> Verification:
    return Verification.model_validate_json(checked(response).content)


def connection_error(exc: httpx.TransportError, base_url: str) -> APIConnectionError:
    return APIConnectionError(f"cannot reach the API at {base_url}: {exc or type(exc).__name__}")


class SSEDecoder:
    """Turns the lines of a `text/event-stream` into events (the WHATWG parsing rules)."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, line: str) -> Event | None:
        """The event that `line` completes, if any."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        return None

    def _dispatch(self) -> Event | None:
        if not self._data:
            self._event = ""
            return None
        raw = "\n".join(self._data)
        try:
            data: Any = json.loads(raw)
        except ValueError:
            data = raw
        event = Event(self._event or "message", data, self._id or None)
        self._event, self._data = "", []
        return event


class EventStream:
    """One job's event stream across reconnects: where to resume, when to give up."""

    def __init__(
        self, requests: Requests, job_id: str, last_event_id: str | None, deadline: "Deadline"
    ) -> None:
        self.requests = requests
        self.job_id = job_id
        self.last_event_id = last_event_id
        self.deadline = deadline
        self.done = False
        self._failures = 0
        self._decoder = SSEDecoder()

    def request(self) -> RequestSpec:
        self._decoder = SSEDecoder()
        self.deadline.check()
        read_timeout_s = min(STREAM_READ_TIMEOUT_S, self.deadline.remaining(STREAM_READ_TIMEOUT_S))
        return self.requests.events(self.job_id, self.last_event_id, max(read_timeout_s, 0.1))

    def opened(self, response: httpx.Response) -> None:
        """Refuse a response that is not an event stream (a proxy's page, say)."""
        content_type = response.headers.get("content-type", "")
        if not content_type.startswith("text/event-stream"):
            raise StreamUnavailable(f"expected an event stream, got {content_type or 'nothing'}")

    def feed(self, line: str) -> Event | None:
        """The event `line` completes, if any. Past the deadline, the end of any event but the final
        one raises `WaitTimeout`: progress events can arrive faster than any read timeout."""
        event = self._decoder.feed(line)
        if event is None:
            if not line:
                self.deadline.check()
            return None
        self._failures = 0
        if event.id is not None:
            self.last_event_id = event.id
        if event.event == "error":
            self.done = True
            message = event.data.get("message") if isinstance(event.data, dict) else None
            raise NotFound(message or f"job {self.job_id} no longer exists", status_code=404)
        self.done = event.is_terminal
        if not self.done:
            self.deadline.check()
        return event

    def retry_delay(self, exc: httpx.TransportError | None) -> float:
        """Seconds to wait before reconnecting after the stream dropped (or ended early)."""
        self.deadline.check()
        self._failures += 1
        if self._failures > MAX_STREAM_RETRIES:
            if exc is None:
                raise StreamUnavailable("the event stream keeps ending before the job does")
            raise connection_error(exc, self.requests.base_url)
        return min(0.25 * 2 ** (self._failures - 1), 4.0, self.deadline.remaining(4.0))


class Deadline:
    """A wait's time limit; `check` raises `WaitTimeout` once it has passed."""

    def __init__(self, job_id: str, timeout_s: float | None) -> None:
        self.job_id = job_id
        self.timeout_s = timeout_s
        self._end = None if timeout_s is None else time.monotonic() + timeout_s

    def remaining(self, cap: float) -> float:
        return cap if self._end is None else max(min(cap, self._end - time.monotonic()), 0.0)

    def check(self) -> None:
        if self._end is not None and time.monotonic() >= self._end:
            assert self.timeout_s is not None
            raise WaitTimeout(self.job_id, self.timeout_s)


class Waiter:
    """Follows one job to its end from events or polls, reporting progress once per change."""

    def __init__(
        self,
        job_id: str,
        timeout_s: float | None,
        on_progress: ProgressCallback | None,
        on_preview: PreviewCallback | None = None,
    ) -> None:
        self.deadline = Deadline(job_id, timeout_s)
        self._on_progress = on_progress
        self._on_preview = on_preview
        self._last: Progress | None = None
        self._last_preview_step = 0
        self._polls = 0

    def _show(self, preview: Preview | None) -> None:
        if preview is None or self._on_preview is None:
            return
        if preview.step > self._last_preview_step:
            self._last_preview_step = preview.step
            self._on_preview(preview)

    def _report(self, progress: Progress | None) -> None:
        if progress is None or self._on_progress is None:
            return
        if self._last is None or (progress.step, progress.total) != (
            self._last.step,
            self._last.total,
        ):
            self._last = progress
            self._on_progress(progress)

    def on_event(self, event: Event) -> JobOut | None:
        """The final job if `event` ends the wait."""
        self._report(event.progress)
        self._show(event.preview)
        job = event.job
        if job is not None:
            self._report(job.progress)
        return job

    def on_job(self, job: JobOut) -> bool:
        """Whether a polled job is final."""
        self._report(job.progress)
        self._show(job.preview)
        return job.status.is_terminal

    def poll_delay(self) -> float:
        self.deadline.check()
        low, high = POLL_INTERVAL_S
        self._polls += 1
        return self.deadline.remaining(min(low * 1.5 ** (self._polls - 1), high))


def image_paths(path: str | Path, count: int) -> list[Path]:
    """Where to save `count` images given one path: `cat.png`, or `cat_0.png`, `cat_1.png`..."""
    path = Path(path)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{index}{path.suffix}") for index in range(count)]


def succeeded(job: JobOut) -> JobOut:
    """The job if it succeeded, else `JobFailed` raised with it."""
    if job.status is not JobStatus.SUCCEEDED:
        raise JobFailed(job)
    return job


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file that appears at `path` only once it is completely written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.part")
    try:
        with partial.open("wb") as file:
            yield file
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


HTTP = TypeVar("HTTP", httpx.Client, httpx.AsyncClient)


class BaseClient(Generic[HTTP]):
    """Construction shared by `Client` and `AsyncClient`."""

    # A subclass may move the stream, e.g. for an API behind a proxy that rewrites paths.
    events_path = EVENTS_PATH
    http_class: type[HTTP]

    def __init__(
        self, base_url: str | None = None, api_key: str | None = None, timeout: float | None = None
    ) -> None:
        """URL and key default to T2I_API_URL and T2I_API_KEY; `timeout` is per request, in s."""
        self._requests = Requests(base_url, api_key, timeout, self.events_path)
        self._http = self.http_class(**self._requests.http_options())

    @property
    def base_url(self) -> str:
        return self._requests.base_url
