"""The render core on a CUDA device in float16 with every speed lever on (compiled UNet, CUDA
graphs, fused projections), LoRA slots and a canny ControlNet: a mixed sequence of every kind of
job through the executor keeps the core's invariants, and no kind syncs the host between steps.
Run on a lent GPU (see bench/README.md); skipped elsewhere.

One model family per run: SD 1.5 at 512x512, or with T2I_GPU_FAMILY=sdxl SDXL base's architecture
at 768x768, not its 1024x1024: the compiles (three UNet variants and the VAE) take about as long
at any size, but the renders (two dozen, each decoded by SDXL's VAE in float32) cost about half
of 1024's, to keep the SDXL run, with the builds on a cold cache, within one 10-minute device
call (a guess: no SDXL run of these tests has been timed on a card yet).

Self-contained (no fixtures from tests/conftest.py), so it runs with `pytest --noconftest`. It
reuses the family's model (`<cache>/sd15-random`, `<cache>/sdxl-random`), adapters, ControlNet
and compile cache of `python -m bench.gpu_pipeline` (`--mixed`, `--family sdxl`) when that ran
first on the same machine. With T2I_GPU_TESTS_ON_CPU=1 the same tests run on a CPU with the
family's tiny model and the levers a CPU gets (the CUDA-only checks skip): a check of the tests
themselves, in seconds.
"""

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.assets import (
    DEFAULT_CACHE_DIR,
    Customization,
    bench_model,
    customization,
    kind_batch,
    load_customized,
)
from bench.gpu_pipeline import count_and_clear, cuda_graph_recordings
from shared.families import FAMILIES, SDXL
from tests.gpu import DEVICE, GPU_MODULE, ON_CPU, needs_cuda
from tests.gpu.test_gpu_pipeline import FP16_TOLERANCE
from worker.executor import GpuExecutor, RenderJob
from worker.pipeline import DiffusionRenderer, NonFiniteImage, RenderBatch, SpeedLevers
from worker.render_types import StepCallback

pytestmark = GPU_MODULE

_FAMILY_NAME = os.environ.get("T2I_GPU_FAMILY", "sd15")
if _FAMILY_NAME not in FAMILIES:
    raise ValueError(f"T2I_GPU_FAMILY={_FAMILY_NAME!r}: one of {sorted(FAMILIES)}")
FAMILY = FAMILIES[_FAMILY_NAME]
SIZE = 64 if ON_CPU else {"sd15": 512, "sdxl": 768}[FAMILY.name]
STEPS = 8
# The same request on the same kernels: equal, or a rounding step apart.
SAME = 1
# What an adapter at full scale does to an image: far more than any rounding.
LORA_EFFECT = 32


def array(image: object) -> np.ndarray:
    assert not isinstance(image, NonFiniteImage)
    return np.asarray(image, dtype=np.int16)


def max_difference(first: list, second: list) -> int:
    assert len(first) == len(second)
    return max(int(np.abs(array(a) - array(b)).max()) for a, b in zip(first, second, strict=True))


@pytest.fixture(scope="module")
def assets() -> tuple[Path, Customization]:
    """The family's model and its adapters and ControlNet, where the benchmark builds them."""
    cache = DEFAULT_CACHE_DIR
    model_dir = bench_model(FAMILY.name, cache, None if ON_CPU else cache / f"{FAMILY.name}-random")
    return model_dir, customization(model_dir, cache, tiny=ON_CPU, family=FAMILY.name)


@pytest.fixture(scope="module")
def eager(assets: tuple[Path, Customization]) -> DiffusionRenderer:
    """The same modules, adapters and ControlNet with no speed lever on."""
    model_dir, custom = assets
    return load_customized(model_dir, DEFAULT_CACHE_DIR, DEVICE.type, SpeedLevers(), custom)


@dataclass
class Worker:
    renderer: DiffusionRenderer
    executor: GpuExecutor
    # CUDA graphs recorded since the warm-up ended; None off CUDA.
    recordings: list[int] | None

    def render(self, batch: RenderBatch, on_step: StepCallback | None = None) -> list:
        return self.executor.submit(RenderJob(batch, on_step)).result(timeout=300).images


@pytest.fixture(scope="module")
def worker(assets: tuple[Path, Customization]) -> Iterator[Worker]:
    """The worker's set-up: every lever on for the device, LoRA slots and the ControlNet, warmed
    for one image on the executor's thread."""
    model_dir, custom = assets
    levers = SpeedLevers.for_device(DEVICE, fuse_qkv=True)
    with cuda_graph_recordings(DEVICE) as recordings:
        renderer = load_customized(model_dir, DEFAULT_CACHE_DIR, DEVICE.type, levers, custom)
        executor = GpuExecutor(
            renderer.render,
            max_batch_images=2,
            key=renderer.batch_key,
            warm_up=lambda: renderer.warm_up(SIZE, SIZE, compiled_counts=(1,), max_images=2),
        )
        try:
            executor.wait_ready(timeout=600)
            # Warm-up renders left for idle time would run beside the tests' eager renders.
            executor.wait_fully_warm(timeout=600)
            warm_up_recordings = count_and_clear(recordings)
            if DEVICE.type == "cuda":
                assert warm_up_recordings, "warming up a compiled UNet records its CUDA graphs"
            yield Worker(renderer, executor, recordings)
        finally:
            executor.shutdown()


def sequence(custom: Customization) -> list[tuple[str, RenderBatch]]:
    """Every kind of job, in an order that swaps adapters and repeats requests; the unguided
    two-image PNDM job's UNet batch has the shapes of the guided one-image graph."""
    first, second = custom.adapters

    def job(kind: str, seed: int = 1, adapter: str | None = None) -> RenderBatch:
        return kind_batch(kind, (seed,), SIZE, STEPS, adapter=adapter)

    unguided = kind_batch("plain", (4, 5), SIZE, STEPS, guidance_scale=1.0, scheduler="pndm")
    return [
        ("plain", job("plain")),
        ("lora-a", job("lora", adapter=first)),
        ("image-to-image", job("image-to-image", 2)),
        ("controlnet", job("controlnet", 3)),
        ("lora-b", job("lora", adapter=second)),
        ("lora-a", job("lora", adapter=first)),
        ("plain", job("plain")),
        ("unguided-pndm", unguided),
        ("inpainting", job("inpainting", 6)),
        ("plain", job("plain")),
    ]


@dataclass
class MixedRun:
    jobs: list[tuple[str, RenderBatch]]
    images: list[list]
    dtypes_before: dict[str, str]
    dtypes_after: dict[str, str]
    variants: set[tuple[bool, bool]]
    recompiles: int
    recordings: int | None
    swaps: int

    def rendered(self, name: str) -> list[list]:
        """The images of each job of that name, in order."""
        return [
            images for (job, _), images in zip(self.jobs, self.images, strict=True) if job == name
        ]

    def batch(self, name: str) -> RenderBatch:
        return next(batch for job, batch in self.jobs if job == name)


@pytest.fixture(scope="module")
def mixed_run(worker: Worker, assets: tuple[Path, Customization]) -> MixedRun:
    """The sequence through the executor, one job at a time, and what it left behind."""
    renderer = worker.renderer
    assert renderer.loras is not None
    jobs = sequence(assets[1])
    dtypes_before = renderer.module_dtypes()
    swaps = renderer.loras.swaps
    images = [worker.render(batch) for _, batch in jobs]
    return MixedRun(
        jobs=jobs,
        images=images,
        dtypes_before=dtypes_before,
        dtypes_after=renderer.module_dtypes(),
        variants=renderer.compiled_variants,
        recompiles=renderer.recompiles,
        recordings=count_and_clear(worker.recordings),
        swaps=renderer.loras.swaps - swaps,
    )


def test_every_module_keeps_its_dtype(mixed_run: MixedRun) -> None:
    on_cuda = DEVICE.type == "cuda"
    expected = {name: "float16" if on_cuda else "float32" for name in mixed_run.dtypes_before}
    if on_cuda and FAMILY is SDXL:
        # SDXL's VAE overflows to NaN in float16 (its config says force_upcast).
        expected["vae"] = "float32"
    assert "controlnet:canny" in mixed_run.dtypes_before
    assert ("text_encoder_2" in mixed_run.dtypes_before) == (FAMILY is SDXL)
    assert mixed_run.dtypes_before == expected
    assert mixed_run.dtypes_after == mixed_run.dtypes_before


def test_nothing_compiles_or_records_a_cuda_graph_after_warm_up(mixed_run: MixedRun) -> None:
    assert mixed_run.recompiles == 0
    if DEVICE.type == "cuda":
        # Warmed, as (LoRA slots on, ControlNet residuals): plain, LoRA, ControlNet.
        assert mixed_run.variants == {(False, False), (True, False), (False, True)}
        assert mixed_run.recordings == 0


@pytest.mark.parametrize("name", ["plain", "lora-a"])
def test_the_same_request_gives_the_same_image_wherever_it_falls(
    mixed_run: MixedRun, name: str
) -> None:
    first, *again = mixed_run.rendered(name)
    differences = [max_difference(images, first) for images in again]
    assert differences
    assert max(differences) <= SAME, differences


def test_adapters_change_the_image_and_swap_in_their_slots(mixed_run: MixedRun) -> None:
    [plain, *_] = mixed_run.rendered("plain")
    [style, *_] = mixed_run.rendered("lora-a")
    [other] = mixed_run.rendered("lora-b")
    assert max_difference(style, plain) > LORA_EFFECT
    assert max_difference(other, style) > LORA_EFFECT
    # A, then B, then A again: copied into the slots three times, or twice where A was there
    # already (from a test that ran earlier).
    assert mixed_run.swaps >= 2


@pytest.mark.parametrize(
    "name",
    ["unguided-pndm", "plain", "lora-a", "lora-b", "image-to-image", "controlnet", "inpainting"],
)
def test_each_job_matches_the_eager_render(
    mixed_run: MixedRun, eager: DiffusionRenderer, name: str
) -> None:
    """Compiled (and replayed from CUDA graphs) as eager within fp16 noise: the unguided PNDM
    job's outputs are copied off the graph before the next replay overwrites them, and the
    adapters swapped into the slots are the ones the graphs read."""
    [rendered, *_] = mixed_run.rendered(name)
    assert max_difference(rendered, eager.render(mixed_run.batch(name))) <= FP16_TOLERANCE


@needs_cuda
@pytest.mark.parametrize("path", ["eager", "worker"])
@pytest.mark.parametrize("kind", ["image-to-image", "inpainting", "controlnet", "lora"])
def test_no_host_sync_between_denoising_steps(
    request: pytest.FixtureRequest, assets: tuple[Path, Customization], kind: str, path: str
) -> None:
    """As tests/gpu/test_gpu_pipeline.py checks it for text-to-image with each scheduler: from
    the first finished step to the last, a device-to-host sync raises."""
    adapter = assets[1].adapters[0] if kind == "lora" else None
    batch = kind_batch(kind, (1,), SIZE, STEPS, adapter=adapter)
    steps: list[tuple[int, int]] = []

    def on_step(step: int, total: int) -> None:
        steps.append((step, total))
        torch.cuda.set_sync_debug_mode("error" if step < total else "default")

    renderer = request.getfixturevalue(path)
    try:
        [image] = renderer.render(batch, on_step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert image.size == (SIZE, SIZE)
    [total] = {total for _, total in steps}
    assert total > 1
    assert [step for step, _ in steps] == list(range(1, total + 1))
