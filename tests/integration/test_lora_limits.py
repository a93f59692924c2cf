"""What the API refuses of a request's LoRA adapters before anything is queued, through HTTP: an
adapter that is not a LoRA file, one that targets layers the workers' LoRA slots do not cover,
and adapters whose ranks add up to more than the slots' rank. No worker is needed to refuse."""

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from redis import Redis
from safetensors.numpy import save_file

from tests.conftest import run_stack
from tests.support import Stack

MAX_RANK = 32
BODY = {"prompt": "a lighthouse at dusk", "num_inference_steps": 2}
ATTENTION = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def write_adapter(path: Path, module: str, rank: int, down: str, up: str) -> None:
    save_file(
        {
            f"{module}.{down}": np.zeros((rank, 32), np.float16),
            f"{module}.{up}": np.zeros((32, rank), np.float16),
        },
        str(path),
    )


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("lora-registry")
    write_adapter(directory / "fits.safetensors", ATTENTION, 16, "lora_A.weight", "lora_B.weight")
    write_adapter(
        directory / "locon.safetensors",
        "lora_unet_down_blocks_0_resnets_0_conv1",
        8,
        "lora_down.weight",
        "lora_up.weight",
    )
    (directory / "broken.safetensors").write_bytes(b"GIF89a" + bytes(32))
    return directory


@pytest.fixture(scope="module")
def lora_api(redis_port: int, workdir: Path, model_cache: Path, registry: Path) -> Iterator[Stack]:
    """The API alone, with slots of rank MAX_RANK: refusals happen before any worker is asked."""
    yield from run_stack(
        "lora-limits",
        11,
        redis_port,
        workdir,
        model_cache,
        with_worker="no",
        T2I_LORA_DIR=str(registry),
        T2I_LORA_MAX_RANK=str(MAX_RANK),
    )


@pytest.fixture
def client(lora_api: Stack) -> Iterator[httpx.Client]:
    with lora_api.client() as client:
        yield client


def refused(stack: Stack, client: httpx.Client, loras: list[dict]) -> dict:
    """The 422 a request naming `loras` gets, once it is clear that nothing was queued."""
    redis = Redis.from_url(stack.env["T2I_REDIS_URL"])

    def snapshot() -> tuple:
        return set(redis.scan_iter("t2i:job:*")), redis.llen("txt2img")

    before = snapshot()
    response = client.post("/v1/jobs", json={**BODY, "loras": loras})
    assert response.status_code == 422, response.text
    assert snapshot() == before
    redis.close()
    error = response.json()["error"]
    assert error["type"] == "validation_error"
    [detail] = error["details"]
    return {"message": error["message"], **detail}


def test_the_listing_gives_each_adapters_rank(client: httpx.Client) -> None:
    listed = client.get("/v1/loras").raise_for_status().json()["data"]
    assert {lora["name"]: lora["rank"] for lora in listed} == {
        "broken": None,
        "fits": 16,
        "locon": 8,
    }


def test_an_adapter_that_fits_is_accepted(client: httpx.Client) -> None:
    response = client.post("/v1/jobs", json={**BODY, "loras": [{"name": "fits"}]})
    assert response.status_code == 202, response.text
    client.post(f"/v1/jobs/{response.json()['id']}/cancel").raise_for_status()


def test_a_file_that_is_not_a_lora_adapter_gets_422(lora_api: Stack, client: httpx.Client) -> None:
    detail = refused(lora_api, client, [{"name": "fits"}, {"name": "broken"}])
    assert (detail["type"], detail["loc"]) == ("lora_invalid", ["body", "loras", 1, "name"])
    assert "'broken'" in detail["message"] and "not a safetensors file" in detail["message"]


def test_an_adapter_of_layers_the_slots_do_not_cover_gets_422(
    lora_api: Stack, client: httpx.Client
) -> None:
    detail = refused(lora_api, client, [{"name": "locon"}])
    assert (detail["type"], detail["loc"]) == ("lora_unsupported", ["body", "loras", 0, "name"])
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in detail["message"]
    assert "attention, feed-forward and projection layers" in detail["message"]


def test_adapters_whose_ranks_add_up_past_the_slots_rank_get_422(
    lora_api: Stack, client: httpx.Client, registry: Path
) -> None:
    # The registry is read per request: an adapter added now is checked at once.
    write_adapter(
        registry / "wide.safetensors", ATTENTION, 24, "lora.down.weight", "lora.up.weight"
    )
    try:
        detail = refused(lora_api, client, [{"name": "fits"}, {"name": "wide"}])
    finally:
        (registry / "wide.safetensors").unlink()
    assert (detail["type"], detail["loc"]) == ("lora_rank_too_large", ["body", "loras"])
    assert detail["ctx"] == {"ranks": {"fits": 16, "wide": 24}, "max_rank": MAX_RANK}
    assert "fits: 16, wide: 24" in detail["message"]
    assert "T2I_LORA_MAX_RANK" in detail["message"]
