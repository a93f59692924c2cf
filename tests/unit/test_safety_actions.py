"""What a safety action does to one image, and which action is in force."""

import numpy as np
import pytest
from PIL import Image

from shared.schema import strictest
from worker.safety import apply_action


@pytest.mark.parametrize(
    ("deployment", "key", "request_action", "applied"),
    [
        ("flag", None, None, "flag"),
        ("flag", "blur", None, "blur"),
        ("flag", "blur", "flag", "blur"),
        ("block", None, "flag", "block"),
        ("blur", None, "block", "block"),
        ("flag", "block", "blur", "block"),
    ],
)
def test_the_strictest_action_applies(
    deployment: str, key: str | None, request_action: str | None, applied: str
) -> None:
    assert strictest(deployment, key, request_action) == applied  # type: ignore[arg-type]


def _noise() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), np.uint8))


def test_an_image_that_passed_or_went_unchecked_is_kept_as_it_is() -> None:
    image = _noise()
    passed, unchecked = apply_action(image, False, "block"), apply_action(image, None, "block")
    assert passed.image is image and (passed.safety.checked, passed.safety.flagged) == (True, False)
    assert unchecked.image is image and not unchecked.safety.checked


def test_flag_keeps_blur_smooths_and_block_drops_a_flagged_image() -> None:
    image = _noise()
    flagged, blurred, blocked = (apply_action(image, True, a) for a in ("flag", "blur", "block"))
    assert flagged.image is image
    assert blocked.image is None
    assert blurred.image is not None and blurred.image.size == image.size
    sharp, soft = np.asarray(image, np.float32), np.asarray(blurred.image, np.float32)
    assert np.abs(np.diff(soft, axis=1)).mean() < 0.2 * np.abs(np.diff(sharp, axis=1)).mean()
    for verdict, action in ((flagged, "flag"), (blurred, "blur"), (blocked, "block")):
        assert verdict.safety.flagged and verdict.safety.action == action
        assert verdict.safety.reason == "nsfw_content"
