"""The diffusers pipeline itself, on the tiny model: what GPU tests and benchmarks call."""

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from worker.kinds import load_renderer
from worker.models import ModelSource, load_pipeline
from worker.pipeline import DiffusionRenderer, RenderBatch, RenderItem
from worker.tiny_model import TINY_XL_MODEL_ID, ensure_tiny_model, ensure_tiny_xl_model

SCHEDULERS = ["dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_a", "ddim", "pndm", "lms", "unipc"]


@pytest.fixture(scope="module")
def renderer(model_cache: Path) -> DiffusionRenderer:
    return load_renderer("tiny", model_cache, "cpu")


def _batch(*items: RenderItem, scheduler: str = "dpmpp_2m", steps: int = 4) -> RenderBatch:
    return RenderBatch(
        items=items,
        width=256,
        height=192,
        num_inference_steps=steps,
        guidance_scale=7.5,
        scheduler=scheduler,
    )


def _array(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_tiny_model_is_built_once_and_loaded_with_from_pretrained(
    renderer: DiffusionRenderer, model_cache: Path
) -> None:
    [built] = [path for path in model_cache.glob("tiny-sd15-*") if path.is_dir()]
    assert (built / "model_index.json").is_file()
    assert {
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler",
        "safety_checker",
        "feature_extractor",
    } <= {p.name for p in built.iterdir()}
    assert built.with_suffix(".safetensors").is_file()


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_renders_the_requested_size_at_any_step_count(
    renderer: DiffusionRenderer, scheduler: str, steps: int
) -> None:
    item = RenderItem("a cat", "", 1)
    [image] = renderer.render(_batch(item, scheduler=scheduler, steps=steps))
    assert image.size == (256, 192)


def test_each_image_in_a_batch_is_the_one_it_would_be_alone(renderer: DiffusionRenderer) -> None:
    a, b = RenderItem("a cat", "", 11), RenderItem("a dog", "cartoon", 12)
    together = renderer.render(_batch(a, b))
    alone = [renderer.render(_batch(item))[0] for item in (a, b)]
    for batched, single in zip(together, alone, strict=True):
        assert np.abs(_array(batched) - _array(single)).max() <= 2
    assert np.abs(_array(together[0]) - _array(together[1])).max() > 0


def test_progress_is_reported_after_every_step(renderer: DiffusionRenderer) -> None:
    steps: list[tuple[int, int]] = []
    renderer.render(_batch(RenderItem("a cat", "", 1), steps=5), on_step=lambda *s: steps.append(s))
    assert steps == [(i, 5) for i in range(1, 6)]


def test_long_prompts_are_encoded_in_chunks_not_truncated(renderer: DiffusionRenderer) -> None:
    # The tiny tokenizer spends a token per character but spaces: this head fills 75 tokens.
    head = "a lighthouse on a cliff at dusk, oil painting, warm light, heavy brush strokes " * 2
    same_head = [RenderItem(f"{head}, {tail}", "", 5) for tail in ("red sky", "green sea")]
    batches = [_batch(item) for item in same_head]
    assert [renderer.prompt_chunks(batch) for batch in batches] == [2, 2]
    first, second = (renderer.render(batch)[0] for batch in batches)
    assert np.abs(_array(first) - _array(second)).max() > 0

    longest = RenderItem("x" * 2000, "y" * 300, 6)
    assert renderer.prompt_chunks(_batch(longest)) == 27
    [image] = renderer.render(_batch(longest))
    assert image.size == (256, 192)


def test_prompts_needing_different_chunk_counts_are_not_batched(
    renderer: DiffusionRenderer,
) -> None:
    short, long = _batch(RenderItem("a cat", "", 1)), _batch(RenderItem("a cat " * 30, "", 1))
    assert renderer.batch_key(short) != renderer.batch_key(long)
    assert renderer.batch_key(short) == renderer.batch_key(_batch(RenderItem("a dog", "", 2)))


def test_the_tiny_vae_passes_an_image_through_as_8x8_block_averages(
    renderer: DiffusionRenderer,
) -> None:
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 3, 8, 8, generator=generator)
    image = torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bicubic").clamp(0, 1)
    vae = renderer.pipeline.vae
    with torch.no_grad():
        decoded = vae.decode(vae.encode(image * 2 - 1).latent_dist.mode()).sample
    blocks = torch.nn.functional.interpolate(
        torch.nn.functional.avg_pool2d(image * 2 - 1, 8), scale_factor=8, mode="nearest"
    )
    assert (decoded - blocks).abs().max() < 1e-3


def _assert_same_weights(expected: Any, loaded: Any, names: tuple[str, ...]) -> None:
    for name in names:
        original = getattr(expected, name).state_dict()
        round_trip = getattr(loaded, name).state_dict()
        assert original.keys() == round_trip.keys()
        assert all(
            torch.equal(original[key], round_trip[key].reshape(original[key].shape))
            for key in original
        )


def test_a_single_file_checkpoint_loads_the_same_weights_as_its_folder(
    renderer: DiffusionRenderer, model_cache: Path
) -> None:
    folder = ensure_tiny_model(model_cache)
    single = load_pipeline(
        ModelSource(str(folder.with_suffix(".safetensors")), str(folder)), torch.float32
    )
    _assert_same_weights(renderer.pipeline, single, ("unet", "vae", "text_encoder"))


def test_the_sdxl_single_file_checkpoint_renders_what_its_folder_renders(
    model_cache: Path,
) -> None:
    """The tiny SDXL model's checkpoint in SDXL's original layout (both text encoders, the
    second in OpenCLIP's names) reads back as the very model its folder holds."""
    checkpoint = ensure_tiny_xl_model(model_cache).with_suffix(".safetensors")
    folder = load_renderer(TINY_XL_MODEL_ID, model_cache, "cpu")
    single = load_renderer(str(checkpoint), model_cache, "cpu", single_file_config=TINY_XL_MODEL_ID)
    assert single.family.name == "sdxl"
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    _assert_same_weights(folder.pipeline, single.pipeline, names)
    batch = RenderBatch(
        items=(RenderItem("a cat", "blurry", 1), RenderItem("a dog", "", 2)),
        width=64,
        height=64,
        num_inference_steps=3,
        guidance_scale=7.5,
        scheduler="dpmpp_2m",
    )
    for expected, loaded in zip(folder.render(batch), single.render(batch), strict=True):
        assert np.array_equal(_array(expected), _array(loaded))


def test_batch_keys_counted_on_other_threads_never_break_a_render(
    renderer: DiffusionRenderer,
) -> None:
    """Jobs compute their batch key (a token count) on their own threads while the GPU thread
    renders: neither may change how the other's text is tokenized."""
    stop = threading.Event()
    counted: list[int] = []

    def count_tokens() -> None:
        batch = _batch(RenderItem("a lighthouse " * 12, "blurry", 1))
        while not stop.is_set():
            counted.append(renderer.prompt_chunks(batch))

    counters = [threading.Thread(target=count_tokens) for _ in range(2)]
    for counter in counters:
        counter.start()
    try:
        for seed in range(40):
            items = (RenderItem("a cat", "", seed), RenderItem("a small dog", "", seed + 1))
            images = renderer.render(
                RenderBatch(items, 64, 64, 1, guidance_scale=7.5, scheduler="dpmpp_2m")
            )
            assert [image.size for image in images] == [(64, 64), (64, 64)]
    finally:
        stop.set()
        for counter in counters:
            counter.join()
    assert counted and set(counted) == {2}
