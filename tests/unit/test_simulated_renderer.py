"""The benchmark aid `T2I_MODEL_ID=simulated:<s>`: the worker's one entry point recognises it,
and it renders flat images of the size asked for, reporting each step, without a model."""

from pathlib import Path

from shared.schema import GenerationRequest
from worker.kinds import load_renderer
from worker.models import model_source
from worker.provenance import weights_sha256
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


def test_a_simulated_model_has_no_weights_to_hash_for_its_provenance(tmp_path: Path) -> None:
    """The worker hashes its model's weights before it loads the model; a simulated one has
    none, and its worker starts all the same."""
    source = model_source("simulated:0.05", tmp_path, "tiny")
    assert weights_sha256(source, tmp_path) is None
