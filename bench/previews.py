"""What live previews cost the render core: the tiny model's throughput on this CPU with previews
off, every 5 steps and every step, and every 5 steps decoded by the tiny autoencoder (the random
AutoencoderTiny of T2I_PREVIEW_VAE=tiny, on a second core of the same model), in one run.

Each round renders the same batch (`--images` images of `--size` pixels, `--steps` steps, guided,
dpmpp_2m) once per setting, the settings' order rotating from round to round so a drift of the
machine's load falls on each alike; every image of the batch asks for a preview of at most 64
pixels in the two preview settings. Reported: the median images/s of each setting over the
rounds, and its overhead against off (positive: slower). The previews' callback does nothing
(the executor's hand-off is not timed here). The first preview of a renderer fits its latent-to-
RGB map; that fit is done once before timing, as a warm worker has it done after its first
preview. `python -m bench.previews [--smoke]`; JSON to stdout and bench/results/previews.json.
"""

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tests.support import REPO_ROOT
from worker.kinds import load_renderer
from worker.pipeline import DiffusionRenderer
from worker.render_types import PreviewAsk, RenderBatch, RenderItem

RESULTS_FILE = REPO_ROOT / "bench" / "results" / "previews.json"
# The preview settings: every how many steps (None: off).
SETTINGS: dict[str, int | None] = {"off": None, "every_5": 5, "every_step": 1, "taesd": 5}
# The settings whose previews the tiny autoencoder decodes, not the linear map.
TINY_AUTOENCODER_SETTINGS = {"taesd"}
PREVIEW_SIZE = 64


def job(args: argparse.Namespace, every: int | None) -> RenderBatch:
    ask = None if every is None else PreviewAsk(every, PREVIEW_SIZE)
    return RenderBatch(
        items=tuple(
            RenderItem("a lighthouse", "", seed, preview=ask) for seed in range(args.images)
        ),
        width=args.size,
        height=args.size,
        num_inference_steps=args.steps,
        guidance_scale=7.5,
        scheduler="dpmpp_2m",
    )


def timed(renderer: DiffusionRenderer, batch: RenderBatch) -> tuple[float, int]:
    """Seconds of one render and how many previews it gave."""
    previews = [0]

    def on_preview(step: int, total: int, images: dict) -> None:
        previews[0] += len(images)

    started = time.perf_counter()
    renderer.render(batch, None, on_preview)
    return time.perf_counter() - started, previews[0]


def run(args: argparse.Namespace) -> dict[str, Any]:
    renderer = load_renderer("tiny", args.cache_dir, "cpu")
    decoding = load_renderer("tiny", args.cache_dir, "cpu", preview_vae="tiny")
    renderers = {
        name: decoding if name in TINY_AUTOENCODER_SETTINGS else renderer for name in SETTINGS
    }
    batches = {name: job(args, every) for name, every in SETTINGS.items()}
    # Warm: kernels chosen for the shape, and the preview map fitted.
    timed(renderer, batches["every_step"])
    timed(decoding, batches["taesd"])
    seconds: dict[str, list[float]] = {name: [] for name in SETTINGS}
    previews: dict[str, int] = {}
    names = list(SETTINGS)
    for round_ in range(args.rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed, count = timed(renderers[name], batches[name])
            seconds[name].append(elapsed)
            previews[name] = count
    throughput = {name: args.images / statistics.median(values) for name, values in seconds.items()}
    off = throughput["off"]
    return {
        "images_per_s": {name: round(value, 3) for name, value in throughput.items()},
        "overhead_pct_vs_off": {
            name: round((off / value - 1) * 100, 1) for name, value in throughput.items()
        },
        "render_s_by_round": {
            name: [round(s, 3) for s in values] for name, values in seconds.items()
        },
        "previews_per_render": previews,
        "rounds": args.rounds,
        "config": {
            "model": "tiny",
            "device": "cpu",
            "dtype": str(renderer.dtype),
            "images_per_batch": args.images,
            "size": f"{args.size}x{args.size}",
            "steps": args.steps,
            "guidance_scale": 7.5,
            "scheduler": "dpmpp_2m",
            "preview_max_size": PREVIEW_SIZE,
            "taesd": "the tiny random AutoencoderTiny (8 channels, 1 block a stage)",
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="renders per setting")
    parser.add_argument("--images", type=int, default=2, help="images per batch")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--smoke", action="store_true", help="1 round of 64x64, 5 steps, no file")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "t2i-bench-models",
        help="where the tiny model is built",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_FILE)
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.size, args.steps = 1, 64, 5
    figures = run(args)
    text = json.dumps(figures, indent=2)
    print(text)
    if not args.smoke:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
