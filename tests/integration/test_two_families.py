"""Two model families side by side, from outside: a worker serving the tiny SD 1.5 model from its
single-file checkpoint, and one serving the tiny SDXL model (with its adapters and ControlNet).
Jobs from `/v1/jobs`, the `openai` package and the `webuiapi` package land on the worker of the
model they name, at its family's default size when they give none, and every SDXL feature works
through the service: adapters (an SD 1.5 adapter is refused), ControlNet and the safety actions."""

import base64
import io
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import webuiapi
from PIL import Image

from tests.conftest import run_stack
from tests.support import Process, Stack, start_redis, wait_for_job, wait_until
from worker.encoding import read_parameters
from worker.tiny_customization import ensure_tiny_loras_of_both_families
from worker.tiny_model import FLAGGED_XL_REQUEST, TINY_XL_MODEL_ID, ensure_tiny_model

FAST = {"num_inference_steps": 2, "seed": 11}
XL_SMALL = {"model": TINY_XL_MODEL_ID, "width": 512, "height": 512, **FAST}


@pytest.fixture(scope="module")
def both_families(workdir: Path, model_cache: Path) -> Iterator[Stack]:
    """The default model, tiny SD 1.5, served from its single-file checkpoint; beside it a worker
    of the tiny SDXL model. One LoRA registry holds both families' adapters."""
    redis_process, port = start_redis(workdir / "two-families-redis")
    loras = ensure_tiny_loras_of_both_families(model_cache)
    checkpoint = ensure_tiny_model(model_cache).with_suffix(".safetensors")
    stacks = run_stack(
        "two-families",
        0,
        port,
        workdir,
        model_cache,
        T2I_MODEL_ID=str(checkpoint),
        T2I_MODEL_NAME="tiny",
        T2I_DEFAULT_MODEL="tiny",
        T2I_SINGLE_FILE_CONFIG="tiny",
        T2I_LORA_DIR=str(loras),
        # The least strict action, so that each request may ask for a stricter one.
        T2I_SAFETY_ACTION="flag",
        # A busy worker on a loaded machine may miss a heartbeat or two.
        T2I_WORKER_HEARTBEAT_MAX_AGE_S="15",
    )
    stack = next(stacks)
    environment = {key: value for key, value in stack.env.items() if key != "T2I_MODEL_NAME"}
    sdxl = Process(
        "sdxl-worker",
        [sys.executable, "-m", "worker"],
        {
            **environment,
            "T2I_MODEL_ID": TINY_XL_MODEL_ID,
            "T2I_CONTROLNETS": '{"canny": "tiny-xl"}',
        },
        stack.workdir / "sdxl-worker.log",
    ).start()
    try:
        with stack.client() as client:
            wait_until(
                lambda: _served(client) == {"tiny": 1, TINY_XL_MODEL_ID: 1},
                240,
                f"a worker for each family:\n{sdxl.log_tail()}",
            )
        yield stack
    finally:
        sdxl.stop()
        next(stacks, None)
        redis_process.stop()


def _served(client: httpx.Client) -> dict[str, int]:
    models = client.get("/v1/models").raise_for_status().json()["data"]
    return {model["id"]: model["workers"] for model in models}


def _render(stack: Stack, key: str | None = None, **request: object) -> dict:
    with stack.client(key) as client:
        response = client.post("/v1/jobs", json={"prompt": "a kite over hills", **request})
        assert response.status_code == 202, response.text
        job = wait_for_job(client, response.json()["id"], timeout_s=240)
    assert job["status"] == "succeeded", job
    return job


def _image(job: dict, index: int = 0) -> Image.Image:
    data = httpx.get(job["images"][index]["url"], timeout=10).raise_for_status().content
    return Image.open(io.BytesIO(data))


def _model_of(image: Image.Image) -> str:
    parameters = image.info.get("parameters") or read_parameters(_png(image))
    assert parameters is not None
    return parameters.rsplit("Model: ", 1)[1].split(",")[0]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _mean_difference(first: Image.Image, second: Image.Image) -> float:
    def as_array(image: Image.Image) -> np.ndarray:
        return np.asarray(image.convert("RGB"), dtype=np.int16)

    return float(np.abs(as_array(first) - as_array(second)).mean())


def test_each_model_says_its_family_with_its_default_and_allowed_sizes(
    both_families: Stack,
) -> None:
    with both_families.client() as client:
        models = client.get("/v1/models").raise_for_status().json()["data"]
        info = client.get("/info").raise_for_status().json()
    families = {model["id"]: model["family"] for model in models}
    assert families == {"tiny": "sd15", TINY_XL_MODEL_ID: "sdxl"}
    defaults = {model["id"]: (model["default_width"], model["default_height"]) for model in models}
    assert defaults == {"tiny": (512, 512), TINY_XL_MODEL_ID: (1024, 1024)}
    workers = {worker["model"]: worker["family"] for worker in info["workers"]}
    assert workers == {"tiny": "sd15", TINY_XL_MODEL_ID: "sdxl"}


def test_a_job_lands_on_the_worker_of_the_model_it_names_at_its_familys_default_size(
    both_families: Stack,
) -> None:
    sd15 = _render(both_families, **FAST)
    sdxl = _render(both_families, model=TINY_XL_MODEL_ID, **FAST)
    assert (sd15["request"]["width"], sd15["request"]["height"]) == (512, 512)
    assert (sdxl["request"]["width"], sdxl["request"]["height"]) == (1024, 1024)
    first, second = _image(sd15), _image(sdxl)
    assert (_model_of(first), first.size) == ("tiny", (512, 512))
    assert (_model_of(second), second.size) == (TINY_XL_MODEL_ID, (1024, 1024))


def test_sizes_outside_the_models_family_are_refused(both_families: Stack) -> None:
    with both_families.client() as client:
        too_small = client.post(
            "/v1/jobs", json={"prompt": "x", **XL_SMALL, "width": 256, "height": 256}
        )
        too_large = client.post("/v1/jobs", json={"prompt": "x", "width": 2048, **FAST})
    assert too_small.status_code == too_large.status_code == 422
    assert "SDXL" in too_small.json()["error"]["message"]
    assert "SD 1.5" in too_large.json()["error"]["message"]


def test_the_openai_package_reaches_the_sdxl_worker_by_its_model(both_families: Stack) -> None:
    with openai.OpenAI(
        base_url=f"{both_families.base_url}/v1", api_key=both_families.api_key, max_retries=0
    ) as client:
        result = client.images.generate(
            prompt="a kite over hills",
            model=TINY_XL_MODEL_ID,
            size="512x512",
            response_format="b64_json",
            extra_body=FAST,
        )
    [data] = result.data or []
    image = Image.open(io.BytesIO(base64.b64decode(data.b64_json or "")))
    assert (_model_of(image), image.size) == (TINY_XL_MODEL_ID, (512, 512))


def test_the_webuiapi_package_reaches_the_sdxl_worker_by_its_checkpoint(
    both_families: Stack,
) -> None:
    host, port = both_families.base_url.removeprefix("http://").rsplit(":", 1)
    key = both_families.create_key("checkpoint chooser", 100_000)
    api = webuiapi.WebUIApi(host=host, port=int(port), username="user", password=key)
    assert sorted(api.util_get_model_names()) == ["tiny", TINY_XL_MODEL_ID]
    overridden = api.txt2img(
        prompt="a kite",
        steps=2,
        width=512,
        height=512,
        override_settings={"sd_model_checkpoint": TINY_XL_MODEL_ID},
    )
    assert overridden.info["sd_model_name"] == TINY_XL_MODEL_ID
    assert _model_of(overridden.image) == TINY_XL_MODEL_ID
    api.util_set_model(TINY_XL_MODEL_ID)
    chosen = api.txt2img(prompt="a kite", steps=2, width=512, height=512)
    assert chosen.info["sd_model_name"] == TINY_XL_MODEL_ID


def test_an_sdxl_adapter_changes_the_image_and_an_sd15_adapter_is_refused(
    both_families: Stack,
) -> None:
    plain = _image(_render(both_families, **XL_SMALL))
    styled = _image(
        _render(both_families, **XL_SMALL, loras=[{"name": "tiny-xl-style", "scale": 1.0}])
    )
    assert _mean_difference(plain, styled) > 6
    with both_families.client() as client:
        sd15_on_sdxl = client.post(
            "/v1/jobs",
            json={"prompt": "x", **XL_SMALL, "loras": [{"name": "tiny-style", "scale": 1.0}]},
        )
        sdxl_on_sd15 = client.post(
            "/v1/jobs",
            json={"prompt": "x", **FAST, "loras": [{"name": "tiny-xl-style", "scale": 1.0}]},
        )
    assert sd15_on_sdxl.status_code == sdxl_on_sd15.status_code == 422
    assert sd15_on_sdxl.json()["error"]["details"][0]["loc"] == ["body", "loras", 0, "name"]
    assert "SDXL" in sd15_on_sdxl.json()["error"]["message"]


def test_an_sdxl_controlnet_changes_the_image(both_families: Stack) -> None:
    coarse = np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    picture = Image.fromarray(coarse).resize((512, 512), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    control = {"type": "canny", "image": base64.b64encode(buffer.getvalue()).decode()}
    plain = _image(_render(both_families, **XL_SMALL))
    controlled = _image(_render(both_families, **XL_SMALL, control=control))
    assert _mean_difference(plain, controlled) > 6


@pytest.mark.parametrize("action", ["blur", "block"])
def test_the_safety_actions_apply_to_sdxl_images(both_families: Stack, action: str) -> None:
    flagged = {**FLAGGED_XL_REQUEST, "model": TINY_XL_MODEL_ID}
    job = _render(both_families, **flagged, safety_action=action)
    [image] = job["images"]
    assert image["safety"]["flagged"] is True
    assert image["safety"]["action"] == action
    if action == "block":
        assert image["url"] is None and image["filtered"]
    else:
        assert image["url"] and not image["filtered"]
