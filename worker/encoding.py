"""Image files that carry their own generation parameters."""

import io

import piexif
import piexif.helper
from PIL import Image as PILImage
from PIL.Image import Image
from PIL.PngImagePlugin import PngInfo

from shared.schema import OutputFormat

_EXIF_IFD = 0x8769
_EXIF_USER_COMMENT = 0x9286


def encode_image(
    image: Image, output_format: OutputFormat, parameters: str, png_compress_level: int = 1
) -> bytes:
    buffer = io.BytesIO()
    if output_format == "png":
        info = PngInfo()
        info.add_text("parameters", parameters)
        image.save(buffer, format="PNG", pnginfo=info, compress_level=png_compress_level)
    else:
        # EXIF UserComment, as A1111 writes it and its PNG Info reads it: type UNDEFINED, an
        # 8-byte charset header, then the text in UTF-16 (Pillow would write type BYTE).
        comment = piexif.helper.UserComment.dump(parameters, encoding="unicode")
        exif = piexif.dump({"Exif": {piexif.ExifIFD.UserComment: comment}})
        pil_format = "JPEG" if output_format == "jpeg" else "WEBP"
        image.save(buffer, format=pil_format, quality=92, exif=exif)
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
