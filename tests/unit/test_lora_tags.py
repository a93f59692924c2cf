"""A1111's `<lora:name:scale>` prompt tags, split from the prompt."""

import pytest

from shared.lora_tags import split_lora_tags


def test_a_prompt_without_tags_is_left_as_it_is() -> None:
    assert split_lora_tags("  a cat ,  on a mat ") == ("  a cat ,  on a mat ", [])


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a cat <lora:style:0.8>", ("a cat", [("style", 0.8)])),
        ("<lora:style> a cat", ("a cat", [("style", 1.0)])),
        ("a <lora:style:1> cat", ("a cat", [("style", 1.0)])),
        ("a cat, <lora:style:0.5>, red", ("a cat, red", [("style", 0.5)])),
        ("a cat <LoRA:style:-0.25>", ("a cat", [("style", -0.25)])),
        ("a cat <lora: style :0.3>", ("a cat", [("style", 0.3)])),
        ("a cat <lora:style:>", ("a cat", [("style", 1.0)])),
        # The text-encoder and UNet weights after the scale are ignored, as A1111 does by default.
        ("a cat <lora:style:0.7:0.2>", ("a cat", [("style", 0.7)])),
        (
            "<lora:one:0.5><lora:two:2> a cat\n<lora:three> on a mat",
            ("a cat\non a mat", [("one", 0.5), ("two", 2.0), ("three", 1.0)]),
        ),
        ("<lora:style:0.8>", ("", [("style", 0.8)])),
    ],
)
def test_tags_come_out_with_their_scales(
    prompt: str, expected: tuple[str, list[tuple[str, float]]]
) -> None:
    assert split_lora_tags(prompt) == expected


def test_other_angle_brackets_stay() -> None:
    assert split_lora_tags("a <hypernet:x:1> cat <lora:s>") == (
        "a <hypernet:x:1> cat",
        [("s", 1.0)],
    )


@pytest.mark.parametrize("tag", ["<lora:>", "<lora: :0.5>", "<lora:style:strong>"])
def test_a_malformed_tag_is_an_error_that_quotes_it(tag: str) -> None:
    with pytest.raises(ValueError, match=tag):
        split_lora_tags(f"a cat {tag}")
