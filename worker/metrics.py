"""The render worker's Prometheus metrics: where a job's time goes, what each pipeline call
carries, and GPU memory."""

import time
from collections.abc import Callable, Iterator
from datetime import datetime

import torch
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from shared.metrics import count_finished
from shared.schema import JobStatus, Timings
from worker.executor import RenderFunction
from worker.render_types import PreviewCallback, RenderBatch, RenderedImages, StepCallback

# Seconds: from a blink to an hour in the queue; a fraction of a second to minutes of render.
_QUEUED_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_RENDER_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
_UPLOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_IMAGE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

JOB_QUEUED_SECONDS = Histogram(
    "txt2img_job_queued_seconds",
    "Time from submission until a worker started the job",
    buckets=_QUEUED_BUCKETS,
)
JOB_RENDER_SECONDS = Histogram(
    "txt2img_job_render_seconds",
    "Time of the pipeline call that rendered a succeeded job (its wait for a batch apart)",
    buckets=_RENDER_BUCKETS,
)
JOB_UPLOAD_SECONDS = Histogram(
    "txt2img_job_upload_seconds",
    "Time to encode and store a succeeded job's images",
    buckets=_UPLOAD_BUCKETS,
)
SAFETY_CHECKED_IMAGES = Counter(
    "txt2img_safety_checked_images_total",
    "Images the safety checker saw, by outcome: passed, or the action taken on a flagged one",
    ["outcome"],
)
PIPELINE_CALLS = Counter("txt2img_pipeline_calls_total", "Pipeline calls (batches) made")
PIPELINE_CALL_IMAGES = Histogram(
    "txt2img_pipeline_call_images", "Images rendered by one pipeline call", buckets=_IMAGE_BUCKETS
)
PIPELINE_CALL_SECONDS = Histogram(
    "txt2img_pipeline_call_seconds", "Duration of one pipeline call", buckets=_RENDER_BUCKETS
)


def job_started(created_at: datetime, started_at: datetime) -> None:
    JOB_QUEUED_SECONDS.observe(max(0.0, (started_at - created_at).total_seconds()))


def job_succeeded(timings: Timings) -> None:
    JOB_RENDER_SECONDS.observe(timings.render_s or 0.0)
    JOB_UPLOAD_SECONDS.observe(timings.upload_s or 0.0)
    count_finished(JobStatus.SUCCEEDED)


def instrument(render: RenderFunction) -> RenderFunction:
    """`render`, counting each call, its images and its duration (failed calls included)."""

    def counted(
        batch: RenderBatch,
        on_step: StepCallback | None,
        on_preview: PreviewCallback | None = None,
    ) -> RenderedImages:
        PIPELINE_CALLS.inc()
        PIPELINE_CALL_IMAGES.observe(len(batch.items))
        started = time.monotonic()
        try:
            return render(batch, on_step, on_preview)
        finally:
            PIPELINE_CALL_SECONDS.observe(time.monotonic() - started)

    return counted


class GpuMemoryCollector(Collector):
    """Memory the worker's tensors hold on its GPU, now and at the peak, read at scrape time."""

    def __init__(self, device: torch.device) -> None:
        self._device = device

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = [str(self._device)]
        used = GaugeMetricFamily(
            "txt2img_gpu_memory_allocated_bytes",
            "GPU memory held by tensors now",
            labels=["device"],
        )
        used.add_metric(labels, torch.cuda.memory_allocated(self._device))
        peak = GaugeMetricFamily(
            "txt2img_gpu_memory_peak_allocated_bytes",
            "Most GPU memory held by tensors since the worker started",
            labels=["device"],
        )
        peak.add_metric(labels, torch.cuda.max_memory_allocated(self._device))
        yield used
        yield peak


class RecompileCollector(Collector):
    """UNet graphs compiled since the warm-up ended, read at scrape time: each one stalled the
    GPU for a compile, so anything but 0 is a bug."""

    def __init__(self, recompiles: Callable[[], int]) -> None:
        self._recompiles = recompiles

    def collect(self) -> Iterator[CounterMetricFamily]:
        counter = CounterMetricFamily(
            "txt2img_worker_recompiles",
            "UNet graphs compiled after the warm-up (every render should find a warmed graph)",
        )
        counter.add_metric([], self._recompiles())
        yield counter


def watch_recompiles(recompiles: Callable[[], int]) -> None:
    REGISTRY.register(RecompileCollector(recompiles))


def watch_gpu_memory(device: torch.device) -> None:
    """Report GPU memory where there is a GPU; on a CPU there is nothing to report."""
    if device.type == "cuda":
        REGISTRY.register(GpuMemoryCollector(device))
