"""schemathesis hooks (`SCHEMATHESIS_HOOKS=tests.schemathesis_hooks`): generated bodies keep to the
limits that a JSON schema cannot state, products of fields that the schema's descriptions name
(the pixel budget, A1111's batch_size x n_iter), and the routes that render before they answer
get small renders, so a CPU gets through them. Only values that are valid are changed, and only to
other valid values: a request the schema calls invalid stays invalid."""

import base64
import io
import re
from typing import Any

import schemathesis
from PIL import Image
from pydantic import BaseModel, Field, ValidationError

from api.routes.openai import SIZE_PATTERN
from shared.families import MAX_SIZE, MIN_SIZE, SD15
from shared.schema import MAX_LORAS, ControlSpec, LoraSpec, WebhookSpec
from shared.settings import ApiSettings


class _Loras(BaseModel):
    loras: list[LoraSpec] = Field(max_length=MAX_LORAS)


MAX_PIXELS = ApiSettings.model_fields["max_pixels_per_job"].default
SMALL_SIDE = 256
FEW_STEPS = 1


def _valid_int(body: dict[str, Any], field: str, low: int, high: int, default: int) -> int | None:
    """The field's value when it is a valid integer, 800.0 included (or absent: its default)."""
    value = body.get(field, default)
    whole = type(value) is int or (type(value) is float and value.is_integer())
    return int(value) if whole and low <= value <= high else None


def _shrink(body: dict[str, Any], field: str, low: int, high: int, default: int, to: int) -> None:
    value = _valid_int(body, field, low, high, default)
    if value is not None:
        body[field] = min(value, to)


def _valid(model: type[BaseModel], value: object) -> bool:
    try:
        model.model_validate(value)
    except ValidationError:
        return False
    return True


def _png_base64(side: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (90, 120, 200)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# A real image for the routes whose schema asks for one (any string is valid to the schema).
INIT_IMAGE = _png_base64(SMALL_SIDE)
# Request fields whose valid values depend on more than the schema: an input image must really be
# an image, and a model must be served by a live worker.
_STATEFUL_FIELDS = ("init_image", "mask_image", "strength", "model")


def _submittable(body: dict[str, Any]) -> None:
    """A job within the pixel budget, with no webhook (a webhook's host must resolve to a public
    address, and no host resolves where these tests run), no input images and the default model.
    Nor LoRA adapters or control: which names and control types exist is the deployment's, not
    the schema's."""
    if body.get("webhook") is not None and _valid(WebhookSpec, body["webhook"]):
        del body["webhook"]
    if body.get("loras") and _valid(_Loras, {"loras": body["loras"]}):
        del body["loras"]
    if body.get("control") is not None and _valid(ControlSpec, body["control"]):
        del body["control"]
    fields = ("init_image", "mask_image", "model")
    if all(body.get(field) is None or isinstance(body[field], str) for field in fields):
        for field in _STATEFUL_FIELDS:
            body.pop(field, None)
    # The default model is SD 1.5's: the schema's sizes are any family's.
    for side in ("width", "height"):
        if side in body:
            _shrink(body, side, MIN_SIZE, MAX_SIZE, SD15.default_size, SD15.max_size)
    width = _valid_int(body, "width", MIN_SIZE, MAX_SIZE, SD15.default_size)
    height = _valid_int(body, "height", MIN_SIZE, MAX_SIZE, SD15.default_size)
    images = _valid_int(body, "num_images", 1, 8, 1)
    if width and height and images and width * height * images > MAX_PIXELS:
        body["num_images"] = MAX_PIXELS // (width * height)


def _small_openai_render(body: dict[str, Any]) -> None:
    size = body.get("size")
    if size is None or (isinstance(size, str) and re.fullmatch(SIZE_PATTERN, size)):
        body["size"] = f"{SMALL_SIDE}x{SMALL_SIDE}"
    _shrink(body, "n", 1, 8, 1, 1)
    _shrink(body, "num_inference_steps", 1, 150, 25, FEW_STEPS)


def _small_a1111_render(body: dict[str, Any]) -> None:
    for side in ("width", "height"):
        if _valid_int(body, side, MIN_SIZE, MAX_SIZE, SD15.default_size) is not None:
            body[side] = SMALL_SIDE
    _shrink(body, "batch_size", 1, 8, 1, 1)
    _shrink(body, "n_iter", 1, 8, 1, 1)
    _shrink(body, "steps", 1, 150, 50, FEW_STEPS)


def _small_a1111_img2img(body: dict[str, Any]) -> None:
    """A small render from a real image; strength 1 so that even one step is one step."""
    _small_a1111_render(body)
    images = body.get("init_images")
    if isinstance(images, list) and len(images) == 1 and isinstance(images[0], str):
        body["init_images"] = [INIT_IMAGE]
    if isinstance(body.get("mask"), str):
        del body["mask"]
    strength = body.get("denoising_strength", 0.75)
    if type(strength) in (int, float) and 0 < strength <= 1:
        body["denoising_strength"] = 1.0


def _real_image(body: dict[str, Any]) -> None:
    """An image to verify, base64."""
    if isinstance(body.get("image"), str):
        body["image"] = INIT_IMAGE


def _served_model_only(body: dict[str, Any]) -> None:
    """Which models are served is the deployment's, not the schema's."""
    body.pop("sd_model_checkpoint", None)


# Bodies whose valid values depend on more than the schema, adjusted in positive cases only.
_STATEFUL_BODIES = {
    "/v1/provenance/verify": _real_image,
    "/sdapi/v1/png-info": _real_image,
    "/sdapi/v1/options": _served_model_only,
}

_BY_PATH = {
    "/v1/jobs": _submittable,
    "/v1/images/generations": _small_openai_render,
    "/sdapi/v1/txt2img": _small_a1111_render,
    "/sdapi/v1/img2img": _small_a1111_img2img,
}


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    if case.operation.path in _STATEFUL_BODIES:
        # A negative case's body stays as generated: the route must refuse it.
        meta = case.meta
        positive = meta is None or all(
            mode == "positive"
            for mode in [meta.generation.mode, *(part.mode for part in meta.components.values())]
        )
        if positive and isinstance(case.body, dict):
            _STATEFUL_BODIES[case.operation.path](case.body)
        return
    adjust = _BY_PATH.get(case.operation.path)
    if (
        adjust is not None
        and case.operation.method.upper() == "POST"
        and isinstance(case.body, dict)
    ):
        adjust(case.body)
