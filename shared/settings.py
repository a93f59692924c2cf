"""Typed settings, one class per concern, all read from `T2I_*` environment variables."""

from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_SIGNING_SECRET = "dev-only-signing-secret-change-me"
DEFAULT_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class Environment(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class _T2ISettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="T2I_", extra="ignore", frozen=True)


class CoreSettings(_T2ISettings):
    """What every process needs: where Redis is and how long jobs live."""

    env: Environment = Environment.DEVELOPMENT
    redis_url: str = "redis://127.0.0.1:6379/0"
    queue_name: str = "txt2img"
    retention_s: int = Field(default=7 * 24 * 3600, ge=1)
    queue_timeout_s: int = Field(default=3600, ge=1)
    # Longer than the longest render, or Redis redelivers a job that is still rendering.
    visibility_timeout_s: int = Field(default=3600, ge=60)
    redis_timeout_s: float = Field(default=2.0, gt=0)
    # A worker silent for longer is dead: /ready stops counting it, its running jobs are reclaimed.
    worker_heartbeat_max_age_s: float = Field(default=30.0, gt=0)


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
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None

    @property
    def local_dir(self) -> Path:
        return self.data_dir / "images"

    @model_validator(mode="after")
    def _refuse_placeholder_secret(self) -> "StorageSettings":
        if self.env is not Environment.DEVELOPMENT and self.signing_secret == DEV_SIGNING_SECRET:
            raise ValueError("T2I_SIGNING_SECRET must be set outside development")
        return self


class ApiSettings(_T2ISettings):
    """The HTTP gateway."""

    host: str = "127.0.0.1"
    port: int = 8000
    # Caps width x height x num_images so one job cannot monopolise a GPU.
    max_pixels_per_job: int = Field(default=8 * 512 * 512, ge=256 * 256)
    public_base_url: str | None = None
    sweep_interval_s: float = Field(default=30.0, gt=0)
    # Applies to job submissions; the default for keys created without their own limit.
    rate_limit_per_min: int = Field(default=60, ge=1)
    max_queue_depth: int = Field(default=1000, ge=1)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    # The OpenAI and AUTOMATIC1111 routes answer with the finished job; past this they cancel it.
    sync_wait_s: float = Field(default=300.0, gt=0, le=3600)

    @property
    def own_base_url(self) -> str:
        """Where clients reach this API, for links that leave it (webhook payloads)."""
        return self.public_base_url or f"http://{self.host}:{self.port}"


class WorkerSettings(_T2ISettings):
    """The GPU worker: model, device and test hooks."""

    env: Environment = Environment.DEVELOPMENT
    model_id: str = DEFAULT_MODEL_ID
    model_cache_dir: Path = Path("data/models")
    device: str = "auto"
    # Unset: twice the largest batch, so one batch gathers while the previous one renders.
    concurrency: int | None = Field(default=None, ge=1, le=256)
    max_batch_images: int = Field(default=8, ge=1, le=64)
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
    # Development-only fault injection: a job with exactly this prompt fails inside the render.
    debug_fail_prompt: str | None = None

    @property
    def task_threads(self) -> int:
        return self.concurrency or 2 * self.max_batch_images

    @model_validator(mode="after")
    def _fault_injection_only_in_development(self) -> "WorkerSettings":
        if self.env is not Environment.DEVELOPMENT and self.debug_fail_prompt:
            raise ValueError("T2I_DEBUG_FAIL_PROMPT is only allowed when T2I_ENV=development")
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
