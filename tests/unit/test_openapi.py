"""The OpenAPI document says what the API really answers: errors in the shape each route sends,
readable operation ids, the headers and content types of answers, examples, links."""

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from api.app import create_app

ERROR_MODEL_BY_TAG = {"openai": "OpenAIError", "automatic1111": "A1111Error"}
IMAGE_TYPES = {"image/png", "image/jpeg", "image/webp", "application/octet-stream"}
Operation = tuple[str, str, dict[str, Any]]


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    # The app connects to Redis lazily, and the document needs none.
    return create_app().openapi()


def operations(document: dict[str, Any]) -> Iterator[Operation]:
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def schema_ref(answer: dict[str, Any], content_type: str = "application/json") -> str:
    return answer.get("content", {}).get(content_type, {}).get("schema", {}).get("$ref", "")


def test_operation_ids_are_the_endpoint_names(document: dict[str, Any]) -> None:
    ids = [operation["operationId"] for _, _, operation in operations(document)]
    assert len(ids) == len(set(ids)) >= 20
    assert all(re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", name) for name in ids), ids
    assert not [name for name in ids if re.search(r"_(get|post)$|_v1_", name)]
    assert {"create_job", "get_job", "download_image", "create_image", "txt2img"} <= set(ids)


def test_every_error_answer_has_the_shape_its_route_sends(document: dict[str, Any]) -> None:
    for path, method, operation in operations(document):
        [tag] = operation["tags"]
        model = ERROR_MODEL_BY_TAG.get(tag, "ErrorEnvelope")
        errors = {code: answer for code, answer in operation["responses"].items() if code >= "4"}
        assert "500" in errors, (method, path)
        for code, answer in errors.items():
            # The body cap answers before any route, in the service's envelope.
            shape = "ErrorEnvelope" if code == "413" else model
            assert schema_ref(answer) == f"#/components/schemas/{shape}", (method, path, code)
        validates = operation.get("parameters") or operation.get("requestBody")
        if validates:
            assert ("400" if tag == "openai" else "422") in errors, (method, path)
    assert "HTTPValidationError" not in json.dumps(document)


def test_answers_document_their_headers(document: dict[str, Any]) -> None:
    create = document["paths"]["/v1/jobs"]["post"]["responses"]
    for code in ("200", "202"):
        headers = create[code]["headers"]
        assert {"Location", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"} <= set(
            headers
        )
        assert headers["Location"]["required"] and headers["RateLimit-Limit"]["required"]
    assert "Idempotent-Replayed" in create["200"]["headers"]
    for path, method, operation in operations(document):
        answers = operation["responses"]
        if "429" in answers:
            assert answers["429"]["headers"]["Retry-After"]["required"], (method, path)
        if "401" in answers:
            assert "WWW-Authenticate" in answers["401"]["headers"], (method, path)
    for path in ("/v1/images/generations", "/sdapi/v1/txt2img"):
        assert (
            "RateLimit-Remaining" in document["paths"][path]["post"]["responses"]["200"]["headers"]
        )


def test_downloads_declare_their_content_types(document: dict[str, Any]) -> None:
    for path in ("/v1/files/{key}", "/v1/jobs/{job_id}/images/{index}"):
        content = document["paths"][path]["get"]["responses"]["200"]["content"]
        assert set(content) == IMAGE_TYPES
        assert all(
            item["schema"] == {"type": "string", "format": "binary"} for item in content.values()
        )
    events = document["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    assert set(events) == {"text/event-stream"}


def test_every_request_body_has_examples(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    bodies = [
        (path, operation["requestBody"]["content"]["application/json"])
        for path, _, operation in operations(document)
        if "requestBody" in operation
    ]
    assert len(bodies) == 7
    for path, media in bodies:
        model = media["schema"]["$ref"].rsplit("/", 1)[-1]
        assert len(schemas[model].get("examples", [])) >= 2, path


def test_each_operation_is_listed_once_and_no_parameter_takes_null(
    document: dict[str, Any],
) -> None:
    for path, method, operation in operations(document):
        assert len(operation["tags"]) == 1, (method, path)
        for parameter in operation.get("parameters", []):
            assert "null" not in json.dumps(parameter["schema"]), (method, path, parameter)


def test_a_submitted_job_links_to_its_routes(document: dict[str, Any]) -> None:
    ids = {operation["operationId"] for _, _, operation in operations(document)}
    for code in ("200", "202"):
        links = document["paths"]["/v1/jobs"]["post"]["responses"][code]["links"]
        assert {link["operationId"] for link in links.values()} <= ids
        assert {"get_job", "cancel_job", "job_events", "download_image"} <= {
            link["operationId"] for link in links.values()
        }


def test_the_document_never_mentions_a_notebook(document: dict[str, Any]) -> None:
    assert "notebook" not in json.dumps(document).lower()
