"""Signed webhooks with retries, the SSRF guard at submit, and JSON-only Celery workers."""

import json
import socket
import time

import httpx
import pytest
from kombu import Connection, Exchange, Producer
from redis import Redis
from standardwebhooks import Webhook
from txt2img.webhooks import WebhookVerificationError, verify

from shared.fairshare import inflight_key, lane_keys_key
from shared.keys import LEASES_KEY, index_key, job_key, status_index_key
from shared.queue import RENDER_TASK
from shared.schema import JobStatus
from shared.webhooks import DELIVER_TASK
from tests.support import Stack, WebhookReceiver, wait_for_job, wait_until

QUICK = {"width": 256, "height": 256, "num_inference_steps": 2}


def submit_with_webhook(client: httpx.Client, url: str, **webhook: object) -> dict:
    response = client.post(
        "/v1/jobs", json={"prompt": "a hooked job", **QUICK, "webhook": {"url": url, **webhook}}
    )
    assert response.status_code == 202, response.text
    return response.json()


def deliveries(client: httpx.Client, job_id: str) -> list[dict]:
    response = client.get(f"/v1/jobs/{job_id}/webhooks")
    assert response.status_code == 200, response.text
    return response.json()["data"]


def test_an_allow_listed_receiver_gets_a_webhook_that_verifies(webhook_stack: Stack) -> None:
    with WebhookReceiver() as receiver, webhook_stack.client() as client:
        secret = client.get("/v1/webhooks/secret").json()["key"]
        job = submit_with_webhook(client, receiver.url)
        [webhook] = receiver.wait_for(1)
        final = wait_for_job(client, job["id"])
    assert secret.startswith("whsec_")
    payload = Webhook(secret).verify(webhook.body, webhook.headers)
    assert payload["type"] == "job.completed"
    assert payload["data"]["id"] == job["id"] and payload["data"]["status"] == "succeeded"
    assert payload["data"]["images"][0]["url"]
    assert final["status"] == "succeeded"
    assert verify(webhook.body, webhook.headers, secret)["data"]["id"] == job["id"]


def test_started_and_progress_events_when_asked(webhook_stack: Stack) -> None:
    with WebhookReceiver() as receiver, webhook_stack.client() as client:
        job = submit_with_webhook(client, receiver.url, events=["started", "progress", "completed"])
        wait_for_job(client, job["id"])
        wait_until(
            lambda: any(b'"job.completed"' in w.body for w in receiver.received), 20, "completed"
        )
    types = {httpx.Response(200, content=w.body).json()["type"] for w in receiver.received}
    assert {"job.started", "job.progress", "job.completed"} <= types


def test_retries_keep_the_webhook_id_and_the_log_shows_each_attempt(webhook_stack: Stack) -> None:
    with WebhookReceiver([500, 500, 200]) as receiver, webhook_stack.client() as client:
        job = submit_with_webhook(client, receiver.url)
        received = receiver.wait_for(3)
        wait_until(
            lambda: deliveries(client, job["id"])[0]["status"] == "delivered", 10, "delivered"
        )
        [delivery] = deliveries(client, job["id"])
        redelivered = client.post(f"/v1/jobs/{job['id']}/webhooks/redeliver")
        receiver.wait_for(4)
        wait_until(lambda: len(deliveries(client, job["id"])[0]["attempts"]) == 4, 10, "4 tries")
    ids = {webhook.headers["webhook-id"] for webhook in received}
    assert len(ids) == 1 and ids == {delivery["webhook_id"]}
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 500, 200]
    assert delivery["attempts"][0]["next_attempt_at"]
    assert redelivered.status_code == 202
    assert redelivered.json()["webhook_id"] == delivery["webhook_id"]
    assert receiver.received[3].headers["webhook-id"] == delivery["webhook_id"]


def test_410_stops_the_retries(webhook_stack: Stack) -> None:
    with WebhookReceiver([410, 200]) as receiver, webhook_stack.client() as client:
        job = submit_with_webhook(client, receiver.url)
        receiver.wait_for(1)
        wait_until(lambda: deliveries(client, job["id"])[0]["status"] == "gone", 10, "gone")
        time.sleep(1.5)  # longer than every retry delay of this stack
    assert len(receiver.received) == 1


def test_a_rotated_secret_signs_alongside_the_old_one(webhook_stack: Stack) -> None:
    key = webhook_stack.create_key("rotating", 100)
    with WebhookReceiver() as receiver, webhook_stack.client(key) as client:
        old = client.get("/v1/webhooks/secret").json()["key"]
        rotated = client.post("/v1/webhooks/secret/rotate").json()
        submit_with_webhook(client, receiver.url)
        [webhook] = receiver.wait_for(1)
    assert rotated["key"] != old and client is not None
    assert len(webhook.headers["webhook-signature"].split()) == 2
    assert verify(webhook.body, webhook.headers, old)
    assert verify(webhook.body, webhook.headers, rotated["key"])


def test_signatures_older_than_five_minutes_fail_verification(webhook_stack: Stack) -> None:
    with WebhookReceiver() as receiver, webhook_stack.client() as client:
        secret = client.get("/v1/webhooks/secret").json()["key"]
        submit_with_webhook(client, receiver.url)
        [webhook] = receiver.wait_for(1)
    sent_at = int(webhook.headers["webhook-timestamp"])
    assert verify(webhook.body, webhook.headers, secret, now=sent_at + 299)
    with pytest.raises(WebhookVerificationError, match="tolerance"):
        verify(webhook.body, webhook.headers, secret, now=sent_at + 301)
    with pytest.raises(WebhookVerificationError, match="signature"):
        verify(webhook.body + b" ", webhook.headers, secret)
    with pytest.raises(WebhookVerificationError, match="signature"):
        verify(webhook.body, webhook.headers, "whsec_" + "A" * 44)


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "[::1]",
        "10.1.2.3",
        "172.16.0.9",
        "192.168.1.20",
        "169.254.169.254",
        "[fe80::1]",
        "[fc00::5]",
        "[fec0::1]",
        "224.0.0.251",
        "[ff02::1]",
        "0.0.0.0",
        "[::]",
        "240.0.0.1",
        "[::ffff:127.0.0.1]",
        "[::ffff:169.254.169.254]",
        "[2002:7f00:1::1]",
        "2130706433",
        "0x7f.1",
        "nowhere.invalid",
    ],
)
def test_refused_webhook_targets_get_422_and_nothing_is_sent(local_stack: Stack, host: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.3)
        port = listener.getsockname()[1]
        redis = Redis.from_url(local_stack.env["T2I_REDIS_URL"])
        queued_before = redis.zcard("t2i:queue") + redis.llen("txt2img")
        with local_stack.client() as client:
            response = client.post(
                "/v1/jobs",
                json={"prompt": "ssrf", **QUICK, "webhook": {"url": f"http://{host}:{port}/x"}},
            )
        with pytest.raises(TimeoutError):
            listener.accept()
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "validation_error"
    assert error["details"][0]["loc"] == ["body", "webhook", "url"]
    assert redis.zcard("t2i:queue") + redis.llen("txt2img") <= queued_before


@pytest.mark.parametrize(
    "webhook",
    [
        {"url": "ftp://example.com/hook"},
        {"url": "http://user:pw@example.com/hook"},
        {"url": "http:///nohost"},
        {"url": "https://example.com/hook", "events": ["finished"]},
        {"url": "https://example.com/hook", "events": ["completed", "completed"]},
        {"url": "https://example.com/hook", "extra": 1},
    ],
)
def test_malformed_webhooks_get_422(local_stack: Stack, webhook: dict) -> None:
    with local_stack.client() as client:
        response = client.post("/v1/jobs", json={"prompt": "x", **QUICK, "webhook": webhook})
    assert response.status_code == 422
    assert response.json()["error"]["type"] == "validation_error"


@pytest.mark.parametrize(("queue", "task"), [("txt2img", RENDER_TASK), ("webhooks", DELIVER_TASK)])
def test_the_workers_refuse_a_pickled_message(webhook_stack: Stack, queue: str, task: str) -> None:
    worker = webhook_stack.worker if queue == "txt2img" else webhook_stack.webhook_worker
    assert worker is not None
    with Connection(webhook_stack.env["T2I_REDIS_URL"]) as connection:
        producer = Producer(connection, exchange=Exchange(queue, type="direct"), routing_key=queue)
        producer.publish(
            {"task": "not-for-you", "args": []},
            serializer="pickle",
            headers={"task": task, "id": f"pickled-{queue}"},
            declare=[],
        )
    wait_until(
        lambda: "untrusted content of type pickle" in worker.log_tail(400),
        20,
        "the worker to refuse the pickled message",
    )
    assert worker.alive()
    with webhook_stack.client() as client:
        after = client.post("/v1/jobs", json={"prompt": "still serving", **QUICK}).json()
        assert wait_for_job(client, after["id"])["status"] == "succeeded"


def _running_snapshot(redis: Redis, job_id: str) -> dict[bytes, bytes]:
    """The job's record while it runs: what a replica that missed its end still holds."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        snapshot = redis.hgetall(job_key(job_id))
        if snapshot.get(b"status") == b"running":
            return snapshot
        time.sleep(0.002)
    raise TimeoutError(f"job {job_id} was never seen running")


def _undo_the_end(redis: Redis, job_id: str, snapshot: dict[bytes, bytes]) -> None:
    """What a failover to a replica that missed the job's end leaves: the record as it ran,
    under a lease that has lapsed by now, in the owner's index of running jobs and among its
    key's jobs in flight."""
    owner, lane = json.loads(snapshot[b"owner"]), json.loads(snapshot[b"lane"])
    score = redis.zscore(index_key(owner), job_id)
    assert score is not None
    with redis.pipeline(transaction=True) as pipe:
        pipe.sadd(inflight_key(lane, owner), job_id)
        pipe.sadd(lane_keys_key(lane), owner or "-")
        pipe.delete(job_key(job_id))
        pipe.hset(job_key(job_id), mapping=snapshot)
        pipe.zadd(LEASES_KEY, {job_id: 0})
        pipe.zrem(status_index_key(owner, JobStatus.SUCCEEDED), job_id)
        pipe.zadd(status_index_key(owner, JobStatus.RUNNING), {job_id: score})
        pipe.execute()


def test_an_end_undone_by_a_failover_keeps_its_images_and_completes_once(
    webhook_stack: Stack,
) -> None:
    """The reaper starts the job again and it ends again, but the URLs the client was given
    for the first attempt's images keep working, and `completed` is sent once."""
    redis = Redis.from_url(webhook_stack.env["T2I_REDIS_URL"])
    with WebhookReceiver() as receiver, webhook_stack.client() as client:
        response = client.post(
            "/v1/jobs",
            json={
                "prompt": "an end a failover undid",
                "width": 256,
                "height": 256,
                "num_inference_steps": 12,
                "webhook": {"url": receiver.url},
            },
        )
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        snapshot = _running_snapshot(redis, job_id)
        first = wait_for_job(client, job_id)
        receiver.wait_for(1)
        first_urls = [image["url"] for image in first["images"]]
        assert first["status"] == "succeeded" and first_urls

        _undo_the_end(redis, job_id, snapshot)
        wait_until(
            lambda: client.get(f"/v1/jobs/{job_id}").json()["attempt"] == 2,
            30,
            "the reaper to start attempt 2",
        )
        second = wait_for_job(client, job_id)
        # Every retry delay of this stack: a second `completed` would have arrived.
        time.sleep(2.5)
        statuses = [client.get(url).status_code for url in first_urls]
        hooks = [w for w in receiver.received if b'"job.completed"' in w.body]
        events = [delivery["event"] for delivery in deliveries(client, job_id)]
    assert second["status"] == "succeeded"
    assert len(hooks) == 1 and events == ["completed"]
    assert statuses == [200] * len(first_urls)
