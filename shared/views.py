"""A job as it leaves the service (HTTP answers, SSE, webhooks): signed URLs, never keys."""

from shared.schema import ImageOut, JobOut, JobRecord
from shared.storage import ObjectStorage


def public_job(
    record: JobRecord,
    storage: ObjectStorage,
    base_url: str,
    queue_position: int | None = None,
    eta_s: float | None = None,
) -> JobOut:
    images = [
        ImageOut(
            url=None if image.key is None else storage.download_url(image.key, base_url),
            width=image.width,
            height=image.height,
            seed=image.seed,
            content_type=image.content_type,
            filtered=image.filtered,
            safety=image.safety,
            provenance=image.provenance,
        )
        for image in record.images
    ]
    return JobOut(
        **record.model_dump(exclude={"images", "owner", "worker", "retries", "watermark"}),
        images=images,
        queue_position=queue_position,
        eta_s=eta_s,
    )
