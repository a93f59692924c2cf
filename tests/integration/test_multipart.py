"""`POST /v1/jobs` as multipart/form-data: the JSON request in a `request` part, the images as
file parts, as a browser form or `curl -F` sends them; checked as the JSON route checks base64."""

import base64
import hashlib
import json
import subprocess
from pathlib import Path

import httpx

from tests.support import REPO_ROOT, Stack, wait_for_job

PHOTO = REPO_ROOT / "examples" / "photo.png"
MASK = REPO_ROOT / "examples" / "mask.png"
REQUEST = {
    "prompt": "a harbour at dusk",
    "width": 256,
    "height": 256,
    "num_inference_steps": 4,
    "strength": 0.8,
}


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def curl_form(stack: Stack, *parts: str, headers: tuple[str, ...] = ()) -> tuple[int, dict]:
    """POST /v1/jobs with real `curl -F` parts: the status and the JSON answer."""
    command = ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", f"{stack.base_url}/v1/jobs"]
    command += ["-H", f"Authorization: Bearer {stack.api_key}"]
    for header in headers:
        command += ["-H", header]
    for part in parts:
        command += ["-F", part]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    body, _, code = done.stdout.rpartition("\n")
    return int(code), json.loads(body)


def test_curl_uploads_make_an_inpainting_job_that_shows_the_files_hashes(
    local_stack: Stack, tmp_path: Path
) -> None:
    request = tmp_path / "request.json"
    request.write_text(json.dumps(REQUEST))
    code, job = curl_form(
        local_stack,
        f"request=<{request};type=application/json",
        f"init_image=@{PHOTO}",
        f"mask_image=@{MASK}",
    )
    assert code == 202, job
    assert job["request"]["init_image"] == sha256(PHOTO)
    assert job["request"]["mask_image"] == sha256(MASK)
    with local_stack.client() as client:
        done = wait_for_job(client, job["id"], timeout_s=180)
    assert done["status"] == "succeeded", done
    assert done["request"]["init_image"] == sha256(PHOTO)
    assert done["request"]["strength"] == 0.8
    assert (done["images"][0]["width"], done["images"][0]["height"]) == (256, 256)


def test_an_idempotency_key_names_one_job_for_a_form_and_the_same_request_in_json(
    local_stack: Stack, tmp_path: Path
) -> None:
    request = tmp_path / "request.json"
    # `json` is the other name of the request part; the image field a placeholder the part fills.
    request.write_text(json.dumps({**REQUEST, "init_image": "@init_image", "seed": 7}))
    key = "Idempotency-Key: multipart-" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:16]
    parts = (f"json=<{request};type=application/json", f"init_image=@{PHOTO}")
    code, first = curl_form(local_stack, *parts, headers=(key,))
    assert code == 202, first
    code, again = curl_form(local_stack, *parts, headers=(key,))
    assert code == 200 and again["id"] == first["id"], again
    body = {**REQUEST, "seed": 7, "init_image": base64.b64encode(PHOTO.read_bytes()).decode()}
    with local_stack.client() as client:
        as_json = client.post("/v1/jobs", json=body, headers=dict([key.split(": ")]))
    assert as_json.status_code == 200 and as_json.json()["id"] == first["id"], as_json.text


def _post(stack: Stack, files: dict, data: dict | None = None) -> httpx.Response:
    with stack.client() as client:
        return client.post("/v1/jobs", files=files, data=data or {})


def _detail(response: httpx.Response) -> dict:
    error = response.json()["error"]
    assert error["type"] == "validation_error", error
    [detail] = error["details"]
    return detail


def test_a_file_part_over_the_byte_cap_is_refused_as_an_oversized_base64_image(
    local_stack: Stack,
) -> None:
    big = b"\x89PNG" + b"\0" * (8 * 1024 * 1024 + 1)
    response = _post(
        local_stack, {"init_image": ("big.png", big, "image/png")}, {"request": json.dumps(REQUEST)}
    )
    assert response.status_code == 422, response.text
    detail = _detail(response)
    assert (detail["loc"], detail["type"]) == (["body", "init_image"], "image_too_large")


def test_a_part_that_is_no_image_is_422_naming_the_part(local_stack: Stack) -> None:
    files = {
        "init_image": ("photo.png", PHOTO.read_bytes(), "image/png"),
        "mask_image": ("mask.png", b"not an image at all", "image/png"),
    }
    response = _post(local_stack, files, {"request": json.dumps(REQUEST)})
    assert response.status_code == 422, response.text
    detail = _detail(response)
    assert (detail["loc"], detail["type"]) == (["body", "mask_image"], "image_invalid")


def test_a_form_without_a_request_part_is_422(local_stack: Stack) -> None:
    response = _post(local_stack, {"init_image": ("photo.png", PHOTO.read_bytes(), "image/png")})
    assert response.status_code == 422, response.text
    assert _detail(response)["loc"] == ["body", "request"]


def test_a_request_part_that_is_not_json_or_an_unknown_part_is_422(local_stack: Stack) -> None:
    photo = {"init_image": ("photo.png", PHOTO.read_bytes(), "image/png")}
    response = _post(local_stack, photo, {"request": "{not json"})
    assert response.status_code == 422, response.text
    assert _detail(response)["loc"] == ["body", "request"]
    response = _post(local_stack, {**photo, "other": ("x.png", b"x", "image/png")})
    assert response.status_code == 422, response.text
    assert _detail(response)["loc"] == ["body", "other"]


def test_a_form_without_credentials_is_401_before_it_is_read(local_stack: Stack) -> None:
    response = httpx.post(
        f"{local_stack.base_url}/v1/jobs",
        files={"init_image": ("x.png", b"x", "image/png")},
        timeout=10,
    )
    assert response.status_code == 401, response.text
