import io

import piexif
import piexif.helper
import pytest
from PIL import Image

from shared.infotext import parameters_text
from shared.schema import GenerationRequest
from worker.encoding import encode_image, read_parameters


def test_parameters_text_in_the_popular_ui_format() -> None:
    request = GenerationRequest(
        prompt="a cat", negative_prompt="blurry", scheduler="dpmpp_2m_karras", seed=3, width=640
    )
    assert parameters_text(request, 4, "sd15") == (
        "a cat\nNegative prompt: blurry\n"
        "Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 4, Size: 640x512, Model: sd15"
    )


def test_no_negative_prompt_line_when_empty() -> None:
    text = parameters_text(GenerationRequest(prompt="a dog"), 1, "m")
    assert "Negative prompt" not in text and text.startswith("a dog\nSteps: 25")


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_every_format_carries_its_parameters(output_format: str) -> None:
    text = "ünïcode prompt\nSteps: 3, Seed: 9"
    data = encode_image(Image.new("RGB", (32, 16), "teal"), output_format, text)
    assert read_parameters(data) == text


def test_the_png_level_trades_size_for_time_and_keeps_the_pixels() -> None:
    gradient = Image.linear_gradient("L").convert("RGB").resize((512, 512))
    fast, small = (encode_image(gradient, "png", "p", level) for level in (1, 9))
    assert len(small) < len(fast)
    for data in (fast, small):
        assert Image.open(io.BytesIO(data)).tobytes() == gradient.tobytes()


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_piexif_reads_the_parameters_as_a1111s_png_info_does(output_format: str) -> None:
    text = "ünïcode prompt\nSteps: 3, Seed: 9"
    data = encode_image(Image.new("RGB", (32, 16), "teal"), output_format, text)
    comment = piexif.load(data)["Exif"][piexif.ExifIFD.UserComment]
    assert isinstance(comment, bytes) and comment.startswith(b"UNICODE\0")
    assert piexif.helper.UserComment.load(comment) == text
