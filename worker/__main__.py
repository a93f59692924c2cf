"""Start a worker: load and warm the pipeline, then consume jobs. `python -m worker`."""

import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict

import torch
from celery.signals import worker_shutting_down

from shared.content_credentials import CredentialsError
from shared.info import SERVICE_VERSION, WorkerInfo
from shared.jobstore import JobStore
from shared.logs import configure_logging
from shared.loras import LoraRegistry
from shared.model_families import record_model_family
from shared.queue import consume, make_celery, render_queue, send_render
from shared.redisconn import end_wait_args, make_redis
from shared.settings import (
    core_settings,
    log_settings,
    provenance_settings,
    storage_settings,
    webhook_settings,
    worker_settings,
)
from shared.storage import make_storage
from shared.webhooks import Webhooks
from worker.cancel import CancelWatcher
from worker.executor import GpuExecutor, RenderFunction
from worker.heartbeat import Heartbeat
from worker.jobs import FaultHooks, JobRunner
from worker.kinds import load_renderer
from worker.leases import LeaseKeeper
from worker.library_logs import route_library_logs
from worker.metrics import instrument, watch_gpu_memory, watch_recompiles
from worker.metrics_server import MetricsPortInUse, WorkerProbes
from worker.models import ModelLoadError, model_source
from worker.pipeline import (
    LeverUnsupported,
    SpeedLevers,
    compiled_image_counts,
    dtype_name,
    limit_torch_threads,
    resolve_device,
)
from worker.provenance import load_marker
from worker.quantization import QuantizationUnavailable
from worker.reporter import Reporter
from worker.safety import SafetyChecker
from worker.supervisor import Supervisor
from worker.tasks import install_runner, register_tasks
from worker.uploads import StorageGuard

log = logging.getLogger("worker")

# The exit status of a worker whose Celery consumer stopped without a signal asking it to.
EXIT_CONSUMER_FAILED = 71


def _safety_checker(
    model_id: str, device: torch.device, dtype: torch.dtype
) -> SafetyChecker | None:
    settings = worker_settings()
    if not settings.safety_checker:
        log.warning("the safety checker is OFF (T2I_SAFETY_CHECKER=false): images go out unchecked")
        return None
    source = model_source(model_id, settings.model_cache_dir, settings.single_file_config)
    return SafetyChecker.load(
        source, settings.safety_checker_id, settings.model_cache_dir, device, dtype
    )


def _fault_injection(render: RenderFunction) -> tuple[RenderFunction, FaultHooks | None]:
    """The render with development-only faults, where the settings turn them on."""
    settings = worker_settings()
    if settings.debug_fail_prompt is None and not settings.debug_faults:
        return render, None
    from worker.faults import Faults

    faults = Faults(settings.debug_fail_prompt, settings.debug_faults)
    return faults.wrap(render), faults


def main() -> int:
    configure_logging(log_settings())
    route_library_logs()
    core, storage_config, settings = core_settings(), storage_settings(), worker_settings()
    try:
        # Up before the model loads, so a probe can tell a slow start from a dead process.
        probes = WorkerProbes(settings.metrics_host, settings.metrics_port, "T2I_METRICS_PORT")
    except MetricsPortInUse as exc:
        log.error("%s", exc)
        return 2
    if settings.torch_threads is not None:
        limit_torch_threads(settings.torch_threads)
    levers = SpeedLevers.for_device(
        resolve_device(settings.device),
        compile=settings.compile,
        cuda_graphs=settings.cuda_graphs,
        fuse_qkv=settings.fuse_qkv,
        channels_last=settings.channels_last,
        cudnn_benchmark=settings.cudnn_benchmark,
        compile_vae=settings.compile_vae,
        vae_channels_last=settings.vae_channels_last,
        compile_autotune=settings.compile_autotune,
        unet_quant=settings.unet_quant,
        deepcache_interval=settings.deepcache_interval,
    )
    served_model = settings.model_name or core.model_id
    queue = render_queue(core, served_model)
    try:
        # Before the model loads: a worker that cannot sign refuses to start at once.
        marker = load_marker(
            provenance_settings(),
            core.model_id,
            lambda: model_source(
                core.model_id, settings.model_cache_dir, settings.single_file_config
            ),
            settings.model_cache_dir,
        )
    except CredentialsError as exc:
        log.error("%s", exc)
        return 2
    try:
        renderer = load_renderer(
            core.model_id,
            settings.model_cache_dir,
            settings.device,
            levers,
            single_file_config=settings.single_file_config,
            dtype=settings.dtype,
            max_batch_pixels=settings.max_batch_pixels,
            decode_slice_pixels=settings.decode_slice_pixels,
            controlnets=settings.controlnets,
            preview_vae=settings.preview_vae,
            vae=settings.vae_id,
        )
        safety = _safety_checker(core.model_id, renderer.device, renderer.dtype)
        if core.lora_dir is not None:
            renderer.use_loras(
                LoraRegistry(core.lora_dir),
                int(settings.lora_cache_mb * 2**20),
                core.lora_max_rank,
            )
    except (ModelLoadError, QuantizationUnavailable, LeverUnsupported) as exc:
        log.error("%s", exc)
        return 2
    watch_gpu_memory(renderer.device)
    watch_recompiles(lambda: renderer.recompiles)
    compiled_counts = settings.compiled_image_counts or compiled_image_counts(
        settings.max_batch_images
    )

    def warm_up() -> list[Callable[[], object]]:
        left_for_idle_time = renderer.warm_up(
            compiled_counts=compiled_counts, max_images=settings.max_batch_images
        )
        log.info("warm-up renders done; %d more run while no job waits", len(left_for_idle_time))
        return left_for_idle_time

    render, faults = _fault_injection(renderer.render)
    # A compiled UNet serves only the shapes it was warmed for, so it is always warmed.
    executor = GpuExecutor(
        instrument(render),
        settings.max_batch_images,
        settings.batch_wait_ms / 1000,
        key=renderer.batch_key,
        stall_s=settings.executor_stall_s,
        warm_up=warm_up if settings.warmup or levers.compile else None,
        max_batch_pixels=settings.max_batch_pixels,
        arrival_wait_s=settings.batch_arrival_wait_ms / 1000,
    )
    try:
        executor.wait_ready()
    except Exception:
        log.exception("the warm-up render failed")
        return 2

    redis = make_redis(core)
    app = make_celery(core)
    store = JobStore(
        redis, core.retention_s, core.worker_heartbeat_max_age_s, replica_wait=end_wait_args(core)
    )
    cancels = CancelWatcher(redis, store)
    cancels.start()
    worker_name = f"render@{socket.gethostname()}.{os.getpid()}"
    leases = LeaseKeeper(store, worker_name, core.lease_s)
    reporter = Reporter()
    reporter.start()
    uploads = StorageGuard(
        make_storage(storage_config),
        settings.storage_retry_s,
        on_down=executor.pause,
        on_up=executor.resume,
    )
    uploads.start()
    runner = JobRunner(
        store=store,
        uploads=uploads,
        webhooks=Webhooks(redis, app, webhook_settings(), core.retention_s),
        executor=executor,
        cancels=cancels,
        leases=leases,
        reporter=reporter,
        send_render=lambda job_id, attempt: send_render(app, queue, job_id, attempt),
        model_name=served_model,
        queue=queue,
        safety=safety,
        key_prefix=storage_config.key_prefix,
        queue_timeout_s=core.queue_timeout_s,
        progress_interval_s=settings.progress_interval_s,
        faults=faults,
        marker=marker,
        png_compress_level=settings.png_compress_level,
    )
    install_runner(runner)

    def describe() -> WorkerInfo:
        dtypes = renderer.module_dtypes()
        if safety is not None:
            dtypes["safety_checker"] = dtype_name(safety.dtype)
        return WorkerInfo(
            name=worker_name,
            model=served_model,
            family=renderer.family.name,
            cross_attention_dim=renderer.cross_attention_dim,
            queue=queue,
            device=str(renderer.device),
            max_batch_images=settings.max_batch_images,
            levers=asdict(renderer.levers),
            control_types=renderer.control_types,
            dtypes=dtypes,
            recompiles=renderer.recompiles,
            version=SERVICE_VERSION,
        )

    info = describe()
    record_model_family(redis, info)
    supervisor = Supervisor(
        executor,
        leases,
        Heartbeat(redis, worker_name, describe, after_beat=store.pump),
        interval_s=min(settings.heartbeat_interval_s, core.lease_s / 3),
    )

    def start() -> None:
        supervisor.start()
        log.info(
            "worker ready: %s on %s, taking jobs from queue %s", info.model, info.device, queue
        )

    def stop() -> None:
        supervisor.stop()
        uploads.stop()
        reporter.stop()

    probes.ready_while_consuming(start, stop)

    def hand_back_and_exit() -> None:
        log.warning("the running batch outlasted the %s s grace period", settings.shutdown_grace_s)
        runner.hand_back_held()
        logging.shutdown()
        os._exit(1)

    def stop_gracefully() -> None:
        """SIGTERM: leave the live set, let the running batch finish and hand back the rest;
        past the grace period, hand back the running jobs too and exit."""
        supervisor.leave()
        runner.stopping = True
        executor.stop_admitting()
        deadline = threading.Timer(settings.shutdown_grace_s, hand_back_and_exit)
        deadline.daemon = True
        deadline.start()

    # The signal arrives inside a signal handler: do the Redis work on another thread.
    worker_shutting_down.connect(
        lambda **_: threading.Thread(target=stop_gracefully, daemon=True).start(), weak=False
    )

    register_tasks(app)
    consume(app, queue, settings.task_threads, worker_name)
    if not runner.stopping:
        # Celery gave up on its own (an unrecoverable error): exit so the supervisor restarts us.
        log.critical("the Celery consumer stopped without being asked to")
        return EXIT_CONSUMER_FAILED
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # Ctrl-C while the model loads: Celery handles it once it runs.
        sys.exit(130)
