"""What the OpenAPI document says beyond what FastAPI derives: readable operation ids, every error
answer with the model it really has, and the headers that answers carry."""

import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel

from shared.errors import ErrorEnvelope

Responses = dict[int | str, dict[str, Any]]

ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "the request is not valid",
    401: "no API key, or not a valid one",
    403: "the link is invalid or has expired",
    404: "no such resource, or not this key's",
    409: "the resource is not in a state that allows this",
    413: "the request body is over T2I_MAX_BODY_BYTES (answered before any route, always in the "
    "service's own envelope)",
    422: "the request is not valid; `details` lists the fields",
    429: "over this key's rate limit, or the queue is full; retry after `Retry-After`",
    500: "an internal error; quote its `error_id`, which is also in the logs",
    503: "Redis or the queue is unavailable; retry shortly",
    504: "the job did not finish in time and was canceled",
}


def header(description: str, kind: str = "string", required: bool = False) -> dict[str, Any]:
    return {"description": description, "required": required, "schema": {"type": kind}}


RATE_LIMIT_HEADERS: dict[str, dict[str, Any]] = {
    "RateLimit-Limit": header("job submissions this key may make per minute", "integer", True),
    "RateLimit-Remaining": header("submissions left in this key's bucket now", "integer", True),
    "RateLimit-Reset": header("seconds until the bucket is full again", "integer", True),
}
_ERROR_HEADERS: dict[int, dict[str, dict[str, Any]]] = {
    401: {"WWW-Authenticate": header("the authentication scheme to use", required=True)},
    # Only submissions are limited, so a 429 also says where the key's bucket stands.
    429: {
        "Retry-After": header("seconds to wait before retrying", "integer", True),
        **RATE_LIMIT_HEADERS,
    },
}


def error_responses(*codes: int, model: type[BaseModel] = ErrorEnvelope) -> Responses:
    """Declarations of these error answers, each with `model` and its headers; 500 always."""
    responses: Responses = {}
    for code in sorted({*codes, 500}):
        # The body cap refuses a body before any route could answer in its own shape.
        shape = ErrorEnvelope if code == 413 else model
        entry: dict[str, Any] = {"model": shape, "description": ERROR_DESCRIPTIONS[code]}
        if code in _ERROR_HEADERS:
            entry["headers"] = _ERROR_HEADERS[code]
        responses[code] = entry
    return responses


def enum_var_names(values: Sequence[str]) -> dict[str, list[str]]:
    """`x-enum-varnames` for an enum whose values differ only in case (`DDIM`, `ddim`), which
    generated clients would otherwise turn into one constant name twice."""
    names: list[str] = []
    for value in values:
        name = re.sub(r"[^0-9A-Za-z]+", "_", value).strip("_").upper()
        if name in names:
            name += "_LOWERCASE" if value.islower() else f"_{len(names)}"
        names.append(name)
    return {"x-enum-varnames": names}


def operation_id(route: APIRoute) -> str:
    """The endpoint function's name: `create_job`, `get_job`, ... as generated clients call it."""
    return route.name


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional parameter's schema without its `null` branch: absent is how a header or a
    query parameter says nothing, and the text `null` is no value of it."""
    variants = schema.get("anyOf")
    if not variants:
        return schema
    kept = [variant for variant in variants if variant.get("type") != "null"]
    if len(kept) != 1:
        return schema
    rest = {name: value for name, value in schema.items() if name != "anyOf"}
    return {**kept[0], **rest}


_FASTAPI_422 = "#/components/schemas/HTTPValidationError"


def _declares_fastapi_422(operation: dict[str, Any]) -> bool:
    content = operation.get("responses", {}).get("422", {}).get("content", {})
    schema = content.get("application/json", {}).get("schema", {})
    return schema.get("$ref") == _FASTAPI_422


# Examples of a request that carries one image file (base64, or a data: URL): real, tiny images,
# so that a request built from an example is valid.
IMAGE_BODY_EXAMPLES = [
    {
        "image": "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFUlEQVR42mOMqjjBgA0"
        "wMeAAg1MCAEPFAaoP12TgAAAAAElFTkSuQmCC"
    },
    {
        "image": "data:image/webp;base64,UklGRjYAAABXRUJQVlA4ICoAAACQAQCdASoIAAgAAsB"
        "MJaACdLoAA5gA/uwmX18AU9Uf/OJfyR+gXaAAAAA="
    },
]


def install_openapi(app: FastAPI, body_models: Sequence[type[BaseModel]] = ()) -> None:
    """Serve the document FastAPI derives, with parameters that never take `null` and without
    the 422 answer FastAPI adds where a route declares none: none of ours has that shape.
    `body_models`: request bodies a route reads itself (to take more than JSON), which its
    `openapi_extra` names by `#/components/schemas/<name>`."""
    derive = app.openapi

    def openapi() -> dict[str, Any]:
        document = derive()
        for operations in document.get("paths", {}).values():
            for operation in operations.values():
                for parameter in operation.get("parameters", []):
                    parameter["schema"] = _without_null(parameter["schema"])
                if _declares_fastapi_422(operation):
                    del operation["responses"]["422"]
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        for model in body_models:
            schemas.setdefault(model.__name__, model.model_json_schema())
        return document

    app.openapi = openapi  # type: ignore[method-assign]
