"""The FastAPI application; `uvicorn api.app:create_app --factory` or `python -m api`."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from api import events
from api.deps import Services
from api.errors import install_error_handlers
from api.limits import BodySizeLimit
from api.metrics import HttpMetrics, QueueCollector, metrics_router
from api.openapi import install_openapi, operation_id
from api.routes import a1111, jobs, openai, playground, provenance, system, webhooks
from api.sweeper import run_reaper, run_sweeper
from shared.apikeys import ApiKeyStore, CachedKeys
from shared.asyncstore import AsyncJobStore
from shared.info import SERVICE_VERSION
from shared.jobstore import JobStore
from shared.queue import make_celery, render_queue, send_render
from shared.recovery import Reaper
from shared.redisconn import end_wait_args, make_async_redis, make_redis, wait_args
from shared.settings import api_settings, core_settings, storage_settings, webhook_settings
from shared.storage import make_storage
from shared.webhooks import Webhooks

# The routes whose bodies may carry input images.
IMAGE_PATHS = frozenset(
    {
        "/v1/jobs",
        "/sdapi/v1/img2img",
        "/sdapi/v1/png-info",
        "/v1/provenance/verify",
        "/v1/images/edits",
        "/v1/images/variations",
    }
)


def create_app() -> FastAPI:
    # Library warnings become log lines, so JSON logs stay one object a line.
    logging.captureWarnings(True)
    core, api, storage_config = core_settings(), api_settings(), storage_settings()
    hooks_config = webhook_settings()
    redis = make_redis(core)
    celery = make_celery(core)
    store = JobStore(
        redis, core.retention_s, core.worker_heartbeat_max_age_s, replica_wait=end_wait_args(core)
    )
    storage = make_storage(storage_config)
    hooks = Webhooks(redis, celery, hooks_config, core.retention_s)
    # Above the longest blocking read (a one-second XREAD), so only a dead Redis times out.
    async_redis = make_async_redis(core, socket_timeout_s=core.redis_timeout_s + 1)
    services = Services(
        core=core,
        api=api,
        storage_settings=storage_config,
        webhook_settings=hooks_config,
        redis=redis,
        async_redis=async_redis,
        store=store,
        jobs=AsyncJobStore(
            async_redis,
            core.retention_s,
            core.worker_heartbeat_max_age_s,
            replica_wait=wait_args(core),
        ),
        keys=ApiKeyStore(redis),
        cached_keys=CachedKeys(async_redis, api.auth_cache_s),
        webhooks=hooks,
        storage=storage,
        celery=celery,
        reaper=Reaper(
            redis,
            store,
            core,
            lambda job_id, attempt: send_render(
                celery, render_queue(core, store.model_of(job_id)), job_id, attempt
            ),
            hooks,
        ),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        loops = [asyncio.create_task(loop(services, stop)) for loop in (run_sweeper, run_reaper)]
        logging.getLogger(__name__).info("API ready; storage backend %s", storage_config.storage)
        yield
        stop.set()
        # A round in progress finishes (its Redis calls have timeouts); then the loops return.
        await asyncio.gather(*loops, return_exceptions=True)
        await services.async_redis.aclose()

    # Swagger UI and ReDoc from assets the service serves itself: the docs render offline.
    app = FastAPIOffline(
        title="txt2img-service",
        version=SERVICE_VERSION,
        description=(
            "Asynchronous text-to-image jobs with Stable Diffusion 1.5, and the OpenAI Images and "
            "AUTOMATIC1111 APIs over the same jobs."
        ),
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
        static_url="/docs/assets",
        # Swagger UI's default validator badge is fetched from an outside service.
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.services = services
    install_error_handlers(app)
    app.include_router(jobs.router)
    app.include_router(events.router)
    app.include_router(webhooks.router)
    app.include_router(provenance.router)
    app.include_router(system.router)
    app.include_router(metrics_router(QueueCollector(redis, store, core, api.metrics_key_labels)))
    app.include_router(openai.router)
    app.include_router(a1111.router)
    app.include_router(playground.router)
    install_openapi(app, body_models=[provenance.VerifyRequest])
    app.add_middleware(
        BodySizeLimit,
        max_bytes=api.max_body_bytes,
        image_paths=IMAGE_PATHS,
        image_max_bytes=api.max_body_bytes_with_images,
    )
    # Outermost, so requests the body cap refuses are counted too.
    app.add_middleware(HttpMetrics)
    return app
