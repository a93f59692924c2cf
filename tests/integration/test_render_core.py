"""The render core against diffusers' own pipelines, and the invariants it keeps for any order of
job kinds: the tiny models of both families (SD 1.5 and SDXL), eager, on this CPU
(tests/integration/test_mixed_traffic.py runs the same kinds compiled, in bfloat16, with fused
projections).

Each kind runs in the core's one denoising loop; with the same seeds it must give the image
diffusers' own pipeline of the model's family gives (StableDiffusion[XL]Pipeline,
...Img2ImgPipeline, ...InpaintPipeline, ...ControlNetPipeline, and `load_lora_weights` for
adapters) on the same modules.
"""

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image
from safetensors.torch import save_file

from shared.info import SCHEDULERS
from shared.loras import LoraRegistry
from worker.controlnet import canny_map
from worker.executor import GpuExecutor, RenderJob
from worker.kinds import _keep_unmasked, load_renderer
from worker.models import ModelLoadError, resolve
from worker.pipeline import (
    DiffusionRenderer,
    LeverUnsupported,
    RenderBatch,
    RenderItem,
    SpeedLevers,
    to_images,
)
from worker.render_types import AdapterSet
from worker.tiny_customization import ensure_tiny_loras, ensure_tiny_xl_loras

SIZE = 64
STEPS = 4
GUIDANCE = 7.5


@dataclass(frozen=True)
class Family:
    """A tiny model of one family, its adapters and ControlNet, and diffusers' own pipelines."""

    model: str
    controlnet: str
    loras: Callable[[Path], Path]
    style: AdapterSet
    other: AdapterSet
    text: type[DiffusionPipeline]
    image_to_image: type[DiffusionPipeline]
    inpainting: type[DiffusionPipeline]
    controlnet_pipeline: type[DiffusionPipeline]
    text_encoders: tuple[str, ...]
    # What diffusers needs told to load the model's folder as the service does (no checker).
    load_options: dict[str, object]


FAMILIES = {
    "sd15": Family(
        model="tiny",
        controlnet="tiny",
        loras=ensure_tiny_loras,
        style=(("tiny-style", 0.7),),
        other=(("tiny-other", 1.0),),
        text=StableDiffusionPipeline,
        image_to_image=StableDiffusionImg2ImgPipeline,
        inpainting=StableDiffusionInpaintPipeline,
        controlnet_pipeline=StableDiffusionControlNetPipeline,
        text_encoders=("text_encoder",),
        load_options={"safety_checker": None, "requires_safety_checker": False},
    ),
    "sdxl": Family(
        model="tiny-xl",
        controlnet="tiny-xl",
        loras=ensure_tiny_xl_loras,
        style=(("tiny-xl-style", 0.7),),
        other=(("tiny-xl-other", 1.0),),
        text=StableDiffusionXLPipeline,
        image_to_image=StableDiffusionXLImg2ImgPipeline,
        inpainting=StableDiffusionXLInpaintPipeline,
        controlnet_pipeline=StableDiffusionXLControlNetPipeline,
        text_encoders=("text_encoder", "text_encoder_2"),
        load_options={},
    ),
}


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((SIZE, SIZE), Image.Resampling.NEAREST)


def square_mask() -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE))
    mask.paste(255, (16, 16, 48, 48))
    return mask


def batch(*items: RenderItem, **shared: object) -> RenderBatch:
    options: dict = {
        "width": SIZE,
        "height": SIZE,
        "num_inference_steps": STEPS,
        "guidance_scale": GUIDANCE,
        "scheduler": "dpmpp_2m",
        **shared,
    }
    return RenderBatch(items=items, **options)


def item(seed: int = 3, **images: Image.Image) -> RenderItem:
    return RenderItem("a cat", "blurry", seed, **images)


def largest_difference(first: object, second: object) -> int:
    return int(np.abs(np.asarray(first, np.int16) - np.asarray(second, np.int16)).max())


def generator(seed: int = 3) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed)]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> Family:
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def lora_dir(family: Family, model_cache: Path) -> Path:
    return family.loras(model_cache)


@pytest.fixture(scope="module")
def core(model_cache: Path, family: Family, lora_dir: Path) -> DiffusionRenderer:
    renderer = load_renderer(
        family.model, model_cache, "cpu", controlnets={"canny": family.controlnet}
    )
    renderer.use_loras(LoraRegistry(lora_dir), max_bytes=64 * 2**20, max_rank=8)
    return renderer


def test_the_core_serves_the_family_its_model_belongs_to(
    core: DiffusionRenderer, family: Family
) -> None:
    assert type(core.pipeline) is family.text
    assert core.family.name == ("sdxl" if family.text is StableDiffusionXLPipeline else "sd15")
    assert set(core.text_encoders()) == set(family.text_encoders)


def test_feature_reuse_is_refused_on_sdxl_with_the_reason(model_cache: Path) -> None:
    """Its shallow forward passes on SD 1.5's conditioning only, not SDXL's added embeddings."""
    with pytest.raises(LeverUnsupported, match="added embeddings"):
        load_renderer("tiny-xl", model_cache, "cpu", SpeedLevers(deepcache_interval=2))


def diffusers_pipeline(core: DiffusionRenderer, kind: type[DiffusionPipeline], **extra):
    """diffusers' own pipeline of `kind` on the core's modules and scheduler."""
    pipeline = kind(**core.pipeline.components, **extra)
    pipeline.scheduler = core.scheduler("dpmpp_2m")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


ARGUMENTS = {"prompt": "a cat", "negative_prompt": "blurry", "num_inference_steps": STEPS}


def test_text_to_image_is_diffusers_own_image(core: DiffusionRenderer, family: Family) -> None:
    [ours] = core.render(batch(item()))
    reference = diffusers_pipeline(core, family.text)(
        **ARGUMENTS, width=SIZE, height=SIZE, guidance_scale=GUIDANCE, generator=generator()
    ).images[0]
    assert largest_difference(ours, reference) == 0


def test_an_empty_negative_prompt_is_what_diffusers_makes_of_none(
    core: DiffusionRenderer, family: Family
) -> None:
    """SDXL base zeroes the unconditional embeddings when no negative prompt is given
    (`force_zeros_for_empty_prompt`); SD 1.5 encodes the empty text."""
    [ours] = core.render(batch(RenderItem("a cat", "", 3)))
    reference = diffusers_pipeline(core, family.text)(
        prompt="a cat",
        negative_prompt=None,
        num_inference_steps=STEPS,
        width=SIZE,
        height=SIZE,
        guidance_scale=GUIDANCE,
        generator=generator(),
    ).images[0]
    assert largest_difference(ours, reference) == 0


def test_every_scheduler_offered_renders_the_familys_model(core: DiffusionRenderer) -> None:
    """From the model's own scheduler config (SDXL's Euler with "leading" spacing, SD 1.5's
    DPM-Solver), each sampler a request may name gives a finite image of its own."""
    images = {name: core.render(batch(item(), scheduler=name))[0] for name in SCHEDULERS}
    for name, image in images.items():
        assert np.asarray(image).std() > 0, name
    assert largest_difference(images["euler"], images["dpmpp_2m"]) > 0


def test_each_image_of_a_batch_is_the_image_it_gets_alone(core: DiffusionRenderer) -> None:
    together = core.render(batch(item(3), RenderItem("a dog", "", 4), item(5)))
    for index, seed in enumerate((3, 4, 5)):
        single = item(seed) if seed != 4 else RenderItem("a dog", "", 4)
        [alone] = core.render(batch(single))
        assert largest_difference(together[index], alone) <= 1, seed


def test_image_to_image_is_diffusers_own_image(core: DiffusionRenderer, family: Family) -> None:
    init = picture(1)
    [ours] = core.render(batch(item(init_image=init), strength=0.6))
    reference = diffusers_pipeline(core, family.image_to_image)(
        **ARGUMENTS, image=[init], strength=0.6, guidance_scale=GUIDANCE, generator=generator()
    ).images[0]
    assert largest_difference(ours, reference) == 0


@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_inpainting_is_diffusers_own_image_with_the_unmasked_part_pasted_back(
    core: DiffusionRenderer, family: Family, strength: float
) -> None:
    init, mask = picture(2), square_mask()
    [ours] = core.render(batch(item(init_image=init, mask_image=mask), strength=strength))
    pixels = diffusers_pipeline(core, family.inpainting)(
        **ARGUMENTS,
        image=[init],
        mask_image=[mask],
        width=SIZE,
        height=SIZE,
        strength=strength,
        guidance_scale=GUIDANCE,
        generator=generator(),
        output_type="pt",
    ).images
    [reference] = to_images(_keep_unmasked(pixels, [init], [mask]))
    assert largest_difference(ours, reference) == 0
    outside = np.asarray(mask) < 128
    assert (np.asarray(ours)[outside] == np.asarray(init)[outside]).all()


def test_controlnet_is_diffusers_own_image(core: DiffusionRenderer, family: Family) -> None:
    edges = canny_map(picture(3))
    [ours] = core.render(batch(item(control_image=edges), control_type="canny", control_scale=0.8))
    [controlnet] = [kind for kind in core.kinds if kind.name == "controlnet"]
    reference = diffusers_pipeline(
        core,
        family.controlnet_pipeline,
        controlnet=controlnet.modules()["controlnet:canny"],
    )(
        **ARGUMENTS,
        image=[edges],
        width=SIZE,
        height=SIZE,
        guidance_scale=GUIDANCE,
        controlnet_conditioning_scale=0.8,
        generator=generator(),
    ).images[0]
    assert largest_difference(ours, reference) == 0
    [plain] = core.render(batch(item()))
    assert largest_difference(ours, plain) > 32


@pytest.fixture(scope="module")
def fresh_with_adapters(model_cache: Path, family: Family, lora_dir: Path) -> DiffusionPipeline:
    """A fresh eager pipeline with both tiny adapters loaded by diffusers itself."""
    pipeline = family.text.from_pretrained(
        resolve(family.model, model_cache), **family.load_options
    )
    pipeline.set_progress_bar_config(disable=True)
    for name, _ in (*family.style, *family.other):
        pipeline.load_lora_weights(str(lora_dir / f"{name}.safetensors"), adapter_name=name)
    return pipeline


def diffusers_with(pipeline: DiffusionPipeline, core: DiffusionRenderer, loras: AdapterSet):
    pipeline.scheduler = core.scheduler("dpmpp_2m")
    pipeline.set_adapters([name for name, _ in loras], [scale for _, scale in loras])
    return pipeline(
        **ARGUMENTS, width=SIZE, height=SIZE, guidance_scale=GUIDANCE, generator=generator()
    ).images[0]


@pytest.mark.parametrize("fuse_qkv", [False, True], ids=["separate", "fused"])
def test_every_lora_batch_is_diffusers_own_image_in_any_order_fused_or_not(
    model_cache: Path,
    family: Family,
    lora_dir: Path,
    fresh_with_adapters: DiffusionPipeline,
    fuse_qkv: bool,
) -> None:
    """A second and a third LoRA batch, after plain ones and other adapters, keep every layer
    of the adapter (fused query-key-value projections included, and both of SDXL's text
    encoders) and leave plain images alone."""
    core = load_renderer(family.model, model_cache, "cpu", SpeedLevers(fuse_qkv=fuse_qkv))
    core.use_loras(LoraRegistry(lora_dir), max_bytes=64 * 2**20, max_rank=8)
    style, other = family.style, family.other
    both = (*other, *style)
    sequence = [(), style, (), other, style, both, (), style]
    images = [core.render(batch(item(), loras=loras))[0] for loras in sequence]
    expected = {
        loras: diffusers_with(fresh_with_adapters, core, loras) for loras in (style, other, both)
    }
    for loras, image in zip(sequence, images, strict=True):
        if loras:
            assert largest_difference(image, expected[loras]) == 0, loras
        else:
            assert largest_difference(image, images[0]) == 0
    assert largest_difference(images[1], images[0]) > 32
    assert core.loras is not None
    # The style adapter's weights went into the slots three times; plain batches copied nothing.
    assert core.loras.swaps == 5


@pytest.fixture(scope="module")
def bfloat16_core(model_cache: Path, family: Family, lora_dir: Path) -> DiffusionRenderer:
    renderer = load_renderer(
        family.model,
        model_cache,
        "cpu",
        SpeedLevers(fuse_qkv=True),
        dtype="bfloat16",
        controlnets={"canny": family.controlnet},
    )
    renderer.use_loras(LoraRegistry(lora_dir), max_bytes=64 * 2**20, max_rank=8)
    return renderer


def every_kind(family: Family) -> list[RenderBatch]:
    init, mask = picture(4), square_mask()
    return [
        batch(item(init_image=init), strength=0.5),
        batch(item(init_image=init, mask_image=mask), strength=0.8),
        batch(item(control_image=canny_map(init)), control_type="canny"),
        batch(item(), loras=family.style),
        batch(item(), guidance_scale=1.0, scheduler="euler_a"),
    ]


def test_every_module_keeps_its_dtype_whatever_kinds_of_job_ran(
    bfloat16_core: DiffusionRenderer, family: Family
) -> None:
    core = bfloat16_core
    for job in every_kind(family):
        [image] = core.render(job)
        assert np.asarray(image).std() > 0
    dtypes = core.module_dtypes()
    assert set(dtypes) == {"unet", "vae", *family.text_encoders, "controlnet:canny"}
    assert set(dtypes.values()) == {"bfloat16"}
    assert {p.dtype for p in core.pipeline.unet.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in core.pipeline.unet.buffers()} == {torch.bfloat16}


def test_a_float16_sdxl_core_keeps_its_vae_in_float32_and_every_other_module_in_float16(
    model_cache: Path, family: Family, lora_dir: Path
) -> None:
    """SDXL's VAE overflows in float16 (its config says `force_upcast`): the core keeps it in
    float32 for good, whatever kinds of job run, and hands it latents in its own dtype. SD 1.5's
    VAE runs in float16 as its diffusers pipeline runs it."""
    core = load_renderer(
        family.model, model_cache, "cpu", dtype="float16", controlnets={"canny": family.controlnet}
    )
    core.use_loras(LoraRegistry(lora_dir), max_bytes=64 * 2**20, max_rank=8)
    for job in every_kind(family):
        [image] = core.render(job)
        assert np.asarray(image).std() > 0
    dtypes = core.module_dtypes()
    vae = "float32" if family.text is StableDiffusionXLPipeline else "float16"
    assert dtypes.pop("vae") == vae
    assert set(dtypes.values()) == {"float16"}


def test_a_vae_fixed_for_float16_replaces_sdxls_own_and_stays_in_float16(
    model_cache: Path, tmp_path: Path
) -> None:
    """T2I_VAE_ID: a VAE whose config does not ask for an upcast (as the float16-fixed SDXL VAE's
    does not) decodes in float16; one that cannot be read stops the load, naming the setting."""
    fixed = tmp_path / "fixed-vae"
    shutil.copytree(Path(resolve("tiny-xl", model_cache)) / "vae", fixed)
    config = json.loads((fixed / "config.json").read_text())
    (fixed / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    core = load_renderer("tiny-xl", model_cache, "cpu", dtype="float16", vae=str(fixed))
    assert core.module_dtypes()["vae"] == "float16"
    [image] = core.render(batch(item()))
    assert np.asarray(image).std() > 0
    with pytest.raises(ModelLoadError, match="T2I_VAE_ID"):
        load_renderer("tiny-xl", model_cache, "cpu", vae=str(tmp_path / "missing"))


def test_the_vae_decodes_in_slices_to_the_same_images(core: DiffusionRenderer) -> None:
    job = batch(item(1), item(2), item(3))
    whole = core.render(job)
    core.decode_slice_pixels = SIZE * SIZE
    try:
        calls: list[int] = []
        hook = core.pipeline.vae.decoder.register_forward_hook(
            lambda module, inputs, output: calls.append(output.shape[0])
        )
        sliced = core.render(job)
        hook.remove()
    finally:
        core.decode_slice_pixels = 1024 * 1024
    assert calls == [1, 1, 1]
    for first, second in zip(whole, sliced, strict=True):
        assert largest_difference(first, second) <= 1


def test_a_batch_holds_no_more_pixels_than_its_cap(core: DiffusionRenderer) -> None:
    """Small images fill a batch up to its image count; large ones stop at the pixel cap, and a
    job larger than the cap still renders, alone."""
    executor = GpuExecutor(
        core.render, max_batch_images=4, batch_wait_s=0.5, max_batch_pixels=2 * 128 * 128
    )
    try:
        small = [executor.submit(RenderJob(batch(item(seed)))) for seed in range(4)]
        small_ids = {future.result(timeout=120).batch_id for future in small}
        large = [
            executor.submit(RenderJob(batch(item(seed), width=128, height=128)))
            for seed in range(3)
        ]
        large_sizes = [future.result(timeout=120).batch_images for future in large]
        huge = executor.submit(
            RenderJob(batch(item(1), item(2), item(3), width=128, height=128))
        ).result(timeout=120)
    finally:
        executor.shutdown()
    assert len(small_ids) == 1
    assert large_sizes == [2, 2, 1]
    assert huge.batch_images == 3


# Adapters as training tools write them: PEFT names (with the text encoder under `text_model.`, as
# transformers 4 named it, and alpha in diffusers' metadata) and kohya/A1111 names (alpha as a
# tensor), on attention, feed-forward and 1x1 projection layers of the UNet and the text encoder.
RANK, ALPHA = 4, 8.0
ADAPTED_LAYERS = [
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v",
    "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
    "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0",
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    "unet.down_blocks.1.attentions.0.proj_in",
    "text_encoder.encoder.layers.0.self_attn.q_proj",
    "text_encoder.encoder.layers.1.mlp.fc1",
]


def layer(pipeline: StableDiffusionPipeline, name: str) -> torch.nn.Module:
    component, path = name.split(".", 1)
    return getattr(pipeline, component).get_submodule(path)


def kohya_name(name: str) -> str:
    component, path = name.split(".", 1)
    prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
    return prefix + path.replace(".", "_")


def write_adapters(
    directory: Path, pipeline: StableDiffusionPipeline
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The same random layers in both formats; returns each layer's (down, up)."""
    draw = torch.Generator().manual_seed(0)
    layers = {}
    peft: dict[str, torch.Tensor] = {}
    kohya: dict[str, torch.Tensor] = {}
    for name in ADAPTED_LAYERS:
        weight = layer(pipeline, name).weight
        down = torch.randn(RANK, weight.shape[1], generator=draw) * 0.3
        up = torch.randn(weight.shape[0], RANK, generator=draw) * 0.3
        layers[name] = (down, up)
        shaped = [t.reshape(*t.shape, *weight.shape[2:]).contiguous() for t in (down, up)]
        peft_name = name.replace("text_encoder.", "text_encoder.text_model.")
        peft[f"{peft_name}.lora_A.weight"], peft[f"{peft_name}.lora_B.weight"] = shaped
        kohya[f"{kohya_name(name)}.lora_down.weight"] = shaped[0]
        kohya[f"{kohya_name(name)}.lora_up.weight"] = shaped[1]
        kohya[f"{kohya_name(name)}.alpha"] = torch.tensor(ALPHA)
    config = {
        f"{part}.{key}": value
        for part in ("unet", "text_encoder")
        for key, value in {"r": RANK, "lora_alpha": ALPHA}.items()
    }
    save_file(
        peft, directory / "peft.safetensors", metadata={"lora_adapter_metadata": json.dumps(config)}
    )
    save_file(kohya, directory / "kohya.safetensors")
    return layers


def test_adapters_in_peft_and_kohya_names_equal_their_weights_merged_into_the_model(
    model_cache: Path, tmp_path: Path
) -> None:
    scale = 0.5
    merged = StableDiffusionPipeline.from_pretrained(
        resolve("tiny", model_cache), safety_checker=None, requires_safety_checker=False
    )
    layers = write_adapters(tmp_path, merged)
    with torch.no_grad():
        for name, (down, up) in layers.items():
            weight = layer(merged, name).weight
            weight += ((up @ down) * (ALPHA / RANK) * scale).reshape(weight.shape)
    core = load_renderer("tiny", model_cache, "cpu", SpeedLevers(fuse_qkv=True))
    core.use_loras(LoraRegistry(tmp_path), max_bytes=64 * 2**20, max_rank=8)
    merged.scheduler = core.scheduler("dpmpp_2m")
    merged.set_progress_bar_config(disable=True)
    reference = merged(
        **ARGUMENTS, width=SIZE, height=SIZE, guidance_scale=GUIDANCE, generator=generator()
    ).images[0]
    [plain] = core.render(batch(item()))
    for name in ("peft", "kohya"):
        [ours] = core.render(batch(item(), loras=((name, scale),)))
        assert largest_difference(ours, reference) <= 1, name
    assert largest_difference(plain, reference) > 32
