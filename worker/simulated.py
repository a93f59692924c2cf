"""A benchmark aid, not a model: `T2I_MODEL_ID=simulated:<seconds per image>` makes a worker
whose renderer sleeps that long per image and returns a small flat image, with no model and no
torch work, so a benchmark (bench/control_plane.py) can run many workers on a few CPU cores and
measure what everything around the render costs: the queue, the job store, encoding, storage,
status and events all run for real. Never meant for production: nothing is rendered."""

import time
from collections.abc import Callable, Iterable

import torch
from PIL import Image

from shared.families import DEFAULT_FAMILY
from worker.pipeline import SpeedLevers
from worker.render_types import (
    BatchKey,
    PreviewCallback,
    RenderBatch,
    RenderedImages,
    StepCallback,
    batch_key,
)

PREFIX = "simulated:"


def is_simulated(model_id: str) -> bool:
    return model_id.startswith(PREFIX)


class SimulatedRenderer:
    """What worker/__main__.py asks of a renderer, with a sleep for the render."""

    def __init__(self, model_id: str) -> None:
        self.seconds_per_image = float(model_id.removeprefix(PREFIX))
        if self.seconds_per_image < 0:
            raise ValueError(f"{model_id}: seconds per image must not be negative")
        self.model_name = model_id
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.levers = SpeedLevers()
        self.control_types: list[str] = []
        self.recompiles = 0
        self.family = DEFAULT_FAMILY
        self.cross_attention_dim: int | None = None

    def use_loras(self, *args: object, **kwargs: object) -> None:
        """Adapters change nothing here."""

    def module_dtypes(self) -> dict[str, str]:
        return {}

    def batch_key(self, batch: RenderBatch) -> BatchKey:
        return batch_key(batch)

    def warm_up(
        self, compiled_counts: Iterable[int] = (1,), max_images: int = 1, **_: object
    ) -> list[Callable[[], object]]:
        return []

    def render(
        self,
        batch: RenderBatch,
        on_step: StepCallback | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> RenderedImages:
        """Sleeps through the steps; previews are not simulated (`on_preview` is never called)."""
        steps = batch.num_inference_steps
        step_s = self.seconds_per_image * len(batch.items) / max(steps, 1)
        for step in range(steps):
            time.sleep(step_s)
            if on_step is not None:
                on_step(step + 1, steps)
        # A flat image of the size asked for: valid, and cheap to encode.
        size = (batch.width, batch.height)
        return [Image.new("RGB", size, (item.seed % 256, 96, 160)) for item in batch.items]
