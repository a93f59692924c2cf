import pytest
from pydantic import ValidationError

from shared.schema import (
    MAX_SEED,
    TERMINAL_STATES,
    GenerationRequest,
    JobStatus,
    can_transition,
)


def test_defaults_are_sd15s_usual_ones_with_dpm_solver_in_25_steps() -> None:
    request = GenerationRequest(prompt="a cat")
    assert (request.width, request.height) == (512, 512)
    assert request.num_inference_steps == 25
    assert request.guidance_scale == 7.5
    assert request.scheduler == "dpmpp_2m"
    assert (request.num_images, request.output_format, request.seed) == (1, "png", None)


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": ""},
        {"prompt": "  "},
        {"prompt": "x" * 2001},
        {"prompt": "a", "negative_prompt": "x" * 2001},
        {"prompt": "a", "width": 248},
        {"prompt": "a", "width": 2056},
        {"prompt": "a", "height": 260},
        {"prompt": "a", "num_inference_steps": 151},
        {"prompt": "a", "guidance_scale": 20.5},
        {"prompt": "a", "guidance_scale": -1},
        {"prompt": "a", "seed": MAX_SEED + 1},
        {"prompt": "a", "num_images": 0},
        {"prompt": "a", "output_format": "gif"},
        {"prompt": "a", "width": 512.5},
        {"prompt": "a", "width": "512"},
        {"prompt": "a", "seed": True},
        {"prompt": "a", "steps": 20},
    ],
)
def test_out_of_bounds_and_unknown_fields_are_refused(fields: dict) -> None:
    with pytest.raises(ValidationError):
        GenerationRequest.model_validate(fields)


def test_a_whole_float_is_the_integer_json_schema_says_it_is() -> None:
    request = GenerationRequest.model_validate({"prompt": "a", "width": 768.0, "seed": 5.0})
    assert (request.width, request.seed) == (768, 5)
    assert type(request.width) is int and type(request.seed) is int


def test_integer_guidance_is_accepted_as_a_number() -> None:
    assert (
        GenerationRequest.model_validate({"prompt": "a", "guidance_scale": 7}).guidance_scale == 7
    )


def test_image_seeds_are_consecutive_and_wrap_at_the_top() -> None:
    request = GenerationRequest(prompt="a", seed=MAX_SEED - 1, num_images=3)
    assert request.image_seeds() == [MAX_SEED - 1, MAX_SEED, 0]
    with pytest.raises(ValueError, match="resolved"):
        GenerationRequest(prompt="a").image_seeds()


def test_terminal_states_never_move() -> None:
    for terminal in TERMINAL_STATES:
        assert terminal.is_terminal
        assert not any(can_transition(terminal, target) for target in JobStatus)


def test_the_state_machine() -> None:
    assert can_transition(JobStatus.QUEUED, JobStatus.RUNNING)
    assert can_transition(JobStatus.QUEUED, JobStatus.CANCELED)
    assert can_transition(JobStatus.RUNNING, JobStatus.SUCCEEDED)
    # A job whose worker was lost goes back to the queue as a new attempt.
    assert can_transition(JobStatus.RUNNING, JobStatus.QUEUED)
    assert not can_transition(JobStatus.QUEUED, JobStatus.SUCCEEDED)
    assert not can_transition(JobStatus.RUNNING, JobStatus.EXPIRED)
