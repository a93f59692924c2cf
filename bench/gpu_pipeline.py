"""GPU pipeline benchmark: plain diffusers against our render path and executor, on one card.

`python -m bench.gpu_pipeline` on a CUDA machine times SD 1.5's architecture with random weights
at 512x512 and writes bench/results/<date>-<gpu>.json; `--smoke` runs the same code on a CPU with
the tiny model, to prove it executes. It prints the figures as JSON either way.
"""

import argparse
import datetime
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from worker.executor import GpuExecutor, RenderJob
from worker.pipeline import (
    DiffusionRenderer,
    RenderBatch,
    RenderItem,
    SpeedLevers,
    batch_buckets,
)
from worker.tiny_model import ensure_tiny_model

RESULTS_DIR = Path(__file__).resolve().parent / "results"
READY = "bench-ready"
GUIDANCE = 7.5
PROMPT = "a lighthouse at dusk, oil painting, highly detailed"


def build_sd15(target: Path, cache_dir: Path) -> Path:
    """SD 1.5's architecture (UNet, VAE, CLIP ViT-L text encoder) with random weights, saved as a
    diffusers directory: the tiny model's components grown to SD 1.5's sizes, so it has the real
    model's shapes and FLOPs and needs no hub. Only the tokenizer stays byte-level."""
    if (target / "model_index.json").is_file():
        return target
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from diffusers import UNet2DConditionModel as UNet
    from transformers import CLIPTextConfig, CLIPTextModel

    tiny = StableDiffusionPipeline.from_pretrained(ensure_tiny_model(cache_dir))
    torch.manual_seed(0)
    unet = UNet.from_config(
        tiny.unet.config,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL.from_config(
        tiny.vae.config,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        norm_num_groups=32,
        scaling_factor=0.18215,
    )
    text_config = tiny.text_encoder.config.to_dict()
    text_config.update(
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        hidden_act="quick_gelu",
    )
    # The seed notebook's scheduler: SD 1.5's own PNDM configuration.
    scheduler = PNDMScheduler.from_config(
        tiny.scheduler.config, skip_prk_steps=True, set_alpha_to_one=False
    )
    components = {
        **tiny.components,
        "unet": unet,
        "vae": vae,
        "text_encoder": CLIPTextModel(CLIPTextConfig(**text_config)),
        "scheduler": scheduler,
    }
    StableDiffusionPipeline(**components, requires_safety_checker=False).save_pretrained(target)
    return target


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def mean_seconds(run: Callable[[], Any], repeats: int) -> float:
    """Mean wall time of `run` after one untimed warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.mean(times)


def plain_diffusers(model_dir: Path, device: torch.device, args: argparse.Namespace) -> dict:
    """(a) the seed notebook's path and (b) plain diffusers with DPM-Solver++, batch 1."""
    from diffusers import DPMSolverMultistepScheduler, PNDMScheduler, StableDiffusionPipeline

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir, dtype=dtype, safety_checker=None, requires_safety_checker=False
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    base = pipe.scheduler.config

    def call(steps: int) -> Callable[[], Any]:
        return lambda: pipe(
            PROMPT,
            width=args.size,
            height=args.size,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            generator=torch.Generator("cpu").manual_seed(0),
        )

    # As SD 1.5 ships it: PNDM without its Runge-Kutta warm-up steps.
    pipe.scheduler = PNDMScheduler.from_config(base, skip_prk_steps=True)
    seed = mean_seconds(call(args.seed_steps), args.repeats)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        base, algorithm_type="dpmsolver++", solver_order=2
    )
    dpm = mean_seconds(call(args.steps), args.repeats)
    return {"seed_baseline_s_per_image": seed, "diffusers_dpm25_s_per_image": dpm}


def job_batch(args: argparse.Namespace, seed: int) -> RenderBatch:
    return RenderBatch(
        items=(RenderItem(PROMPT, "", seed),),
        width=args.size,
        height=args.size,
        num_inference_steps=args.steps,
        guidance_scale=GUIDANCE,
        scheduler="dpmpp_2m",
    )


def levers_for(args: argparse.Namespace) -> SpeedLevers:
    return SpeedLevers.for_device(
        torch.device(args.device),
        compile=args.compile,
        cuda_graphs=args.cuda_graphs,
        fuse_qkv=args.fuse_qkv,
    )


def load_ours(model_dir: Path, args: argparse.Namespace) -> DiffusionRenderer:
    """The worker's start-up: load, turn on the levers, warm every batch size it will serve."""
    levers = levers_for(args)
    renderer = DiffusionRenderer.load(str(model_dir), args.cache_dir, args.device, levers)
    counts = args.warm_counts or batch_buckets(args.max_batch_images)
    renderer.warm_up(args.size, args.size, counts if levers.compile else [1])
    return renderer


def ours(renderer: DiffusionRenderer, args: argparse.Namespace) -> dict:
    """(c) one job through our render path; (d) concurrent jobs through the batching executor."""
    one = mean_seconds(lambda: renderer.render(job_batch(args, 0)), args.repeats)
    executor = GpuExecutor(renderer.render, args.max_batch_images, args.batch_wait_ms / 1000)
    try:
        # One untimed round, so every batch size the round uses has run once.
        for future in [executor.submit(RenderJob(job_batch(args, s))) for s in range(args.jobs)]:
            future.result()
        batches: set[str] = set()
        started = time.perf_counter()
        futures = [executor.submit(RenderJob(job_batch(args, s))) for s in range(args.jobs)]
        for future in futures:
            batches.add(future.result().batch_id)
        elapsed = time.perf_counter() - started
    finally:
        executor.shutdown()
    return {
        "ours_b1_s_per_image": one,
        "ours_throughput_images_per_s": args.jobs / elapsed,
        "ours_throughput_pipeline_calls": len(batches),
    }


def cold_start(model_dir: Path, args: argparse.Namespace) -> float:
    """(e) seconds from starting a fresh process to a warmed pipeline, with the cache warm."""
    command = [sys.executable, "-m", "bench.gpu_pipeline", "--cold-start-child"]
    command += [*child_options(args), "--model-dir", str(model_dir)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    ready = any(line.strip() == READY for line in process.stdout)
    elapsed = time.perf_counter() - started
    process.wait()
    if not ready or process.returncode != 0:
        raise RuntimeError(f"the cold-start process failed (exit {process.returncode})")
    return elapsed


def child_options(args: argparse.Namespace) -> list[str]:
    options = [
        "--device",
        args.device,
        "--size",
        str(args.size),
        "--cache-dir",
        str(args.cache_dir),
    ]
    options += ["--max-batch-images", str(args.max_batch_images)]
    if args.warm_counts:
        options += ["--warm-counts", ",".join(map(str, args.warm_counts))]
    for name in ("compile", "cuda_graphs", "fuse_qkv"):
        value = getattr(args, name)
        if value is not None:
            flag = name.replace("_", "-")
            options.append(f"--{flag}" if value else f"--no-{flag}")
    return options


def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main() -> int:
    args = parse_args()
    device = torch.device(args.device)
    if args.cold_start_child:
        load_ours(Path(args.model_dir), args)
        print(READY, flush=True)
        return 0

    model_dir = (
        ensure_tiny_model(args.cache_dir)
        if args.smoke
        else build_sd15(args.model_dir, args.cache_dir)
    )
    figures: dict[str, Any] = {"gpu": gpu_name(device)}
    figures.update(plain_diffusers(model_dir, device, args))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    load_started = time.perf_counter()
    renderer = load_ours(model_dir, args)
    figures["ours_load_and_warm_up_s"] = time.perf_counter() - load_started
    figures.update(ours(renderer, args))
    del renderer
    figures["cold_start_warm_cache_s"] = cold_start(model_dir, args)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    figures["peak_vram_gib"] = peak / 2**30
    figures["config"] = {
        "size": args.size,
        "steps": args.steps,
        "seed_steps": args.seed_steps,
        "jobs": args.jobs,
        "max_batch_images": args.max_batch_images,
        "warm_counts": args.warm_counts or batch_buckets(args.max_batch_images),
        "batch_wait_ms": args.batch_wait_ms,
        "levers": asdict(levers_for(args)),
        "smoke": args.smoke,
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
    }
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out is not None or not args.smoke:
        out = args.out or RESULTS_DIR / f"{datetime.date.today()}-{slug(figures['gpu'])}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny model on a CPU, seconds")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --smoke")
    parser.add_argument("--size", type=int, default=None, help="width and height (512)")
    parser.add_argument("--steps", type=int, default=None, help="our steps and (b)'s (25)")
    parser.add_argument("--seed-steps", type=int, default=None, help="(a)'s PNDM steps (50)")
    parser.add_argument("--jobs", type=int, default=None, help="concurrent jobs in (d) (32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure (3)")
    parser.add_argument("--max-batch-images", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=15.0)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--fuse-qkv", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--warm-counts",
        type=lambda text: [int(n) for n in text.split(",")],
        default=None,
        help="image counts to compile, e.g. 1,8 (default: 1, 2, 4, ... up to the max batch)",
    )
    parser.add_argument("--cache-dir", default=None, help="models and the compile cache")
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON")
    parser.add_argument("--cold-start-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # Smoke figures are seconds on a CPU: tiny model, 256x256, 2 steps, a few jobs.
    defaults = (256, 2, 2, 4, 1) if args.smoke else (512, 25, 50, 32, 3)
    for name, value in zip(
        ("size", "steps", "seed_steps", "jobs", "repeats"), defaults, strict=True
    ):
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --smoke for the CPU smoke test")
    default_cache = Path(tempfile.gettempdir()) / "t2i-bench-cache"
    args.cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache
    args.model_dir = args.model_dir or args.cache_dir / "sd15-random"
    return args


if __name__ == "__main__":
    sys.exit(main())
