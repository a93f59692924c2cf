"""The FastAPI application; `uvicorn api.app:create_app --factory` or `python -m api`."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from redis.asyncio import Redis as AsyncRedis

from api import events
from api.deps import Services
from api.errors import install_error_handlers
from api.limits import BodySizeLimit
from api.openapi import install_openapi, operation_id
from api.ratelimit import RateLimiter
from api.routes import a1111, jobs, openai, system, webhooks
from api.sweeper import run_sweeper
from shared.apikeys import ApiKeyStore
from shared.jobstore import JobStore
from shared.queue import make_celery, make_redis
from shared.settings import api_settings, core_settings, storage_settings, webhook_settings
from shared.storage import make_storage
from shared.webhooks import Webhooks

VERSION = "0.1.0"


def create_app() -> FastAPI:
    core, api, storage_config = core_settings(), api_settings(), storage_settings()
    hooks_config = webhook_settings()
    redis = make_redis(core)
    celery = make_celery(core)
    services = Services(
        core=core,
        api=api,
        storage_settings=storage_config,
        webhook_settings=hooks_config,
        redis=redis,
        async_redis=AsyncRedis.from_url(
            core.redis_url, socket_connect_timeout=core.redis_timeout_s
        ),
        store=JobStore(redis, core.retention_s),
        keys=ApiKeyStore(redis),
        rate_limiter=RateLimiter(redis),
        webhooks=Webhooks(redis, celery, hooks_config, core.retention_s),
        storage=make_storage(storage_config),
        celery=celery,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(run_sweeper(services))
        logging.getLogger(__name__).info("API ready; storage backend %s", storage_config.storage)
        yield
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        await services.async_redis.aclose()

    app = FastAPI(
        title="txt2img-service",
        version=VERSION,
        description=(
            "Asynchronous text-to-image jobs with Stable Diffusion 1.5, and the OpenAI Images and "
            "AUTOMATIC1111 APIs over the same jobs."
        ),
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
    )
    app.state.services = services
    install_error_handlers(app)
    app.include_router(jobs.router)
    app.include_router(events.router)
    app.include_router(webhooks.router)
    app.include_router(system.router)
    app.include_router(openai.router)
    app.include_router(a1111.router)
    install_openapi(app)
    app.add_middleware(BodySizeLimit, max_bytes=api.max_body_bytes)
    return app
