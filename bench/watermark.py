"""The watermark's robustness, visibility and speed on 512x512 images.

For `--images` smooth random images like the tiny model's (low-pass colour noise, seeds 0..N-1)
and `--photos` 512x512 crops of examples/photo.png (resized to 560), each marked with its own
random payload: per transform of the test suite's list (the stored encodings, JPEG 90/75/50, half
size, 10% crops, PNG to WebP 80) the bit accuracy (mean and worst) and how many decoded to the
exact payload; the PSNR of marked against unmarked; embed and decode milliseconds (median); and
how many of the unmarked images (and their JPEG 75 copies) decoded to anything (should be 0).
`python -m bench.watermark [--smoke]`; JSON to stdout and bench/results/watermark.json.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from shared import watermark
from tests.support import REPO_ROOT
from tests.unit.test_watermark import TRANSFORMS, photo, psnr, smooth_image

RESULTS_FILE = REPO_ROOT / "bench" / "results" / "watermark.json"


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1e3


def run(images: int, photos: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    originals: list[tuple[str, Image.Image]] = [
        (f"smooth-{seed}", smooth_image(seed)) for seed in range(images)
    ] + [(f"photo-{n}", photo(offset=n * 48 // max(photos, 1))) for n in range(photos)]
    per_transform: dict[str, dict[str, list[Any]]] = {
        name: {"accuracy": [], "decoded": []} for name in TRANSFORMS
    }
    psnrs, embed_ms, decode_ms, confidences = [], [], [], []
    false_decodes = 0
    for _, image in originals:
        payload = int(rng.integers(0, 1 << watermark.PAYLOAD_BITS))
        started = time.perf_counter()
        marked = watermark.embed(image, payload)
        embed_ms.append(_ms(started))
        psnrs.append(psnr(image, marked))
        started = time.perf_counter()
        found = watermark.decode(marked)
        decode_ms.append(_ms(started))
        confidences.append(found.confidence if found else 0.0)
        for name, transform in TRANSFORMS.items():
            copy = transform(marked)
            found = watermark.decode(copy)
            per_transform[name]["decoded"].append(found is not None and found.payload == payload)
            per_transform[name]["accuracy"].append(watermark.bit_accuracy(copy, payload))
        for unmarked in (image, TRANSFORMS["jpeg75"](image)):
            false_decodes += watermark.decode(unmarked) is not None
    count = len(originals)
    return {
        "images": count,
        "smooth_images": images,
        "photo_crops": photos,
        "size": "512x512",
        "transforms": {
            name: {
                "bit_accuracy_mean": round(statistics.mean(values["accuracy"]), 4),
                "bit_accuracy_min": round(min(values["accuracy"]), 4),
                "decoded": f"{sum(values['decoded'])}/{count}",
                "all_decoded": all(values["decoded"]),
            }
            for name, values in per_transform.items()
        },
        "psnr_db_mean": round(statistics.mean(psnrs), 2),
        "psnr_db_min": round(min(psnrs), 2),
        "confidence_stored_png_mean": round(statistics.mean(confidences), 3),
        "embed_ms_median": round(statistics.median(embed_ms), 1),
        "decode_ms_median": round(statistics.median(decode_ms), 1),
        "unmarked_false_decodes": f"{false_decodes}/{2 * count}",
        "config": {
            "step": watermark.STEP,
            "coefficients": [f"{v},{u}" for v, u in watermark.COEFFICIENTS],
            "flat_std": watermark.FLAT_STD,
            "min_strength": watermark.MIN_STRENGTH,
            "min_confidence": watermark.MIN_CONFIDENCE,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "machine": platform.machine(),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20, help="smooth random images")
    parser.add_argument("--photos", type=int, default=4, help="crops of examples/photo.png")
    parser.add_argument("--smoke", action="store_true", help="3 images and 1 photo, no file")
    parser.add_argument("--out", type=Path, default=RESULTS_FILE)
    args = parser.parse_args()
    if args.smoke:
        args.images, args.photos = 3, 1
    figures = run(args.images, args.photos)
    text = json.dumps(figures, indent=2)
    print(text)
    if not args.smoke:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
