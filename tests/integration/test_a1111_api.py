"""AUTOMATIC1111's API as its clients call it, against a real API and worker."""

import base64
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from shared.infotext import SAMPLER_NAMES
from tests.conftest import run_stack, start_second_model_worker
from tests.support import Stack, start_redis, wait_for_job, wait_until
from worker.tiny_model import SECOND_TINY_MODEL_ID

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


def _webui(stack: Stack, api_key: str) -> webuiapi.WebUIApi:
    host, port = stack.base_url.removeprefix("http://").rsplit(":", 1)
    return webuiapi.WebUIApi(host=host, port=int(port), username="user", password=api_key)


def _jobs(stack: Stack, api_key: str) -> list[dict]:
    with stack.client(api_key) as http:
        return http.get("/v1/jobs", params={"limit": 10}).raise_for_status().json()["data"]


READ_ONLY_ROUTES = {
    "/loras": [],
    "/sd-vae": [],
    "/upscalers": [],
    "/hypernetworks": [],
    "/face-restorers": [],
    "/realesrgan-models": [],
    "/prompt-styles": [],
    "/embeddings": {"loaded": {}, "skipped": {}},
}


def test_the_routes_clients_call_at_start_up_answer(sdapi: httpx.Client) -> None:
    for path, expected in READ_ONLY_ROUTES.items():
        response = sdapi.get(path)
        assert (response.status_code, response.json()) == (200, expected), path
    assert sdapi.get("/cmd-flags").json()["nowebui"] is True
    memory = sdapi.get("/memory").json()
    assert memory["ram"]["total"] > 0 and "error" in memory["cuda"]


def test_errors_come_in_a1111s_shape(sdapi: httpx.Client) -> None:
    missing = sdapi.get("/no-such-route")
    assert missing.status_code == 404
    assert set(missing.json()) == {"error", "detail", "body", "errors"}
    assert missing.json()["error"] == "not_found"
    wrong_method = sdapi.get("/txt2img")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json()["error"] == "method_not_allowed"
    invalid = sdapi.post("/png-info", json={})
    assert invalid.status_code == 422 and invalid.json()["error"] == "validation_error"
    assert invalid.json()["errors"][0]["loc"] == ["body", "image"]
    not_an_image = sdapi.post("/png-info", json={"image": base64.b64encode(b"x").decode()})
    assert not_an_image.status_code == 422 and "not a base64 image" in not_an_image.json()["detail"]
    unknown_lora = sdapi.post("/txt2img", json={**CLIENT_DEFAULTS, "prompt": "a <lora:nope:0.5>"})
    assert unknown_lora.status_code == 422
    assert "'nope'" in unknown_lora.json()["detail"]
    assert "GET /sdapi/v1/loras" in unknown_lora.json()["detail"]


def test_options_are_kept_per_key(local_stack: Stack) -> None:
    mine = _webui(local_stack, local_stack.create_key("options", 100_000))
    other = _webui(local_stack, local_stack.create_key("other options", 100_000))
    assert mine.set_options({"sd_model_checkpoint": "tiny", "jpeg_quality": 80}) is None
    assert mine.util_get_current_model() == "tiny"
    assert mine.get_options()["jpeg_quality"] == 80
    assert "jpeg_quality" not in other.get_options()
    refused = mine.session.post(f"{mine.baseurl}/options", json={"sd_model_checkpoint": "nope"})
    assert refused.status_code == 422 and refused.json()["error"] == "validation_error"
    assert "'nope'" in refused.json()["detail"]
    assert mine.util_get_current_model() == "tiny"


def test_png_info_reads_pngs_jpegs_and_webps(sdapi: httpx.Client, local_stack: Stack) -> None:
    api = _webui(local_stack, local_stack.api_key)
    result = api.txt2img(prompt="a blue boat", seed=77, steps=2, width=256, height=256)
    info = api.png_info(result.image)
    assert info.info == result.info["infotexts"][0]
    assert (info.parameters["Seed"], info.parameters["Steps"]) == ("77", "2")
    assert info.parameters["Prompt"] == "a blue boat"
    with local_stack.client() as http:
        for output_format in ("jpeg", "webp"):
            job = http.post(
                "/v1/jobs",
                json={
                    "prompt": f"a {output_format} harbour",
                    "negative_prompt": "fog",
                    "seed": 4321,
                    "num_inference_steps": 3,
                    "width": 256,
                    "height": 256,
                    "output_format": output_format,
                },
            ).json()
            job = wait_for_job(http, job["id"])
            data = httpx.get(job["images"][0]["url"], timeout=10).raise_for_status().content
            answer = sdapi.post("/png-info", json={"image": base64.b64encode(data).decode()})
            assert answer.status_code == 200, answer.text
            parameters = answer.json()["parameters"]
            assert (parameters["Seed"], parameters["Steps"]) == ("4321", "3"), output_format
            assert parameters["Prompt"] == f"a {output_format} harbour"
            assert parameters["Negative prompt"] == "fog"
            assert (parameters["Size-1"], parameters["Size-2"]) == ("256", "256")
    plain = _png_base64(Image.new("RGB", (8, 8)))
    assert sdapi.post("/png-info", json={"image": plain}).json()["info"] == ""


def test_interrupt_ends_the_keys_waiting_render(local_stack: Stack) -> None:
    key = local_stack.create_key("interrupter", 100_000)
    api = _webui(local_stack, key)
    results: list = []

    def render() -> None:
        results.append(api.txt2img(prompt="a very long render", steps=150, width=256, height=256))

    thread = threading.Thread(target=render)
    thread.start()

    def rendering() -> bool:
        return api.get_progress()["state"]["sampling_step"] > 0

    wait_until(rendering, 60, "the A1111 render to start")
    assert api.interrupt() == {}
    thread.join(60)
    assert not thread.is_alive()
    [result] = results
    assert result.images == [] and result.info["infotexts"] == []
    [job] = _jobs(local_stack, key)
    assert job["status"] == "canceled"
    # Nothing left to interrupt: still {}.
    assert api.interrupt() == {} and api.skip() == {}


def test_interrupt_leaves_the_keys_other_jobs_alone(local_stack: Stack) -> None:
    key = local_stack.create_key("v1 jobs only", 100_000)
    with local_stack.client(key) as http:
        job = http.post(
            "/v1/jobs",
            json={"prompt": "long", "num_inference_steps": 150, "width": 256, "height": 256},
        ).json()
        wait_until(
            lambda: http.get(f"/v1/jobs/{job['id']}").json()["status"] == "running",
            60,
            "the job to run",
        )
        assert _webui(local_stack, key).interrupt() == {}
        assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
        assert http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200


@pytest.fixture(scope="module")
def models_and_loras(
    tmp_path_factory: pytest.TempPathFactory, model_cache: Path, tiny_lora_dir: Path
) -> Iterator[Stack]:
    """A stack with the tiny LoRA registry, and a second worker serving the second tiny model."""
    workdir = tmp_path_factory.mktemp("a1111")
    redis_process, port = start_redis(workdir / "redis")
    stacks = run_stack(
        "a1111-stack",
        0,
        port,
        workdir,
        model_cache,
        T2I_LORA_DIR=str(tiny_lora_dir),
        T2I_WORKER_HEARTBEAT_MAX_AGE_S="15",
    )
    stack = next(stacks)
    second = start_second_model_worker(stack, model_cache)
    try:
        api = _webui(stack, stack.api_key)
        wait_until(
            lambda: len(api.util_get_model_names()) == 2,
            180,
            f"a worker for each model:\n{second.log_tail()}",
        )
        yield stack
    finally:
        second.stop()
        next(stacks, None)
        redis_process.stop()


def test_the_model_a_key_sets_is_the_model_its_renders_use(models_and_loras: Stack) -> None:
    stack = models_and_loras
    key = stack.create_key("model chooser", 100_000)
    api = _webui(stack, key)
    assert sorted(api.util_get_model_names()) == ["tiny", SECOND_TINY_MODEL_ID]
    assert api.util_get_current_model() == "tiny"
    api.util_set_model(SECOND_TINY_MODEL_ID)
    assert api.util_get_current_model() == SECOND_TINY_MODEL_ID
    result = api.txt2img(prompt="a second model", steps=2, width=256, height=256)
    assert result.info["sd_model_name"] == SECOND_TINY_MODEL_ID
    assert _jobs(stack, key)[0]["request"]["model"] == SECOND_TINY_MODEL_ID
    # A request's own override wins; other keys keep the default.
    result = api.txt2img(
        prompt="the first model",
        steps=2,
        width=256,
        height=256,
        override_settings={"sd_model_checkpoint": "tiny"},
    )
    assert result.info["sd_model_name"] == "tiny"
    assert _webui(stack, stack.api_key).util_get_current_model() == "tiny"


def test_a_prompts_lora_tag_renders_as_the_jobs_loras_do(models_and_loras: Stack) -> None:
    stack = models_and_loras
    key = stack.create_key("lora tags", 100_000, watermark_exempt=True)
    api = _webui(stack, key)
    assert [(lora["name"], lora["alias"]) for lora in api.get_loras()] == [
        ("tiny-other", "tiny-other"),
        ("tiny-style", "tiny-style"),
    ]
    settings = {"seed": 99, "steps": 3, "width": 256, "height": 256, "cfg_scale": 7.0}
    tagged = api.txt2img(
        prompt="a red kite <lora:tiny-style:0.8>", sampler_name="Euler", **settings
    )
    assert tagged.info["prompt"] == "a red kite"
    assert "a red kite <lora:tiny-style:0.8>\n" in tagged.info["infotexts"][0]
    with stack.client(key) as http:
        job = http.post(
            "/v1/jobs",
            json={
                "prompt": "a red kite",
                "seed": 99,
                "num_inference_steps": 3,
                "width": 256,
                "height": 256,
                "guidance_scale": 7.0,
                "scheduler": "euler",
                "loras": [{"name": "tiny-style", "scale": 0.8}],
            },
        ).json()
        job = wait_for_job(http, job["id"])
        assert job["status"] == "succeeded", job
        data = httpx.get(job["images"][0]["url"], timeout=10).raise_for_status().content
    untagged = api.txt2img(prompt="a red kite", sampler_name="Euler", **settings)
    pixels = np.asarray(tagged.image.convert("RGB"))
    assert np.array_equal(pixels, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    assert not np.array_equal(pixels, np.asarray(untagged.image.convert("RGB")))
