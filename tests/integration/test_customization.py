"""LoRA adapters and ControlNet: on the real tiny pipeline with the tiny adapters and the tiny
canny ControlNet, in the GPU executor, and through HTTP.

Differences are mean absolute differences of 8-bit pixels, in [0, 1]. Measured on the tiny model
(64x64 and 256x256, 4 steps): a LoRA at scale 1 moves an image by about 0.02, a canny ControlNet
by about 0.03; a LoRA at scale 0, and a plain image after a LoRA or ControlNet image, differ from
the plain image by exactly 0.
"""

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from redis import Redis
from safetensors.torch import load_file, save_file

from shared.loras import LoraRegistry
from tests.integration.test_batching import hold_gpu, outcomes
from tests.support import Stack, wait_for_job
from worker.controlnet import canny_map
from worker.executor import GpuExecutor, RenderJob
from worker.kinds import load_renderer
from worker.lora_slots import UnsupportedAdapter
from worker.pipeline import DiffusionRenderer, RenderBatch, RenderItem, SpeedLevers
from worker.render_types import AdapterSet

STEPS = 4
# A LoRA or a ControlNet moves the mean pixel by more than this; what batching may move a pixel
# by (the executor's tests allow 2 levels of 255) is far less.
VISIBLE = 0.005
BATCHING_TOLERANCE = 2
STYLE: AdapterSet = (("tiny-style", 1.0),)
OTHER: AdapterSet = (("tiny-other", 1.0),)


@pytest.fixture(scope="module")
def renderer(model_cache: Path, tiny_lora_dir: Path) -> DiffusionRenderer:
    renderer = load_renderer("tiny", model_cache, "cpu", controlnets={"canny": "tiny"})
    renderer.use_loras(LoraRegistry(tiny_lora_dir), max_bytes=64 * 2**20)
    return renderer


def batch(*seeds: int, loras: AdapterSet = (), control: Image.Image | None = None) -> RenderBatch:
    return RenderBatch(
        items=tuple(RenderItem("a cat", "", seed, control_image=control) for seed in seeds),
        width=64,
        height=64,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        scheduler="dpmpp_2m",
        loras=loras,
        control_type=None if control is None else "canny",
    )


def array(image: object) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def mean_difference(a: object, b: object) -> float:
    return float(np.abs(array(a) - array(b)).mean() / 255)


def largest_difference(a: object, b: object) -> int:
    return int(np.abs(array(a) - array(b)).max())


def blocks(seed: int, size: int, cells: int = 8) -> Image.Image:
    """Hard-edged coloured blocks, `cells` a side: a picture with edges for canny to find."""
    coarse = np.random.default_rng(seed).integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.Resampling.NEAREST)


def test_a_lora_changes_the_image_scale_zero_does_not_and_the_plain_image_after_is_unchanged(
    renderer: DiffusionRenderer,
) -> None:
    [before] = renderer.render(batch(3))
    [styled] = renderer.render(batch(3, loras=STYLE))
    [at_zero] = renderer.render(batch(3, loras=(("tiny-style", 0.0),)))
    [other] = renderer.render(batch(3, loras=OTHER))
    [after] = renderer.render(batch(3))

    assert mean_difference(styled, before) > VISIBLE
    assert mean_difference(other, styled) > VISIBLE
    assert largest_difference(at_zero, before) <= BATCHING_TOLERANCE
    assert largest_difference(after, before) == 0
    # Two adapters at once are a third image, and half the scale is another.
    [both] = renderer.render(batch(3, loras=(*OTHER, *STYLE)))
    [half] = renderer.render(batch(3, loras=(("tiny-style", 0.5),)))
    assert min(mean_difference(both, styled), mean_difference(both, other)) > VISIBLE
    assert 0 < mean_difference(half, before) < mean_difference(styled, before)
    [again] = renderer.render(batch(3, loras=STYLE))
    assert largest_difference(again, styled) == 0


def test_with_fused_attention_projections_a_lora_applies_and_the_fusion_comes_back(
    renderer: DiffusionRenderer, model_cache: Path, tiny_lora_dir: Path
) -> None:
    fused = load_renderer("tiny", model_cache, "cpu", SpeedLevers(fuse_qkv=True))
    fused.use_loras(LoraRegistry(tiny_lora_dir), max_bytes=64 * 2**20)
    processors = fused.pipeline.unet.attn_processors
    [before] = fused.render(batch(9))
    [styled] = fused.render(batch(9, loras=STYLE))
    [after] = fused.render(batch(9))
    [unfused_styled] = renderer.render(batch(9, loras=STYLE))
    # The adapter's query, key and value parts sit in the slot of the fused projection.
    assert largest_difference(styled, unfused_styled) <= BATCHING_TOLERANCE
    assert largest_difference(after, before) == 0
    assert fused.pipeline.unet.attn_processors == processors


def test_an_adapter_that_does_not_fit_fails_its_batch_and_leaves_nothing_behind(
    renderer: DiffusionRenderer, tiny_lora_dir: Path, tmp_path: Path
) -> None:
    for adapter in tiny_lora_dir.iterdir():
        (tmp_path / adapter.name).write_bytes(adapter.read_bytes())
    # Its last layer's down-projection has the wrong width: the model has no such layer.
    weights = load_file(tiny_lora_dir / "tiny-style.safetensors")
    last = sorted(name for name in weights if "lora.down" in name)[-1]
    weights[last] = torch.zeros(weights[last].shape[0], weights[last].shape[1] + 1)
    save_file(weights, tmp_path / "broken.safetensors")
    renderer.use_loras(LoraRegistry(tmp_path), max_bytes=64 * 2**20)
    try:
        [before] = renderer.render(batch(4))
        with pytest.raises(UnsupportedAdapter):
            renderer.render(batch(4, loras=(*STYLE, ("broken", 1.0))))
        [after] = renderer.render(batch(4))
        [styled] = renderer.render(batch(4, loras=STYLE))
    finally:
        renderer.use_loras(LoraRegistry(tiny_lora_dir), max_bytes=64 * 2**20)
    assert largest_difference(after, before) == 0
    assert mean_difference(styled, before) > VISIBLE


def test_the_adapter_cache_keeps_the_most_recently_used_within_its_bound(
    renderer: DiffusionRenderer, tiny_lora_dir: Path
) -> None:
    one_adapter = (tiny_lora_dir / "tiny-style.safetensors").stat().st_size
    renderer.use_loras(LoraRegistry(tiny_lora_dir), max_bytes=one_adapter + one_adapter // 2)
    try:
        [styled_first] = renderer.render(batch(5, loras=STYLE))
        renderer.render(batch(5, loras=OTHER))
        assert renderer.loras is not None
        assert renderer.loras.cached == ["tiny-other"]
        assert renderer.loras.cached_bytes <= one_adapter + one_adapter // 2
        # Read again from the registry after its eviction, it renders the same image.
        [styled_again] = renderer.render(batch(5, loras=STYLE))
        assert renderer.loras.cached == ["tiny-style"]
        assert largest_difference(styled_again, styled_first) == 0
    finally:
        renderer.use_loras(LoraRegistry(tiny_lora_dir), max_bytes=64 * 2**20)
        renderer.render(batch(5))


def test_jobs_with_the_same_adapters_share_a_pipeline_call_and_other_adapters_do_not(
    renderer: DiffusionRenderer,
) -> None:
    executor = GpuExecutor(renderer.render, max_batch_images=4, batch_wait_s=0.05)
    try:
        release = hold_gpu(executor)
        batches = [
            batch(1, loras=STYLE),
            batch(2, loras=OTHER),
            batch(3, loras=STYLE),
            batch(4),
            batch(5, loras=(("tiny-style", 0.5),)),
        ]
        futures = [executor.submit(RenderJob(job)) for job in batches]
        release.set()
        results = outcomes(futures)
    finally:
        executor.shutdown()

    ids = [result.batch_id for result in results]
    assert ids[0] == ids[2] and results[0].batch_images == 2
    assert len(set(ids)) == 4
    for job, result in zip(batches, results, strict=True):
        [alone] = renderer.render(job)
        assert largest_difference(result.images[0], alone) <= BATCHING_TOLERANCE


def test_a_canny_controlnet_changes_the_image_and_the_plain_image_after_is_unchanged(
    renderer: DiffusionRenderer,
) -> None:
    edges = canny_map(blocks(1, 64))
    assert 0.05 < float((np.asarray(edges) > 0).mean()) < 0.5
    [before] = renderer.render(batch(7))
    [controlled] = renderer.render(batch(7, control=edges))
    [other_edges] = renderer.render(batch(7, control=canny_map(blocks(2, 64, cells=3))))
    [after] = renderer.render(batch(7))
    assert mean_difference(controlled, before) > VISIBLE
    assert mean_difference(other_edges, controlled) > VISIBLE
    assert largest_difference(after, before) == 0


# Through HTTP, on one stack with the tiny LoRA registry and the tiny canny ControlNet.

SIZE = 256
BODY = {"prompt": "a harbour", "width": SIZE, "height": SIZE, "num_inference_steps": STEPS}


def as_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def client(customization_stack: Stack) -> Iterator[httpx.Client]:
    with customization_stack.client() as client:
        yield client


def rendered(client: httpx.Client, **fields: object) -> tuple[dict, np.ndarray]:
    response = client.post("/v1/jobs", json={**BODY, **fields})
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["id"], timeout_s=180)
    assert job["status"] == "succeeded", job
    data = httpx.get(job["images"][0]["url"], timeout=10).raise_for_status().content
    return job, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_the_registry_is_listed_and_a_lora_job_renders_differently(client: httpx.Client) -> None:
    listed = client.get("/v1/loras").raise_for_status().json()["data"]
    assert [lora["name"] for lora in listed] == ["tiny-other", "tiny-style"]
    assert all(lora["size_bytes"] > 0 for lora in listed)
    _, plain = rendered(client, seed=11)
    job, styled = rendered(client, seed=11, loras=[{"name": "tiny-style", "scale": 1.0}])
    assert job["request"]["loras"] == [{"name": "tiny-style", "scale": 1.0}]
    assert mean_difference(styled, plain) > VISIBLE


def test_lora_tags_in_the_prompt_are_the_jobs_loras(customization_stack: Stack) -> None:
    # Each job's watermark is its own: the two renders are compared unmarked.
    unmarked = customization_stack.create_key("no watermark", 100_000, watermark_exempt=True)
    with customization_stack.client(unmarked) as client:
        tagged, from_tags = rendered(client, seed=12, prompt="a red kite <lora:tiny-style:0.8>")
        job, explicit = rendered(
            client, seed=12, prompt="a red kite", loras=[{"name": "tiny-style", "scale": 0.8}]
        )
        unknown = client.post("/v1/jobs", json={**BODY, "prompt": "a kite <lora:nowhere>"})
    assert tagged["request"]["prompt"] == "a red kite"
    assert tagged["request"]["loras"] == job["request"]["loras"]
    assert np.array_equal(from_tags, explicit)
    assert unknown.status_code == 422 and "nowhere" in unknown.json()["error"]["message"]


def test_a_canny_job_renders_differently_from_the_same_job_without_control(
    client: httpx.Client,
) -> None:
    models = client.get("/v1/models").raise_for_status().json()["data"]
    assert [model["control_types"] for model in models] == [["canny"]]
    _, plain = rendered(client, seed=12)
    control = {"type": "canny", "image": as_base64(blocks(3, 320)), "conditioning_scale": 1.0}
    job, controlled = rendered(client, seed=12, control=control)
    assert job["request"]["control"]["image"].startswith("sha256:")
    assert mean_difference(controlled, plain) > VISIBLE
    # A map sent as it is (no preprocessing) is the same as the map the worker computes.
    edges = canny_map(blocks(3, 320).resize((SIZE, SIZE), Image.Resampling.LANCZOS))
    as_map = {**control, "image": as_base64(edges), "preprocess": False}
    _, from_map = rendered(client, seed=12, control=as_map)
    assert mean_difference(from_map, plain) > VISIBLE


def _bad_requests() -> list[tuple[str, dict, list, str]]:
    picture = as_base64(blocks(4, SIZE))
    return [
        ("unknown LoRA", {"loras": [{"name": "nope"}]}, ["loras", 0, "name"], "lora_unknown"),
        (
            "LoRA named twice",
            {"loras": [{"name": "tiny-style"}, {"name": "tiny-style", "scale": 0.5}]},
            ["loras"],
            "value_error",
        ),
        (
            "LoRA scale too high",
            {"loras": [{"name": "tiny-style", "scale": 3}]},
            ["loras", 0, "scale"],
            "less_than_equal",
        ),
        (
            "unknown control type",
            {"control": {"type": "depth", "image": picture}},
            ["control", "type"],
            "control_type_not_served",
        ),
        (
            "control image not an image",
            {"control": {"type": "canny", "image": base64.b64encode(b"hello" * 20).decode()}},
            ["control", "image"],
            "image_invalid",
        ),
        (
            "control image not base64",
            {"control": {"type": "canny", "image": "%%% nope %%%"}},
            ["control", "image"],
            "image_invalid",
        ),
        (
            "control with an init image",
            {"control": {"type": "canny", "image": picture}, "init_image": picture},
            [],
            "value_error",
        ),
    ]


@pytest.mark.parametrize(
    ("case", "fields", "location", "kind"),
    _bad_requests(),
    ids=[case[0] for case in _bad_requests()],
)
def test_bad_customization_gets_422_and_nothing_is_queued_or_stored(
    customization_stack: Stack,
    client: httpx.Client,
    case: str,
    fields: dict,
    location: list,
    kind: str,
) -> None:
    redis = Redis.from_url(customization_stack.env["T2I_REDIS_URL"])
    stored = customization_stack.workdir / "data" / "images"

    def snapshot() -> tuple:
        return (set(redis.scan_iter("t2i:job:*")), redis.llen("txt2img"), sorted(stored.rglob("*")))

    before = snapshot()
    response = client.post("/v1/jobs", json={**BODY, **fields})
    assert response.status_code == 422, (case, response.text)
    error = response.json()["error"]
    assert error["type"] == "validation_error"
    assert any(
        detail["loc"][1 : 1 + len(location)] == location and detail["type"] == kind
        for detail in error["details"]
    ), error
    assert snapshot() == before
