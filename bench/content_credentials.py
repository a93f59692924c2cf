"""What signing a C2PA manifest into each image costs, and reading it back.

A development chain (made in a temp dir, as a worker in development makes its own) signs a
512x512 picture (a gradient under noise, so PNG and WebP are about as large as a render's)
encoded as the worker encodes it (`worker.encoding.encode_image`, its parameters text inside) in
PNG, JPEG and WebP: for each format the median milliseconds of `CredentialSigner.sign` and of
`read_manifest` (parse, signature and hash check) over `--repeats` runs after a warm-up, the
bytes the manifest adds, and images/s signing from `--threads` threads at once. It also times
`CredentialSigner.from_files` (which signs and verifies a test image). `python -m
bench.content_credentials`; JSON to stdout and bench/results/content_credentials.json
(`--smoke`: a few repeats, no file unless `--out` names one).
"""

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psutil
from PIL import Image

from shared.content_credentials import (
    Claims,
    CredentialSigner,
    Ingredient,
    make_development_credentials,
    read_manifest,
)
from tests.support import REPO_ROOT
from worker.encoding import encode_image

RESULTS_FILE = REPO_ROOT / "bench" / "results" / "content_credentials.json"
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
PARAMETERS = "a lighthouse at dusk, oil painting\nSteps: 25, Sampler: DPM++ 2M Karras, Seed: 1"


def _picture(size: int) -> Image.Image:
    gradient = Image.linear_gradient("L").resize((size, size))
    noise = Image.effect_noise((size, size), 40)
    return Image.merge("RGB", (gradient, noise, gradient.rotate(90)))


def _claims(n: int) -> Claims:
    return Claims(
        generator="txt2img-service",
        generator_version=version("txt2img-service"),
        model_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
        model_sha256="5f" * 32,
        loras=(("pixel-art", 0.8),),
        controlnets=("canny",),
        job_id=f"bench-{n}",
        image_index=0,
        watermark="dwt-dct:0x1a2b3c4d5e6f",
        prompt=None,
        negative_prompt=None,
        ingredients=(Ingredient("control:canny", "ab" * 32, "image/png"),),
        development_signer=True,
    )


def _median_ms(call: Any, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 2)


def _measure(
    signer: CredentialSigner, data: bytes, content_type: str, args: argparse.Namespace
) -> dict[str, Any]:
    signed = signer.sign(data, content_type, _claims(0))
    report = read_manifest(signed, content_type)
    assert report.valid, report
    counter = iter(range(10**9))
    sign_ms = _median_ms(
        lambda: signer.sign(data, content_type, _claims(next(counter))), args.repeats
    )
    read_ms = _median_ms(lambda: read_manifest(signed, content_type), args.repeats)
    jobs = args.repeats * args.threads
    start = time.perf_counter()
    with ThreadPoolExecutor(args.threads) as pool:
        list(pool.map(lambda n: signer.sign(data, content_type, _claims(n)), range(jobs)))
    threaded = jobs / (time.perf_counter() - start)
    return {
        "image_bytes": len(data),
        "bytes_added": len(signed) - len(data),
        "sign_ms": sign_ms,
        "read_verify_ms": read_ms,
        f"sign_images_per_s_{args.threads}_threads": round(threaded, 1),
        "validation_state": report.validation_state,
        "failures": list(report.failures),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir:
        files = make_development_credentials(Path(workdir))
        start = time.perf_counter()
        signer = CredentialSigner.from_files(*files)
        start_ms = round((time.perf_counter() - start) * 1e3, 1)
    picture = _picture(args.size)
    formats: dict[str, Any] = {}
    for name, content_type in CONTENT_TYPES.items():
        formats[name] = _measure(
            signer, encode_image(picture, name, PARAMETERS), content_type, args
        )
        print(json.dumps({name: formats[name]}), file=sys.stderr)
    return {
        "benchmark": "content_credentials",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": psutil.cpu_count(),
            "python": platform.python_version(),
            "c2pa_python": version("c2pa-python"),
            "load_average_1m": round(psutil.getloadavg()[0], 2),
        },
        "config": {
            "image_size": args.size,
            "repeats": args.repeats,
            "threads": args.threads,
            "alg": "ES256",
            "thumbnail": False,
        },
        "signer_start_ms": start_ms,
        "formats": formats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="image width and height")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="3 repeats, no file written")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.smoke:
        args.repeats = 3
    out = args.out or (None if args.smoke else RESULTS_FILE)
    figures = run(args)
    text = json.dumps(figures, indent=2)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


if __name__ == "__main__":
    main()
