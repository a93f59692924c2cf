"""Webhook secrets and delivery logs."""

import time

from fastapi import APIRouter, status
from pydantic import BaseModel, Field

from api.deps import CallerDep, ServicesDep
from api.openapi import error_responses
from shared.errors import ErrorType, ServiceError

# Each route names its one tag, so the docs list it once.
router = APIRouter()


class WebhookSecret(BaseModel):
    key: str = Field(description="the `whsec_` secret that signs this API key's webhooks")


class SecretRotation(BaseModel):
    key: str
    previous_valid_for_s: float


class Attempt(BaseModel):
    attempt: int | None = None
    at: str
    status_code: int | None
    error: str | None = None
    duration_ms: float | None = None
    next_attempt_at: str | None = None


class Delivery(BaseModel):
    webhook_id: str
    event: str
    url: str
    status: str = Field(description="pending, retrying, delivered, gone (410) or failed")
    attempts: list[Attempt]


class DeliveryList(BaseModel):
    data: list[Delivery]


class Redelivery(BaseModel):
    webhook_id: str


@router.get(
    "/v1/webhooks/secret",
    response_model=WebhookSecret,
    responses=error_responses(401, 404, 503),
    tags=["webhooks"],
    summary="Your key's webhook secret",
)
def get_secret(services: ServicesDep, caller: CallerDep) -> WebhookSecret:
    secrets = services.keys.webhook_secrets(caller.id)
    if secrets is None:
        raise ServiceError(ErrorType.NOT_FOUND, "this API key has no webhook secret")
    return WebhookSecret(key=secrets.current)


@router.post(
    "/v1/webhooks/secret/rotate",
    response_model=SecretRotation,
    responses=error_responses(401, 404, 503),
    tags=["webhooks"],
    summary="A new webhook secret; the old one keeps signing during the overlap window",
)
def rotate_secret(services: ServicesDep, caller: CallerDep) -> SecretRotation:
    overlap_s = services.webhook_settings.webhook_secret_overlap_s
    fresh = services.keys.rotate_webhook_secret(caller.id, overlap_s, time.time())
    if fresh is None:
        raise ServiceError(ErrorType.NOT_FOUND, "this API key has no webhook secret")
    return SecretRotation(key=fresh, previous_valid_for_s=overlap_s)


@router.get(
    "/v1/jobs/{job_id}/webhooks",
    response_model=DeliveryList,
    responses=error_responses(401, 404, 422, 503),
    tags=["jobs"],
    summary="Every webhook delivery of a job, with each attempt",
)
def list_deliveries(job_id: str, services: ServicesDep, caller: CallerDep) -> DeliveryList:
    services.owned_job(job_id, caller)
    return DeliveryList.model_validate({"data": services.webhooks.for_job(job_id)})


@router.post(
    "/v1/jobs/{job_id}/webhooks/redeliver",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Redelivery,
    responses=error_responses(401, 404, 409, 422, 503),
    tags=["jobs"],
    summary="Send the job's latest webhook again, with the same webhook-id",
)
def redeliver(job_id: str, services: ServicesDep, caller: CallerDep) -> Redelivery:
    services.owned_job(job_id, caller)
    delivery_id = services.webhooks.latest_for_job(job_id)
    if delivery_id is None:
        raise ServiceError(ErrorType.CONFLICT, "this job has no webhook delivery to repeat")
    services.webhooks.update(delivery_id, status="pending")
    services.webhooks.send_now(delivery_id)
    return Redelivery(webhook_id=delivery_id)
