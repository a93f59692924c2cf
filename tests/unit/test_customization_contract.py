"""The request's LoRA adapters and ControlNet: what the contract accepts, and how a batch and an
image file carry them."""

import pytest
from pydantic import ValidationError

from shared.infotext import parameters_text
from shared.schema import GenerationRequest
from worker.pipeline import RenderBatch, batch_key

EDGES = "iVBORw0KGgo="


def request(**fields: object) -> GenerationRequest:
    return GenerationRequest.model_validate({"prompt": "a cat", "seed": 1, **fields})


def test_loras_default_to_none_and_each_name_comes_once() -> None:
    assert request().loras == []
    assert request(loras=[{"name": "ink"}]).loras[0].scale == 1.0
    with pytest.raises(ValidationError, match="named once"):
        request(loras=[{"name": "ink"}, {"name": "ink", "scale": 0.5}])
    with pytest.raises(ValidationError):
        request(loras=[{"name": f"a{index}"} for index in range(5)])
    with pytest.raises(ValidationError):
        request(loras=[{"name": "../escape"}])


def test_control_does_not_combine_with_an_init_image() -> None:
    control = {"type": "canny", "image": EDGES}
    assert request(control=control).control.preprocess is True
    with pytest.raises(ValidationError, match="init_image"):
        request(control=control, init_image=EDGES)


def test_the_batch_key_holds_the_adapters_in_any_order_and_the_control() -> None:
    both = [{"name": "ink", "scale": 0.5}, {"name": "film"}]
    key = batch_key(RenderBatch.from_request(request(loras=both)))
    assert key == batch_key(RenderBatch.from_request(request(loras=both[::-1])))
    assert key != batch_key(RenderBatch.from_request(request(loras=both[:1])))
    assert key != batch_key(RenderBatch.from_request(request()))
    controlled = RenderBatch.from_request(request(control={"type": "canny", "image": EDGES}))
    assert (controlled.control_type, controlled.control_scale) == ("canny", 1.0)
    assert batch_key(controlled) != batch_key(RenderBatch.from_request(request()))


def test_an_image_file_names_its_adapters_and_control_as_popular_uis_do() -> None:
    text = parameters_text(
        request(
            loras=[{"name": "ink", "scale": 0.5}],
            control={"type": "canny", "image": "sha256:ab", "conditioning_scale": 0.8},
        ),
        1,
        "sd15",
    )
    assert text.splitlines()[0] == "a cat <lora:ink:0.5>"
    assert 'ControlNet 0: "Module: canny, Model: canny, Weight: 0.8"' in text
