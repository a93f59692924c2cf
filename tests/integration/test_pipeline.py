"""The diffusers pipeline itself, on the tiny model: what GPU tests and benchmarks call."""

from pathlib import Path

import numpy as np
import pytest

from worker.pipeline import DiffusionRenderer, RenderBatch, RenderItem

SCHEDULERS = ["dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_a", "ddim", "pndm", "lms", "unipc"]


@pytest.fixture(scope="module")
def renderer(model_cache: Path) -> DiffusionRenderer:
    return DiffusionRenderer.load("tiny", model_cache, "cpu")


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
    [built] = list(model_cache.glob("tiny-sd15-*"))
    assert (built / "model_index.json").is_file()
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= {
        p.name for p in built.iterdir()
    }


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
