"""Reading the generation parameters back out of an image, as AUTOMATIC1111's PNG Info does: the
`parameters` text chunk of a PNG, or the EXIF UserComment of a JPEG or WebP (the service's images
and A1111's carry it there), and that text parsed into its fields."""

import io
import re
from typing import Any

from PIL import Image

_EXIF_IFD = 0x8769
_EXIF_USER_COMMENT = 0x9286
# The UserComment's 8-byte character code, then the text.
_CHARSETS = {b"UNICODE\0": "utf-16-be", b"ASCII\0\0\0": "ascii", b"\0" * 8: "utf-8"}
# One `Name: value` field of the settings line; a value in quotes may hold commas.
_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def read_image_info(data: bytes) -> tuple[str | None, dict[str, Any]]:
    """The image's parameters text (None when it carries none) and its other text items, as
    A1111 lists them beside it. An unreadable image is a ValueError."""
    try:
        image = Image.open(io.BytesIO(data))
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"not an image: {exc}") from exc
    items = {
        name: value
        for name, value in image.info.items()
        if isinstance(value, str) and name != "parameters"
    }
    if isinstance(image.info.get("parameters"), str):
        return image.info["parameters"], items
    return _user_comment(image), items


def _user_comment(image: Image.Image) -> str | None:
    comment = image.getexif().get_ifd(_EXIF_IFD).get(_EXIF_USER_COMMENT)
    if isinstance(comment, str):
        return comment
    if not isinstance(comment, bytes) or len(comment) < 8:
        return None
    charset = _CHARSETS.get(comment[:8])
    if charset is None:
        return None
    return comment[8:].decode(charset, errors="replace").rstrip("\0")


def parse_parameters(text: str) -> dict[str, Any]:
    """The parameters text's fields as A1111 parses them: `Prompt`, `Negative prompt`, and each
    `Name: value` of the last line (values as text, a `Size` also as `Size-1` and `Size-2`)."""
    *lines, last = text.strip().split("\n")
    if len(_FIELD.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        if line.startswith("Negative prompt:"):
            negative.append(line.removeprefix("Negative prompt:").strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    fields: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for name, value in _FIELD.findall(last):
        value = value.strip()
        if len(value) > 1 and value[0] == value[-1] == '"':
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        fields[name.strip()] = value
        size = _SIZE.match(value)
        if size:
            fields[f"{name.strip()}-1"], fields[f"{name.strip()}-2"] = size.groups()
    return fields
