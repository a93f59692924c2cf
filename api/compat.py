"""What the compatibility routes (OpenAI, AUTOMATIC1111) share: errors answered in the other API's
shape, and a job submitted through the one job path and awaited within the request."""

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ClassVar

from fastapi import Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute

from api.deps import Services
from api.errors import as_service_error
from api.events import wait_until_terminal
from api.routes.jobs import cancel, submit
from shared.apikeys import ApiKey
from shared.errors import ErrorType, ServiceError
from shared.queue import worker_model
from shared.ratelimit import Decision
from shared.schema import GenerationRequest, JobRecord, JobStatus, StoredImage


class DialectRoute(APIRoute):
    """A route whose errors, its dependencies' included, leave in another API's shape."""

    render_error: ClassVar[Callable[[ServiceError], Response]]

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()
        render = type(self).render_error

        async def handle_in_dialect(request: Request) -> Response:
            try:
                return await handle(request)
            except Exception as exc:
                return render(as_service_error(request, exc))

        return handle_in_dialect


@dataclass(frozen=True)
class Finished:
    """A succeeded job, with the rate-limit state its submission left."""

    record: JobRecord
    rate_limit: Decision

    def images(self, services: Services) -> list[bytes]:
        """The stored image files; an image the safety checker blocked has none."""
        return [services.storage.get(image.key) for image in self.stored_images()]

    def stored_images(self) -> list[StoredImage]:
        """The images that were stored (not blocked by the safety checker)."""
        return [image for image in self.record.images if image.key is not None]

    def model(self, services: Services) -> str:
        """The model that rendered the job, as its worker announced it."""
        named = self.record.worker and worker_model(services.redis, self.record.worker)
        return named or "unknown"


@dataclass(frozen=True)
class Tracking:
    """What a dialect does with a job while its answer waits (A1111's routes list their jobs, for
    `/interrupt`), and whether a job canceled meanwhile is an answer rather than an error."""

    start: Callable[[str], object]
    end: Callable[[str], object]
    canceled_is_an_answer: bool = False


async def generate(
    services: Services,
    request: Request,
    caller: ApiKey,
    generation: GenerationRequest,
    tracking: Tracking | None = None,
) -> Finished:
    """Submit a job and wait until it has succeeded; a job that cannot is canceled and raised."""
    submission = await submit(services, caller, generation)
    record = submission.record
    if tracking is not None:
        await run_in_threadpool(tracking.start, record.id)
    try:
        ended = await wait_until_terminal(
            services, record.id, services.api.sync_wait_s, give_up=request.is_disconnected
        )
    finally:
        if tracking is not None:
            await run_in_threadpool(tracking.end, record.id)
    if not ended:
        await run_in_threadpool(cancel, services, record)
        raise ServiceError(
            ErrorType.TIMEOUT,
            f"the job did not finish within {services.api.sync_wait_s:g} s; it was canceled",
            {"job_id": record.id},
        )
    final = await services.jobs.get(record.id)
    answers = {JobStatus.SUCCEEDED}
    if tracking is not None and tracking.canceled_is_an_answer:
        answers.add(JobStatus.CANCELED)
    if final is None or final.status not in answers:
        raise _unfinished(record.id, final)
    return Finished(final, submission.rate_limit)


def _unfinished(job_id: str, record: JobRecord | None) -> ServiceError:
    details: dict[str, Any] = {"job_id": job_id}
    if record is None:
        return ServiceError(ErrorType.INTERNAL_ERROR, "the job vanished", details)
    details["status"] = record.status.value
    if record.status is JobStatus.CANCELED:
        return ServiceError(ErrorType.CONFLICT, "the job was canceled", details)
    if record.status is JobStatus.EXPIRED:
        message = "no worker started the job in time; retry later"
        return ServiceError(ErrorType.UNAVAILABLE, message, details)
    error = record.error
    details["error"] = error.model_dump(mode="json") if error else None
    reason = f": {error.type}: {error.message}" if error else ""
    return ServiceError(ErrorType.INTERNAL_ERROR, f"the job failed{reason}", details)
