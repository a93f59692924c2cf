"""Every stored image says where it came from, through every route: a C2PA manifest the c2pa
library verifies (its claims, and a hash that breaks with one changed pixel) and an invisible
watermark naming the job, both read back by `POST /v1/provenance/verify`, which names only the
caller's own jobs. A worker that cannot sign refuses to start."""

import base64
import hashlib
import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import httpx
import pytest
from PIL import Image

from shared import watermark
from shared.content_credentials import read_manifest
from shared.provenance import WatermarkPayload
from tests.conftest import run_stack
from tests.support import REPO_ROOT, Stack, service_env, start_redis, wait_for_job
from worker.encoding import read_parameters
from worker.tiny_model import ensure_tiny_model

QUICK = {"width": 256, "height": 256, "num_inference_steps": 2}
TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
PHOTO = REPO_ROOT / "examples/photo.png"
MASK = REPO_ROOT / "examples/mask.png"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_cache: Path, tiny_lora_dir: Path):
    workdir = tmp_path_factory.mktemp("provenance")
    redis_process, port = start_redis(workdir / "redis")
    try:
        yield from run_stack(
            "provenance-stack",
            0,
            port,
            workdir,
            model_cache,
            T2I_LORA_DIR=str(tiny_lora_dir),
            T2I_CONTROLNETS='{"canny": "tiny"}',
        )
    finally:
        redis_process.stop()


@pytest.fixture(scope="module")
def other_key(stack: Stack) -> str:
    return stack.create_key("someone else", 100_000)


@pytest.fixture(scope="module")
def exempt_key(stack: Stack) -> str:
    return stack.create_key("no watermark", 100_000, watermark_exempt=True)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def render(stack: Stack, key: str | None = None, **fields: object) -> dict:
    with stack.client(key) as client:
        response = client.post("/v1/jobs", json={"prompt": "a lighthouse", **QUICK, **fields})
        assert response.status_code == 202, response.text
        job = wait_for_job(client, response.json()["id"], timeout_s=120)
    assert job["status"] == "succeeded", job
    return job


def download(url: str) -> bytes:
    return httpx.get(url, timeout=10).raise_for_status().content


def verify(stack: Stack, data: bytes, key: str | None = None, multipart: bool = True) -> dict:
    with stack.client(key) as client:
        if multipart:
            response = client.post("/v1/provenance/verify", files={"image": ("x", data)})
        else:
            body = {"image": base64.b64encode(data).decode()}
            response = client.post("/v1/provenance/verify", json=body)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def tiny_unet_sha256(model_cache: Path) -> str:
    weights = ensure_tiny_model(model_cache) / "unet/diffusion_pytorch_model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest()


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_every_stored_image_carries_a_valid_manifest_and_the_jobs_watermark(
    stack: Stack, tiny_unet_sha256: str, output_format: str
) -> None:
    job = render(
        stack,
        num_images=2,
        output_format=output_format,
        loras=[{"name": "tiny-style", "scale": 0.8}],
    )
    for index, image in enumerate(job["images"]):
        assert image["provenance"] == {
            "c2pa_manifest": True,
            "development_signer": True,
            "watermark": True,
        }
        data = download(image["url"])
        report = read_manifest(data)
        assert report.present and report.valid, report
        assert report.development_signer and report.validation_state == "Valid"
        claims = report.claims
        assert claims["digital_source_type"] == TRAINED
        assert claims["job_id"] == job["id"] and claims["image_index"] == index
        assert claims["model_id"] == "tiny" and claims["model_sha256"] == tiny_unet_sha256
        assert claims["loras"] == [{"name": "tiny-style", "scale": 0.8}]
        assert claims["controlnets"] == [] and claims["ingredients"] == []
        assert claims["watermark"] == WatermarkPayload.of(job["id"], index).describe()
        # The operator did not allow prompts into the manifest.
        assert "prompt" not in claims and "negative_prompt" not in claims
        # The generation parameters survive signing.
        assert f"Seed: {image['seed']}" in (read_parameters(data) or "")
        if output_format == "png":
            # The tiny model's images are saturated 8x8 colour blocks, where a lossy format's
            # chroma subsampling clips the luma the watermark lives in; on natural images it
            # survives JPEG and WebP (tests/unit/test_watermark.py).
            found = watermark.decode(Image.open(io.BytesIO(data)))
            assert found is not None
            assert WatermarkPayload.from_int(found.payload) == WatermarkPayload.of(job["id"], index)


def test_input_images_are_the_manifests_ingredients_by_hash(stack: Stack) -> None:
    inpainting = render(stack, init_image=b64(PHOTO), mask_image=b64(MASK), strength=0.9)
    control = render(stack, control={"type": "canny", "image": b64(PHOTO)})
    photo_hash = hashlib.sha256(PHOTO.read_bytes()).hexdigest()
    mask_hash = hashlib.sha256(MASK.read_bytes()).hexdigest()

    claims = read_manifest(download(inpainting["images"][0]["url"])).claims
    assert [(i["role"], i["sha256"]) for i in claims["ingredients"]] == [
        ("init_image", photo_hash),
        ("mask", mask_hash),
    ]
    assert {i["relationship"] for i in claims["c2pa_ingredients"]} == {"inputTo"}
    claims = read_manifest(download(control["images"][0]["url"])).claims
    assert claims["controlnets"] == ["canny"]
    assert [(i["role"], i["sha256"]) for i in claims["ingredients"]] == [
        ("control:canny", photo_hash)
    ]


def _idat_with_one_pixel_changed(png: bytes) -> bytes:
    """The PNG with the last pixel's blue changed and its manifest kept in place: the image data
    re-deflated at the level that keeps its length is rare, so the one IDAT is rewritten whole,
    chunk length, CRC and all (the manifest binds the bytes around it by offset and hash)."""
    chunks, at = [], 8
    while at < len(png):
        (length,) = struct.unpack(">I", png[at : at + 4])
        chunks.append((png[at + 4 : at + 8], png[at + 8 : at + 8 + length]))
        at += 12 + length
    raw = bytearray(zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT")))
    raw[-1] ^= 0x40
    out, wrote = [png[:8]], False
    for kind, body in chunks:
        if kind == b"IDAT":
            if wrote:
                continue
            kind, body, wrote = b"IDAT", zlib.compress(bytes(raw), 1), True
        out.append(struct.pack(">I", len(body)) + kind + body)
        out.append(struct.pack(">I", zlib.crc32(kind + body)))
    return b"".join(out)


def test_one_changed_pixel_fails_the_manifest_but_not_the_watermark(stack: Stack) -> None:
    job = render(stack, seed=11)
    data = download(job["images"][0]["url"])
    tampered = _idat_with_one_pixel_changed(data)
    before = Image.open(io.BytesIO(data)).tobytes()
    after = Image.open(io.BytesIO(tampered)).tobytes()
    assert sum(a != b for a, b in zip(before, after, strict=True)) == 1

    answer = verify(stack, tampered)
    assert answer["c2pa"]["present"] and not answer["c2pa"]["valid"]
    assert "assertion.dataHash.mismatch" in answer["c2pa"]["failures"]
    assert answer["watermark"]["made_by"] == "your_job"
    assert answer["watermark"]["job_id"] == job["id"]


def test_verify_names_your_own_job_from_a_stripped_and_recompressed_copy(stack: Stack) -> None:
    job = render(stack, num_images=2, seed=21)
    data = download(job["images"][1]["url"])
    answer = verify(stack, data, multipart=False)
    assert answer["c2pa"]["valid"] and answer["c2pa"]["development_signer"]
    assert answer["c2pa"]["claims"]["job_id"] == job["id"]
    assert answer["watermark"] == {
        "found": True,
        "made_by": "your_job",
        "job_id": job["id"],
        "image_index": 1,
        "confidence": answer["watermark"]["confidence"],
    }
    assert "your job" in answer["summary"]

    # Cropped by a tenth and saved again: every metadata chunk, the manifest with them, is gone.
    picture = Image.open(io.BytesIO(data))
    buffer = io.BytesIO()
    picture.crop((13, 13, picture.width - 13, picture.height - 13)).save(buffer, format="PNG")
    stripped = verify(stack, buffer.getvalue())
    assert not stripped["c2pa"]["present"]
    assert stripped["watermark"]["job_id"] == job["id"]
    assert stripped["watermark"]["image_index"] == 1


def test_another_keys_job_is_only_watermarked_by_this_service(stack: Stack, other_key: str) -> None:
    job = render(stack, other_key, seed=31)
    data = download(job["images"][0]["url"])
    answer = verify(stack, data)
    assert answer["watermark"] == {
        "found": True,
        "made_by": "this_service",
        "job_id": None,
        "image_index": None,
        "confidence": answer["watermark"]["confidence"],
    }
    assert job["id"] not in answer["summary"]
    # Its owner is told which job it was.
    assert verify(stack, data, other_key)["watermark"]["job_id"] == job["id"]


def test_an_unmarked_image_has_neither_mark(stack: Stack) -> None:
    answer = verify(stack, PHOTO.read_bytes())
    assert answer["c2pa"]["present"] is False and answer["c2pa"]["valid"] is False
    assert answer["watermark"]["found"] is False and answer["watermark"]["made_by"] is None
    assert answer["summary"] == "no Content Credentials; no watermark of this service"


def test_an_exempt_key_gets_the_manifest_but_no_watermark(stack: Stack, exempt_key: str) -> None:
    job = render(stack, exempt_key, seed=41)
    [image] = job["images"]
    assert image["provenance"] == {
        "c2pa_manifest": True,
        "development_signer": True,
        "watermark": False,
    }
    data = download(image["url"])
    report = read_manifest(data)
    assert report.valid and report.claims["watermark"] is None
    assert verify(stack, data, exempt_key)["watermark"]["found"] is False


@pytest.mark.parametrize(
    ("body", "files", "message"),
    [
        ({"image": "not base64!"}, None, "image"),
        (None, {"file": ("x", b"abc")}, "multipart part named `image`"),
        (None, {"image": ("x", b"not an image")}, "not an image"),
    ],
)
def test_bad_uploads_get_a_clear_validation_error(
    stack: Stack, body: dict | None, files: dict | None, message: str
) -> None:
    with stack.client() as client:
        response = client.post("/v1/provenance/verify", json=body, files=files)
    assert response.status_code == 422, response.text
    assert message in response.json()["error"]["message"]


def test_images_from_the_openai_and_a1111_routes_carry_both_marks(stack: Stack) -> None:
    with stack.client() as client:
        openai = client.post(
            "/v1/images/generations",
            json={"prompt": "a lighthouse", "size": "256x256", "response_format": "b64_json"},
            timeout=120,
        )
        assert openai.status_code == 200, openai.text
        a1111 = client.post(
            "/sdapi/v1/txt2img",
            json={"prompt": "a lighthouse", "width": 256, "height": 256, "steps": 2},
            timeout=120,
        )
        assert a1111.status_code == 200, a1111.text
    files = [
        base64.b64decode(openai.json()["data"][0]["b64_json"]),
        base64.b64decode(a1111.json()["images"][0]),
    ]
    for data in files:
        answer = verify(stack, data)
        assert answer["c2pa"]["valid"], answer
        assert answer["watermark"]["made_by"] == "your_job", answer
        assert answer["watermark"]["job_id"] == answer["c2pa"]["claims"]["job_id"]


def _start_worker(tmp_path: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    env = service_env(
        T2I_MODEL_ID="tiny",
        T2I_MODEL_CACHE_DIR=str(tmp_path / "models"),
        T2I_METRICS_PORT="0",
        **settings,
    )
    return subprocess.run(
        [sys.executable, "-m", "worker"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"T2I_ENV": "production", "T2I_SIGNING_SECRET": "a-real-secret"},
            "set T2I_C2PA_CERT and T2I_C2PA_KEY",
        ),
        ({"T2I_C2PA_CERT": "/nonexistent/chain.pem", "T2I_C2PA_KEY": "k"}, "T2I_C2PA_CERT"),
    ],
)
def test_a_worker_that_cannot_sign_refuses_to_start(
    tmp_path: Path, settings: dict[str, str], message: str
) -> None:
    finished = _start_worker(tmp_path, **settings)
    assert finished.returncode == 2, finished.stderr
    assert message in finished.stderr
    # It refused before building or loading any model.
    assert not list((tmp_path / "models").glob("tiny-sd15*"))


def test_a_key_of_another_certificate_is_refused_at_start(
    tmp_path: Path, model_cache: Path
) -> None:
    from shared.content_credentials import make_development_credentials

    chain, _ = make_development_credentials(tmp_path / "one")
    _, other_key = make_development_credentials(tmp_path / "two")
    finished = _start_worker(tmp_path, T2I_C2PA_CERT=str(chain), T2I_C2PA_KEY=str(other_key))
    assert finished.returncode == 2, finished.stderr
    assert "T2I_C2PA_KEY" in finished.stderr
