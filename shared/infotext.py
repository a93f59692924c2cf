"""The generation-parameters text ("infotext") in the format popular SD UIs read and write: what
an image file carries in its `parameters` chunk, and what the AUTOMATIC1111 route reports."""

from shared.schema import GenerationRequest, ImageSafety, Scheduler

# Each scheduler under the name popular SD UIs give it.
SAMPLER_NAMES: dict[Scheduler, str] = {
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "euler": "Euler",
    "euler_a": "Euler a",
    "ddim": "DDIM",
    "pndm": "PNDM",
    "lms": "LMS",
    "unipc": "UniPC",
}


def parameters_text(
    request: GenerationRequest, seed: int, model_name: str, safety: ImageSafety | None = None
) -> str:
    """The `parameters` text of one image of `request`, rendered with `seed` by `model_name`,
    with what the safety checker made of it."""
    # LoRA adapters as popular SD UIs write them: tags in the prompt.
    tags = "".join(f" <lora:{lora.name}:{lora.scale:g}>" for lora in request.loras)
    lines = [request.prompt + tags]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    settings = {
        "Steps": request.num_inference_steps,
        "Sampler": SAMPLER_NAMES[request.scheduler],
        "CFG scale": request.guidance_scale,
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model": model_name,
    }
    if request.init_image is not None:
        settings["Denoising strength"] = request.image_strength
        settings["Mode"] = "inpaint" if request.mask_image is not None else "img2img"
    if request.control is not None:
        module = request.control.type if request.control.preprocess else "none"
        weight = request.control.conditioning_scale
        settings["ControlNet 0"] = (
            f'"Module: {module}, Model: {request.control.type}, Weight: {weight}"'
        )
    if safety is not None:
        settings["Safety"] = _safety_text(safety)
    lines.append(", ".join(f"{name}: {value}" for name, value in settings.items()))
    return "\n".join(lines)


def _safety_text(safety: ImageSafety) -> str:
    if not safety.checked:
        return "unchecked"
    if not safety.flagged:
        return "passed"
    return f"flagged ({safety.reason}), {safety.action}"
