"""The fp16 pipeline on a CUDA device: run on a lent GPU (see bench/README.md); skipped elsewhere.

Self-contained (no fixtures from tests/conftest.py), so it runs with `pytest --noconftest` on a
machine without Redis or boto3. It reuses the benchmark's model and compile cache when the
benchmark ran first on the same machine.
"""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from worker.executor import GpuExecutor, RenderJob
from worker.kinds import load_renderer
from worker.pipeline import (
    DiffusionRenderer,
    NonFiniteImage,
    RenderBatch,
    RenderItem,
    SpeedLevers,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SIZE = 512
# fp16 kernels differ with batch size and with compilation; a few levels in 255 is noise.
FP16_TOLERANCE = 8
SCHEDULERS = ["dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_a", "ddim", "pndm", "lms", "unipc"]
# diffusers' UniPC copies host values to the device with a blocking copy in every step (seen with
# diffusers 0.42.1); strict, so a release that fixes it shows up here.
UNIPC_SYNCS = pytest.mark.xfail(
    strict=True, raises=RuntimeError, reason="UniPC's step copies its sigmas to the device"
)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    """SD 1.5's architecture with random weights, where the benchmark builds it."""
    from bench.assets import DEFAULT_CACHE_DIR, build_sd15

    return build_sd15(DEFAULT_CACHE_DIR / "sd15-random", DEFAULT_CACHE_DIR)


@pytest.fixture(scope="module")
def eager(model_dir: Path) -> DiffusionRenderer:
    return load_renderer(str(model_dir), model_dir.parent, "cuda", SpeedLevers())


def batch(*seeds: int, steps: int = 8, size: int = SIZE, scheduler: str = "dpmpp_2m"):
    return RenderBatch(
        items=tuple(RenderItem(f"a lighthouse, seed {seed}", "blurry", seed) for seed in seeds),
        width=size,
        height=size,
        num_inference_steps=steps,
        guidance_scale=7.5,
        scheduler=scheduler,
    )


def array(image) -> np.ndarray:
    assert not isinstance(image, NonFiniteImage)
    return np.asarray(image, dtype=np.int16)


def max_difference(first: list, second: list) -> int:
    assert len(first) == len(second)
    return max(int(np.abs(array(a) - array(b)).max()) for a, b in zip(first, second, strict=True))


def test_fp16_pipeline_renders_on_the_gpu(eager: DiffusionRenderer) -> None:
    assert eager.pipeline.unet.dtype == torch.float16
    assert eager.device.type == "cuda"
    [image] = eager.render(batch(1))
    assert image.size == (SIZE, SIZE)
    assert array(image).std() > 0


def test_batched_equals_unbatched_within_fp16_tolerance(eager: DiffusionRenderer) -> None:
    together = eager.render(batch(1, 2, 3))
    alone = [eager.render(batch(seed))[0] for seed in (1, 2, 3)]
    assert max_difference(together, alone) <= FP16_TOLERANCE
    assert max_difference(together[:1], together[1:2]) > FP16_TOLERANCE


@pytest.fixture
def cuda_graph_recordings(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts CUDA graph recordings by inductor's graph trees, from any thread."""
    from torch._inductor.cudagraph_trees import CUDAGraphTreeManager

    recordings: list[int] = []
    record = CUDAGraphTreeManager.record_function

    def counted(self, *args, **kwargs):
        recordings.append(1)
        return record(self, *args, **kwargs)

    monkeypatch.setattr(CUDAGraphTreeManager, "record_function", counted)
    return recordings


@pytest.fixture
def compiled(model_dir: Path, cuda_graph_recordings: list[int]) -> Iterator[GpuExecutor]:
    """The worker's set-up: every lever on, warmed for one image on the executor's thread (after
    the main thread imported inductor's CUDA graph trees, which older torch could not handle)."""
    fast = load_renderer(
        str(model_dir), model_dir.parent, "cuda", SpeedLevers.for_device(torch.device("cuda"))
    )
    executor = GpuExecutor(
        fast.render,
        max_batch_images=2,
        key=fast.batch_key,
        warm_up=lambda: fast.warm_up(SIZE, SIZE, compiled_counts=(1,), max_images=2),
    )
    executor.wait_ready(timeout=600)
    assert cuda_graph_recordings, "warming up a compiled UNet records its CUDA graph"
    cuda_graph_recordings.clear()
    yield executor
    executor.shutdown()


def test_compiled_renders_on_the_executor_thread_without_recording_again(
    compiled: GpuExecutor, eager: DiffusionRenderer, cuda_graph_recordings: list[int]
) -> None:
    def render(job: RenderBatch) -> list:
        return compiled.submit(RenderJob(job)).result(timeout=300).images

    # The warmed shape replays its graph; other shapes render eager, and right.
    for seeds in [(1,), (2, 3), (4,)]:
        assert max_difference(render(batch(*seeds)), eager.render(batch(*seeds))) <= (
            FP16_TOLERANCE
        )
    odd = batch(7, size=384)
    assert max_difference(render(odd), eager.render(odd)) <= FP16_TOLERANCE
    assert cuda_graph_recordings == []


@pytest.mark.parametrize(
    "scheduler",
    [pytest.param(name, marks=UNIPC_SYNCS) if name == "unipc" else name for name in SCHEDULERS],
)
def test_no_host_sync_between_denoising_steps(eager: DiffusionRenderer, scheduler: str) -> None:
    """A sync per step (an .item(), a copy from pageable host memory) stalls the launch queue;
    the loop has none, with any scheduler (ancestral ones draw their noise on the device)."""

    def on_step(step: int, total: int) -> None:
        # From the first finished step to the last, a device-to-host sync raises.
        torch.cuda.set_sync_debug_mode("error" if step < total else "default")

    try:
        [image] = eager.render(batch(1, steps=8, scheduler=scheduler), on_step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert image.size == (SIZE, SIZE)
