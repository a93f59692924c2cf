"""Requests follow the family of the model they name, on every route: an SD 1.5 model (the
default, `tiny`) and an SDXL one (`tiny-xl`) made live by their workers' heartbeats, written the
way a worker writes them; the API alone, no render. A compatibility route's job is read back from
the job list once its short wait has given up on it."""

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from redis import Redis
from safetensors.numpy import save_file

from shared.info import WorkerInfo
from shared.model_families import MODEL_FAMILIES_KEY, record_model_family
from tests.support import Stack, service_env, start_redis
from worker.heartbeat import Heartbeat

XL = "tiny-xl"
SD15_SIZES = {"minimum": 256.0, "maximum": 1024.0, "multiple_of": 8}
XL_SIZES = {"minimum": 512.0, "maximum": 2048.0, "multiple_of": 8}
# Tiny test models' cross-attention: 32 (tiny SD 1.5) and 80 (tiny SDXL) text features.
WORKERS = {"tiny": ("sd15", 32), XL: ("sdxl", 80)}
PROMPT = {"prompt": "a lighthouse at dusk", "num_inference_steps": 2}
UNET_KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
KOHYA_KEY = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_v"
KOHYA_TE2 = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"


def worker_info(model: str) -> WorkerInfo:
    family, dim = WORKERS[model]
    return WorkerInfo(
        name=f"render@{model}",
        model=model,
        family=family,  # type: ignore[arg-type]
        cross_attention_dim=dim,
        device="cpu",
        max_batch_images=4,
        levers={},
        version="test",
    )


def write_adapters(directory: Path) -> None:
    rank = 4
    # Diffusers' names, trained on a model whose cross-attention takes 32 text features.
    save_file(
        {
            f"{UNET_KEY}.lora_A.weight": np.zeros((rank, 32), np.float16),
            f"{UNET_KEY}.lora_B.weight": np.zeros((32, rank), np.float16),
        },
        str(directory / "small.safetensors"),
    )
    # Kohya's names, with a second text encoder: trained on SDXL (2048 text features), and on
    # the tiny SDXL (80).
    for name, dim in (("xl", 2048), ("tiny-xl", 80)):
        save_file(
            {
                f"{KOHYA_KEY}.lora_down.weight": np.zeros((rank, dim), np.float16),
                f"{KOHYA_KEY}.lora_up.weight": np.zeros((640, rank), np.float16),
                f"{KOHYA_TE2}.lora_down.weight": np.zeros((rank, 1280), np.float16),
                f"{KOHYA_TE2}.lora_up.weight": np.zeros((1280, rank), np.float16),
            },
            str(directory / f"{name}.safetensors"),
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("model-families")
    redis_process, port = start_redis(workdir / "redis")
    loras = workdir / "loras"
    loras.mkdir()
    write_adapters(loras)
    env = service_env(
        T2I_REDIS_URL=f"redis://127.0.0.1:{port}/0",
        T2I_MODEL_ID="tiny",
        T2I_DATA_DIR=str(workdir / "data"),
        T2I_LORA_DIR=str(loras),
        # The heartbeats below are written once: they stay live for the module.
        T2I_WORKER_HEARTBEAT_MAX_AGE_S="3600",
        # No worker renders: a compatibility route gives up on its job at once.
        T2I_SYNC_WAIT_S="0.5",
    )
    stack = Stack(env, workdir, with_worker=False)
    redis = Redis.from_url(env["T2I_REDIS_URL"])
    try:
        stack.start()
        for model in WORKERS:
            Heartbeat(redis, f"render@{model}", lambda model=model: worker_info(model)).beat()
        yield stack
    finally:
        stack.stop()
        redis.close()
        redis_process.stop()


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx.Client]:
    with stack.client() as client:
        yield client


def submitted(client: httpx.Client, body: dict) -> dict:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()["request"]


def refused(response: httpx.Response) -> tuple[str, list[dict]]:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "validation_error"
    return error["message"], error["details"]


def newest_job(client: httpx.Client) -> dict:
    return client.get("/v1/jobs", params={"limit": 1}).raise_for_status().json()["data"][0]


def test_a_size_not_given_is_the_familys_default(client: httpx.Client) -> None:
    assert (submitted(client, PROMPT)["width"], submitted(client, PROMPT)["height"]) == (512, 512)
    xl = submitted(client, {**PROMPT, "model": XL})
    assert (xl["model"], xl["width"], xl["height"]) == (XL, 1024, 1024)
    given = submitted(client, {**PROMPT, "model": XL, "width": 768})
    assert (given["width"], given["height"]) == (768, 1024)
    # A prompt's LoRA tags leave the sides it did not give unset.
    tagged = submitted(client, {**PROMPT, "prompt": "a cat <lora:tiny-xl:0.5>", "model": XL})
    assert (tagged["width"], tagged["loras"]) == (1024, [{"name": "tiny-xl", "scale": 0.5}])
    form = {"request": (None, json.dumps({**PROMPT, "model": XL}), "application/json")}
    multipart = client.post("/v1/jobs", files=form)
    assert multipart.status_code == 202, multipart.text
    assert multipart.json()["request"]["width"] == 1024


@pytest.mark.parametrize(
    ("body", "family", "sides"),
    [
        ({"width": 2048, "height": 512}, "SD 1.5", ["width"]),
        ({"model": XL, "width": 256}, "SDXL", ["width"]),
        ({"model": XL, "height": 384, "width": 384}, "SDXL", ["width", "height"]),
    ],
)
def test_a_size_outside_the_models_family_gets_422(
    client: httpx.Client, body: dict, family: str, sides: list[str]
) -> None:
    message, details = refused(client.post("/v1/jobs", json={**PROMPT, **body}))
    assert [detail["loc"] for detail in details] == [["body", side] for side in sides]
    assert {detail["type"] for detail in details} == {"size_out_of_family"}
    assert f"{family} family" in message
    assert ("512 to 2048" if family == "SDXL" else "256 to 1024") in message
    # The same size is another family's to take.
    assert submitted(client, {**PROMPT, "model": XL, "width": 2048, "height": 512})["width"] == 2048


def test_the_pixel_budget_counts_the_filled_in_size(client: httpx.Client) -> None:
    assert submitted(client, {**PROMPT, "model": XL, "num_images": 2})["num_images"] == 2
    _, details = refused(client.post("/v1/jobs", json={**PROMPT, "model": XL, "num_images": 3}))
    assert details[0]["type"] == "pixel_budget"


def test_models_and_info_tell_each_models_family_and_sizes(client: httpx.Client) -> None:
    models = {m["id"]: m for m in client.get("/v1/models").raise_for_status().json()["data"]}
    assert models["tiny"] | {"queued": 0} == {
        "id": "tiny",
        "family": "sd15",
        "default_width": 512,
        "default_height": 512,
        "width": SD15_SIZES,
        "height": SD15_SIZES,
        "default": True,
        "workers": 1,
        "queued": 0,
        "control_types": [],
    }
    assert models[XL]["family"] == "sdxl"
    assert (models[XL]["default_width"], models[XL]["width"]) == (1024, XL_SIZES)
    info = client.get("/info").raise_for_status().json()
    assert info["models"] == ["tiny", XL]
    served = {model["id"]: model for model in info["served_models"]}
    assert served[XL] == {
        "id": XL,
        "family": "sdxl",
        "default_width": 1024,
        "default_height": 1024,
        "width": XL_SIZES,
        "height": XL_SIZES,
    }
    assert served["tiny"]["family"] == "sd15"
    assert info["limits"]["width"] == {"minimum": 256.0, "maximum": 2048.0, "multiple_of": 8}


@pytest.mark.parametrize("model_field", ["model", "size"])
def test_openai_renders_the_named_models_family(client: httpx.Client, model_field: str) -> None:
    body = {"prompt": "a kite", "model": XL}
    if model_field == "size":
        # OpenAI's any-size rule maps within the family's sizes.
        body["size"] = "4096x1024"
    answer = client.post("/v1/images/generations", json=body)
    assert answer.status_code == 504, answer.text
    request = newest_job(client)["request"]
    expected = (1024, 1024) if model_field == "model" else (2048, 512)
    assert (request["model"], request["width"], request["height"]) == (XL, *expected)
    client.post("/v1/images/generations", json={"prompt": "a kite", "model": "dall-e-3"})
    request = newest_job(client)["request"]
    assert (request["model"], request["width"]) == ("tiny", 512)


@pytest.mark.parametrize("route", ["txt2img", "img2img"])
def test_a1111_fills_in_the_family_of_its_checkpoint(client: httpx.Client, route: str) -> None:
    body: dict = {"prompt": "a kite", "steps": 2}
    if route == "img2img":
        body["init_images"] = [
            "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAAAAADhZOFXAAAAEElEQVR4nGNsYIAAJgaK"
            "GAAmCACQXTClHgAAAABJRU5ErkJggg=="
        ]
    overridden = {**body, "override_settings": {"sd_model_checkpoint": XL}}
    assert client.post(f"/sdapi/v1/{route}", json=overridden).status_code == 504
    request = newest_job(client)["request"]
    assert (request["model"], request["width"], request["height"]) == (XL, 1024, 1024)
    # The key's chosen checkpoint, and a size given.
    client.post("/sdapi/v1/options", json={"sd_model_checkpoint": XL}).raise_for_status()
    try:
        client.post(f"/sdapi/v1/{route}", json={**body, "width": 768})
        request = newest_job(client)["request"]
        assert (request["model"], request["width"], request["height"]) == (XL, 768, 1024)
        answer = client.post(f"/sdapi/v1/{route}", json={**body, "height": 256})
        assert answer.status_code == 422, answer.text
        assert answer.json()["errors"][0]["type"] == "size_out_of_family"
    finally:
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny"})


@pytest.mark.parametrize(
    ("adapter", "model", "made_for", "model_is"),
    [
        ("xl", "tiny", "SDXL", "SD 1.5, its cross-attention taking 32 text features"),
        (
            "small",
            XL,
            "a model whose cross-attention takes 32 text features",
            "SDXL, its cross-attention taking 80 text features",
        ),
    ],
)
def test_an_adapter_made_for_another_model_gets_422(
    client: httpx.Client, adapter: str, model: str, made_for: str, model_is: str
) -> None:
    body = {**PROMPT, "model": model, "loras": [{"name": adapter}]}
    message, [detail] = refused(client.post("/v1/jobs", json=body))
    assert (detail["type"], detail["loc"]) == ("lora_wrong_model", ["body", "loras", 0, "name"])
    assert f"made for {made_for}, not for the model {model!r} ({model_is})" in message
    fitting = {**PROMPT, "model": "tiny", "loras": [{"name": "small"}]}
    assert submitted(client, fitting)["loras"] == [{"name": "small", "scale": 1.0}]


def test_with_no_live_worker_the_models_record_decides(stack: Stack, client: httpx.Client) -> None:
    redis = Redis.from_url(stack.env["T2I_REDIS_URL"])
    sd15 = Heartbeat(redis, "render@tiny", lambda: worker_info("tiny"))
    sd15.leave()
    try:
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert (models["tiny"]["workers"], models["tiny"]["family"]) == (0, "sd15")
        # Nothing live, nothing recorded: the default family, and no adapter check.
        assert submitted(client, {**PROMPT, "loras": [{"name": "xl"}]})["width"] == 512
        record_model_family(redis, worker_info(XL).model_copy(update={"model": "tiny"}))
        assert submitted(client, PROMPT)["width"] == 1024
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert models["tiny"]["family"] == "sdxl"
        _, [detail] = refused(
            client.post("/v1/jobs", json={**PROMPT, "loras": [{"name": "small"}]})
        )
        assert detail["type"] == "lora_wrong_model"
    finally:
        redis.hdel(MODEL_FAMILIES_KEY, "tiny")
        sd15.beat()
        redis.close()
