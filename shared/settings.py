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

    env: Environment = Field(
        default=Environment.DEVELOPMENT,
        description="`development` or `production`; `production` refuses placeholder secrets "
        "and development-only hooks",
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis for jobs and the queue (`redis://:password@host:port/db`)",
    )
    queue_name: str = Field(
        default="txt2img",
        description="the default model's Celery queue; another model's is "
        "`<T2I_QUEUE_NAME>@<model>`",
    )
    model_id: str = Field(
        default=DEFAULT_MODEL_ID,
        description="the model a worker loads, SD 1.5 or SDXL (its layout says which): a hub "
        "id, a local diffusers directory or a single-file checkpoint (`.safetensors`, `.ckpt`); "
        "`tiny` builds the tiny offline SD 1.5 model, `tiny-second` another one with other "
        "weights, `tiny-xl` the tiny offline SDXL model",
    )
    default_model: str | None = Field(
        default=None,
        description="the model a request without `model` gets, as its workers announce it (set "
        "it alike on the API and the workers); unset: `T2I_MODEL_ID`",
    )
    lora_dir: Path | None = Field(
        default=None,
        description="the LoRA registry: a directory of `.safetensors` adapters that the API lists "
        "and checks and the workers load (the same directory, or a copy, on every machine); "
        "unset: no adapters",
    )
    lora_max_rank: int = Field(
        default=64,
        ge=1,
        le=1024,
        description="the rank of the LoRA slots every worker builds: the ranks of a request's "
        "adapters add up to at most this (they sit side by side in the slots), or it is a `422`; "
        "set it alike on the workers and the API",
    )
    retention_s: int = Field(
        default=7 * 24 * 3600,
        ge=1,
        description="how long jobs and their images are kept (7 days); after that `GET` is a `404`",
    )
    queue_timeout_s: int = Field(
        default=3600, ge=1, description="a job not started within this long becomes `expired`"
    )
    visibility_timeout_s: int = Field(
        default=3600,
        ge=1,
        description="the broker redelivers a message whose worker vanished after this long; only "
        "a last resort, since lapsed leases bring such jobs back far sooner (a redelivered "
        "message of an old attempt is dropped)",
    )
    redis_timeout_s: float = Field(
        default=2.0,
        gt=0,
        description="connect and command timeout, so a lost Redis gives a `503` instead of a hang",
    )
    redis_async_max_connections: int = Field(
        default=200,
        ge=1,
        description="connections to Redis one API process holds at most for SSE streams, "
        "`Prefer: wait` and the OpenAI and AUTOMATIC1111 waits (each holds one while it "
        "blocks); a request that finds none free within `T2I_REDIS_TIMEOUT_S` is answered `503`",
    )
    worker_heartbeat_max_age_s: float = Field(
        default=30.0,
        gt=0,
        description="`/ready` counts a worker alive while its heartbeat is younger than this",
    )
    lease_s: float = Field(
        default=15.0,
        gt=0,
        description="a worker renews the lease of each job it holds every third of this; a job "
        "whose lease ran out goes back to the queue as a new attempt",
    )
    job_max_retries: int = Field(
        default=3,
        ge=0,
        description="how many times a job whose worker or message was lost goes back to the "
        "queue; after that it fails as `worker_lost`",
    )
    redispatch_after_s: float = Field(
        default=10.0,
        gt=0,
        description="a job sent this long before a later-sent job was reserved (the queue is "
        "first in, first out), or while the queue is empty, and still unreserved, has lost its "
        "message: it is sent again",
    )
    redis_sentinels: str = Field(
        default="",
        description="Redis Sentinel, `host:port,host:port,...`: every process asks these for the "
        "primary of `T2I_REDIS_SENTINEL_MASTER` and follows a failover; `T2I_REDIS_URL` then "
        "only gives the password and database",
    )
    redis_sentinel_master: str = Field(
        default="txt2img", description="the name the sentinels monitor the primary under"
    )
    redis_sentinel_password: str | None = Field(
        default=None, description="the sentinels' own password, when they require one"
    )
    redis_replica_acks: int | None = Field(
        default=None,
        ge=0,
        description="replicas that must hold a new job before it is answered `202`, and a job's "
        "end before its worker moves on (Redis `WAIT`, the end written again until they do), so "
        "that a failover cannot undo either; 0 leaves replication asynchronous; unset: 0, except "
        "that with `T2I_REDIS_SENTINELS` a job's end waits for one replica",
    )
    redis_replica_ack_timeout_s: float = Field(
        default=1.0,
        gt=0,
        description="how long that `WAIT` may take; a new job short of it is answered `202` with "
        "`X-Replication: pending` (it exists on the primary, which a failover now could lose)",
    )

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
    storage: Literal["local", "s3"] = Field(
        default="local",
        description="`local` (a directory, served by the API) or `s3` (any S3-compatible store)",
    )
    data_dir: Path = Field(
        default=Path("data"),
        description="local images go to `DATA_DIR/images`; `make run` keeps Redis's files in "
        "`DATA_DIR/redis` and the development API key in `DATA_DIR/dev-api-key`",
    )
    signing_secret: str = Field(
        default=DEV_SIGNING_SECRET,
        description="HMAC key for local download URLs; the development placeholder is refused "
        "outside development",
    )
    url_ttl_s: int = Field(
        default=3600,
        ge=1,
        le=7 * 24 * 3600,
        description="lifetime of download URLs (local and presigned S3)",
    )
    key_prefix: str = Field(
        default="images",
        description="object keys are `{prefix}/{job_id}/{attempt}/{index}.{ext}` for images and "
        "`{prefix}/{job_id}/inputs/{name}.png` for input images",
    )
    s3_bucket: str = Field(
        default="txt2img", description="bucket for the `s3` backend (private; it must exist)"
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="e.g. `http://minio:9000` or an R2 endpoint; unset: AWS",
    )
    s3_public_endpoint_url: str | None = Field(
        default=None,
        description="the endpoint download URLs are signed for, when clients reach the store at "
        "another address than the services (compose: `http://localhost:9000` against "
        "`http://minio:9000`); unset: `T2I_S3_ENDPOINT_URL`",
    )
    s3_region: str = Field(default="us-east-1", description="region used for signing")
    s3_access_key_id: str | None = Field(
        default=None,
        description="credentials; unset uses boto3's usual chain (`AWS_*` variables, instance "
        "roles)",
    )
    s3_secret_access_key: str | None = Field(
        default=None, description="the secret of `T2I_S3_ACCESS_KEY_ID`"
    )

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
    host: str = Field(default="127.0.0.1", description="API bind address")
    port: int = Field(default=8000, description="API port")
    instance: str | None = Field(
        default=None,
        max_length=200,
        description="a name `/health` reports, so whoever started the API can tell it from "
        "another process on the same port (`make run` sets one per start)",
    )
    max_pixels_per_job: int = Field(
        default=8 * 512 * 512,
        ge=256 * 256,
        description="cap on `width x height x num_images` (8 x 512 x 512), so one job cannot "
        "monopolise a GPU",
    )
    public_base_url: str | None = Field(
        default=None,
        description="base of local download URLs and webhook links when the API sits behind a "
        "proxy; unset: the request's own host",
    )
    sweep_interval_s: float = Field(
        default=30.0,
        gt=0,
        description="how often the API expires stale queued jobs and deletes jobs past retention",
    )
    reap_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="how often the API's reaper looks for lapsed leases and lost messages",
    )
    max_header_bytes: int = Field(
        default=16 * 1024,
        ge=1024,
        description="a request line and headers over this get `431`",
    )
    rate_limit_per_min: int = Field(
        default=60,
        ge=1,
        description="job submissions per minute for a key created without its own limit (a token "
        "bucket: bursts up to the limit)",
    )
    max_running_per_key: int = Field(
        default=0,
        ge=0,
        description="jobs sent to workers or running at once for a key created without its own "
        "`--max-running`; 0: no cap, the key's weight alone shares the pool",
    )
    metrics_key_labels: bool = Field(
        default=False,
        description="`/metrics` shows each key's queued and running jobs with the key id as a "
        "label (one series per key); off, only how many keys wait and the largest counts",
    )
    max_queue_depth: int = Field(
        default=1000,
        ge=1,
        description="queued jobs across all keys before submissions get `429`",
    )
    max_body_bytes: int = Field(
        default=64 * 1024,
        ge=1024,
        description="request bodies over this get `413` before they are read; a body with input "
        "images (`POST /v1/jobs`, `/sdapi/v1/img2img`) may carry two base64 images of "
        "`T2I_MAX_INPUT_IMAGE_BYTES` on top",
    )
    api_processes: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="uvicorn processes serving the API; `/metrics` reports their sum "
        "(prometheus-client's multiprocess mode); unset: one per core with "
        "`T2I_ENV=production`, else one",
    )
    auth_cache_s: float = Field(
        default=5.0,
        ge=0,
        le=300,
        description="how long each API process remembers a valid key, so most requests skip its "
        "lookup; a revoked key stops working within this long (0: look up every request)",
    )
    sync_wait_s: float = Field(
        default=300.0,
        gt=0,
        le=3600,
        description="how long the OpenAI and AUTOMATIC1111 routes wait for their job; then they "
        "cancel it and answer `504`",
    )
    safety_action: SafetyAction = Field(
        default="block",
        description="what happens to an image the safety checker flags: `flag`, `blur` or "
        "`block`, unless the API key or the request asks for a stricter action",
    )
    max_input_image_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1024,
        description="the largest input image file (`init_image`, `mask_image`, a control image)",
    )
    max_input_image_pixels: int = Field(
        default=2048 * 2048,
        ge=256 * 256,
        description="the most pixels (width x height) of an input image, read from its header",
    )
    input_image_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="the one deadline of fetching an input image from its URL: resolving, "
        "connecting, waiting for a free fetch slot and reading the whole body; then `422`",
    )
    input_image_fetches: int = Field(
        default=64,
        ge=1,
        description="input image URLs one API process fetches at once; more wait for a slot "
        "within `T2I_INPUT_IMAGE_TIMEOUT_S`",
    )
    input_image_fetches_per_key: int = Field(
        default=4,
        ge=1,
        description="requests of one API key that may fetch input image URLs at once in one API "
        "process; one more is answered `429 rate_limited`",
    )

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
    model_name: str | None = Field(
        default=None,
        description="the name a worker serves its model under: what requests' `model` and "
        "`GET /v1/models` say; unset: `T2I_MODEL_ID`",
    )
    single_file_config: str = Field(
        default=DEFAULT_MODEL_ID,
        description="for a single-file checkpoint: the diffusers directory or hub id its configs, "
        "tokenizer and safety checker come from",
    )
    vae_id: str | None = Field(
        default=None,
        description="a VAE (diffusers' `AutoencoderKL`: a hub id or directory) that replaces the "
        "model's own. SDXL's own VAE overflows in float16, so a float16 worker keeps it in "
        "float32; `madebyollin/sdxl-vae-fp16-fix` decodes in float16 instead. Unset: the "
        "model's own",
    )
    safety_checker: bool = Field(
        default=True,
        description="run the safety checker on every image; `false` is the only way to turn it "
        "off, and is logged at start",
    )
    safety_checker_id: str | None = Field(
        default=None,
        description="a hub id or directory with `safety_checker/` and `feature_extractor/`, for "
        "models that ship none; unset: the model's own, or for a single-file checkpoint the one "
        "of `T2I_SINGLE_FILE_CONFIG`",
    )
    model_cache_dir: Path = Field(
        default=Path("data/models"),
        description="where the tiny model is built and the compile cache is kept",
    )
    device: str = Field(
        default="auto",
        description="`auto` (CUDA when present), `cpu`, `cuda`, `cuda:1`, ...",
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        default="auto",
        description="what every module (UNet, VAE, text encoder, ControlNets, safety checker) is "
        "loaded in and keeps under any mix of jobs: `auto` (float16 on CUDA, float32 elsewhere), "
        "`float16`, `bfloat16`, `float32`; `/info` shows each worker's dtype per module",
    )
    lora_cache_mb: float = Field(
        default=512.0,
        gt=0,
        description="LoRA adapters a worker keeps loaded, least recently used out first, within "
        "this many MiB",
    )
    controlnets: dict[str, str] = Field(
        default={},
        description="JSON: the ControlNet a worker loads for each control type, e.g. "
        '`{"canny": "lllyasviel/sd-controlnet-canny"}` (hub ids or directories; an SDXL model '
        'needs SDXL ControlNets); `"tiny"` is the tiny model\'s, `"tiny-xl"` the tiny SDXL '
        "model's",
    )
    preview_vae: str | None = Field(
        default=None,
        description="a tiny autoencoder (diffusers' `AutoencoderTiny`, e.g. `madebyollin/taesd` "
        "for SD 1.5: a hub id or directory) that decodes live previews; unset: a linear map from "
        "latents to colours fitted to the model's VAE; `tiny`: the tiny model's",
    )
    concurrency: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="Celery task threads per worker, which is how many jobs it reserves; unset: "
        "2 x `T2I_MAX_BATCH_IMAGES`, so the next batch is reserved and ready the moment the GPU "
        "is free while the last one's jobs encode and upload. Reserved jobs stay `queued`, with "
        "their position, until the GPU admits them",
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="CPU threads torch uses per worker process; with several workers on one "
        "machine's CPUs, give each its share (two workers on two cores: `1`); unset: torch's "
        "default, every core",
    )
    max_batch_images: int = Field(
        default=8,
        ge=1,
        le=64,
        description="most images one pipeline call renders; compatible jobs (same size, steps, "
        "scheduler, guidance) share a call up to this many images. A job with more images still "
        "renders, alone",
    )
    max_batch_pixels: int = Field(
        default=4 * 1024 * 1024,
        ge=64 * 64,
        description="most pixels (width x height x images) one pipeline call renders: sixteen "
        "512x512 or four 1024x1024 images, what a 24 GB card holds in float16. A job larger than "
        "this still renders, alone",
    )
    decode_slice_pixels: int = Field(
        default=1024 * 1024,
        ge=64 * 64,
        description="the VAE decodes a batch in slices of at most this many pixels (at least one "
        "image): a whole batch of large images at once would peak at many GB",
    )
    batch_wait_ms: float = Field(
        default=0.0,
        ge=0,
        le=5000,
        description="how long an idle GPU waits for company after a job arrives; at 0 it starts "
        "at once, and jobs that arrive while it renders form the next batch",
    )
    batch_arrival_wait_ms: float = Field(
        default=50.0,
        ge=0,
        le=5000,
        description="how long a batch being gathered waits, at most, for jobs this worker has "
        "already received and is still preparing (reserving in Redis, reading input images), "
        "so a burst renders in full batches; a lone job waits for nothing",
    )
    compile: bool | None = Field(
        default=None,
        description="`torch.compile` the UNet for the warmed shapes (512x512, the image counts "
        "of `T2I_COMPILED_IMAGE_COUNTS`); other shapes render eager. The compile cache lives in "
        "`T2I_MODEL_CACHE_DIR/inductor`, so a restarted worker is ready fast; unset: on with CUDA",
    )
    cuda_graphs: bool | None = Field(
        default=None,
        description='replay the compiled UNet as CUDA graphs (`mode="reduce-overhead"`); only '
        "with `T2I_COMPILE`; unset: on with CUDA",
    )
    fuse_qkv: bool | None = Field(
        default=None,
        description="fuse the attention's query, key and value projections into one matrix "
        "product; unset: on with CUDA",
    )
    cudnn_benchmark: bool | None = Field(
        default=None,
        description="let cuDNN time its convolution algorithms once per shape and keep the "
        "fastest; unset: on with CUDA",
    )
    channels_last: bool = Field(
        default=False,
        description="channels-last memory format for the UNet and VAE; off unless asked for, "
        "since it slowed eager SD 1.5 on the torch we measured",
    )
    compile_vae: bool | None = Field(
        default=None,
        description="`torch.compile` the VAE's decode, one image at a time, for the warmed size "
        "(512x512); other sizes decode eager; unset: on with CUDA",
    )
    vae_channels_last: bool = Field(
        default=False,
        description="channels-last memory format for the VAE alone (`T2I_CHANNELS_LAST` turns "
        "it on for both)",
    )
    compile_autotune: bool = Field(
        default=False,
        description="let inductor autotune the UNet's kernels (`max-autotune`): a first compile "
        "several times longer, for what bench/ measures it gains; only with `T2I_COMPILE`",
    )
    unet_quant: Literal["fp8", "int8"] | None = Field(
        default=None,
        description="the UNet's linear layers in float8 (`fp8`: Ada or Hopper cards) or `int8`, "
        "with dynamic activation scales (torchao); opt-in: images drift from float16's by what "
        "docs/performance.md reports",
    )
    deepcache_interval: int = Field(
        default=0,
        ge=0,
        le=10,
        description="feature reuse (DeepCache): run the whole UNet every this many denoising "
        "steps (and at the last) and only its outermost blocks on the steps between, reusing "
        "the deep features of the last whole step. Faster, but it changes the image (see "
        "docs/performance.md); ControlNet jobs always run every step whole; 0 or 1: off",
    )
    compiled_image_counts: list[int] | None = Field(
        default=None,
        description="JSON list of the image counts the UNet is compiled for, e.g. `[1,4,8]`; each "
        "adds a trace to every start. Other counts render eager, or padded up to a compiled "
        "count where the warm-up measured that to be faster; unset: 1 and "
        "`T2I_MAX_BATCH_IMAGES`",
    )
    warmup: bool = Field(
        default=True,
        description="render once at start-up, before taking jobs (with `T2I_COMPILE` on, the "
        "compiled shapes are always warmed and every batch size timed)",
    )
    heartbeat_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="how often a worker reports itself alive (only while its GPU executor is "
        "healthy)",
    )
    progress_interval_s: float = Field(
        default=0.25,
        ge=0,
        description="least time between two progress writes of one job (the last step is always "
        "written)",
    )
    executor_stall_s: float = Field(
        default=120.0,
        gt=0,
        description="a GPU executor busy this long without finishing a denoising step is hung: "
        "the worker exits (status 70) so its supervisor restarts it",
    )
    storage_retry_s: float = Field(
        default=120.0,
        ge=0,
        description="how long an upload is retried, with backoff, before its job fails with "
        "`storage_error`; meanwhile the worker admits no new batch",
    )
    png_compress_level: int = Field(
        default=1,
        ge=0,
        le=9,
        description="zlib level of PNG images (0-9): 1 encodes a 512x512 image in about a fourth "
        "of the time of Pillow's default 6, for files up to about twice as large on smooth images",
    )
    shutdown_grace_s: float = Field(
        default=25.0,
        ge=0,
        description="after `SIGTERM`, how long the running batch may take before its jobs are "
        "handed back too; keep it under the stop grace period of whatever runs the worker",
    )
    debug_fail_prompt: str | None = Field(
        default=None,
        description="development only: a job with exactly this prompt fails inside the render "
        "(used by tests)",
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        description="where a worker (and the webhook worker) serves `/metrics`, `/health` and "
        "`/ready`; `0.0.0.0` in containers",
    )
    metrics_port: int = Field(
        default=9101,
        ge=0,
        le=65535,
        description="a render worker's metrics and probe port (`0`: none); give each worker on "
        "one machine its own",
    )
    debug_faults: bool = Field(
        default=False,
        description="development only: the prompts in `worker/faults.py` hang the render or "
        "break progress writes or admission on purpose (used by the chaos tests)",
    )

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
    webhook_queue: str = Field(
        default="webhooks",
        description="the Celery queue that webhook workers (`python -m worker.webhooks`) read",
    )
    webhook_allowlist: str = Field(
        default="",
        description="comma-separated hosts or CIDRs a webhook, or an input image URL, may reach "
        "even though they are private, loopback or link-local",
    )
    webhook_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="the one deadline of a delivery attempt: connecting, sending and reading the "
        "whole response; then it is retried",
    )
    webhook_retry_delays_s: str = Field(
        default="5,30,120,600,1800,3600,7200,14400,28800,43200",
        description="seconds before each retry (jitter added): ten retries over about 29 hours; "
        "a receiver's `Retry-After` may lengthen a wait up to the largest of these, never past "
        "the sum of them all since the first attempt",
    )
    webhook_secret_overlap_s: float = Field(
        default=24 * 3600,
        ge=0,
        description="after a rotation, webhooks carry the old secret's signature too for this long",
    )
    webhook_concurrency: int = Field(
        default=8, ge=1, le=256, description="deliveries one webhook worker sends at once"
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        description="where the webhook worker serves `/metrics`, `/health` and `/ready`",
    )
    webhook_metrics_port: int = Field(
        default=9102,
        ge=0,
        le=65535,
        description="the webhook worker's metrics and probe port (`0`: none)",
    )

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


class ProvenanceSettings(_T2ISettings):
    """Where images say they came from: the signed C2PA manifest and the invisible watermark
    (docs/provenance.md)."""

    env: Environment = Environment.DEVELOPMENT
    provenance: bool = Field(
        default=True,
        description="workers embed an invisible watermark (the job and image) in every image and "
        "sign a C2PA manifest into every stored file; `false` turns both off, and is logged at "
        "start",
    )
    provenance_prompt: bool = Field(
        default=False,
        description="the C2PA manifest also carries the prompt and negative prompt; off, since "
        "prompts can be private",
    )
    c2pa_cert: str | None = Field(
        default=None,
        description="the signing certificate chain, PEM, leaf first: a file path, or the PEM "
        "text itself (from a secret); unset in development: a development chain made in "
        "`T2I_MODEL_CACHE_DIR` on first start; unset in production: the worker refuses to start",
    )
    c2pa_key: str | None = Field(
        default=None,
        description="the private key of `T2I_C2PA_CERT`'s leaf, PEM: a file path or the PEM text",
    )
    c2pa_tsa_url: str | None = Field(
        default=None,
        description="an RFC 3161 timestamp authority the signature is timestamped by; unset: none "
        "(the manifest is valid while the certificate is)",
    )
    verify_concurrency: int = Field(
        default=2,
        ge=1,
        le=64,
        description="uploads `POST /v1/provenance/verify` checks at once per API process (each "
        "takes a CPU core for up to a second); more wait their turn",
    )


class LogSettings(_T2ISettings):
    """How every service process logs."""

    log_format: Literal["text", "json"] = Field(
        default="text",
        description="`text`, or `json`: one JSON object a line (`time`, `level`, `logger`, "
        "`message`, `job_id` on every line about a job, `exception`)",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="`DEBUG`, `INFO`, `WARNING` or `ERROR`"
    )
    access_log: bool = Field(
        default=False,
        description="one line per HTTP request; off, since clients poll (`/metrics` counts "
        "requests instead)",
    )


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
def provenance_settings() -> ProvenanceSettings:
    return ProvenanceSettings()


@lru_cache
def log_settings() -> LogSettings:
    return LogSettings()
