"""Every kind of job on the fast path a GPU worker runs, as far as this CPU allows: the tiny models
of both families (SD 1.5 and SDXL) in bfloat16, the UNet compiled by inductor, fused attention
projections, LoRA slots and a canny ControlNet, warmed on the executor's thread. A mixed sequence
of jobs must keep every module's dtype, compile nothing after the warm-up, and give the same
request the same image wherever it falls; first in this process through the GPU executor, then
(SD 1.5) from outside through `make run`.

Both warm up at 512x512 for one image with the same settings, so `make run` finds the graphs this
process compiled in the shared inductor cache instead of compiling them again.
"""

import base64
import io
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from shared.apikeys import ApiKeyStore
from shared.loras import LoraRegistry
from tests.integration.test_operations import MakeRun, ports, start_make_run
from tests.integration.test_render_core import FAMILIES, Family
from tests.support import wait_for_job, wait_until
from worker.controlnet import canny_map
from worker.executor import GpuExecutor, RenderJob
from worker.kinds import load_renderer
from worker.models import resolve
from worker.pipeline import DiffusionRenderer, RenderBatch, RenderItem, SpeedLevers
from worker.render_types import AdapterSet

SIZE = 512
STEPS = 4
# bfloat16 keeps 8 bits of mantissa: compiled kernels and eager ones round differently, and the
# tiny model's random weights amplify that into single pixels far apart (bfloat16 against float32,
# eager: up to 115 levels of 255) while the mean stays about 1.5 levels. So paths are compared by
# their mean absolute difference, in levels of 255; one path with itself, pixel by pixel.
BFLOAT16_MEAN_TOLERANCE = 3.0
# A tiny adapter at scale 1 moves the mean pixel by 11 to 13 levels.
VISIBLE_MEAN = 6.0


def picture(seed: int) -> Image.Image:
    coarse = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((SIZE, SIZE), Image.Resampling.NEAREST)


def square_mask() -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE))
    mask.paste(255, (SIZE // 4, SIZE // 4, 3 * SIZE // 4, 3 * SIZE // 4))
    return mask


def largest_difference(first: object, second: object) -> int:
    return int(np.abs(np.asarray(first, np.int16) - np.asarray(second, np.int16)).max())


def mean_difference(first: object, second: object) -> float:
    return float(np.abs(np.asarray(first, np.int16) - np.asarray(second, np.int16)).mean())


def batch(*items: RenderItem, **shared: object) -> RenderBatch:
    options: dict = {
        "width": SIZE,
        "height": SIZE,
        "num_inference_steps": STEPS,
        "guidance_scale": 7.5,
        "scheduler": "dpmpp_2m",
        **shared,
    }
    return RenderBatch(items=items, **options)


def item(seed: int = 5, **images: Image.Image) -> RenderItem:
    return RenderItem("a harbour at dawn", "blurry", seed, **images)


def mixed_sequence(family: Family) -> list[tuple[str, RenderBatch]]:
    """Ten jobs of every kind, in an order that puts each kind before and after the others."""
    init = picture(1)
    # Adapters at scale 1.
    style: AdapterSet = ((family.style[0][0], 1.0),)
    other: AdapterSet = ((family.other[0][0], 1.0),)
    return [
        ("plain", batch(item())),
        ("lora A", batch(item(), loras=style)),
        ("image-to-image", batch(item(init_image=init), strength=0.6)),
        ("controlnet", batch(item(control_image=canny_map(picture(2))), control_type="canny")),
        ("lora B", batch(item(), loras=other)),
        ("lora A again", batch(item(), loras=style)),
        ("plain again", batch(item())),
        (
            "unguided pndm",
            batch(item(6), item(7), guidance_scale=1.0, scheduler="pndm"),
        ),
        (
            "inpainting",
            batch(item(init_image=init, mask_image=square_mask()), strength=0.8),
        ),
        ("plain last", batch(item())),
    ]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> Family:
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def fast_path(model_cache: Path, family: Family) -> Iterator[tuple[DiffusionRenderer, GpuExecutor]]:
    """The worker's set-up, with the levers a GPU worker turns on."""
    renderer = load_renderer(
        family.model,
        model_cache,
        "cpu",
        SpeedLevers(compile=True, fuse_qkv=True),
        dtype="bfloat16",
        controlnets={"canny": family.controlnet},
    )
    renderer.use_loras(LoraRegistry(family.loras(model_cache)), max_bytes=64 * 2**20)
    executor = GpuExecutor(
        renderer.render,
        max_batch_images=2,
        key=renderer.batch_key,
        warm_up=lambda: renderer.warm_up(SIZE, SIZE, compiled_counts=(1,), max_images=2),
    )
    executor.wait_ready(timeout=1500)
    yield renderer, executor
    executor.shutdown()


@pytest.fixture(scope="module")
def eager(model_cache: Path, family: Family) -> DiffusionRenderer:
    """The same model and dtype without compile or fused projections."""
    renderer = load_renderer(
        family.model,
        model_cache,
        "cpu",
        dtype="bfloat16",
        controlnets={"canny": family.controlnet},
    )
    renderer.use_loras(LoraRegistry(family.loras(model_cache)), max_bytes=64 * 2**20)
    return renderer


@pytest.fixture(scope="module")
def rendered(fast_path: tuple[DiffusionRenderer, GpuExecutor], family: Family) -> dict[str, list]:
    renderer, executor = fast_path
    images = {}
    for name, job in mixed_sequence(family):
        images[name] = executor.submit(RenderJob(job)).result(timeout=300).images
        assert renderer.recompiles == 0, f"{name} compiled a graph after the warm-up"
    return images


def test_the_warm_up_compiled_a_graph_for_each_variant(
    fast_path: tuple[DiffusionRenderer, GpuExecutor],
) -> None:
    renderer, _ = fast_path
    # Plain, LoRA slots on, ControlNet residuals.
    assert renderer.compiled_variants == {(False, False), (True, False), (False, True)}


def test_mixed_jobs_compile_nothing_and_keep_every_dtype(
    fast_path: tuple[DiffusionRenderer, GpuExecutor], rendered: dict[str, list], family: Family
) -> None:
    renderer, _ = fast_path
    assert renderer.recompiles == 0
    dtypes = renderer.module_dtypes()
    assert set(dtypes) == {"unet", "vae", *family.text_encoders, "controlnet:canny"}
    assert set(dtypes.values()) == {"bfloat16"}


def test_the_same_request_gives_the_same_image_wherever_it_falls(rendered: dict[str, list]) -> None:
    [plain] = rendered["plain"]
    for later in ("plain again", "plain last"):
        assert largest_difference(rendered[later][0], plain) <= 1
    assert largest_difference(rendered["lora A again"][0], rendered["lora A"][0]) <= 1
    assert mean_difference(rendered["lora A"][0], plain) > VISIBLE_MEAN
    assert mean_difference(rendered["lora B"][0], rendered["lora A"][0]) > VISIBLE_MEAN


def test_every_kind_renders_compiled_as_it_does_eager(
    rendered: dict[str, list], eager: DiffusionRenderer, family: Family
) -> None:
    """Compiled, fused and in slots, each job's images are those of the eager core (which
    equals diffusers' own pipelines: tests/integration/test_render_core.py)."""
    for name, job in mixed_sequence(family):
        for compiled, reference in zip(rendered[name], eager.render(job), strict=True):
            assert mean_difference(compiled, reference) <= BFLOAT16_MEAN_TOLERANCE, name


def test_a_lora_job_equals_a_fresh_eager_pipeline_with_the_same_adapter(
    rendered: dict[str, list], model_cache: Path, family: Family
) -> None:
    fresh = family.text.from_pretrained(
        resolve(family.model, model_cache), dtype=torch.bfloat16, **family.load_options
    )
    fresh.set_progress_bar_config(disable=True)
    [(style, _)] = family.style
    adapter = family.loras(model_cache) / f"{style}.safetensors"
    fresh.load_lora_weights(str(adapter), adapter_name="style")
    fresh.scheduler = DPMSolverMultistepScheduler.from_config(
        fresh.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
    )
    [reference] = fresh(
        "a harbour at dawn",
        negative_prompt="blurry",
        width=SIZE,
        height=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        generator=[torch.Generator().manual_seed(5)],
    ).images
    assert mean_difference(rendered["lora A"][0], reference) <= BFLOAT16_MEAN_TOLERANCE


# From outside: `make run` with the same settings, HTTP only.


@pytest.fixture(scope="module")
def service(workdir: Path, model_cache: Path, redis_port: int) -> Iterator[MakeRun]:
    """Started after this process compiled the graphs (its tests come last in the module), so
    the worker finds them cached. `make run` serves the SD 1.5 tiny model only."""
    # Its own database: a worker of another stack in the same one would take its jobs.
    redis_url = f"redis://127.0.0.1:{redis_port}/13"
    run = start_make_run(
        workdir / "make-run-fast-path",
        model_cache,
        redis_url,
        T2I_DTYPE="bfloat16",
        T2I_COMPILE="true",
        T2I_FUSE_QKV="true",
        T2I_COMPILED_IMAGE_COUNTS="[1]",
        T2I_MAX_BATCH_IMAGES="2",
        **ports(),
    )

    def ready() -> bool:
        if not run.process.alive():
            raise RuntimeError(f"make run exited:\n{run.stdout()}\n{run.stderr()[-3000:]}")
        return "txt2img-service ready" in run.stdout()

    wait_until(ready, 1500, "make run's ready line")
    # The sequence compares several jobs' pixels, and each job's watermark is its own: the
    # development key is exempted before its first request, so no API process has it cached.
    key_id = (run.data_dir / "dev-api-key").read_text().strip().split("_")[1]
    redis = Redis.from_url(redis_url)
    try:
        assert ApiKeyStore(redis).update(key_id, watermark_exempt=True) is not None
    finally:
        redis.close()
    yield run
    if run.process.alive():
        run.stop(signal.SIGTERM)


def encoded(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def http_sequence() -> list[tuple[str, dict]]:
    init = encoded(picture(1))
    common = {
        "prompt": "a harbour at dawn",
        "negative_prompt": "blurry",
        "width": SIZE,
        "height": SIZE,
        "num_inference_steps": STEPS,
        "seed": 5,
    }
    style = [{"name": "tiny-style", "scale": 1.0}]
    return [
        ("plain", common),
        ("lora A", {**common, "loras": style}),
        ("image-to-image", {**common, "init_image": init, "strength": 0.6}),
        ("controlnet", {**common, "control": {"type": "canny", "image": encoded(picture(2))}}),
        ("lora B", {**common, "loras": [{"name": "tiny-other", "scale": 1.0}]}),
        ("lora A again", {**common, "loras": style}),
        ("plain again", common),
        (
            "unguided pndm",
            {**common, "num_images": 2, "guidance_scale": 1.0, "scheduler": "pndm"},
        ),
        (
            "inpainting",
            {**common, "init_image": init, "mask_image": encoded(square_mask()), "strength": 0.8},
        ),
        ("plain last", common),
    ]


def recompiles(run: MakeRun) -> float:
    text = httpx.get(f"{run.worker}/metrics", timeout=10).raise_for_status().text
    [sample] = [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "txt2img_worker_recompiles_total"
    ]
    return sample.value


def test_make_run_serves_the_mixed_sequence_on_the_fast_path(service: MakeRun) -> None:
    images: dict[str, list[np.ndarray]] = {}
    with service.client() as client:
        for index, (name, body) in enumerate(http_sequence()):
            response = client.post("/v1/jobs", json=body)
            assert response.status_code == 202, (name, response.text)
            job = wait_for_job(client, response.json()["id"], timeout_s=300)
            assert job["status"] == "succeeded", (name, job)
            images[name] = [
                np.asarray(
                    Image.open(io.BytesIO(httpx.get(entry["url"], timeout=10).content)).convert(
                        "RGB"
                    ),
                    np.int16,
                )
                for entry in job["images"]
            ]
            if index == 0:
                assert recompiles(service) == 0
        info = client.get("/info").raise_for_status().json()
    [plain] = images["plain"]
    assert largest_difference(images["plain again"][0], plain) <= 1
    assert largest_difference(images["plain last"][0], plain) <= 1
    assert largest_difference(images["lora A again"][0], images["lora A"][0]) <= 1
    assert mean_difference(images["lora A"][0], plain) > VISIBLE_MEAN
    assert len(images["unguided pndm"]) == 2
    assert recompiles(service) == 0
    [worker] = info["workers"]
    assert worker["levers"]["compile"] and worker["levers"]["fuse_qkv"]
    assert set(worker["dtypes"]) == {
        "unet",
        "vae",
        "text_encoder",
        "controlnet:canny",
        "safety_checker",
    }
    assert set(worker["dtypes"].values()) == {"bfloat16"}
    assert worker["recompiles"] == 0


def test_make_run_with_the_tiny_model_serves_the_tiny_adapters_and_controlnet(
    service: MakeRun,
) -> None:
    with service.client() as client:
        loras = client.get("/v1/loras").raise_for_status().json()["data"]
        models = client.get("/v1/models").raise_for_status().json()["data"]
    assert [lora["name"] for lora in loras] == ["tiny-other", "tiny-style"]
    assert [model["control_types"] for model in models] == [["canny"]]
    # Stopping is quick: nothing waits on a compile.
    started = time.monotonic()
    service.stop(signal.SIGTERM)
    assert time.monotonic() - started < 60
