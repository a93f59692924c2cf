"""Request-scoped access to the app's services and the caller, as `Annotated` dependencies."""

import re
from dataclasses import dataclass
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from api.ratelimit import RateLimiter
from shared.apikeys import ApiKey, ApiKeyStore
from shared.errors import ErrorType, ServiceError
from shared.jobstore import JobStore
from shared.recovery import Reaper
from shared.schema import JobRecord
from shared.settings import ApiSettings, CoreSettings, StorageSettings, WebhookSettings
from shared.storage import LocalStorage, S3Storage
from shared.webhooks import Webhooks

_JOB_ID = re.compile(r"[0-9a-f]{32}")


@dataclass
class Services:
    core: CoreSettings
    api: ApiSettings
    storage_settings: StorageSettings
    webhook_settings: WebhookSettings
    redis: Redis
    # For waits that must not hold a thread: SSE streams and `Prefer: wait`.
    async_redis: AsyncRedis
    store: JobStore
    keys: ApiKeyStore
    rate_limiter: RateLimiter
    webhooks: Webhooks
    storage: LocalStorage | S3Storage
    celery: Celery
    reaper: Reaper

    def base_url(self, request: Request) -> str:
        return self.api.public_base_url or str(request.base_url)

    def owned_job(self, job_id: str, caller: ApiKey) -> JobRecord:
        """The job, when this caller made it; another key's job is as absent as a missing one."""
        # Checked before the id goes into a Redis key: no id names another kind of key.
        if not _JOB_ID.fullmatch(job_id):
            raise ServiceError(ErrorType.NOT_FOUND, f"no job with id {job_id!r}")
        record = self.store.get(job_id)
        if record is None or record.owner != caller.id:
            raise ServiceError(ErrorType.NOT_FOUND, f"no job with id {job_id!r}")
        return record


def _services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(_services)]

_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer t2i_...`")


async def _caller(
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKey:
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        message = "send an API key: Authorization: Bearer <key>"
        raise ServiceError(ErrorType.UNAUTHORIZED, message, headers=challenge)
    key = await run_in_threadpool(services.keys.authenticate, credentials.credentials)
    if key is None:
        raise ServiceError(ErrorType.UNAUTHORIZED, "the API key is not valid", headers=challenge)
    return key


CallerDep = Annotated[ApiKey, Depends(_caller)]
