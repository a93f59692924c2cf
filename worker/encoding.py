"""Image files that carry their own generation parameters."""

import io

from PIL import Image as PILImage
from PIL.Image import Image
from PIL.PngImagePlugin import PngInfo

from shared.schema import GenerationRequest, OutputFormat

_SAMPLER_NAMES = {
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "euler": "Euler",
    "euler_a": "Euler a",
    "ddim": "DDIM",
    "pndm": "PNDM",
    "lms": "LMS",
    "unipc": "UniPC",
}
_EXIF_IFD = 0x8769
_EXIF_USER_COMMENT = 0x9286


def parameters_text(request: GenerationRequest, seed: int, model_name: str) -> str:
    """The `parameters` text in the format popular SD UIs read and write."""
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    settings = {
        "Steps": request.num_inference_steps,
        "Sampler": _SAMPLER_NAMES[request.scheduler],
        "CFG scale": request.guidance_scale,
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model": model_name,
    }
    lines.append(", ".join(f"{name}: {value}" for name, value in settings.items()))
    return "\n".join(lines)


def encode_image(image: Image, output_format: OutputFormat, parameters: str) -> bytes:
    buffer = io.BytesIO()
    if output_format == "png":
        info = PngInfo()
        info.add_text("parameters", parameters)
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        exif = PILImage.Exif()
        # EXIF UserComment: an 8-byte charset header, then the text.
        exif.get_ifd(_EXIF_IFD)[_EXIF_USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
        pil_format = "JPEG" if output_format == "jpeg" else "WEBP"
        image.save(buffer, format=pil_format, quality=92, exif=exif.tobytes())
    return buffer.getvalue()


def read_parameters(data: bytes) -> str | None:
    """The parameters text of an encoded image, whatever its format."""
    image = PILImage.open(io.BytesIO(data))
    if "parameters" in image.info:
        return image.info["parameters"]
    comment = image.getexif().get_ifd(_EXIF_IFD).get(_EXIF_USER_COMMENT)
    if isinstance(comment, bytes) and comment.startswith(b"UNICODE\0"):
        return comment[8:].decode("utf-16-be")
    return None
