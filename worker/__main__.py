"""Start a worker: load and warm the pipeline, then consume jobs. `python -m worker`."""

import logging
import os
import socket
import sys
import time

from celery.signals import worker_ready, worker_shutdown

from shared.jobstore import JobStore
from shared.queue import consume, make_celery, make_redis, worker_alive
from shared.settings import core_settings, storage_settings, webhook_settings, worker_settings
from shared.storage import make_storage
from shared.webhooks import Webhooks
from worker.cancel import CancelWatcher
from worker.executor import GpuExecutor
from worker.heartbeat import Heartbeat
from worker.jobs import JobRunner
from worker.pipeline import (
    DiffusionRenderer,
    ModelLoadError,
    SpeedLevers,
    compiled_image_counts,
    resolve_device,
)
from worker.tasks import install_runner, register_tasks

log = logging.getLogger("worker")


def main() -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    core, storage_config, settings = core_settings(), storage_settings(), worker_settings()
    levers = SpeedLevers.for_device(
        resolve_device(settings.device),
        compile=settings.compile,
        cuda_graphs=settings.cuda_graphs,
        fuse_qkv=settings.fuse_qkv,
        channels_last=settings.channels_last,
        cudnn_benchmark=settings.cudnn_benchmark,
    )
    try:
        renderer = DiffusionRenderer.load(
            settings.model_id, settings.model_cache_dir, settings.device, levers
        )
    except ModelLoadError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return 2
    compiled_counts = settings.compiled_image_counts or compiled_image_counts(
        settings.max_batch_images
    )

    def warm_up() -> None:
        renderer.warm_up(compiled_counts=compiled_counts, max_images=settings.max_batch_images)
        log.info("warm-up renders done")

    fail_prompt = settings.debug_fail_prompt

    def render(batch, on_step):
        if fail_prompt is not None and any(item.prompt == fail_prompt for item in batch.items):
            raise RuntimeError(f"injected failure for prompt {fail_prompt!r}")
        return renderer.render(batch, on_step)

    # A compiled UNet serves only the shapes it was warmed for, so it is always warmed.
    executor = GpuExecutor(
        render,
        settings.max_batch_images,
        settings.batch_wait_ms / 1000,
        key=renderer.batch_key,
        warm_up=warm_up if settings.warmup or levers.compile else None,
    )
    try:
        executor.wait_ready()
    except Exception:
        log.exception("the warm-up render failed")
        return 2

    redis = make_redis(core)
    app = make_celery(core)
    store = JobStore(redis, core.retention_s)
    cancels = CancelWatcher(redis, store)
    cancels.start()
    worker_name = f"render@{socket.gethostname()}.{os.getpid()}"
    install_runner(
        JobRunner(
            store=store,
            storage=make_storage(storage_config),
            webhooks=Webhooks(redis, app, webhook_settings(), core.retention_s),
            executor=executor,
            cancels=cancels,
            worker_name=worker_name,
            worker_alive=lambda name: worker_alive(
                redis, name, core.worker_heartbeat_max_age_s, time.time()
            ),
            model_name=settings.model_id,
            key_prefix=storage_config.key_prefix,
            queue_timeout_s=core.queue_timeout_s,
            progress_interval_s=settings.progress_interval_s,
        )
    )
    heartbeat = Heartbeat(redis, worker_name, settings.heartbeat_interval_s, settings.model_id)
    worker_ready.connect(lambda **_: heartbeat.start(), weak=False)
    worker_shutdown.connect(lambda **_: heartbeat.stop(), weak=False)

    register_tasks(app)
    consume(app, core.queue_name, settings.task_threads, worker_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
