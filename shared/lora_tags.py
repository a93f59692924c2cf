"""LoRA tags in a prompt, as AUTOMATIC1111 writes them: `<lora:name>` or `<lora:name:scale>`."""

import re

DEFAULT_SCALE = 1.0
_TAG = re.compile(r"<lora:([^<>]*)>", re.IGNORECASE)
_SPACES = re.compile(r"[ \t]+")
_SPACE_BEFORE_COMMA = re.compile(r"[ \t]+,")
_REPEATED_COMMAS = re.compile(r",(?:[ \t]*,)+")


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its LoRA tags (spaces and commas the tags leave behind tidied), and each
    tag's adapter name and scale (1.0 when the tag names none), in the prompt's order. A tag with
    no name, or a scale that is not a number, is a ValueError that quotes the tag.

    Like A1111, a tag's fields after the scale (its separate text-encoder and UNet weights) are
    ignored."""
    tags: list[tuple[str, float]] = []
    for match in _TAG.finditer(prompt):
        name, *rest = match.group(1).split(":")
        name = name.strip()
        if not name:
            raise ValueError(f"the LoRA tag {match.group(0)!r} names no adapter")
        scale = DEFAULT_SCALE
        if rest and rest[0].strip():
            try:
                scale = float(rest[0])
            except ValueError:
                raise ValueError(
                    f"the LoRA tag {match.group(0)!r} has a scale that is not a number"
                ) from None
        tags.append((name, scale))
    if not tags:
        return prompt, []
    lines = []
    for line in _TAG.sub(" ", prompt).split("\n"):
        line = _SPACES.sub(" ", line)
        line = _SPACE_BEFORE_COMMA.sub(",", line)
        line = _REPEATED_COMMAS.sub(",", line)
        lines.append(line.strip(" \t,"))
    return "\n".join(lines).strip(), tags
