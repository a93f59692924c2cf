"""The messages the fair scheduler's scripts push are the ones Celery itself would publish.

The scripts forge each render message in Lua (shared/fairshare.py). Here the real script runs
against a real redis-server, Celery publishes the same task to a scratch queue of the same server,
and the two raw list entries are compared field by field: a Celery or kombu upgrade that moves the
format fails this test instead of stranding every job. That a Celery worker consumes the forged
messages is what every fair-share test (tests/integration/test_fair_share.py) shows end to end.
"""

import base64
import json
from typing import Any

import pytest
from redis import Redis

from shared.fairshare import ahead_key
from shared.jobstore import JobStore
from shared.queue import RENDER_TASK, BrokerSetupError, check_forgeable, make_celery
from shared.records import new_job_id, utc_now
from shared.schema import GenerationRequest, JobRecord, JobStatus
from shared.settings import CoreSettings

LANE = "render-contract"
SCRATCH_QUEUE = "render-contract-reference"

# Fields that differ per message by design; each is checked on its own below.
_PER_MESSAGE_HEADERS = {"id", "root_id", "origin"}
_PER_MESSAGE_PROPERTIES = {"correlation_id", "delivery_tag", "reply_to", "delivery_info"}


def _core(redis_client: Redis) -> CoreSettings:
    url = "redis://{host}:{port}/{db}".format(**redis_client.connection_pool.connection_kwargs)
    return CoreSettings(redis_url=url, model_id="tiny")


def _decoded(raw: bytes) -> dict[str, Any]:
    message = json.loads(raw)
    assert message["properties"]["body_encoding"] == "base64"
    message["body"] = json.loads(base64.b64decode(message["body"]).decode("utf-8"))
    return message


def _forged_and_reference(redis_client: Redis) -> tuple[str, dict[str, Any], dict[str, Any]]:
    store = JobStore(redis_client, retention_s=600)
    record = JobRecord(
        id=new_job_id(),
        status=JobStatus.QUEUED,
        created_at=utc_now(),
        request=GenerationRequest(prompt="a cat", seed=1),
    )
    app = make_celery(_core(redis_client))
    # A message Celery publishes to the lane first: the forged one must queue behind it.
    app.send_task(RENDER_TASK, kwargs={"job_id": "earlier", "attempt": 1}, queue=LANE)
    store.create(record, lane=LANE)
    app.send_task(RENDER_TASK, kwargs={"job_id": record.id, "attempt": 1}, queue=SCRATCH_QUEUE)

    lane = redis_client.lrange(LANE, 0, -1)
    assert len(lane) == 2
    # kombu pushes on the left and pops on the right: the forged message is the newer one.
    assert _decoded(lane[-1])["body"][1]["job_id"] == "earlier"
    [reference] = redis_client.lrange(SCRATCH_QUEUE, 0, -1)
    return record.id, _decoded(lane[0]), _decoded(reference)


def test_a_forged_message_matches_what_celery_publishes_field_by_field(
    redis_client: Redis,
) -> None:
    job_id, forged, reference = _forged_and_reference(redis_client)

    fields = {"body", "content-encoding", "content-type", "headers", "properties"}
    assert set(forged) == set(reference) == fields
    assert forged["body"] == reference["body"]
    assert forged["body"][1] == {"job_id": job_id, "attempt": 1}
    assert forged["content-type"] == reference["content-type"] == "application/json"
    assert forged["content-encoding"] == reference["content-encoding"] == "utf-8"

    headers, expected_headers = forged["headers"], reference["headers"]
    assert set(headers) == set(expected_headers)
    for name in sorted(set(expected_headers) - _PER_MESSAGE_HEADERS):
        assert headers[name] == expected_headers[name], name
    # What the worker routes and tracks by: the task, and a task id of its own that roots itself.
    assert headers["task"] == RENDER_TASK
    assert headers["root_id"] == headers["id"]
    assert expected_headers["root_id"] == expected_headers["id"]
    assert headers["parent_id"] is None and headers["group"] is None and headers["retries"] == 0
    assert isinstance(headers["origin"], str) and headers["origin"]

    properties, expected_properties = forged["properties"], reference["properties"]
    assert set(properties) == set(expected_properties)
    for name in sorted(set(expected_properties) - _PER_MESSAGE_PROPERTIES):
        assert properties[name] == expected_properties[name], name
    assert properties["correlation_id"] == headers["id"]
    assert expected_properties["correlation_id"] == expected_headers["id"]
    assert properties["delivery_info"] == {"exchange": "", "routing_key": LANE}
    assert expected_properties["delivery_info"] == {"exchange": "", "routing_key": SCRATCH_QUEUE}
    # Results are ignored, so nothing is ever sent to reply_to; kombu fills it in regardless.
    assert isinstance(properties["reply_to"], str)
    # kombu acks and restores unacked messages by delivery tag: a string unique per message.
    assert isinstance(properties["delivery_tag"], str)
    assert isinstance(expected_properties["delivery_tag"], str)


def test_every_forged_message_has_its_own_task_id_and_delivery_tag(redis_client: Redis) -> None:
    store = JobStore(redis_client, retention_s=600)
    for _ in range(3):
        record = JobRecord(
            id=new_job_id(),
            status=JobStatus.QUEUED,
            created_at=utc_now(),
            request=GenerationRequest(prompt="a cat", seed=1),
        )
        store.create(record, lane=LANE)
        # No live worker: a window of one, so send each in turn by emptying the window.
        redis_client.delete(ahead_key(LANE))
    messages = [_decoded(raw) for raw in redis_client.lrange(LANE, 0, -1)]
    assert len(messages) == 3
    assert len({m["headers"]["id"] for m in messages}) == 3
    assert len({m["properties"]["delivery_tag"] for m in messages}) == 3


def test_a_broker_the_scripts_cannot_send_to_is_refused_at_start(redis_client: Redis) -> None:
    app = make_celery(_core(redis_client))
    check_forgeable(app)
    options = dict(app.conf.broker_transport_options)
    app.conf.broker_transport_options = {**options, "global_keyprefix": "t2i-"}
    with pytest.raises(BrokerSetupError, match="global_keyprefix"):
        check_forgeable(app)
    app.conf.broker_transport_options = options
    app.conf.broker_url = "amqp://guest@localhost//"
    with pytest.raises(BrokerSetupError, match="amqp"):
        check_forgeable(app)
