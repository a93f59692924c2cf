"""GPU pipeline benchmark: plain diffusers against our render path and executor, on one card.

`python -m bench.gpu_pipeline` on a CUDA machine times SD 1.5's architecture with random weights
at 512x512 and writes bench/results/<date>-<gpu>.json; `--family sdxl` times SDXL base's at
1024x1024 the same way, into <date>-<gpu>-sdxl.json. `--mixed` times the worker's set-up with
LoRA adapters and a ControlNet under plain against mixed traffic instead, into
<date>-<gpu>-mixed.json; `--vae` times the VAE's decode with its levers, into
<date>-<gpu>-vae.json. `--smoke` runs the same code on a CPU with the tiny model (the tiny SDXL
model with `--family sdxl`), to prove it executes. It prints the figures as JSON either way.
"""

import argparse
import datetime
import json
import math
import random
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.assets import (
    DEFAULT_CACHE_DIR,
    GUIDANCE,
    LORA_MAX_RANK,
    LORA_RANK,
    PROMPT,
    Customization,
    bench_model,
    customization,
    kind_batch,
    load_customized,
)
from shared.families import FAMILIES
from shared.settings import WorkerSettings
from worker.executor import GpuExecutor, RenderJob
from worker.kinds import load_renderer
from worker.pipeline import (
    DEFAULT_DECODE_SLICE_PIXELS,
    DiffusionRenderer,
    NonFiniteImage,
    RenderBatch,
    RenderItem,
    SpeedLevers,
    VaeDecode,
    compiled_image_counts,
)
from worker.quantization import UNET_QUANTS, QuantizationUnavailable

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The levers a `--<name>` or `--no-<name>` option switches (unset: the device's default).
SWITCHED_LEVERS = (
    "compile",
    "cuda_graphs",
    "fuse_qkv",
    "cudnn_benchmark",
    "compile_vae",
    "vae_channels_last",
    "compile_autotune",
)
# The opt-in levers `--levers` measures, each as the bench options it sets.
OPT_IN_LEVERS: dict[str, dict[str, Any]] = {
    "autotune": {"compile_autotune": True},
    "fp8": {"unet_quant": "fp8"},
    "int8": {"unet_quant": "int8"},
    "deepcache2": {"deepcache_interval": 2},
    "deepcache3": {"deepcache_interval": 3},
}
# Fixed seeds whose images each lever's are compared with the defaults' on.
LEVER_SEEDS = range(4)
READY = "bench-ready"
FULLY_WARM = "bench-fully-warm"
# The cold-start child's first line: the wall-clock time when its imports were done.
IMPORTED = "bench-imported"


def note(message: str) -> None:
    """Progress on stderr, so a run cut short still tells how far it got."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_seconds(run: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `run` after one untimed warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def plain_diffusers(model_dir: Path, device: torch.device, args: argparse.Namespace) -> dict:
    """(a) plain diffusers with the model's default scheduler (SD 1.5: PNDM; SDXL: its own
    EulerDiscrete) and (b) with DPM-Solver++, batch 1."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.family == "sdxl":
        # No invisible watermark: the pipeline's own would stamp each image on the host inside
        # the call; ours marks stored images off the GPU thread.
        pipe = StableDiffusionXLPipeline.from_pretrained(
            model_dir, dtype=dtype, add_watermarker=False
        )
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            model_dir, dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    base = pipe.scheduler.config

    def call(steps: int, images: int = 1) -> Callable[[], Any]:
        return lambda: pipe(
            [PROMPT] * images,
            width=args.size,
            height=args.size,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            generator=[torch.Generator("cpu").manual_seed(n) for n in range(images)],
        )

    if args.family == "sd15":
        # As SD 1.5 ships it: PNDM without its Runge-Kutta warm-up steps.
        pipe.scheduler = PNDMScheduler.from_config(base, skip_prk_steps=True)
    seed = median_seconds(call(args.seed_steps), args.repeats)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        base, algorithm_type="dpmsolver++", solver_order=2
    )
    dpm = median_seconds(call(args.steps), args.repeats)
    note(f"plain diffusers: default path {seed:.3f} s, DPM-Solver++ {dpm:.3f} s per image")
    batched = median_seconds(call(args.steps, args.max_batch_images), args.repeats)
    return {
        "seed_baseline_s_per_image": seed,
        "diffusers_dpm25_s_per_image": dpm,
        f"diffusers_dpm25_b{args.max_batch_images}_images_per_s": args.max_batch_images / batched,
    }


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
        cudnn_benchmark=args.cudnn_benchmark,
        compile_vae=args.compile_vae,
        vae_channels_last=bool(args.vae_channels_last),
        compile_autotune=bool(args.compile_autotune),
        unet_quant=args.unet_quant,
        deepcache_interval=args.deepcache_interval,
    )


def load_ours(
    model_dir: Path, args: argparse.Namespace, custom: Customization | None = None
) -> tuple[DiffusionRenderer, GpuExecutor]:
    """The worker's start-up: load, turn on the levers (and serve `custom`'s adapters and
    ControlNets), then warm up on the executor's thread (compile each variant, record CUDA graphs,
    time each batch size), which is where jobs will render."""
    levers = levers_for(args)
    started = time.perf_counter()
    # As the worker caps a batch (and padding): by pixels as well as images.
    pixels = args.max_batch_pixels
    if custom is None:
        renderer = load_renderer(
            str(model_dir), args.cache_dir, args.device, levers, max_batch_pixels=pixels
        )
    else:
        renderer = load_customized(
            model_dir, args.cache_dir, args.device, levers, custom, max_batch_pixels=pixels
        )
    renderer.warm_up_seconds["load"] = time.perf_counter() - started
    counts = args.compiled_counts or compiled_image_counts(args.max_batch_images)
    executor = GpuExecutor(
        renderer.render,
        args.max_batch_images,
        args.batch_wait_ms / 1000,
        key=renderer.batch_key,
        warm_up=lambda: renderer.warm_up(args.size, args.size, counts, args.max_batch_images),
        max_batch_pixels=pixels,
    )
    executor.wait_ready()
    return renderer, executor


def startup_phases(renderer: DiffusionRenderer) -> dict[str, float]:
    """Seconds of each start-up phase: loading the model, compiling each count, timing counts."""
    return {name: round(seconds, 2) for name, seconds in renderer.warm_up_seconds.items()}


def run_jobs(executor: GpuExecutor, args: argparse.Namespace, seeds: range) -> dict[str, Any]:
    """Submit one job per seed at once and wait for all: pipeline calls and failed images."""
    return run_batches(executor, [job_batch(args, seed) for seed in seeds])


def run_batches(executor: GpuExecutor, jobs: Iterable[RenderBatch]) -> dict[str, Any]:
    """Submit every job at once and wait for all: pipeline calls, their sizes and seconds, and
    failed images. Each job is announced first, as the worker's tasks announce theirs on
    receipt."""
    jobs = list(jobs)
    arrivals = [executor.announce() for _ in jobs]
    futures = [
        executor.submit(RenderJob(job), arrival)
        for job, arrival in zip(jobs, arrivals, strict=True)
    ]
    batches: dict[str, tuple[int, float]] = {}
    non_finite = 0
    for future in futures:
        try:
            outcome = future.result()
        except NonFiniteImage:
            non_finite += 1
            continue
        batches[outcome.batch_id] = (outcome.batch_images, outcome.render_s)
    return {
        "pipeline_calls": len(batches),
        "batch_images": sorted(images for images, _ in batches.values()),
        "render_s": sum(seconds for _, seconds in batches.values()),
        "non_finite_images": non_finite,
    }


def ours(executor: GpuExecutor, args: argparse.Namespace) -> dict:
    """(c) one job at a time through our executor; (d) concurrent jobs, batched."""

    def one_job() -> None:
        run_jobs(executor, args, range(1))

    one = median_seconds(one_job, args.repeats)
    note(f"ours: {one:.3f} s per image, one job at a time")
    # One untimed round, so every batch size the round uses has run once.
    run_jobs(executor, args, range(args.jobs))
    started = time.perf_counter()
    counts = run_jobs(executor, args, range(args.jobs))
    elapsed = time.perf_counter() - started
    note(f"ours: {args.jobs / elapsed:.2f} images/s with {args.jobs} concurrent jobs")
    return {
        "ours_b1_s_per_image": one,
        "ours_throughput_images_per_s": args.jobs / elapsed,
        "ours_throughput_pipeline_calls": counts["pipeline_calls"],
        "ours_throughput_batch_images": counts["batch_images"],
        # The share of the wall time spent inside pipeline calls: the rest (handing images out,
        # gathering the next batch) is what overlapping host work with the GPU could win back.
        "ours_throughput_in_pipeline_calls": counts["render_s"] / elapsed,
        "ours_non_finite_images": counts["non_finite_images"],
    }


def cold_start(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """(e) seconds from starting a fresh process to a warmed executor, with the cache warm, and
    where they went: "python and imports" from the start to the child's imports done (its
    clock), the child's own phases (load, load compile artifacts, compile each count, ...), and
    "other" the rest (the executor's thread, the parent reading the child's output)."""
    command = [sys.executable, "-m", "bench.gpu_pipeline", "--cold-start-child"]
    command += [*child_options(args), "--family", args.family, "--model-dir", str(model_dir)]
    started_at = time.time()
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    phases: dict[str, float] = {}
    imported_at: float | None = None
    seconds_to: dict[str, float] = {}
    for line in process.stdout:
        if line.startswith("{"):
            phases = json.loads(line)
        elif line.startswith(IMPORTED):
            imported_at = float(line.split()[1])
        elif line.strip() in (READY, FULLY_WARM):
            seconds_to[line.strip()] = time.perf_counter() - started
    process.wait()
    if set(seconds_to) != {READY, FULLY_WARM} or process.returncode != 0:
        raise RuntimeError(f"the cold-start process failed (exit {process.returncode})")
    if imported_at is None:
        raise RuntimeError("the cold-start process did not say when its imports were done")
    elapsed = seconds_to[READY]
    phases["python and imports"] = round(imported_at - started_at, 2)
    phases["other"] = round(elapsed - sum(phases.values()), 2)
    return {
        "cold_start_warm_cache_s": elapsed,
        "cold_start_phases_s": phases,
        # Ready takes jobs; the image counts not compiled warm up after that, while none waits.
        "cold_start_fully_warm_s": seconds_to[FULLY_WARM],
    }


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
    options += ["--max-batch-pixels", str(args.max_batch_pixels)]
    if args.compiled_counts:
        options += ["--compiled-counts", ",".join(map(str, args.compiled_counts))]
    for name in SWITCHED_LEVERS:
        value = getattr(args, name)
        if value is not None:
            flag = name.replace("_", "-")
            options.append(f"--{flag}" if value else f"--no-{flag}")
    if args.unet_quant is not None:
        options += ["--unet-quant", args.unet_quant]
    options += ["--deepcache-interval", str(args.deepcache_interval)]
    return options


def versus_diffusers(
    model_dir: Path, args: argparse.Namespace, figures: dict[str, Any], save: Callable[[], None]
) -> None:
    """(a) to (f): plain diffusers, then our executor, then a cold start."""
    device = torch.device(args.device)
    figures.update(plain_diffusers(model_dir, device, args))
    save()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    load_started = time.perf_counter()
    renderer, executor = load_ours(model_dir, args)
    # Timings cached by an earlier run leave renders for idle time: not while measuring.
    executor.wait_fully_warm()
    figures["ours_load_and_warm_up_s"] = time.perf_counter() - load_started
    figures["ours_warm_up_render_s"] = {
        f"{width}x{height}": costs for (width, height), costs in renderer.render_costs.items()
    }
    figures["ours_load_and_warm_up_phases_s"] = startup_phases(renderer)
    note(f"ours: loaded and warmed up in {figures['ours_load_and_warm_up_s']:.1f} s")
    try:
        figures.update(ours(executor, args))
    finally:
        executor.shutdown()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    figures["peak_vram_gib"] = peak / 2**30
    figures["speedup_b1_vs_diffusers_dpm25"] = (
        figures["diffusers_dpm25_s_per_image"] / figures["ours_b1_s_per_image"]
    )
    seed_rate = 1 / figures["seed_baseline_s_per_image"]
    figures["throughput_vs_seed_path"] = figures["ours_throughput_images_per_s"] / seed_rate
    save()
    del renderer, executor
    figures.update(cold_start(model_dir, args))
    note(f"cold start with a warm cache: {figures['cold_start_warm_cache_s']:.1f} s")
    save()


@contextmanager
def cuda_graph_recordings(device: torch.device) -> Iterator[list[int] | None]:
    """Counts CUDA graph recordings by inductor's graph trees, from any thread, while open; None
    off CUDA."""
    if device.type != "cuda":
        yield None
        return
    from torch._inductor.cudagraph_trees import CUDAGraphTreeManager

    recordings: list[int] = []
    record = CUDAGraphTreeManager.record_function

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        recordings.append(1)
        return record(self, *args, **kwargs)

    CUDAGraphTreeManager.record_function = counted  # type: ignore[method-assign]
    try:
        yield recordings
    finally:
        CUDAGraphTreeManager.record_function = record  # type: ignore[method-assign]


def count_and_clear(recordings: list[int] | None) -> int | None:
    if recordings is None:
        return None
    count = len(recordings)
    recordings.clear()
    return count


def variant_names(variants: set[tuple[bool, bool]]) -> list[str]:
    """The UNet graphs compiled, by what they carry: LoRA slots on, ControlNet residuals."""
    names = {(False, False): "plain", (True, False): "lora", (False, True): "controlnet"}
    return sorted(names.get(variant, "lora+controlnet") for variant in variants)


def mixed_kinds(jobs: int) -> list[str]:
    """The kinds of a mixed round's jobs, in the order they arrive: half plain, a fifth LoRA, the
    rest image-to-image, ControlNet and inpainting in turn, shuffled the same way every run."""
    plain, lora = jobs // 2, jobs // 5
    others = ("image-to-image", "controlnet", "inpainting")
    kinds = ["plain"] * plain + ["lora"] * lora
    kinds += [others[index % len(others)] for index in range(jobs - plain - lora)]
    random.Random(0).shuffle(kinds)
    return kinds


def mixed_jobs(
    args: argparse.Namespace, custom: Customization, kinds: list[str]
) -> list[RenderBatch]:
    """One single-image job per kind; LoRA jobs alternate the two adapters, so weights swap."""
    jobs = []
    loras = 0
    for seed, kind in enumerate(kinds):
        adapter = None
        if kind == "lora":
            adapter = custom.adapters[loras % len(custom.adapters)]
            loras += 1
        jobs.append(kind_batch(kind, (seed,), args.size, args.steps, adapter=adapter))
    return jobs


def timed_round(executor: GpuExecutor, jobs: list[RenderBatch]) -> tuple[float, dict[str, Any]]:
    """Images per second of the jobs submitted at once, after one untimed round (so every shape,
    variant and adapter has been met once), and the timed round's counts."""
    run_batches(executor, jobs)
    sync()
    started = time.perf_counter()
    counts = run_batches(executor, jobs)
    sync()
    images = sum(len(job.items) for job in jobs)
    return images / (time.perf_counter() - started), counts


def mixed(
    model_dir: Path, args: argparse.Namespace, figures: dict[str, Any], save: Callable[[], None]
) -> None:
    """The worker's set-up with two LoRA adapters and a canny ControlNet: plain-only traffic
    against mixed traffic, and a LoRA batch against a plain one."""
    device = torch.device(args.device)
    custom = customization(model_dir, args.cache_dir, tiny=args.smoke)
    note(f"adapters in {custom.lora_dir}, ControlNets {custom.controlnets}")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with cuda_graph_recordings(device) as recordings:
        started = time.perf_counter()
        renderer, executor = load_ours(model_dir, args, custom)
        executor.wait_fully_warm()
        figures["load_and_warm_up_s"] = time.perf_counter() - started
        figures["load_and_warm_up_phases_s"] = startup_phases(renderer)
        figures["cuda_graph_recordings_warm_up"] = count_and_clear(recordings)
        note(f"loaded and warmed up in {figures['load_and_warm_up_s']:.1f} s")
        save()
        try:
            measure_mixed(executor, args, custom, figures, save)
        finally:
            executor.shutdown()
        figures["cuda_graph_recordings_after_warm_up"] = count_and_clear(recordings)
    assert renderer.loras is not None
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    figures.update(
        {
            "recompiles_after_warm_up": renderer.recompiles,
            "compiled_variants": variant_names(renderer.compiled_variants),
            "lora_swaps": renderer.loras.swaps,
            "module_dtypes": renderer.module_dtypes(),
            "peak_vram_gib": peak / 2**30,
            "mixed_vs_plain_images_per_s": (
                figures["mixed_images_per_s"] / figures["plain_only_images_per_s"]
            ),
            "lora_vs_plain_batch_time": figures["lora_batch_s"] / figures["plain_batch_s"],
        }
    )
    save()


def measure_mixed(
    executor: GpuExecutor,
    args: argparse.Namespace,
    custom: Customization,
    figures: dict[str, Any],
    save: Callable[[], None],
) -> None:
    """The plain-only round, the mixed round (as many jobs), then a batch of the largest size
    without and with a LoRA adapter (the same one each time: the slots' cost, not a swap's)."""
    plain_jobs = [kind_batch("plain", (seed,), args.size, args.steps) for seed in range(args.jobs)]
    rate, counts = timed_round(executor, plain_jobs)
    note(f"plain only: {rate:.2f} images/s with {args.jobs} concurrent jobs")
    figures["plain_only_images_per_s"] = rate
    figures["plain_only_pipeline_calls"] = counts["pipeline_calls"]
    save()
    kinds = mixed_kinds(args.jobs)
    rate, mixed_counts = timed_round(executor, mixed_jobs(args, custom, kinds))
    note(f"mixed: {rate:.2f} images/s with {args.jobs} concurrent jobs")
    figures["mixed_images_per_s"] = rate
    figures["mixed_jobs_by_kind"] = dict(Counter(kinds))
    figures["mixed_pipeline_calls"] = mixed_counts["pipeline_calls"]
    figures["non_finite_images"] = counts["non_finite_images"] + mixed_counts["non_finite_images"]
    save()
    images = range(args.max_batch_images)
    for name, batch in (
        ("plain_batch_s", kind_batch("plain", images, args.size, args.steps)),
        (
            "lora_batch_s",
            kind_batch("lora", images, args.size, args.steps, adapter=custom.adapters[0]),
        ),
    ):
        figures[name] = median_seconds(lambda job=batch: run_batches(executor, [job]), args.repeats)
    plain, lora = figures["plain_batch_s"], figures["lora_batch_s"]
    note(f"a batch of {args.max_batch_images}: {plain:.3f} s plain, {lora:.3f} s with a LoRA")
    save()


def vae_levers(
    model_dir: Path, args: argparse.Namespace, figures: dict[str, Any], save: Callable[[], None]
) -> None:
    """The VAE's decode as the worker runs it, lever by lever: eager (slices of four 512x512
    images), compiled (one image per call), each in the default layout and channels-last.
    Milliseconds per image decoding one image and `--max-batch-images`, and the largest
    difference from eager in the default layout, in levels of 255."""
    from diffusers import AutoencoderKL

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    vae = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=dtype).to(device)
    vae.eval()
    generator = torch.Generator(device).manual_seed(0)
    latent_size = args.size // 8
    # A few images suffice to prove the smoke run works.
    images = min(args.max_batch_images, 2) if args.smoke else args.max_batch_images
    shape = (images, vae.config.latent_channels, latent_size, latent_size)
    latents = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    latents = latents / vae.config.scaling_factor
    per_slice = max(1, DEFAULT_DECODE_SLICE_PIXELS // (args.size * args.size))
    reference: torch.Tensor | None = None
    results: dict[str, Any] = {}
    figures["vae_decode"] = results
    for channels_last in (False, True):
        if channels_last:
            vae.to(memory_format=torch.channels_last)
        for compiled in (False, True):
            layout = " channels-last" if channels_last else ""
            name = ("compiled" if compiled else "eager") + layout
            warm_up_s, one, batch, pixels = time_vae_decode(
                VaeDecode(vae), compiled, latents, per_slice, args.repeats
            )
            levels = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round()
            if reference is None:
                reference = levels
            results[name] = {
                "ms_per_image_1": one * 1000,
                f"ms_per_image_{images}": batch * 1000 / images,
                "warm_up_s": warm_up_s,
                "max_difference_levels": float((levels - reference).abs().max()),
                "mean_difference_levels": float((levels - reference).abs().mean()),
            }
            note(f"vae {name}: {results[name]}")
            save()


def opt_in_levers(
    model_dir: Path, args: argparse.Namespace, figures: dict[str, Any], save: Callable[[], None]
) -> None:
    """Each opt-in lever against the defaults, compiled for one image (a count of one keeps each
    start short): one job's seconds, the start's, and how far its images on fixed seeds are from
    the defaults' (mean and largest difference in levels of 255, PSNR)."""
    device = torch.device(args.device)
    results: dict[str, Any] = {}
    figures["opt_in_levers"] = results
    reference: np.ndarray | None = None
    for name in ["defaults", *args.levers]:
        variant = argparse.Namespace(**{**vars(args), **OPT_IN_LEVERS.get(name, {})})
        variant.compiled_counts, variant.max_batch_images = [1], 1
        started = time.perf_counter()
        try:
            renderer, executor = load_ours(model_dir, variant)
        except QuantizationUnavailable as exc:
            results[name] = {"unavailable": str(exc)}
            save()
            continue
        load_s = time.perf_counter() - started
        try:
            one, images = time_one_job_and_render_seeds(executor, variant)
        finally:
            executor.shutdown()
        del renderer, executor
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if reference is None:
            reference = images
        squared = float(((images - reference) ** 2).mean())
        results[name] = {
            "s_per_image": one,
            "load_and_warm_up_s": load_s,
            "levers": asdict(levers_for(variant)),
            "mean_difference_levels": float(np.abs(images - reference).mean()),
            "max_difference_levels": float(np.abs(images - reference).max()),
            "psnr_db": None if squared == 0 else 10 * math.log10(255**2 / squared),
        }
        note(f"lever {name}: {results[name]}")
        save()


def time_one_job_and_render_seeds(
    executor: GpuExecutor, args: argparse.Namespace
) -> tuple[float, np.ndarray]:
    """One job's median seconds, and the images of the fixed seeds."""
    one = median_seconds(lambda: run_jobs(executor, args, range(1)), args.repeats)
    futures = [executor.submit(RenderJob(job_batch(args, seed))) for seed in LEVER_SEEDS]
    return one, np.stack([np.asarray(f.result().images[0], np.float64) for f in futures])


@torch.inference_mode()
def time_vae_decode(
    decode: VaeDecode, compiled: bool, latents: torch.Tensor, per_slice: int, repeats: int
) -> tuple[float, float, float, torch.Tensor]:
    """Seconds to warm up (compile), to decode one image and the whole batch, and its pixels."""
    started = time.perf_counter()
    if compiled:
        decode.compile()
    decode.warming = True
    decode(latents[:1], per_slice)
    decode.warming = False
    warm_up_s = time.perf_counter() - started
    one = median_seconds(lambda: decode(latents[:1], per_slice), repeats)
    batch = median_seconds(lambda: decode(latents, per_slice), repeats)
    return warm_up_s, one, batch, decode(latents, per_slice)


def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main() -> int:
    args = parse_args()
    device = torch.device(args.device)
    if args.cold_start_child:
        print(IMPORTED, time.time(), flush=True)
        renderer, executor = load_ours(Path(args.model_dir), args)
        print(json.dumps(startup_phases(renderer)), flush=True)
        print(READY, flush=True)
        executor.wait_fully_warm()
        print(FULLY_WARM, flush=True)
        executor.shutdown()
        return 0

    figures: dict[str, Any] = {"gpu": gpu_name(device), "config": config(args)}
    out = args.out
    if out is None and not args.smoke:
        suffix = next(
            (f"-{mode}" for mode in ("mixed", "vae", "levers") if getattr(args, mode)), ""
        )
        if args.family != "sd15":
            suffix = f"-{args.family}{suffix}"
        out = RESULTS_DIR / f"{datetime.date.today()}-{slug(figures['gpu'])}{suffix}.json"

    def save() -> None:
        """Written after every phase, so a run cut short keeps what it measured."""
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(figures, indent=2) + "\n")

    model_dir = bench_model(args.family, args.cache_dir, None if args.smoke else args.model_dir)
    note(f"model ready in {model_dir}")
    if args.mixed:
        mixed(model_dir, args, figures, save)
    elif args.vae:
        vae_levers(model_dir, args, figures, save)
    elif args.levers is not None:
        opt_in_levers(model_dir, args, figures, save)
    else:
        versus_diffusers(model_dir, args, figures, save)
    print(json.dumps(figures, indent=2))
    if out is not None:
        print(f"wrote {out}", file=sys.stderr)
    return 0


def config(args: argparse.Namespace) -> dict[str, Any]:
    # The random adapters' rank (the tiny ones' is the tiny model's own).
    loras = {"lora_rank": None if args.smoke else LORA_RANK, "lora_max_rank": LORA_MAX_RANK}
    return {
        "family": args.family,
        "size": args.size,
        "steps": args.steps,
        "seed_steps": args.seed_steps,
        "jobs": args.jobs,
        "max_batch_images": args.max_batch_images,
        "max_batch_pixels": args.max_batch_pixels,
        "compiled_counts": args.compiled_counts or compiled_image_counts(args.max_batch_images),
        "batch_wait_ms": args.batch_wait_ms,
        "mixed": args.mixed,
        "vae": args.vae,
        "opt_in_levers": args.levers,
        **(loras if args.mixed else {}),
        "levers": asdict(levers_for(args)),
        "smoke": args.smoke,
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
    }


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def add_worker_options(parser: argparse.ArgumentParser) -> None:
    """The options that are the worker's settings: batching, levers and compiled counts."""
    parser.add_argument("--max-batch-images", type=int, default=16)
    parser.add_argument(
        "--max-batch-pixels",
        type=int,
        default=WorkerSettings.model_fields["max_batch_pixels"].default,
        help="most pixels a batch renders (T2I_MAX_BATCH_PIXELS, and its default)",
    )
    parser.add_argument("--batch-wait-ms", type=float, default=0.0)
    for name in SWITCHED_LEVERS:
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--unet-quant", choices=UNET_QUANTS, default=None)
    parser.add_argument("--deepcache-interval", type=int, default=0)
    parser.add_argument(
        "--compiled-counts",
        type=lambda text: [int(n) for n in text.split(",")],
        default=None,
        help="image counts to compile, e.g. 1,4,8 (default: 1 and the max batch)",
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny model on a CPU, seconds")
    parser.add_argument(
        "--family",
        choices=tuple(FAMILIES),
        default="sd15",
        help="the architecture: SD 1.5's (sd15) or SDXL base's (sdxl)",
    )
    parser.add_argument(
        "--mixed", action="store_true", help="plain-only against mixed traffic, with LoRA and more"
    )
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --smoke")
    parser.add_argument(
        "--size", type=int, default=None, help="width and height (the family's: 512, 1024)"
    )
    parser.add_argument("--steps", type=int, default=None, help="our steps and (b)'s (25)")
    parser.add_argument("--seed-steps", type=int, default=None, help="(a)'s PNDM steps (50)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="concurrent jobs in (d), and in each mixed round (32; sdxl 16)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed runs, median (5; sdxl 3)")
    add_worker_options(parser)
    # Unset: 16, or fewer where the pixel cap holds fewer images of the size.
    parser.set_defaults(max_batch_images=None)
    parser.add_argument(
        "--vae", action="store_true", help="the VAE's decode with each of its levers instead"
    )
    parser.add_argument(
        "--levers",
        type=lambda text: [name for name in text.split(",") if name],
        default=None,
        metavar="NAMES",
        help=f"the opt-in levers against the defaults instead, e.g. {','.join(OPT_IN_LEVERS)}",
    )
    parser.add_argument("--cache-dir", default=None, help="models and the compile cache")
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON")
    parser.add_argument("--cold-start-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.family != "sd15" and (args.mixed or args.vae or args.levers is not None):
        parser.error(f"--family {args.family} times the run against plain diffusers only")
    # Smoke figures are seconds on a CPU: tiny model, 256x256 (below SDXL's smallest request:
    # the render core takes any size), 2 steps, a few jobs (enough for every kind of job in a
    # mixed round). SDXL's images cost about four times SD 1.5's: fewer jobs and repeats.
    smoke_jobs = 10 if args.mixed else 4
    if args.smoke:
        defaults: tuple[int, ...] = (256, 2, 2, smoke_jobs, 1)
    else:
        size = FAMILIES[args.family].default_size
        defaults = (size, 25, 50, 32, 5) if args.family == "sd15" else (size, 25, 50, 16, 3)
    for name, value in zip(
        ("size", "steps", "seed_steps", "jobs", "repeats"), defaults, strict=True
    ):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.max_batch_images is None:
        args.max_batch_images = max(1, min(16, args.max_batch_pixels // args.size**2))
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --smoke for the CPU smoke test")
    args.cache_dir = Path(args.cache_dir) if args.cache_dir else DEFAULT_CACHE_DIR
    args.model_dir = args.model_dir or args.cache_dir / f"{args.family}-random"
    return args


if __name__ == "__main__":
    sys.exit(main())
