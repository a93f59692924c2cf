"""The benchmark aid `T2I_MODEL_ID=simulated:<s>`: the worker's one entry point recognises it,
and it renders flat images of the size asked for, reporting each step, without a model."""

from pathlib import Path

from shared.schema import GenerationRequest
from worker.kinds import load_renderer
from worker.render_types import RenderBatch
from worker.simulated import SimulatedRenderer


def test_simulated_model_renders_without_a_model(tmp_path: Path) -> None:
    renderer = load_renderer("simulated:0", tmp_path)
    assert isinstance(renderer, SimulatedRenderer)
    request = GenerationRequest(
        prompt="x", width=256, height=320, num_images=2, num_inference_steps=3, seed=1
    )
    steps: list[tuple[int, int]] = []
    images = renderer.render(RenderBatch.from_request(request), lambda d, t: steps.append((d, t)))
    assert [image.size for image in images] == [(256, 320), (256, 320)]  # type: ignore[union-attr]
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert renderer.warm_up(compiled_counts=(1,), max_images=8) == []
