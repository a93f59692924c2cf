"""The safety checker on every image, through HTTP: the tiny checker flags one known image (its
first concept is that image's own CLIP embedding), and the action in force decides what happens
to it. The deployment here says `flag`; keys and requests may only make it stricter."""

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_stack
from tests.support import Stack, wait_for_job
from worker.encoding import read_parameters
from worker.tiny_model import FLAGGED_REQUEST


@pytest.fixture(scope="module")
def safety_stack(redis_port: int, workdir: Path, model_cache: Path) -> Iterator[Stack]:
    yield from run_stack(
        "safety-stack", 8, redis_port, workdir, model_cache, T2I_SAFETY_ACTION="flag"
    )


@pytest.fixture(scope="module")
def keys(safety_stack: Stack) -> dict[str, str]:
    """An API key per action: `flag` follows the deployment, the others are stricter."""
    return {
        "flag": safety_stack.api_key,
        "blur": safety_stack.create_key("blurs", 100_000, "blur"),
        "block": safety_stack.create_key("blocks", 100_000, "block"),
    }


def render(stack: Stack, key: str, **fields: object) -> dict:
    with stack.client(key) as client:
        response = client.post("/v1/jobs", json={**FLAGGED_REQUEST, **fields})
        assert response.status_code == 202, response.text
        job = wait_for_job(client, response.json()["id"], timeout_s=120)
    assert job["status"] == "succeeded", job
    return job


def pixels(url: str) -> np.ndarray:
    data = httpx.get(url, timeout=10).raise_for_status().content
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


def roughness(image: np.ndarray) -> float:
    """Mean difference between neighbouring pixels: what a blur takes away."""
    return float(np.abs(np.diff(image, axis=0)).mean() + np.abs(np.diff(image, axis=1)).mean())


def test_an_image_the_checker_does_not_flag_is_stored_and_says_it_was_checked(
    safety_stack: Stack, keys: dict[str, str]
) -> None:
    job = render(safety_stack, keys["block"], seed=int(FLAGGED_REQUEST["seed"]) + 1)
    [image] = job["images"]
    assert image["safety"] == {"checked": True, "flagged": False, "action": None, "reason": None}
    assert image["url"] and not image["filtered"]
    parameters = read_parameters(httpx.get(image["url"], timeout=10).content)
    assert parameters is not None and "Safety: passed" in parameters


def test_flag_stores_the_flagged_image_as_is_and_marks_it(
    safety_stack: Stack, keys: dict[str, str]
) -> None:
    job = render(safety_stack, keys["flag"])
    [image] = job["images"]
    assert job["request"]["safety_action"] == "flag"
    assert image["safety"] == {
        "checked": True,
        "flagged": True,
        "action": "flag",
        "reason": "nsfw_content",
    }
    assert image["url"] and not image["filtered"]
    data = httpx.get(image["url"], timeout=10).content
    parameters = read_parameters(data)
    assert parameters is not None and "Safety: flagged (nsfw_content), flag" in parameters


def test_blur_stores_the_flagged_image_blurred_and_marks_it(
    safety_stack: Stack, keys: dict[str, str]
) -> None:
    as_is = render(safety_stack, keys["flag"])["images"][0]
    blurred = render(safety_stack, keys["blur"])["images"][0]
    assert blurred["safety"]["flagged"] and blurred["safety"]["action"] == "blur"
    sharp, soft = pixels(as_is["url"]), pixels(blurred["url"])
    # Never a black image: the picture is there, only smoothed.
    assert soft.mean() > 10 and abs(soft.mean() - sharp.mean()) < 0.1 * sharp.mean()
    assert roughness(soft) < 0.5 * roughness(sharp), (roughness(soft), roughness(sharp))


def test_block_stores_nothing_and_the_image_entry_says_filtered(
    safety_stack: Stack, keys: dict[str, str]
) -> None:
    job = render(safety_stack, keys["block"])
    [image] = job["images"]
    assert image["url"] is None and image["filtered"] is True
    assert image["safety"] == {
        "checked": True,
        "flagged": True,
        "action": "block",
        "reason": "nsfw_content",
    }
    files = (safety_stack.workdir / "data" / "images").rglob("*")
    assert [path for path in files if job["id"] in str(path) and path.is_file()] == []
    with safety_stack.client(keys["block"]) as client:
        download = client.get(f"/v1/jobs/{job['id']}/images/0")
    assert download.status_code == 404
    assert "safety checker" in download.json()["error"]["message"]


@pytest.mark.parametrize(
    ("key", "asked", "applied"),
    [
        ("block", "flag", "block"),
        ("blur", "flag", "blur"),
        ("flag", "blur", "blur"),
        ("blur", "block", "block"),
    ],
)
def test_a_request_may_make_the_action_stricter_but_never_looser(
    safety_stack: Stack, keys: dict[str, str], key: str, asked: str, applied: str
) -> None:
    job = render(safety_stack, keys[key], safety_action=asked)
    assert job["request"]["safety_action"] == applied
    assert job["images"][0]["safety"]["action"] == applied
    assert (job["images"][0]["url"] is None) == (applied == "block")
