"""Live previews on a CUDA device in float16, on SD 1.5's architecture with random weights (no
speed lever on): previews, by the linear map or by a tiny autoencoder (TAESD's architecture,
random weights), add no host sync to the denoising loop, and what they cost at 512x512. Run on
a lent GPU (see bench/README.md) with `pytest tests/gpu/test_gpu_previews.py -s` (the
throughput prints as JSON); skipped elsewhere.

Self-contained (no fixtures from tests/conftest.py), so it runs with `pytest --noconftest`. It
reuses the SD 1.5-shaped model of `python -m bench.gpu_pipeline` when that ran first on the same
machine. With T2I_GPU_TESTS_ON_CPU=1 the same tests run on a CPU with the tiny model (the
CUDA-only checks skip): a check of the tests themselves, in seconds.
"""

import json
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderTiny

from bench.assets import DEFAULT_CACHE_DIR, build_sd15, kind_batch
from tests.gpu import DEVICE, GPU_MODULE, ON_CPU, needs_cuda
from worker.kinds import load_renderer
from worker.pipeline import DiffusionRenderer, SpeedLevers
from worker.render_types import PreviewAsk, RenderBatch
from worker.tiny_model import ensure_tiny_model

pytestmark = GPU_MODULE

SIZE = 64 if ON_CPU else 512
PREVIEW_SIZE = 64
# The settings: (every how many steps, decoded by the tiny autoencoder); None: no preview.
SETTINGS: dict[str, tuple[int, bool] | None] = {
    "off": None,
    "every_5": (5, False),
    "every_step": (1, False),
    "taesd_every_5": (5, True),
    "taesd_every_step": (1, True),
}
# CUDA runtime calls that drain the launch queue: the host waits for all the device's work.
DRAINING_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy")
# Reported beside them: FinishedSteps waits on the event of a step `lag` steps back (bounded: the
# device keeps that many queued), and pinned buffers the host allocator had no cached block for.
REPORTED_CALLS = ("cudaEventSynchronize", "cudaHostAlloc", "cudaHostRegister", "cudaFreeHost")


@pytest.fixture(scope="module")
def renderer() -> DiffusionRenderer:
    """The model in the worker's dtype for the device, eager: the UNet is the same whether or
    not previews are asked, and compiling SD 1.5 would cost minutes of a lent GPU's time."""
    cache = DEFAULT_CACHE_DIR
    model_dir = ensure_tiny_model(cache) if ON_CPU else build_sd15(cache / "sd15-random", cache)
    return load_renderer(str(model_dir), cache, DEVICE.type, SpeedLevers())


@pytest.fixture(scope="module")
def tiny_autoencoder(renderer: DiffusionRenderer) -> AutoencoderTiny:
    """TAESD's architecture (diffusers' AutoencoderTiny defaults) with random weights, in the
    core's dtype on its device: what T2I_PREVIEW_VAE=madebyollin/taesd costs."""
    torch.manual_seed(0)
    return AutoencoderTiny().to(renderer.device, renderer.dtype).eval()


@contextmanager
def previews_of(
    renderer: DiffusionRenderer, setting: str, autoencoder: AutoencoderTiny
) -> Iterator[None]:
    """The renderer decoding previews as `setting` says, for the duration."""
    asked = SETTINGS[setting]
    renderer.preview_vae = autoencoder if asked is not None and asked[1] else None
    try:
        yield
    finally:
        renderer.preview_vae = None


def job(setting: str, images: int, steps: int) -> RenderBatch:
    plain = kind_batch("plain", tuple(range(1, images + 1)), SIZE, steps)
    asked = SETTINGS[setting]
    ask = None if asked is None else PreviewAsk(asked[0], PREVIEW_SIZE)
    return replace(plain, items=tuple(replace(item, preview=ask) for item in plain.items))


class Previews:
    def __init__(self) -> None:
        self.steps: list[int] = []

    def __call__(self, step: int, total: int, images: dict) -> None:
        assert all(image.size == (PREVIEW_SIZE, PREVIEW_SIZE) for image in images.values())
        self.steps.append(step)


def expected_steps(setting: str, steps: int) -> list[int]:
    asked = SETTINGS[setting]
    return [] if asked is None else list(range(asked[0], steps + 1, asked[0]))


def render(
    renderer: DiffusionRenderer,
    setting: str,
    autoencoder: AutoencoderTiny,
    batch: RenderBatch,
    on_step: Callable[[int, int], None] | None = None,
) -> Previews:
    previews = Previews()
    with previews_of(renderer, setting, autoencoder):
        images = renderer.render(batch, on_step, previews)
    assert len(images) == len(batch.items)
    return previews


@needs_cuda
@pytest.mark.parametrize("setting", ["off", "every_5", "every_step", "taesd_every_step"])
def test_no_host_sync_between_denoising_steps(
    renderer: DiffusionRenderer, tiny_autoencoder: AutoencoderTiny, setting: str
) -> None:
    """As tests/gpu/test_gpu_pipeline.py checks it without previews: from the first finished
    step to the last, a device-to-host sync raises; previews' copies to pinned memory do not.
    A render first, as a warm worker had one: the linear map is fitted (a sync, once) at a
    renderer's first preview."""
    batch = job(setting, 2, 10)
    render(renderer, setting, tiny_autoencoder, batch)

    def on_step(step: int, total: int) -> None:
        torch.cuda.set_sync_debug_mode("error" if step < total else "default")

    try:
        previews = render(renderer, setting, tiny_autoencoder, batch, on_step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert previews.steps == expected_steps(setting, 10)


def runtime_calls(
    renderer: DiffusionRenderer, setting: str, autoencoder: AutoencoderTiny, steps: int
) -> Counter[str]:
    """The CUDA runtime calls of one render of `steps` steps, by name, as the profiler saw them."""
    from torch.profiler import ProfilerActivity, profile

    batch = job(setting, 2, steps)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        previews = render(renderer, setting, autoencoder, batch)
    assert previews.steps == expected_steps(setting, steps)
    return Counter({event.key: event.count for event in profiler.key_averages()})


@needs_cuda
@pytest.mark.parametrize("setting", ["off", "every_step", "taesd_every_step"])
def test_syncs_do_not_grow_with_the_steps(
    renderer: DiffusionRenderer, tiny_autoencoder: AutoencoderTiny, setting: str
) -> None:
    """Whatever syncs a render has (the text encoder's, the final decode's copy to the host),
    12 steps have no more than 4: none is per step. Counted from the CUDA runtime calls the
    profiler records, so it sees syncs the sync debug mode does not flag."""
    render(renderer, setting, tiny_autoencoder, job(setting, 2, 4))
    few = runtime_calls(renderer, setting, tiny_autoencoder, 4)
    many = runtime_calls(renderer, setting, tiny_autoencoder, 12)
    launches = sum(count for name, count in many.items() if name.startswith("cudaLaunch"))
    assert launches > 0, "the profiler recorded no CUDA runtime call"
    print(
        json.dumps(
            {
                "setting": setting,
                "calls_at_4_steps": {name: few[name] for name in DRAINING_CALLS + REPORTED_CALLS},
                "calls_at_12_steps": {name: many[name] for name in DRAINING_CALLS + REPORTED_CALLS},
            }
        )
    )
    assert {name: many[name] for name in DRAINING_CALLS} == {
        name: few[name] for name in DRAINING_CALLS
    }
    # At most one wait a step, each on a step `lag` behind the host, never the newest.
    assert many["cudaEventSynchronize"] - few["cudaEventSynchronize"] <= 12 - 4


def test_throughput_with_previews_off_every_5_steps_and_every_step(
    renderer: DiffusionRenderer, tiny_autoencoder: AutoencoderTiny
) -> None:
    """Images/s of a batch of 4 at SIZE, 20 steps, guided, with each setting, the settings'
    order rotating from round to round; printed as JSON. Asserts only that each rendered."""
    images, steps, rounds = (2, 5, 2) if ON_CPU else (4, 20, 3)
    batches = {name: job(name, images, steps) for name in SETTINGS}
    for name, batch in batches.items():
        render(renderer, name, tiny_autoencoder, batch)
    seconds: dict[str, list[float]] = {name: [] for name in SETTINGS}
    names = list(SETTINGS)
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            previews = render(renderer, name, tiny_autoencoder, batches[name])
            seconds[name].append(time.perf_counter() - started)
            assert previews.steps == expected_steps(name, steps)
    throughput = {name: images / statistics.median(values) for name, values in seconds.items()}
    off = throughput["off"]
    print(
        json.dumps(
            {
                "images_per_s": {name: round(value, 3) for name, value in throughput.items()},
                "overhead_pct_vs_off": {
                    name: round((off / value - 1) * 100, 1) for name, value in throughput.items()
                },
                "render_s_by_round": {
                    name: [round(s, 3) for s in values] for name, values in seconds.items()
                },
                "config": {
                    "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
                    "model": "tiny" if ON_CPU else "SD 1.5 architecture, random weights",
                    "dtype": str(renderer.dtype),
                    "levers": "none (eager)",
                    "images_per_batch": images,
                    "size": f"{SIZE}x{SIZE}",
                    "steps": steps,
                    "scheduler": "dpmpp_2m",
                    "preview_max_size": PREVIEW_SIZE,
                    "taesd": "AutoencoderTiny defaults, random weights",
                    "rounds": rounds,
                    "torch": torch.__version__,
                },
            },
            indent=2,
        )
    )
