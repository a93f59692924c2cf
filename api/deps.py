"""Request-scoped access to the app's services, as `Annotated` dependencies."""

from dataclasses import dataclass
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from shared.jobstore import JobStore
from shared.settings import ApiSettings, CoreSettings, StorageSettings
from shared.storage import LocalStorage, S3Storage


@dataclass
class Services:
    core: CoreSettings
    api: ApiSettings
    storage_settings: StorageSettings
    redis: Redis
    # For waits that must not hold a thread: SSE streams and `Prefer: wait`.
    async_redis: AsyncRedis
    store: JobStore
    storage: LocalStorage | S3Storage
    celery: Celery

    def base_url(self, request: Request) -> str:
        return self.api.public_base_url or str(request.base_url)


def _services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(_services)]
