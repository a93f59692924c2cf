"""The fp16 pipeline on a CUDA device: run on a lent GPU (see bench/README.md); skipped elsewhere.

Self-contained (no fixtures from tests/conftest.py), so it runs with `pytest --noconftest` on a
machine without Redis or boto3.
"""

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from worker.pipeline import (
    DiffusionRenderer,
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


@pytest.fixture(scope="module")
def model_dir() -> Iterator[Path]:
    """SD 1.5's architecture with random weights, as the benchmark builds it."""
    from bench.gpu_pipeline import build_sd15

    with tempfile.TemporaryDirectory() as directory:
        yield build_sd15(Path(directory) / "sd15-random", Path(directory))


@pytest.fixture(scope="module")
def eager(model_dir: Path) -> DiffusionRenderer:
    return DiffusionRenderer.load(str(model_dir), model_dir.parent, "cuda", SpeedLevers())


def batch(*seeds: int, steps: int = 8, size: int = SIZE) -> RenderBatch:
    return RenderBatch(
        items=tuple(RenderItem(f"a lighthouse, seed {seed}", "blurry", seed) for seed in seeds),
        width=size,
        height=size,
        num_inference_steps=steps,
        guidance_scale=7.5,
        scheduler="dpmpp_2m",
    )


def array(image) -> np.ndarray:
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


def test_compiled_equals_eager_within_tolerance(model_dir: Path, eager: DiffusionRenderer) -> None:
    fast = DiffusionRenderer.load(
        str(model_dir),
        model_dir.parent,
        "cuda",
        SpeedLevers.for_device(torch.device("cuda")),
    )
    # One warmed shape, one compile (about a minute); other shapes must render eager, and right.
    fast.warm_up(SIZE, SIZE, image_counts=(1,))
    for seeds in [(1,), (2, 3)]:
        assert max_difference(fast.render(batch(*seeds)), eager.render(batch(*seeds))) <= (
            FP16_TOLERANCE
        )
    odd = batch(7, size=384)
    assert max_difference(fast.render(odd), eager.render(odd)) <= FP16_TOLERANCE


def test_no_host_sync_between_denoising_steps(eager: DiffusionRenderer) -> None:
    """A sync per step (an .item(), a CPU tensor) stalls the launch queue; the loop has none."""

    def on_step(step: int, total: int) -> None:
        # From the end of step 1 to the end of the last step, a device-to-host sync raises.
        torch.cuda.set_sync_debug_mode("error" if step < total else "default")

    try:
        [image] = eager.render(batch(1, steps=6), on_step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert image.size == (SIZE, SIZE)
