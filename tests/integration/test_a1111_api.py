"""AUTOMATIC1111's API as its clients call it, against a real API and worker."""

import base64
import io
import json
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from shared.infotext import SAMPLER_NAMES
from tests.support import Stack, wait_until

# What A1111 clients send: many fields this service ignores, besides the ones it uses.
CLIENT_DEFAULTS = {
    "negative_prompt": "",
    "styles": [],
    "seed": -1,
    "subseed": -1,
    "subseed_strength": 0,
    "sampler_name": "Euler a",
    "batch_size": 1,
    "n_iter": 1,
    "steps": 3,
    "cfg_scale": 7,
    "width": 256,
    "height": 256,
    "restore_faces": False,
    "tiling": False,
    "enable_hr": False,
    "override_settings": {"CLIP_stop_at_last_layers": 1},
    "override_settings_restore_afterwards": True,
    "send_images": True,
    "save_images": False,
    "alwayson_scripts": {},
}


@pytest.fixture
def sdapi(local_stack: Stack) -> Iterator[httpx.Client]:
    """A client that authenticates as A1111 clients do: HTTP Basic, the key as the password."""
    with httpx.Client(
        base_url=f"{local_stack.base_url}/sdapi/v1",
        auth=("any-user", local_stack.api_key),
        timeout=120,
    ) as client:
        yield client


def txt2img(client: httpx.Client, **fields: object) -> tuple[list[Image.Image], dict, dict]:
    response = client.post("/txt2img", json={**CLIENT_DEFAULTS, **fields})
    assert response.status_code == 200, response.text
    answer = response.json()
    images = [Image.open(io.BytesIO(base64.b64decode(data))) for data in answer["images"]]
    return images, json.loads(answer["info"]), answer["parameters"]


def test_txt2img_pngs_carry_the_parameters_that_info_reports(sdapi: httpx.Client) -> None:
    images, info, parameters = txt2img(
        sdapi,
        prompt="a lighthouse at dusk",
        negative_prompt="fog",
        seed=1234,
        sampler_name="DPM++ 2M",
        scheduler="Karras",
        batch_size=2,
        n_iter=2,
        cfg_scale=6.5,
        width=320,
    )
    assert [(image.format, image.size) for image in images] == [("PNG", (320, 256))] * 4
    assert [image.info["parameters"] for image in images] == info["infotexts"]
    assert info["all_seeds"] == [1234, 1235, 1236, 1237] and info["seed"] == 1234
    assert (info["prompt"], info["negative_prompt"]) == ("a lighthouse at dusk", "fog")
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (320, 256, 3, 6.5)
    assert (info["sampler_name"], info["batch_size"], info["sd_model_name"]) == (
        "DPM++ 2M Karras",
        2,
        "tiny",
    )
    assert info["infotexts"][3] == (
        "a lighthouse at dusk\nNegative prompt: fog\nSteps: 3, Sampler: DPM++ 2M Karras, "
        "CFG scale: 6.5, Seed: 1237, Size: 320x256, Model: tiny, Safety: passed"
    )
    assert parameters["prompt"] == "a lighthouse at dusk" and parameters["n_iter"] == 2


def test_seed_minus_one_picks_a_random_seed_and_the_job_is_a_job(
    sdapi: httpx.Client, local_stack: Stack
) -> None:
    _, first, _ = txt2img(sdapi, prompt="a random kite", steps=1)
    _, second, _ = txt2img(sdapi, prompt="a random kite", steps=1)
    assert first["seed"] != second["seed"]
    assert 0 <= first["seed"] < 2**32 and f"Seed: {first['seed']}," in first["infotexts"][0]
    with local_stack.client() as http:
        [job] = http.get("/v1/jobs", params={"limit": 1}).json()["data"]
    assert job["request"]["seed"] == second["seed"] and job["request"]["scheduler"] == "euler_a"
    assert job["status"] == "succeeded" and job["batch"]["images"] >= 1


def test_without_send_images_the_answer_has_none(sdapi: httpx.Client) -> None:
    images, info, _ = txt2img(sdapi, prompt="a quiet harbour", steps=1, send_images=False)
    assert images == [] and len(info["infotexts"]) == 1


def test_samplers_models_and_options_list(sdapi: httpx.Client) -> None:
    samplers = sdapi.get("/samplers").json()
    assert [sampler["name"] for sampler in samplers] == list(SAMPLER_NAMES.values())
    assert {"k_euler_a"} <= {alias for sampler in samplers for alias in sampler["aliases"]}
    [model] = sdapi.get("/sd-models").json()
    assert (model["title"], model["model_name"]) == ("tiny", "tiny")
    assert sdapi.get("/options").json()["sd_model_checkpoint"] == "tiny"
    assert [schedule["label"] for schedule in sdapi.get("/schedulers").json()] == [
        "Automatic",
        "Karras",
    ]


def test_every_listed_sampler_renders_under_its_own_name(sdapi: httpx.Client) -> None:
    for sampler in sdapi.get("/samplers").json():
        _, info, _ = txt2img(sdapi, prompt="a lantern", steps=1, sampler_name=sampler["name"])
        assert info["sampler_name"] == sampler["name"]
        assert f"Sampler: {sampler['name']}," in info["infotexts"][0]


def test_a_wrong_sampler_gets_a_clear_error(sdapi: httpx.Client) -> None:
    response = sdapi.post(
        "/txt2img", json={**CLIENT_DEFAULTS, "prompt": "a", "sampler_name": "Heun"}
    )
    assert response.status_code == 422
    error = response.json()
    assert error["error"] == "validation_error"
    assert "sampler_name" in error["detail"] and "'DPM++ 2M'" in error["detail"]
    assert error["errors"][0]["loc"] == ["body", "sampler_name"]


def test_too_many_images_get_a_clear_error(sdapi: httpx.Client) -> None:
    response = sdapi.post(
        "/txt2img", json={**CLIENT_DEFAULTS, "prompt": "a", "batch_size": 3, "n_iter": 3}
    )
    assert response.status_code == 422
    assert response.json()["detail"] == "batch_size x n_iter may be at most 8"


def test_basic_or_bearer_and_nothing_else(local_stack: Stack) -> None:
    url = f"{local_stack.base_url}/sdapi/v1/sd-models"
    assert httpx.get(url, auth=("user", local_stack.api_key)).status_code == 200
    assert httpx.get(url, auth=(local_stack.api_key, "")).status_code == 200
    bearer = {"Authorization": f"Bearer {local_stack.api_key}"}
    assert httpx.get(url, headers=bearer).status_code == 200
    for refused in (httpx.get(url), httpx.get(url, auth=("user", "t2i_wrong.key"))):
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Basic"
        assert refused.json()["error"] == "unauthorized"


def test_progress_follows_the_keys_rendering_job(sdapi: httpx.Client, local_stack: Stack) -> None:
    with local_stack.client() as http:
        job = http.post(
            "/v1/jobs",
            json={
                "prompt": "a long render",
                "width": 256,
                "height": 256,
                "num_inference_steps": 150,
            },
        ).json()

        def rendering() -> bool:
            state = sdapi.get("/progress").json()["state"]
            return state["job"] == job["id"] and state["sampling_step"] > 0

        wait_until(rendering, 60, "the job's progress on /sdapi/v1/progress")
        progress = sdapi.get("/progress").json()
        assert progress["state"]["sampling_steps"] == 150 and 0 < progress["progress"] < 1
        assert progress["state"]["job_count"] >= 1
        assert http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    wait_until(lambda: sdapi.get("/progress").json()["state"]["job"] == "", 30, "an idle progress")


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_img2img_and_inpainting_start_from_the_given_image(sdapi: httpx.Client) -> None:
    start = Image.new("RGB", (256, 256), (200, 40, 40))
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (64, 64, 192, 192))
    for extra in ({}, {"mask": _png_base64(mask)}):
        response = sdapi.post(
            "/img2img",
            json={
                **CLIENT_DEFAULTS,
                "prompt": "a red wall",
                "steps": 4,
                "init_images": [_png_base64(start)],
                "denoising_strength": 0.5,
                "resize_mode": 0,
                "inpainting_fill": 1,
                **extra,
            },
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        assert "init_images" not in answer["parameters"] and "mask" not in answer["parameters"]
        [data] = answer["images"]
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert image.size == (256, 256)
        mode = "inpaint" if extra else "img2img"
        assert f"Denoising strength: 0.5, Mode: {mode}" in image.info["parameters"]
        if extra:
            # Outside the mask, the starting image, but for the watermark's few levels.
            kept = image.convert("RGB").getpixel((5, 5))
            assert max(abs(a - b) for a, b in zip(kept, (200, 40, 40), strict=True)) <= 4


def test_img2img_refuses_a_strength_too_low_for_its_steps(sdapi: httpx.Client) -> None:
    start = _png_base64(Image.new("RGB", (256, 256)))
    response = sdapi.post(
        "/img2img",
        json={**CLIENT_DEFAULTS, "prompt": "x", "init_images": [start], "denoising_strength": 0.1},
    )
    assert response.status_code == 422, response.text
