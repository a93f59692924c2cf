"""Live previews from the render core at step boundaries, with the real tiny pipeline on this
CPU: which steps and items get one, that they match the image they preview (the tiny model's
passthrough VAE makes the fitted latent-to-RGB map exact), that they change nothing else, and
that the GPU executor hands each job of a batch its own; and previews decoded by a tiny
autoencoder (T2I_PREVIEW_VAE=tiny: a random AutoencoderTiny, TAESD's architecture)."""

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.settings import WorkerSettings
from tests.unit.test_finished_steps import DeviceClock
from worker.executor import GpuExecutor, RenderCanceled, RenderJob
from worker.kinds import load_renderer
from worker.pipeline import DiffusionRenderer, FinishedSteps, SpeedLevers, StepReporter
from worker.render_types import PreviewAsk, RenderBatch, RenderItem

# The last preview against the final image at the preview's size, in mean absolute levels.
# Measured 0.04 (the passthrough VAE's decode is linear, so the fitted map is exact up to
# rounding); the margin covers rounding of another torch build.
LAST_PREVIEW_MEAN_DIFF = 1.0
# The same in bfloat16, compiled: 8 bits of mantissa in the latents the map reads.
LAST_PREVIEW_MEAN_DIFF_BF16 = 3.0


def batch(*items: RenderItem, size: int, steps: int, guidance: float = 7.5) -> RenderBatch:
    return RenderBatch(
        items=items,
        width=size,
        height=size,
        num_inference_steps=steps,
        guidance_scale=guidance,
        scheduler="dpmpp_2m",
    )


def mean_difference(preview: Image.Image, final: Image.Image) -> float:
    reference = final.resize(preview.size, Image.Resampling.BOX)
    return float(np.abs(np.asarray(preview, np.int16) - np.asarray(reference, np.int16)).mean())


@dataclass
class Previews:
    """What on_preview was called with, in order."""

    calls: list[tuple[int, int, dict]] = field(default_factory=list)

    def __call__(self, step: int, total: int, images: dict) -> None:
        self.calls.append((step, total, images))


@pytest.fixture(scope="module", params=["tiny", "tiny-xl"], ids=["sd15", "sdxl"])
def renderer(model_cache: Path, request: pytest.FixtureRequest) -> DiffusionRenderer:
    """The tiny model of each family: previews come the same way from both."""
    return load_renderer(request.param, model_cache, "cpu")


@dataclass
class Rendered:
    images: list
    previews: Previews
    unet_calls: int


# The batch most tests render: 8 steps at 256x256, its first item asking for a preview every 2
# steps at 64 pixels, the other none. Unguided: half the UNet's work, on a CPU.
ASKING = batch(
    RenderItem("a lighthouse", "", 11, preview=PreviewAsk(2, 64)),
    RenderItem("a harbour", "", 12),
    size=256,
    steps=8,
    guidance=1.0,
)
PLAIN = replace(ASKING, items=tuple(replace(item, preview=None) for item in ASKING.items))


@pytest.fixture(scope="module")
def rendered(renderer: DiffusionRenderer) -> dict[str, Rendered]:
    """ASKING rendered without any preview asked, then with them. Without previews first: the
    core must not even fit its preview map then."""
    asking, plain = ASKING, PLAIN
    calls = [0]

    def count(*_: object) -> None:
        calls[0] += 1

    hook = renderer.pipeline.unet.register_forward_pre_hook(count)
    results = {}
    try:
        for name, render in [("off", plain), ("on", asking)]:
            calls[0] = 0
            previews = Previews()
            images = renderer.render(render, None, previews)
            results[name] = Rendered(images, previews, calls[0])
            if name == "off":
                assert renderer._preview_weights is None, "previews off fitted the preview map"
    finally:
        hook.remove()
    return results


def test_an_item_gets_its_previews_at_its_steps_and_the_last_matches_the_image(
    rendered: dict[str, Rendered],
) -> None:
    on = rendered["on"]
    firsts = [(step, total, images[0]) for step, total, images in on.previews.calls if 0 in images]
    assert [(step, total) for step, total, _ in firsts] == [(2, 8), (4, 8), (6, 8), (8, 8)]
    for _, _, preview in firsts:
        assert preview.mode == "RGB"
        assert preview.size == (64, 64)
    assert mean_difference(firsts[-1][2], on.images[0]) <= LAST_PREVIEW_MEAN_DIFF
    # Earlier previews show an image still changing.
    assert mean_difference(firsts[0][2], on.images[0]) > LAST_PREVIEW_MEAN_DIFF


def test_items_of_one_batch_get_only_the_previews_they_ask_for(
    rendered: dict[str, Rendered],
) -> None:
    on = rendered["on"]
    assert [(step, sorted(images)) for step, _, images in on.previews.calls] == [
        (2, [0]),
        (4, [0]),
        (6, [0]),
        (8, [0]),
    ]


def test_previews_do_not_change_the_images(rendered: dict[str, Rendered]) -> None:
    for with_previews, without in zip(rendered["on"].images, rendered["off"].images, strict=True):
        assert np.array_equal(np.asarray(with_previews), np.asarray(without))


def test_with_no_preview_asked_nothing_is_called_and_the_unet_runs_as_often(
    rendered: dict[str, Rendered],
) -> None:
    assert rendered["off"].previews.calls == []
    assert rendered["off"].unet_calls == rendered["on"].unet_calls == 8


def test_the_linear_map_is_the_default(renderer: DiffusionRenderer) -> None:
    assert WorkerSettings().preview_vae is None
    assert renderer.preview_vae is None
    assert renderer._preview_weights is not None  # fitted by the render with previews
    assert "preview_vae" not in renderer.module_dtypes()


@dataclass
class TinyAutoencoderRender:
    renderer: DiffusionRenderer
    images: list
    previews: Previews
    # The latents the tiny autoencoder's decoder was given at each preview, and those the
    # model's VAE decoded the images from.
    decoded: list[torch.Tensor]
    final_latents: torch.Tensor


@pytest.fixture(scope="module")
def tiny_autoencoder(model_cache: Path, renderer: DiffusionRenderer) -> TinyAutoencoderRender:
    """ASKING rendered by a core of the same model whose previews the tiny autoencoder
    decodes."""
    renderer = load_renderer(renderer.model_name, model_cache, "cpu", preview_vae="tiny")
    assert renderer.preview_vae is not None
    decoded: list[torch.Tensor] = []
    finals: list[torch.Tensor] = []
    hook = renderer.preview_vae.decoder.register_forward_pre_hook(
        lambda _, inputs: decoded.append(inputs[0].clone())
    )
    decode = renderer.decode

    def keep_latents(latents: torch.Tensor) -> torch.Tensor:
        finals.append(latents.clone())
        return decode(latents)

    renderer.decode = keep_latents  # type: ignore[method-assign]
    try:
        previews = Previews()
        images = renderer.render(ASKING, None, previews)
    finally:
        hook.remove()
        del renderer.decode
    return TinyAutoencoderRender(renderer, images, previews, decoded, finals[0])


def test_the_tiny_autoencoder_previews_an_item_at_its_steps_at_its_size(
    tiny_autoencoder: TinyAutoencoderRender,
) -> None:
    calls = tiny_autoencoder.previews.calls
    assert [(step, total, sorted(images)) for step, total, images in calls] == [
        (2, 8, [0]),
        (4, 8, [0]),
        (6, 8, [0]),
        (8, 8, [0]),
    ]
    for _, _, images in calls:
        assert images[0].mode == "RGB"
        assert images[0].size == (64, 64)
    # A random decoder, but not a blank one, and the previews change as the image does.
    first, last = (np.asarray(calls[index][2][0], np.int16) for index in (0, -1))
    assert last.std() > 0
    assert np.abs(first - last).mean() > 0
    # The linear map was never needed.
    assert tiny_autoencoder.renderer._preview_weights is None


def test_the_tiny_autoencoder_decodes_only_the_rows_due_from_the_latents_as_they_are(
    tiny_autoencoder: TinyAutoencoderRender,
) -> None:
    """Only the asking row is decoded, at each step due; the latents go in as the UNet made
    them, divided by the autoencoder's own scaling factor (1.0, as TAESD's), never the model
    VAE's: at the last step they are the latents the image was decoded from."""
    decoded = tiny_autoencoder.decoded
    assert len(decoded) == 4
    assert {tuple(latents.shape) for latents in decoded} == {(1, 4, 32, 32)}
    vae = tiny_autoencoder.renderer.preview_vae
    assert vae is not None and vae.config.scaling_factor == 1.0
    assert torch.equal(decoded[-1], tiny_autoencoder.final_latents[0:1])


def test_the_tiny_autoencoder_does_not_change_the_images(
    tiny_autoencoder: TinyAutoencoderRender, rendered: dict[str, Rendered]
) -> None:
    for with_previews, without in zip(tiny_autoencoder.images, rendered["off"].images, strict=True):
        assert np.array_equal(np.asarray(with_previews), np.asarray(without))


def test_the_tiny_autoencoder_is_listed_with_its_dtype(
    tiny_autoencoder: TinyAutoencoderRender,
) -> None:
    assert tiny_autoencoder.renderer.module_dtypes()["preview_vae"] == "float32"


@pytest.fixture
def executor(renderer: DiffusionRenderer) -> Iterator[GpuExecutor]:
    executor = GpuExecutor(renderer.render, max_batch_images=8, batch_wait_s=0.5)
    yield executor
    executor.shutdown()


class JobPreviews:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[int, int, list]] = []
        self.thread: set[str] = set()
        self.fail = fail

    def __call__(self, step: int, total: int, images: list) -> None:
        self.calls.append((step, total, images))
        self.thread.add(threading.current_thread().name)
        if self.fail:
            raise RuntimeError("a preview callback that breaks")


def test_jobs_batched_together_each_get_their_own_previews(executor: GpuExecutor) -> None:
    """Five items of four jobs in one batch; the items that ask are not one run of rows (the
    third job asks none), and the last job asks at another pace, and size."""
    ask = PreviewAsk(1, 32)
    first, second, broken = JobPreviews(), JobPreviews(), JobPreviews(fail=True)
    jobs = [
        RenderJob(batch(RenderItem("red", "", 1, preview=ask), size=64, steps=3), on_preview=first),
        RenderJob(
            batch(
                RenderItem("green", "", 2, preview=ask),
                RenderItem("blue", "", 3, preview=ask),
                size=64,
                steps=3,
            ),
            on_preview=second,
        ),
        # A job that asks none, and one whose callback raises: neither disturbs the others.
        RenderJob(batch(RenderItem("grey", "", 4), size=64, steps=3), on_preview=JobPreviews()),
        RenderJob(
            batch(RenderItem("black", "", 5, preview=PreviewAsk(2, 16)), size=64, steps=3),
            on_preview=broken,
        ),
    ]
    futures = [executor.submit(job) for job in jobs]
    outcomes = [future.result(timeout=120) for future in futures]
    assert {outcome.batch_id for outcome in outcomes} == {outcomes[0].batch_id}
    assert [outcome.batch_images for outcome in outcomes] == [5, 5, 5, 5]

    for previews, outcome in [(first, outcomes[0]), (second, outcomes[1])]:
        assert [(step, total) for step, total, _ in previews.calls] == [(1, 3), (2, 3), (3, 3)]
        assert previews.thread == {"gpu-executor"}
        last = previews.calls[-1][2]
        assert len(last) == len(outcome.images)
        for preview, image in zip(last, outcome.images, strict=True):
            assert preview.size == (32, 32)
            assert mean_difference(preview, image) <= LAST_PREVIEW_MEAN_DIFF
    assert [(step, len(images)) for step, _, images in broken.calls] == [(2, 1)]
    assert broken.calls[0][2][0].size == (16, 16)
    assert jobs[2].on_preview.calls == []  # type: ignore[union-attr]
    # Each job has its own pictures, not its neighbour's.
    assert mean_difference(first.calls[-1][2][0], outcomes[1].images[0]) > 5


def test_a_job_canceled_mid_render_gets_no_more_previews(executor: GpuExecutor) -> None:
    ask = PreviewAsk(1, 16)
    canceled = threading.Event()

    def on_step(step: int, total: int) -> None:
        if step == 2:
            canceled.set()

    doomed, kept = JobPreviews(), JobPreviews()
    doomed_job = RenderJob(
        batch(RenderItem("doomed", "", 1, preview=ask), size=64, steps=5),
        on_step=on_step,
        is_canceled=canceled.is_set,
        on_preview=doomed,
    )
    kept_job = RenderJob(
        batch(RenderItem("kept", "", 2, preview=ask), size=64, steps=5), on_preview=kept
    )
    futures = [executor.submit(doomed_job), executor.submit(kept_job)]
    with pytest.raises(RenderCanceled):
        futures[0].result(timeout=120)
    assert futures[1].result(timeout=120).batch_images == 2
    # Canceled as step 2 was reported: its preview of step 2 and later never came.
    assert [step for step, _, _ in doomed.calls] == [1]
    assert [step for step, _, _ in kept.calls] == [1, 2, 3, 4, 5]


def test_previews_in_bfloat16_with_the_unet_compiled_cause_no_recompile(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    renderer = load_renderer("tiny", model_cache, "cpu", dtype="bfloat16")
    renderer.apply(SpeedLevers(compile=True), tmp_path_factory.mktemp("previews") / "inductor")
    renderer.warm_up(64, 64, compiled_counts=(1,), max_images=1)
    previous = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = True
    try:
        previews = Previews()
        one = batch(RenderItem("a kite", "", 21, preview=PreviewAsk(1, 64)), size=64, steps=3)
        [image] = renderer.render(one, None, previews)
    finally:
        torch._dynamo.config.error_on_recompile = previous
    assert renderer.recompiles == 0
    assert [step for step, _, _ in previews.calls] == [1, 2, 3]
    assert set(renderer.module_dtypes().values()) == {"bfloat16"}
    last = previews.calls[-1][2][0]
    assert last.size == (64, 64)
    assert mean_difference(last, image) <= LAST_PREVIEW_MEAN_DIFF_BF16


def test_tiny_autoencoder_previews_in_bfloat16_with_the_unet_compiled_cause_no_recompile(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    renderer = load_renderer("tiny", model_cache, "cpu", dtype="bfloat16", preview_vae="tiny")
    renderer.apply(SpeedLevers(compile=True), tmp_path_factory.mktemp("taesd") / "inductor")
    renderer.warm_up(64, 64, compiled_counts=(1,), max_images=1)
    previous = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = True
    try:
        previews = Previews()
        one = batch(RenderItem("a kite", "", 21, preview=PreviewAsk(1, 32)), size=64, steps=3)
        renderer.render(one, None, previews)
    finally:
        torch._dynamo.config.error_on_recompile = previous
    assert renderer.recompiles == 0
    assert [step for step, _, _ in previews.calls] == [1, 2, 3]
    assert renderer.module_dtypes()["preview_vae"] == "bfloat16"
    assert set(renderer.module_dtypes().values()) == {"bfloat16"}
    assert previews.calls[-1][2][0].size == (32, 32)


def test_on_a_device_a_steps_previews_are_made_only_once_the_step_finished() -> None:
    """As on CUDA: the host queues steps ahead; a step's previews (their copy queued before the
    step's event) are read from the host only once that event completed, after its progress."""
    clock = DeviceClock()
    seen: list[tuple[str, int]] = []
    reporter = StepReporter(
        torch.device("cpu"),
        lambda step, total: seen.append(("step", step)),
        4,
        lambda step, total, images: seen.append(("preview", step)),
    )
    reporter._steps = FinishedSteps(clock.event, lag=2)

    def previews(step: int) -> Callable[[], dict]:
        def make() -> dict:
            assert clock.finished >= step, "preview read before its step finished"
            return {0: Image.new("RGB", (1, 1))}

        return make

    reporter.step_end(None)
    reporter.step_end(previews(2))
    assert seen == []  # both queued, the device still busy
    clock.finished = 2
    reporter.step_end(None)
    assert seen == [("step", 1), ("step", 2), ("preview", 2)]
    reporter.step_end(previews(4))
    reporter.finish()
    assert seen[3:] == [("step", 3), ("step", 4), ("preview", 4)]
