"""The synchronous client."""

import logging
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from types import TracebackType
from typing import Unpack

import httpx

from txt2img._core import (
    BaseClient,
    Deadline,
    Event,
    EventStream,
    GenerationFields,
    PreviewCallback,
    ProgressCallback,
    Requests,
    RequestSpec,
    Waiter,
    atomic_file,
    checked,
    connection_error,
    image_paths,
    parse_job,
    parse_list,
    parse_verification,
    succeeded,
)
from txt2img.errors import Txt2ImgError, WaitTimeout
from txt2img.models import ImageOut, JobList, JobOut, JobStatus, Verification

log = logging.getLogger("txt2img")


class Client(BaseClient[httpx.Client]):
    """A synchronous client of the txt2img API."""

    http_class = httpx.Client

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _send(self, spec: RequestSpec, stream: bool = False) -> httpx.Response:
        try:
            return self._http.send(spec.build(self._http), stream=stream)
        except httpx.TransportError as exc:
            raise connection_error(exc, self.base_url) from exc

    def submit(
        self,
        prompt: str,
        *,
        idempotency_key: str | None = None,
        wait_s: float | None = None,
        **fields: Unpack[GenerationFields],
    ) -> JobOut:
        """Submit a job; with `wait_s`, the server holds the answer until it ends (up to 60 s)."""
        return parse_job(self._send(self._requests.submit(prompt, fields, idempotency_key, wait_s)))

    def get(self, job_id: str) -> JobOut:
        return parse_job(self._send(self._requests.get(job_id)))

    def cancel(self, job_id: str) -> JobOut:
        """Cancel a queued or running job; `Conflict` if it has already ended."""
        return parse_job(self._send(self._requests.cancel(job_id)))

    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[Event]:
        """The job's events until its terminal one, reconnecting with Last-Event-ID on a drop."""
        return self._follow(
            EventStream(self._requests, job_id, last_event_id, Deadline(job_id, None))
        )

    def _follow(self, stream: EventStream) -> Iterator[Event]:
        while True:
            dropped = None
            try:
                request = stream.request().build(self._http)
                with closing(self._http.send(request, stream=True)) as r:
                    stream.opened(checked(r))
                    for line in r.iter_lines():
                        if (event := stream.feed(line)) is not None:
                            yield event
                            if stream.done:
                                return
            except httpx.TransportError as exc:
                dropped = exc
            time.sleep(stream.retry_delay(dropped))

    def wait(
        self,
        job_id: str,
        timeout_s: float | None = None,
        on_progress: ProgressCallback | None = None,
        *,
        use_sse: bool = True,
        on_preview: PreviewCallback | None = None,
    ) -> JobOut:
        """The job once it has ended, followed by its event stream, or by polling without one."""
        waiter = Waiter(job_id, timeout_s, on_progress, on_preview)
        if use_sse:
            stream = EventStream(self._requests, job_id, None, waiter.deadline)
            try:
                with closing(self._follow(stream)) as events:
                    for event in events:
                        if (job := waiter.on_event(event)) is not None:
                            return job
            except WaitTimeout:
                raise
            except Txt2ImgError as exc:
                log.info("event stream of job %s unusable (%s); polling instead", job_id, exc)
        while not waiter.on_job(job := self.get(job_id)):
            time.sleep(waiter.poll_delay())
        return job

    def generate(
        self,
        prompt: str,
        *,
        on_progress: ProgressCallback | None = None,
        on_preview: PreviewCallback | None = None,
        timeout_s: float | None = None,
        idempotency_key: str | None = None,
        use_sse: bool = True,
        **fields: Unpack[GenerationFields],
    ) -> JobOut:
        """Submit and wait; `JobFailed` if the job ends other than succeeded."""
        job = self.submit(prompt, idempotency_key=idempotency_key, **fields)
        if not job.status.is_terminal:
            job = self.wait(job.id, timeout_s, on_progress, use_sse=use_sse, on_preview=on_preview)
        return succeeded(job)

    def download(self, image: str | ImageOut, path: str | Path) -> Path:
        """Save an image (or any signed URL) to `path`."""
        target = Path(path)
        with closing(self._send(Requests.download(image), stream=True)) as response:
            checked(response)
            with atomic_file(target) as file:
                for chunk in response.iter_bytes():
                    file.write(chunk)
        return target

    def download_all(self, job: JobOut, path: str | Path) -> list[Path]:
        """Save every stored image of a job (not those the safety checker blocked): `path` for
        one, `stem_0.ext`, `stem_1.ext`... for several."""
        stored = [image for image in job.images if image.url is not None]
        paths = image_paths(path, len(stored))
        return [self.download(image, to) for image, to in zip(stored, paths, strict=True)]

    def verify(self, image: str | Path | bytes) -> Verification:
        """Check an image file (a path, or its bytes): its signed Content Credentials, and
        whether its invisible watermark names one of this key's jobs."""
        return parse_verification(self._send(self._requests.verify(image)))

    # Last, so that `list` in the annotations above is still the builtin.
    def list(
        self, status: JobStatus | str | None = None, limit: int = 20, cursor: str | None = None
    ) -> JobList:
        """One page of jobs, newest first; pass `next_cursor` back as `cursor` for the next."""
        return parse_list(self._send(self._requests.list(status, limit, cursor)))
