"""Typed settings, one class per concern, all read from `T2I_*` environment variables."""

import os
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.schema import SafetyAction

DEV_SIGNING_SECRET = "dev-only-signing-secret-change-me"
# What the shipped deployment files (.env.example, deploy/k8s/secrets.yaml) hold for each secret.
PLACEHOLDER_SECRET = "replace-me"
DEFAULT_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class Environment(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


def host_ports(addresses: str) -> list[tuple[str, int]]:
    """`host:port,host:port,...` as pairs; ValueError on anything else."""
    pairs = []
    for address in filter(None, (part.strip() for part in addresses.split(","))):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{address!r} is not host:port")
        pairs.append((host, int(port)))
    return pairs


class _T2ISettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="T2I_", extra="ignore", frozen=True)


class CoreSettings(_T2ISettings):
    """What every process needs: where Redis is and how long jobs live."""

    env: Environment = Environment.DEVELOPMENT
    redis_url: str = "redis://127.0.0.1:6379/0"
    # The default model's queue; each other model has its own, this name and the model's.
    queue_name: str = "txt2img"
    # A worker loads this; a hub id, a local diffusers directory or a single-file checkpoint.
    model_id: str = DEFAULT_MODEL_ID
    # What a request that names no model gets; unset: T2I_MODEL_ID.
    default_model: str | None = None
    # The LoRA registry: a directory of `.safetensors` adapters that the API lists and checks and
    # the workers load (the same directory, or a copy, on every machine); unset: no adapters.
    lora_dir: Path | None = None
    # The rank of the LoRA slots every worker builds: a request's adapters together may use at
    # most this rank (their ranks add up, since adapters used together sit side by side there).
    lora_max_rank: int = Field(default=64, ge=1, le=1024)
    retention_s: int = Field(default=7 * 24 * 3600, ge=1)
    queue_timeout_s: int = Field(default=3600, ge=1)
    # The broker's redelivery of a vanished worker's messages: only a last resort, since lapsed
    # leases bring those jobs back far sooner (a redelivered message of an old attempt is dropped).
    visibility_timeout_s: int = Field(default=3600, ge=1)
    redis_timeout_s: float = Field(default=2.0, gt=0)
    # A worker silent for longer is dead to /ready.
    worker_heartbeat_max_age_s: float = Field(default=30.0, gt=0)
    # A worker renews the lease of each job it holds every third of this; a job whose lease ran
    # out goes back to the queue as a new attempt.
    lease_s: float = Field(default=15.0, gt=0)
    job_max_retries: int = Field(default=3, ge=0)
    # A job sent this long before a later-sent job was reserved (the queue is FIFO), or while the
    # queue is empty, and still unreserved, has lost its message: it is sent again.
    redispatch_after_s: float = Field(default=10.0, gt=0)
    # Redis Sentinel, `host:port,host:port,...`: every process asks these for the primary of
    # T2I_REDIS_SENTINEL_MASTER and follows a failover; T2I_REDIS_URL then only gives the
    # password and database.
    redis_sentinels: str = ""
    redis_sentinel_master: str = "txt2img"
    # When the sentinels themselves require a password.
    redis_sentinel_password: str | None = None
    # Replicas that must hold a new job before it is answered 202, and a job's end before its
    # worker moves on (Redis WAIT), so that a failover cannot undo either; 0 leaves replication
    # asynchronous. A new job short of it is answered 503 (it may still run: retry with the
    # same Idempotency-Key).
    redis_replica_acks: int = Field(default=0, ge=0)
    redis_replica_ack_timeout_s: float = Field(default=1.0, gt=0)

    @property
    def deployment_model(self) -> str:
        return self.default_model or self.model_id

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return host_ports(self.redis_sentinels)

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinels_are_host_ports(cls, value: str) -> str:
        host_ports(value)
        return value

    @model_validator(mode="after")
    def _refuse_placeholder_password(self) -> "CoreSettings":
        if self.env is not Environment.DEVELOPMENT and PLACEHOLDER_SECRET in self.redis_url:
            raise ValueError(f"T2I_REDIS_URL still holds the {PLACEHOLDER_SECRET!r} placeholder")
        return self


class StorageSettings(_T2ISettings):
    """Where images go and how download URLs are made."""

    env: Environment = Environment.DEVELOPMENT
    storage: Literal["local", "s3"] = "local"
    data_dir: Path = Path("data")
    signing_secret: str = DEV_SIGNING_SECRET
    url_ttl_s: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    key_prefix: str = "images"
    s3_bucket: str = "txt2img"
    s3_endpoint_url: str | None = None
    # Download URLs are signed for this endpoint: where clients reach the store, when that is
    # not where the services do (MinIO inside compose: http://minio:9000 vs http://localhost:9000).
    s3_public_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None

    @property
    def local_dir(self) -> Path:
        return self.data_dir / "images"

    @model_validator(mode="after")
    def _refuse_placeholder_secret(self) -> "StorageSettings":
        if self.env is Environment.DEVELOPMENT:
            return self
        if self.signing_secret in {DEV_SIGNING_SECRET, PLACEHOLDER_SECRET}:
            raise ValueError("T2I_SIGNING_SECRET must be set outside development")
        if self.s3_secret_access_key == PLACEHOLDER_SECRET:
            raise ValueError(f"T2I_S3_SECRET_ACCESS_KEY is still {PLACEHOLDER_SECRET!r}")
        return self


class ApiSettings(_T2ISettings):
    """The HTTP gateway."""

    env: Environment = Environment.DEVELOPMENT
    host: str = "127.0.0.1"
    port: int = 8000
    # Caps width x height x num_images so one job cannot monopolise a GPU.
    max_pixels_per_job: int = Field(default=8 * 512 * 512, ge=256 * 256)
    public_base_url: str | None = None
    sweep_interval_s: float = Field(default=30.0, gt=0)
    reap_interval_s: float = Field(default=5.0, gt=0)
    max_header_bytes: int = Field(default=16 * 1024, ge=1024)
    # Applies to job submissions; the default for keys created without their own limit.
    rate_limit_per_min: int = Field(default=60, ge=1)
    # The cap on a key's jobs sent to workers or running at once, for keys created without their
    # own (`txt2img-keys create --max-running`); 0: no cap, the key's weight alone shares the pool.
    max_running_per_key: int = Field(default=0, ge=0)
    # /metrics shows each key's queued and running jobs with its id as a label (one series per
    # key); off, only how many keys wait and the largest counts.
    metrics_key_labels: bool = False
    max_queue_depth: int = Field(default=1000, ge=1)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    # uvicorn processes; their metrics are summed (prometheus-client's multiprocess mode).
    # Unset: one per core in production, one in development.
    api_processes: int | None = Field(default=None, ge=1, le=64)
    # A valid API key is remembered this long per process, so most requests skip its lookup.
    auth_cache_s: float = Field(default=5.0, ge=0, le=300)
    # The OpenAI and AUTOMATIC1111 routes answer with the finished job; past this they cancel it.
    sync_wait_s: float = Field(default=300.0, gt=0, le=3600)
    # What happens to an image the safety checker flags, unless the API key or the request asks
    # for a stricter action.
    safety_action: SafetyAction = "block"
    # Caps on each input image (init_image, mask_image): its file and its width x height. A
    # request with images may be this much larger than T2I_MAX_BODY_BYTES, base64 and all.
    max_input_image_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_input_image_pixels: int = Field(default=2048 * 2048, ge=256 * 256)
    # How long fetching an input image from its URL may take.
    input_image_timeout_s: float = Field(default=10.0, gt=0)

    @property
    def max_body_bytes_with_images(self) -> int:
        """Room for two base64 images on top of the usual body."""
        return self.max_body_bytes + 2 * (4 * self.max_input_image_bytes // 3 + 4)

    @property
    def processes(self) -> int:
        if self.api_processes is not None:
            return self.api_processes
        if self.env is Environment.PRODUCTION:
            return len(os.sched_getaffinity(0))
        return 1

    @property
    def own_base_url(self) -> str:
        """Where clients reach this API, for links that leave it (webhook payloads)."""
        return self.public_base_url or f"http://{self.host}:{self.port}"


class WorkerSettings(_T2ISettings):
    """The GPU worker: model, device and test hooks."""

    env: Environment = Environment.DEVELOPMENT
    # The name requests route by; unset: T2I_MODEL_ID.
    model_name: str | None = None
    # Where a single-file checkpoint's configs (tokenizer, scheduler, shapes) come from.
    single_file_config: str = DEFAULT_MODEL_ID
    # Off only when the operator says so (logged at start): every image is checked otherwise.
    safety_checker: bool = True
    # Unset: the checker the model ships (its safety_checker/ and feature_extractor/), or, for a
    # single-file checkpoint, the one of T2I_SINGLE_FILE_CONFIG.
    safety_checker_id: str | None = None
    model_cache_dir: Path = Path("data/models")
    device: str = "auto"
    # What every module (UNet, VAE, text encoder, ControlNets, safety checker) is loaded in and
    # keeps under any mix of jobs; auto: float16 on CUDA, float32 elsewhere.
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    # LoRA adapters kept loaded, least recently used first out, within this many MiB.
    lora_cache_mb: float = Field(default=512.0, gt=0)
    # ControlNet models this worker loads, by control type (JSON, e.g. {"canny": "<hub id or
    # directory>"}); "tiny" is the tiny offline ControlNet of the tiny model.
    controlnets: dict[str, str] = {}
    # Unset: the largest batch, so a worker holds about one batch and leaves the rest to others.
    concurrency: int | None = Field(default=None, ge=1, le=256)
    # CPU threads torch uses for one render; unset: torch's default (every core). Several
    # workers on one machine's CPUs each take their share.
    torch_threads: int | None = Field(default=None, ge=1, le=256)
    max_batch_images: int = Field(default=8, ge=1, le=64)
    # A batch's images together hold at most this many pixels (a single larger job still runs,
    # alone): sixteen 512x512 or four 1024x1024 images, what a 24 GB card holds in float16.
    max_batch_pixels: int = Field(default=4 * 1024 * 1024, ge=64 * 64)
    # The VAE decodes a batch in slices of at most this many pixels (at least one image): a
    # whole batch of large images at once peaks at many GB.
    decode_slice_pixels: int = Field(default=1024 * 1024, ge=64 * 64)
    # 0: an idle GPU starts a job at once; jobs that arrive while it renders form the next batch.
    batch_wait_ms: float = Field(default=0.0, ge=0, le=5000)
    # Speed levers; unset means on where they pay (CUDA) and off elsewhere.
    compile: bool | None = None
    cuda_graphs: bool | None = None
    fuse_qkv: bool | None = None
    cudnn_benchmark: bool | None = None
    # Slower in eager on the torch we measured (DESIGN section 10), so off unless asked for.
    channels_last: bool = False
    # Image counts the UNet is compiled for (JSON list, e.g. [1,4,8]); unset: 1 and the largest
    # batch. Each costs a trace at every start; other counts render eager, or padded up to a
    # compiled count where warm-up measured that to be faster.
    compiled_image_counts: list[int] | None = None
    warmup: bool = True
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    progress_interval_s: float = Field(default=0.25, ge=0)
    # A busy GPU executor that shows no sign of life for this long is hung: the worker exits.
    executor_stall_s: float = Field(default=120.0, gt=0)
    # How long an upload is retried (with backoff) before its job fails with `storage_error`.
    storage_retry_s: float = Field(default=120.0, ge=0)
    # zlib's level for PNG images: 1 encodes a 512x512 image in about a fourth of the time of
    # Pillow's default 6, for larger files (up to about 2x on smooth images, alike on noisy ones).
    png_compress_level: int = Field(default=1, ge=0, le=9)
    # After SIGTERM, how long the running batch may take before its jobs are handed back too.
    shutdown_grace_s: float = Field(default=25.0, ge=0)
    # Development-only fault injection: a job with exactly this prompt fails inside the render.
    debug_fail_prompt: str | None = None
    # /metrics, /health and /ready of this worker; port 0 turns the endpoint off.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9101, ge=0, le=65535)
    # Development-only: prompts named in worker/faults.py break the worker on purpose.
    debug_faults: bool = False

    @property
    def task_threads(self) -> int:
        # The batch rendering, and one more reserved behind it: the next batch is ready the
        # moment the GPU is free, while the last one's jobs encode and upload.
        return self.concurrency or 2 * self.max_batch_images

    @model_validator(mode="after")
    def _fault_injection_only_in_development(self) -> "WorkerSettings":
        if self.env is not Environment.DEVELOPMENT:
            if self.debug_fail_prompt:
                raise ValueError("T2I_DEBUG_FAIL_PROMPT is only allowed when T2I_ENV=development")
            if self.debug_faults:
                raise ValueError("T2I_DEBUG_FAULTS is only allowed when T2I_ENV=development")
        return self


class WebhookSettings(_T2ISettings):
    """Webhook delivery: its own Celery queue on CPU workers."""

    env: Environment = Environment.DEVELOPMENT
    webhook_queue: str = "webhooks"
    webhook_allowlist: str = ""
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    # Seconds before each retry (jitter added); the default spans more than a day.
    webhook_retry_delays_s: str = "5,30,120,600,1800,3600,7200,14400,28800,43200"
    webhook_secret_overlap_s: float = Field(default=24 * 3600, ge=0)
    webhook_concurrency: int = Field(default=8, ge=1, le=256)
    # The webhook worker's /metrics, /health and /ready; port 0 turns the endpoint off.
    metrics_host: str = "127.0.0.1"
    webhook_metrics_port: int = Field(default=9102, ge=0, le=65535)

    @property
    def retry_delays_s(self) -> list[float]:
        return [float(part) for part in self.webhook_retry_delays_s.split(",") if part.strip()]

    @property
    def allowlist(self) -> list[str]:
        return [part.strip().lower() for part in self.webhook_allowlist.split(",") if part.strip()]

    @property
    def https_only(self) -> bool:
        return self.env is not Environment.DEVELOPMENT

    @model_validator(mode="after")
    def _valid_delays(self) -> "WebhookSettings":
        try:
            delays = self.retry_delays_s
        except ValueError as exc:
            raise ValueError("T2I_WEBHOOK_RETRY_DELAYS_S must be comma-separated seconds") from exc
        if any(delay <= 0 for delay in delays):
            raise ValueError("T2I_WEBHOOK_RETRY_DELAYS_S must be positive")
        return self


class LogSettings(_T2ISettings):
    """How every service process logs."""

    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # One line per HTTP request; off by default, since clients poll.
    access_log: bool = False


@lru_cache
def core_settings() -> CoreSettings:
    return CoreSettings()


@lru_cache
def storage_settings() -> StorageSettings:
    return StorageSettings()


@lru_cache
def api_settings() -> ApiSettings:
    return ApiSettings()


@lru_cache
def webhook_settings() -> WebhookSettings:
    return WebhookSettings()


@lru_cache
def worker_settings() -> WorkerSettings:
    return WorkerSettings()


@lru_cache
def log_settings() -> LogSettings:
    return LogSettings()
