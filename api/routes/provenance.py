"""Where an image came from: its signed C2PA manifest and its invisible watermark."""

import asyncio
from dataclasses import asdict
from functools import lru_cache
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from PIL.Image import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from api.deps import CallerDep, ServicesDep
from api.images import decode_upload, open_upload
from api.openapi import IMAGE_BODY_EXAMPLES, error_responses
from shared import watermark
from shared.content_credentials import ManifestReport, read_manifest
from shared.errors import ErrorType, ServiceError
from shared.provenance import WatermarkPayload
from shared.settings import ApiSettings, provenance_settings

router = APIRouter()

_JSON = "application/json"
_MULTIPART = "multipart/form-data"


class VerifyRequest(BaseModel):
    """An image to check, in JSON (a multipart upload sends it as the `image` part)."""

    model_config = ConfigDict(json_schema_extra={"examples": IMAGE_BODY_EXAMPLES})

    image: str = Field(description="the image (PNG, JPEG or WebP), base64 or a data: URL")


class ManifestCheck(BaseModel):
    present: bool = Field(description="the file carries a C2PA manifest")
    valid: bool = Field(
        description="its signature and its binding to these exact bytes verify; trust in the "
        "signer is a separate question (`signer`, `development_signer`)"
    )
    validation_state: str | None = Field(description="as the C2PA library reports it")
    failures: list[str] = Field(description="C2PA validation failure codes, e.g. a hash mismatch")
    signer: str | None = Field(description="who signed it, from the signing certificate")
    development_signer: bool = Field(
        description="signed with a development certificate, not an operator's"
    )
    claim_generator: str | None
    claims: dict[str, Any] = Field(
        description="what the manifest asserts: the generator, model, job, adapters, inputs"
    )


class WatermarkCheck(BaseModel):
    found: bool = Field(description="the pixels carry this service's invisible watermark")
    made_by: Literal["your_job", "this_service"] | None = Field(
        description="`your_job`: one of this API key's jobs, named in `job_id`; `this_service`: "
        "made here, by a job this key cannot see (another key's, or no longer kept)"
    )
    job_id: str | None = Field(description="only for this key's own jobs")
    image_index: int | None = Field(description="which of the job's images, with `job_id`")
    confidence: float | None = Field(description="0..1: how clearly the watermark reads")


class Verification(BaseModel):
    c2pa: ManifestCheck
    watermark: WatermarkCheck
    summary: str = Field(description="the findings in one sentence")


@lru_cache
def _checks(at_once: int) -> asyncio.Semaphore:
    """This process's verifications at once: each holds a core for up to a second."""
    return asyncio.Semaphore(at_once)


@router.post(
    "/v1/provenance/verify",
    response_model=Verification,
    responses=error_responses(401, 413, 422, 503),
    tags=["provenance"],
    summary="Check an image's Content Credentials and invisible watermark",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                # A multipart upload (the docstring's) is taken too, but not declared: the
                # OpenAPI fuzzing cannot tell an image part from any binary string.
                _JSON: {"schema": {"$ref": "#/components/schemas/VerifyRequest"}},
            },
        }
    },
)
async def verify(request: Request, services: ServicesDep, caller: CallerDep) -> Verification:
    """Whether the image carries a valid C2PA manifest (its claims, signer and validation state)
    and whether its pixels carry this service's watermark, and if so whether one of your own jobs
    made it. Send the image as JSON (`{"image": "<base64>"}`) or as the `image` part of a
    multipart/form-data upload (`curl -F image=@file.png`)."""
    data = await _upload(request, services.api)
    async with _checks(provenance_settings().verify_concurrency):
        manifest, found = await run_in_threadpool(_inspect, data, services.api)
    mark = await _watermark(found, services, caller.id)
    return Verification(
        c2pa=ManifestCheck(**asdict(manifest)),
        watermark=mark,
        summary=_summary(manifest, mark),
    )


async def _upload(request: Request, api: ApiSettings) -> bytes:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == _MULTIPART:
        form = await request.form(max_files=1, max_fields=4)
        part = form.get("image")
        if not isinstance(part, UploadFile):
            raise _refused("send the image as the multipart part named `image` (a file)")
        return await part.read(api.max_input_image_bytes + 1)
    if content_type == _JSON:
        try:
            body = VerifyRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            message = exc.errors()[0]["msg"]
            raise _refused(f"the body is not {{'image': '<base64>'}}: {message}") from exc
        return decode_upload(body.image, api)
    raise ServiceError(
        ErrorType.VALIDATION_ERROR,
        f'send the image as {_JSON} (`{{"image": "<base64>"}}`) or {_MULTIPART}, not '
        f"{content_type or 'no content type'}",
    )


def _refused(message: str) -> ServiceError:
    return ServiceError(
        ErrorType.VALIDATION_ERROR,
        message,
        [{"loc": ["body", "image"], "msg": message, "type": "missing"}],
    )


def _inspect(data: bytes, api: ApiSettings) -> tuple[ManifestReport, watermark.Watermark | None]:
    image: Image = open_upload(data, api)
    return read_manifest(data), watermark.decode(image)


async def _watermark(
    found: watermark.Watermark | None, services: ServicesDep, caller_id: str
) -> WatermarkCheck:
    if found is None:
        return WatermarkCheck(
            found=False, made_by=None, job_id=None, image_index=None, confidence=None
        )
    payload = WatermarkPayload.from_int(found.payload)
    job_id = await services.jobs.watermarked_job(payload.job_id_prefix)
    record = await services.jobs.get(job_id) if job_id else None
    if record is None or record.owner != caller_id:
        # Another key's job is never named, nor told apart from one no longer kept.
        return WatermarkCheck(
            found=True,
            made_by="this_service",
            job_id=None,
            image_index=None,
            confidence=round(found.confidence, 3),
        )
    return WatermarkCheck(
        found=True,
        made_by="your_job",
        job_id=record.id,
        image_index=payload.image_index,
        confidence=round(found.confidence, 3),
    )


def _summary(manifest: ManifestReport, mark: WatermarkCheck) -> str:
    if not manifest.present:
        credentials = "no Content Credentials"
    elif manifest.valid:
        signer = "a development certificate" if manifest.development_signer else manifest.signer
        credentials = f"valid Content Credentials signed by {signer}"
    else:
        credentials = (
            "Content Credentials that do not verify ("
            + ", ".join(manifest.failures or ("invalid",))
            + ")"
        )
    if mark.made_by == "your_job":
        made = f"watermarked by your job {mark.job_id} (image {mark.image_index})"
    elif mark.made_by == "this_service":
        made = "watermarked by this service"
    else:
        made = "no watermark of this service"
    return f"{credentials}; {made}"
