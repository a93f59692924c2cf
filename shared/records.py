"""A job record as the job store keeps it: its id, its times, its request's fingerprint, and its
fields in its hash (each but the status as JSON)."""

import hashlib
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic_core import to_jsonable_python

from shared.schema import GenerationRequest, JobRecord


def new_job_id() -> str:
    return uuid.uuid4().hex


def utc_now() -> datetime:
    return datetime.now(UTC)


def request_fingerprint(request: GenerationRequest) -> str:
    """Same body, same fingerprint: the normalized request as the client sent it."""
    canonical = json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def encode_fields(fields: dict[str, Any]) -> list[str]:
    """`fields` as HSET takes them: each name, then its value."""
    flat: list[str] = []
    for name, value in to_jsonable_python(fields).items():
        flat.extend((name, value if name == "status" else json.dumps(value)))
    return flat


def decode_record(raw: dict[bytes, bytes]) -> JobRecord:
    # Each field but the status is stored as JSON: the record is one JSON document, parsed once.
    fields = b",".join(
        b'"%s":"%s"' % (name, value) if name == b"status" else b'"%s":%s' % (name, value)
        for name, value in raw.items()
    )
    return JobRecord.model_validate_json(b"{" + fields + b"}")
