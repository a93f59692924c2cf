"""Where a model's weights, configs and safety checker come from: a hub id, a local diffusers
directory, a single-file checkpoint (`.safetensors`, as fine-tuning tools write them) or one of
the tiny offline models."""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


class ModelLoadError(Exception):
    """The configured model could not be loaded."""


@dataclass(frozen=True)
class ModelSource:
    """What to load: the weights, and the diffusers layout their configs and checker come from."""

    weights: str
    # For a single-file checkpoint: the diffusers directory (or hub id) with its configs.
    single_file_config: str | None = None

    @property
    def diffusers_layout(self) -> str:
        """The directory or hub id with the model's configs and, where it ships one, its safety
        checker (`safety_checker/`, `feature_extractor/`)."""
        return self.single_file_config or self.weights


# The names of the tiny offline test models (worker/tiny_model.py builds them).
TINY_MODEL_IDS = ("tiny", "tiny-second", "tiny-xl")


def resolve(name: str, cache_dir: Path) -> str:
    """A tiny model's directory (built on first use); any other name as it is."""
    if name not in TINY_MODEL_IDS:
        return name
    # Imported only where a tiny model is asked for: it builds test models.
    from worker.tiny_model import (
        SECOND_TINY_MODEL_ID,
        TINY_XL_MODEL_ID,
        ensure_second_tiny_model,
        ensure_tiny_model,
        ensure_tiny_xl_model,
    )

    if name == SECOND_TINY_MODEL_ID:
        return str(ensure_second_tiny_model(cache_dir))
    if name == TINY_XL_MODEL_ID:
        return str(ensure_tiny_xl_model(cache_dir))
    return str(ensure_tiny_model(cache_dir))


def model_source(model_id: str, cache_dir: Path, single_file_config: str) -> ModelSource:
    weights = resolve(model_id, cache_dir)
    if weights.endswith(SINGLE_FILE_SUFFIXES):
        return ModelSource(weights, resolve(single_file_config, cache_dir))
    return ModelSource(weights)


def pipeline_class(
    source: ModelSource,
) -> type[StableDiffusionPipeline] | type[StableDiffusionXLPipeline]:
    """The pipeline the model's layout names (its `model_index.json`): SDXL's, or SD 1.5's for
    anything else (and where the layout cannot be read: loading then says why)."""
    try:
        config = DiffusionPipeline.load_config(source.diffusers_layout)
    except (OSError, ValueError):
        return StableDiffusionPipeline
    if str(config.get("_class_name", "")).startswith("StableDiffusionXL"):
        return StableDiffusionXLPipeline
    return StableDiffusionPipeline


def load_pipeline(
    source: ModelSource, dtype: torch.dtype, vae: str | None = None
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """The model's pipeline (SD 1.5's or SDXL's, as its layout says) in `dtype`, on the host;
    with `vae` (a hub id or directory) in place of the model's own VAE."""
    family_pipeline = pipeline_class(source)
    options: dict[str, Any] = {"dtype": dtype}
    if vae is not None:
        try:
            options["vae"] = AutoencoderKL.from_pretrained(vae, torch_dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not load T2I_VAE_ID={vae!r}: {exc}") from exc
    if family_pipeline is StableDiffusionPipeline:
        # The service runs the checker itself (worker/safety.py): the pipeline's own would
        # return black images. (SDXL's pipeline has none.)
        options.update(safety_checker=None, requires_safety_checker=False)
    try:
        if source.single_file_config is not None:
            return family_pipeline.from_single_file(
                source.weights, config=source.single_file_config, **options
            )
        if dtype == torch.float16:
            try:
                return family_pipeline.from_pretrained(source.weights, variant="fp16", **options)
            except (OSError, ValueError):
                log.info("%s has no fp16 variant; loading the default weights as fp16", source)
        return family_pipeline.from_pretrained(source.weights, **options)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load T2I_MODEL_ID={source.weights!r}: {exc}\n"
            "Without network access and no local copy, point T2I_MODEL_ID at a local diffusers "
            "directory or a single-file checkpoint (with T2I_SINGLE_FILE_CONFIG), or set "
            "T2I_MODEL_ID=tiny for the tiny offline test model."
        ) from exc
