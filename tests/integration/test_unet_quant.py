"""The UNet's linear layers in int8 (the `unet_quant` lever; fp8 needs a GPU and is measured by
bench/): a bounded drift from the unquantized image, compiled without recompiles, adapters in
their slots on top of quantized layers, and a clear refusal of fp8 where it cannot run."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from shared.loras import LoraRegistry
from tests.integration.test_batching import item, job
from tests.integration.test_compiled_unet import no_recompile
from tests.support import REPO_ROOT
from worker.kinds import load_renderer
from worker.pipeline import DiffusionRenderer, SpeedLevers
from worker.quantization import QuantizationUnavailable, quantize_unet

SIZE = 64
# torchao lives outside the development environment (pyproject.toml's `quant` extra): on sys.path
# for this process alone, so the workers other tests start do not import it.
sys.path.append(str(REPO_ROOT / ".venv" / "quant"))


def levels(images: list) -> np.ndarray:
    return np.stack([np.asarray(image, np.float32) for image in images])


@pytest.fixture(scope="module")
def plain(model_cache: Path) -> DiffusionRenderer:
    return load_renderer("tiny", model_cache, "cpu", dtype="bfloat16")


def test_int8_drifts_from_the_bfloat16_image_by_a_little(
    model_cache: Path, plain: DiffusionRenderer
) -> None:
    quantized = load_renderer(
        "tiny", model_cache, "cpu", SpeedLevers(unet_quant="int8"), dtype="bfloat16"
    )
    batch = job(item(1), item(2), size=SIZE)
    difference = np.abs(levels(quantized.render(batch)) - levels(plain.render(batch)))
    # Measured on the tiny model: a mean of about a level; a broken quantization (wrong
    # scales, a transposed weight) moves every pixel by tens of levels.
    assert 0 < difference.mean() < 8
    assert quantized.module_dtypes()["unet"] == "bfloat16"


def test_int8_compiles_once_and_renders_compiled_as_eager(
    model_cache: Path, tmp_path: Path
) -> None:
    levers = SpeedLevers(compile=True, unet_quant="int8")
    compiled = load_renderer("tiny", model_cache, "cpu", dtype="bfloat16")
    compiled.apply(levers, tmp_path / "inductor")
    eager_levers = SpeedLevers(unet_quant="int8")
    eager = load_renderer("tiny", model_cache, "cpu", eager_levers, dtype="bfloat16")
    graphs_before = counters["stats"]["unique_graphs"]
    compiled.warm_up(SIZE, SIZE, compiled_counts=(1,), max_images=1)
    assert counters["stats"]["unique_graphs"] - graphs_before == 1
    batch = job(item(3), size=SIZE)
    with no_recompile():
        [image] = compiled.render(batch)
    [reference] = eager.render(batch)
    difference = np.abs(levels([image]) - levels([reference]))
    # The tolerance of compiled against eager in bfloat16 (tests/integration/test_mixed_traffic.py).
    assert difference.mean() <= 3


def test_adapters_apply_on_top_of_int8_layers(
    model_cache: Path, tiny_lora_dir: Path, plain: DiffusionRenderer
) -> None:
    quantized = load_renderer(
        "tiny", model_cache, "cpu", SpeedLevers(unet_quant="int8"), dtype="bfloat16"
    )
    quantized.use_loras(LoraRegistry(tiny_lora_dir), max_bytes=64 * 2**20)
    without = job(item(4), size=SIZE)
    with_adapter = job(item(4), size=SIZE, loras=(("tiny-style", 1.0),))
    difference = np.abs(levels(quantized.render(with_adapter)) - levels(quantized.render(without)))
    assert difference.mean() > 1


def test_fp8_is_refused_where_the_card_has_no_float8_tensor_cores(
    plain: DiffusionRenderer,
) -> None:
    with pytest.raises(QuantizationUnavailable, match="T2I_UNET_QUANT=fp8"):
        quantize_unet(plain.pipeline.unet, "fp8", torch.device("cpu"))
