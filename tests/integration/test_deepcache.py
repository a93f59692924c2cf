"""Feature reuse (the `deepcache_interval` lever) in the render core, on the tiny model on this CPU.

The reference is diffusers' own pipeline with the whole UNet run every step and the output of
its second-to-last up block swapped, on the steps between whole ones, for the one kept from the
last whole step: what feature reuse computes, with none of the render core's code.
"""

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from torch._dynamo.utils import counters

from shared.info import WorkerInfo
from shared.loras import LoraRegistry
from shared.settings import WorkerSettings
from tests.integration.test_mixed_traffic import largest_difference, mean_difference
from tests.integration.test_render_core import batch as render_core_batch
from tests.integration.test_render_core import item, picture, square_mask
from worker.controlnet import canny_map
from worker.kinds import _keep_unmasked, load_renderer
from worker.pipeline import (
    DiffusionRenderer,
    RenderBatch,
    RenderItem,
    SpeedLevers,
    deep_forward,
    deepcache_full_step,
    shallow_forward,
    to_images,
)
from worker.render_types import AdapterSet

SIZE = 64
STEPS = 10
GUIDANCE = 7.5
INTERVAL = 3
STYLE: AdapterSet = (("tiny-style", 0.7),)
# Measured at 10 steps, interval 3, 64x64 (float32): feature reuse moves the tiny model's image
# by 1.6 levels of 255 on average (at most 62 in one pixel); another seed moves it by far more.
REUSE_MEAN_BOUND = 4.0
# As tests/integration/test_mixed_traffic.py: bfloat16 compiled against eager, by the mean.
BFLOAT16_MEAN_TOLERANCE = 3.0


def batch(*items: RenderItem, **shared: object) -> RenderBatch:
    return render_core_batch(*items, **{"num_inference_steps": STEPS, **shared})


@pytest.fixture(scope="module")
def core(model_cache: Path, tiny_lora_dir: Path) -> DiffusionRenderer:
    renderer = load_renderer("tiny", model_cache, "cpu", controlnets={"canny": "tiny"})
    renderer.use_loras(LoraRegistry(tiny_lora_dir), max_bytes=64 * 2**20, max_rank=8)
    return renderer


@contextlib.contextmanager
def reusing(core: DiffusionRenderer, interval: int) -> Iterator[None]:
    core.apply(SpeedLevers(deepcache_interval=interval))
    try:
        yield
    finally:
        core.apply(SpeedLevers())


def render(core: DiffusionRenderer, job: RenderBatch, interval: int) -> list:
    with reusing(core, interval):
        return core.render(job)


@contextlib.contextmanager
def counted(core: DiffusionRenderer) -> Iterator[dict[str, int]]:
    """Calls of the deep path (the mid block) and of the UNet's last up block (every step)."""
    unet = core.pipeline.unet
    calls = {"whole": 0, "steps": 0}

    def count(name: str) -> Any:
        def hook(*_: Any) -> None:
            calls[name] += 1

        return hook

    handles = [
        unet.mid_block.register_forward_hook(count("whole")),
        unet.up_blocks[-1].register_forward_hook(count("steps")),
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def counted_parts(core: DiffusionRenderer) -> Iterator[dict[str, int]]:
    """Calls of the whole and the shallow forward (hooks do not run in a compiled graph)."""
    unet = core._unet
    calls = {"deep": 0, "shallow": 0}

    def counting(name: str) -> Any:
        original = getattr(unet, name)

        def call(*args: Any) -> Any:
            calls[name] += 1
            return original(*args)

        return call

    unet.deep, unet.shallow = counting("deep"), counting("shallow")  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        del unet.deep, unet.shallow


@contextlib.contextmanager
def reference_reuse(core: DiffusionRenderer, steps: int, interval: int) -> Iterator[None]:
    """diffusers' UNet as it runs, with the deep features of the steps between whole ones
    swapped for the last whole step's (one UNet call per step: guidance batches both halves)."""
    deep = core.pipeline.unet.up_blocks[-2]
    state: dict[str, Any] = {"call": 0, "kept": None}

    def swap(_: Any, __: Any, output: torch.Tensor) -> torch.Tensor:
        index = state["call"]
        state["call"] += 1
        if deepcache_full_step(index, steps, interval):
            state["kept"] = output
            return output
        return state["kept"]

    handle = deep.register_forward_hook(swap)
    try:
        yield
    finally:
        handle.remove()


def diffusers_pipeline(core: DiffusionRenderer, kind: type = StableDiffusionPipeline) -> Any:
    pipeline = kind(**core.pipeline.components)
    pipeline.scheduler = core.scheduler("dpmpp_2m")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


ARGUMENTS = {"prompt": "a cat", "negative_prompt": "blurry", "num_inference_steps": STEPS}


def generator(seed: int = 3) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed)]


def test_the_schedule_runs_the_first_and_last_steps_and_every_interval_whole() -> None:
    assert [deepcache_full_step(i, 10, 3) for i in range(10)] == [
        True,
        False,
        False,
        True,
        False,
        False,
        True,
        False,
        False,
        True,
    ]
    assert [deepcache_full_step(i, 5, 3) for i in range(5)] == [True, False, False, True, True]
    assert all(deepcache_full_step(i, 7, interval) for interval in (0, 1) for i in range(7))


def sd15_shaped_unet() -> UNet2DConditionModel:
    """SD 1.5's block layout (attention in the outermost blocks, two layers a block) at a tiny
    width, random weights."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()


@pytest.mark.parametrize("model", ["tiny", "sd15-shaped"])
@pytest.mark.parametrize("latent_side", [8, 9], ids=["even", "odd"])
def test_the_deep_and_shallow_forwards_are_the_unets_own_on_one_step(
    core: DiffusionRenderer, model: str, latent_side: int
) -> None:
    unet = core.pipeline.unet if model == "tiny" else sd15_shaped_unet()
    sample = torch.randn(2, 4, latent_side, latent_side, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    timestep = torch.tensor(500.0)
    with torch.inference_mode():
        whole = unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]
        output, features = deep_forward(unet, sample, timestep, context)
        shallow = shallow_forward(unet, sample, timestep, context, features)
    assert torch.equal(output, whole)
    # On the features of its own step, the shallow branch is the whole UNet.
    assert torch.equal(shallow, whole)


def test_interval_one_and_renders_of_whole_steps_only_are_todays_image(
    core: DiffusionRenderer,
) -> None:
    today = core.render(batch(item()))
    assert largest_difference(render(core, batch(item()), 1)[0], today[0]) == 0
    two_steps = batch(item(), num_inference_steps=2)
    # Two steps are the first and the last: both whole.
    with counted(core) as calls:
        reused = render(core, two_steps, INTERVAL)
    assert calls == {"whole": 2, "steps": 2}
    assert largest_difference(reused[0], core.render(two_steps)[0]) == 0


def test_interval_three_runs_the_whole_unet_on_four_of_ten_steps_as_the_reference_does(
    core: DiffusionRenderer,
) -> None:
    today = core.render(batch(item()))
    with counted(core) as calls:
        [reused] = render(core, batch(item()), INTERVAL)
    assert calls == {"whole": 4, "steps": STEPS}
    with reference_reuse(core, STEPS, INTERVAL):
        reference = diffusers_pipeline(core)(
            **ARGUMENTS, width=SIZE, height=SIZE, guidance_scale=GUIDANCE, generator=generator()
        ).images[0]
    assert largest_difference(reused, reference) == 0
    cost = mean_difference(reused, today[0])
    another_seed = mean_difference(core.render(batch(item(4)))[0], today[0])
    print(
        f"feature reuse every {INTERVAL} of {STEPS} steps: mean {cost:.2f}, "
        f"largest {largest_difference(reused, today[0])} levels; another seed: mean "
        f"{another_seed:.2f}"
    )
    assert 0 < cost <= REUSE_MEAN_BOUND
    assert cost < another_seed / 4


def test_image_to_image_reuses_from_its_first_step_as_the_reference_does(
    core: DiffusionRenderer,
) -> None:
    init = picture(1)
    with counted(core) as calls:
        [reused] = render(core, batch(item(init_image=init), strength=0.6), INTERVAL)
    # 6 of 10 steps run: whole at their first, fourth and last.
    assert calls == {"whole": 3, "steps": 6}
    with reference_reuse(core, 6, INTERVAL):
        reference = diffusers_pipeline(core, StableDiffusionImg2ImgPipeline)(
            **ARGUMENTS, image=[init], strength=0.6, guidance_scale=GUIDANCE, generator=generator()
        ).images[0]
    assert largest_difference(reused, reference) == 0


def test_inpainting_reuses_features_as_the_reference_does(core: DiffusionRenderer) -> None:
    init, mask = picture(2), square_mask()
    job = batch(item(init_image=init, mask_image=mask), strength=0.75)
    with counted(core) as calls:
        [reused] = render(core, job, INTERVAL)
    assert calls == {"whole": 3, "steps": 7}
    with reference_reuse(core, 7, INTERVAL):
        pixels = diffusers_pipeline(core, StableDiffusionInpaintPipeline)(
            **ARGUMENTS,
            image=[init],
            mask_image=[mask],
            width=SIZE,
            height=SIZE,
            strength=0.75,
            guidance_scale=GUIDANCE,
            generator=generator(),
            output_type="pt",
        ).images
    [reference] = to_images(_keep_unmasked(pixels, [init], [mask]))
    assert largest_difference(reused, reference) == 0


def test_controlnet_jobs_run_every_step_whole(core: DiffusionRenderer) -> None:
    job = batch(item(control_image=canny_map(picture(3))), control_type="canny")
    today = core.render(job)
    with counted(core) as calls:
        reused = render(core, job, INTERVAL)
    assert calls == {"whole": STEPS, "steps": STEPS}
    assert largest_difference(reused[0], today[0]) == 0


def test_adapters_apply_to_the_layers_that_run_as_the_reference_does(
    core: DiffusionRenderer,
) -> None:
    with counted(core) as calls:
        [styled] = render(core, batch(item(), loras=STYLE), INTERVAL)
    assert calls == {"whole": 4, "steps": STEPS}
    assert core.loras is not None
    core.loras.activate(STYLE)
    with core.loras.on(), reference_reuse(core, STEPS, INTERVAL):
        reference = diffusers_pipeline(core)(
            **ARGUMENTS, width=SIZE, height=SIZE, guidance_scale=GUIDANCE, generator=generator()
        ).images[0]
    assert largest_difference(styled, reference) == 0
    [plain] = render(core, batch(item()), INTERVAL)
    assert largest_difference(styled, plain) > 0


def test_a_batchs_images_each_equal_their_image_alone(core: DiffusionRenderer) -> None:
    items = [item(3), item(5), item(8)]
    together = render(core, batch(*items), INTERVAL)
    for one, image in zip(items, together, strict=True):
        [alone] = render(core, batch(one), INTERVAL)
        assert largest_difference(image, alone) <= 1


def test_compiled_feature_reuse_warms_its_graphs_and_matches_eager(
    model_cache: Path, tiny_lora_dir: Path, tmp_path: Path
) -> None:
    started = time.perf_counter()
    levers = SpeedLevers(compile=True, deepcache_interval=INTERVAL)
    renderers = []
    for lever in (levers, SpeedLevers(deepcache_interval=INTERVAL)):
        renderer = load_renderer("tiny", model_cache, "cpu", dtype="bfloat16")
        renderer.apply(lever, tmp_path / "inductor")
        renderer.use_loras(LoraRegistry(tiny_lora_dir), max_bytes=64 * 2**20, max_rank=8)
        renderers.append(renderer)
    renderer, eager = renderers
    graphs_before = counters["stats"]["unique_graphs"]
    renderer.warm_up(SIZE, SIZE, compiled_counts=(1,), max_images=1)
    # At least the whole step's graph and the shallow step's, plain and with LoRA slots on.
    assert counters["stats"]["unique_graphs"] - graphs_before >= 2
    assert renderer.compiled_variants == {(False, False), (True, False)}
    jobs = [
        batch(item()),
        batch(item(7), scheduler="euler_a"),
        batch(item(init_image=picture(1)), strength=0.6),
        batch(item(), loras=STYLE),
    ]
    for job in jobs:
        with counted_parts(renderer) as calls:
            [compiled] = renderer.render(job)
        assert calls["shallow"] > 0
        assert calls["deep"] > 0
        [reference] = eager.render(job)
        print(
            f"compiled against eager, bfloat16: mean {mean_difference(compiled, reference):.2f}, "
            f"largest {largest_difference(compiled, reference)} levels"
        )
        assert mean_difference(compiled, reference) <= BFLOAT16_MEAN_TOLERANCE
    assert renderer.recompiles == 0
    print(f"compiled feature reuse: {time.perf_counter() - started:.1f} s")


def test_the_worker_setting_is_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    assert WorkerSettings().deepcache_interval == 0
    assert SpeedLevers.for_device(torch.device("cuda")).deepcache_interval == 0
    monkeypatch.setenv("T2I_DEEPCACHE_INTERVAL", "3")
    interval = WorkerSettings().deepcache_interval
    levers = SpeedLevers.for_device(torch.device("cpu"), deepcache_interval=interval)
    assert levers == SpeedLevers(deepcache_interval=3)
    # What the worker's heartbeat reports of it.
    info = WorkerInfo(
        name="w", model="tiny", device="cpu", max_batch_images=1, levers=asdict(levers), version="0"
    )
    assert info.levers["deepcache_interval"] == 3
    assert info.levers["compile"] is False
