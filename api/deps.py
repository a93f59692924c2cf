"""Request-scoped access to the app's services and the caller, as `Annotated` dependencies."""

import re
from dataclasses import dataclass
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from fastapi.security import (
    HTTPAuthorizationCredentials,
    HTTPBasic,
    HTTPBasicCredentials,
    HTTPBearer,
)
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from shared.apikeys import ApiKey, ApiKeyStore, CachedKeys
from shared.asyncstore import AsyncJobStore, JobView
from shared.errors import ErrorType, ServiceError
from shared.jobstore import JobStore
from shared.loras import LoraRegistry
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
    # The request path's reads and writes, without a thread-pool hop.
    jobs: AsyncJobStore
    keys: ApiKeyStore
    cached_keys: CachedKeys
    webhooks: Webhooks
    storage: LocalStorage | S3Storage
    celery: Celery
    reaper: Reaper

    @property
    def loras(self) -> LoraRegistry:
        return LoraRegistry(self.core.lora_dir)

    def base_url(self, request: Request) -> str:
        return self.api.public_base_url or str(request.base_url)

    def owned_job(self, job_id: str, caller: ApiKey) -> JobRecord:
        """The job, when this caller made it; another key's job is as absent as a missing one."""
        _check_job_id(job_id)
        return _owned(job_id, self.store.get(job_id), caller)

    async def owned_view(self, job_id: str, caller: ApiKey) -> JobView:
        """`owned_job`, with its queue position and the queue's rates, in one round trip."""
        _check_job_id(job_id)
        view = await self.jobs.read(job_id)
        _owned(job_id, view.record if view else None, caller)
        assert view is not None
        return view


def _check_job_id(job_id: str) -> None:
    # Checked before the id goes into a Redis key: no id names another kind of key.
    if not _JOB_ID.fullmatch(job_id):
        raise ServiceError(ErrorType.NOT_FOUND, f"no job with id {job_id!r}")


def _owned(job_id: str, record: JobRecord | None, caller: ApiKey) -> JobRecord:
    if record is None or record.owner != caller.id:
        raise ServiceError(ErrorType.NOT_FOUND, f"no job with id {job_id!r}")
    return record


async def _services(request: Request) -> Services:
    # Async, as every dependency here: a sync one would cost a thread-pool hop per request.
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(_services)]

_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer t2i_...`")
_basic = HTTPBasic(
    auto_error=False, description="the API key as the password (or as the user name alone)"
)


async def authenticate(services: Services, presented: str | None, scheme: str, how: str) -> ApiKey:
    """The key `presented`, if it is valid; a 401 challenges with `scheme` and says `how`."""
    challenge = {"WWW-Authenticate": scheme}
    if not presented:
        raise ServiceError(ErrorType.UNAUTHORIZED, f"send an API key: {how}", headers=challenge)
    key = await services.cached_keys.authenticate(presented)
    if key is None:
        raise ServiceError(ErrorType.UNAUTHORIZED, "the API key is not valid", headers=challenge)
    return key


async def _caller(
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKey:
    presented = credentials.credentials if credentials else None
    return await authenticate(services, presented, "Bearer", "Authorization: Bearer <key>")


async def _bearer_or_basic_caller(
    services: ServicesDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    basic: Annotated[HTTPBasicCredentials | None, Depends(_basic)],
) -> ApiKey:
    presented = bearer.credentials if bearer else None
    if basic is not None:
        presented = basic.password or basic.username
    how = "Authorization: Basic with the key as the password, or Bearer <key>"
    return await authenticate(services, presented, "Basic", how)


CallerDep = Annotated[ApiKey, Depends(_caller)]
# AUTOMATIC1111 clients send their credentials as HTTP Basic.
BearerOrBasicCallerDep = Annotated[ApiKey, Depends(_bearer_or_basic_caller)]
