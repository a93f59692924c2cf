"""The job lifecycle through HTTP: progress, queue position, SSE, cancel, idempotency, wait,
listing, expiry and retention."""

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import httpx
import pytest
from redis import Redis

from shared.jobstore import Holder, JobStore, Reservation
from shared.queue import make_celery, send_render
from shared.records import new_job_id, utc_now
from shared.schema import GenerationRequest, JobRecord, JobStatus
from shared.settings import CoreSettings
from tests.conftest import FAIL_PROMPT
from tests.support import Stack, read_sse, wait_for_job, wait_until

QUICK = {"width": 256, "height": 256, "num_inference_steps": 3}
# Long enough to be caught running: seconds of denoising on the tiny model.
LONG = {"width": 512, "height": 512, "num_inference_steps": 150}
TERMINAL = {"succeeded", "failed", "canceled", "expired"}


def submit(client: httpx.Client, prompt: str, **fields: object) -> dict:
    response = client.post("/v1/jobs", json={"prompt": prompt, **QUICK, **fields})
    assert response.status_code == 202, response.text
    return response.json()


def poll_until(client: httpx.Client, job_id: str, condition, timeout_s: float = 60) -> dict:
    job: dict = {}

    def check() -> bool:
        nonlocal job
        job = client.get(f"/v1/jobs/{job_id}").json()
        return condition(job)

    wait_until(check, timeout_s, f"job {job_id} to reach the expected state")
    return job


def running_with_progress(job: dict) -> bool:
    return job["status"] == "running" and job["progress"] is not None


def stream_order(event_id: str) -> tuple[int, int]:
    millis, _, sequence = event_id.partition("-")
    return int(millis), int(sequence or 0)


def parse_time(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def test_progress_rises_monotonically_to_total(serial_stack: Stack) -> None:
    with serial_stack.client() as client:
        job = submit(client, "a slow sunrise", num_inference_steps=40)
        events = read_sse(client, f"/v1/jobs/{job['id']}/events")
        final = client.get(f"/v1/jobs/{job['id']}").json()
    steps = [event.data["step"] for event in events if event.event == "progress"]
    assert len(steps) >= 2 and steps == sorted(steps) and len(set(steps)) == len(steps)
    assert steps[-1] == 40
    assert all(
        e.data["total"] == 40 and e.data["eta_s"] >= 0 for e in events if e.event == "progress"
    )
    assert final["status"] == "succeeded"
    assert final["progress"]["step"] == final["progress"]["total"] == 40


def test_queue_positions_count_down_behind_one_worker(serial_stack: Stack) -> None:
    with serial_stack.client() as client:
        for _ in range(2):  # measured throughput, for the ETAs below
            wait_for_job(client, submit(client, "warming the averages")["id"])
        blocker = submit(client, "a long render", **LONG)
        poll_until(client, blocker["id"], running_with_progress)
        queued = [submit(client, f"queued {n}", num_inference_steps=20) for n in range(3)]
        last = queued[-1]["id"]
        first_view = client.get(f"/v1/jobs/{last}").json()
        assert first_view["queue_position"] == 2
        assert first_view["eta_s"] is not None and first_view["eta_s"] > 0
        client.post(f"/v1/jobs/{blocker['id']}/cancel").raise_for_status()

        positions: list[int] = []
        job = first_view
        while job["status"] == "queued":
            positions.append(job["queue_position"])
            time.sleep(0.02)
            job = client.get(f"/v1/jobs/{last}").json()
        final = wait_for_job(client, last)
    assert positions[0] == 2
    assert positions == sorted(positions, reverse=True)
    assert len(set(positions)) >= 2, positions
    assert final["status"] == "succeeded" and final["queue_position"] is None


def test_sse_delivers_ordered_events_and_resumes_with_last_event_id(serial_stack: Stack) -> None:
    with serial_stack.client() as client:
        job = submit(client, "a resumable stream", num_inference_steps=30)
        head = read_sse(client, f"/v1/jobs/{job['id']}/events", stop_after=3)
        resumed_from = head[-1].id
        tail = read_sse(client, f"/v1/jobs/{job['id']}/events", last_event_id=resumed_from)
        replay = read_sse(client, f"/v1/jobs/{job['id']}/events")

    events = head + tail
    assert events[0].event == "queued"
    assert "running" in [e.event for e in events]
    ordered = [stream_order(e.id) for e in events if e.event != "position"]
    assert ordered == sorted(ordered) and len(set(ordered)) == len(ordered)
    assert all(stream_order(e.id) > stream_order(resumed_from) for e in tail)
    terminal = events[-1]
    assert terminal.event == "succeeded"
    assert terminal.data["id"] == job["id"] and terminal.data["images"][0]["url"]
    # A stream opened later replays the whole history and ends the same way.
    assert next(e.event for e in replay if e.event != "position") == "queued"
    assert replay[-1].event == "succeeded" and replay[-1].id == terminal.id


def test_cancel_a_queued_and_a_running_job_then_the_worker_goes_on(serial_stack: Stack) -> None:
    images_root = serial_stack.workdir / "data" / "images" / "images"
    with serial_stack.client() as client:
        running = submit(client, "a canceled render", **LONG)
        poll_until(client, running["id"], running_with_progress)
        queued = submit(client, "never rendered")
        assert client.get(f"/v1/jobs/{queued['id']}").json()["status"] == "queued"

        canceled_queued = client.post(f"/v1/jobs/{queued['id']}/cancel")
        canceled_running = client.post(f"/v1/jobs/{running['id']}/cancel")
        canceled_at = time.time()
        after = wait_for_job(client, submit(client, "the next job")["id"])
        stream = read_sse(client, f"/v1/jobs/{running['id']}/events")
        final_running = client.get(f"/v1/jobs/{running['id']}").json()
        final_queued = client.get(f"/v1/jobs/{queued['id']}").json()
        again = client.post(f"/v1/jobs/{running['id']}/cancel")

    assert canceled_queued.status_code == 200 and canceled_queued.json()["status"] == "canceled"
    assert canceled_running.status_code == 200
    remaining_s = canceled_running.json()["progress"]["eta_s"]
    assert final_running["status"] == final_queued["status"] == "canceled"
    assert final_running["images"] == [] and final_queued["started_at"] is None
    assert after["status"] == "succeeded"
    # The canceled render stopped: the next job finished before it would have.
    assert parse_time(after["finished_at"]) < canceled_at + remaining_s
    assert stream[-1].event == "canceled"
    assert not (images_root / running["id"]).exists()
    assert not (images_root / queued["id"]).exists()
    assert again.status_code == 409 and again.json()["error"]["type"] == "conflict"


def test_cancel_an_unknown_job_is_404(local_stack: Stack) -> None:
    with local_stack.client() as client:
        response = client.post("/v1/jobs/0123456789abcdef0123456789abcdef/cancel")
        events = client.get("/v1/jobs/0123456789abcdef0123456789abcdef/events")
    assert response.status_code == events.status_code == 404
    assert response.json()["error"]["type"] == "not_found"


def test_idempotent_posts_return_one_job(local_stack: Stack) -> None:
    redis = Redis.from_url(local_stack.env["T2I_REDIS_URL"])
    body = {"prompt": "an idempotent teapot", **QUICK}
    with local_stack.client() as client:
        first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "retry-1"})
        second = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "retry-1"})
        other_body = client.post(
            "/v1/jobs", json={**body, "seed": 3}, headers={"Idempotency-Key": "retry-1"}
        )
        bad_key = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "x" * 300})
    assert (first.status_code, second.status_code) == (202, 200)
    assert first.json()["id"] == second.json()["id"]
    assert second.json()["request"]["seed"] == first.json()["request"]["seed"]
    assert second.headers["idempotent-replayed"] == "true"
    assert other_body.status_code == 409 and other_body.json()["error"]["type"] == "conflict"
    assert bad_key.status_code == 422

    jobs_before = sum(1 for _ in redis.scan_iter("t2i:job:*[^s]"))
    burst = {"prompt": "twenty at once", **QUICK}

    def post(_: int) -> httpx.Response:
        with local_stack.client() as client:
            return client.post("/v1/jobs", json=burst, headers={"Idempotency-Key": "burst-20"})

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(post, range(20)))
    assert {r.json()["id"] for r in responses} == {responses[0].json()["id"]}
    assert sorted(r.status_code for r in responses) == [200] * 19 + [202]
    assert sum(1 for _ in redis.scan_iter("t2i:job:*[^s]")) == jobs_before + 1


def test_prefer_wait_returns_the_finished_job(local_stack: Stack) -> None:
    with local_stack.client() as client:
        response = client.post(
            "/v1/jobs",
            json={"prompt": "right away", **QUICK},
            headers={"Prefer": "wait=30"},
            # The server may hold the answer 30 s; on a loaded machine the job can take over 10.
            timeout=40,
        )
        short_wait = client.post(
            "/v1/jobs",
            json={"prompt": "too long to wait for", **LONG},
            headers={"Prefer": "wait=1"},
        )
        client.post(f"/v1/jobs/{short_wait.json()['id']}/cancel")
    assert response.status_code == 200
    assert response.headers["preference-applied"] == "wait=30"
    assert response.json()["status"] == "succeeded" and response.json()["images"]
    assert short_wait.status_code == 202
    assert short_wait.json()["status"] in {"queued", "running"}


def test_listing_is_newest_first_paginated_and_filtered(local_stack: Stack) -> None:
    with local_stack.client() as client:
        mine = [submit(client, f"listed {n}")["id"] for n in range(3)]
        failed = submit(client, FAIL_PROMPT)["id"]
        for job_id in [*mine, failed]:
            wait_for_job(client, job_id)
        top = client.get("/v1/jobs", params={"limit": 4}).json()
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
            page = client.get("/v1/jobs", params=params).json()
            assert len(page["data"]) <= 3
            seen += [job["id"] for job in page["data"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        failed_only = client.get("/v1/jobs", params={"status": "failed", "limit": 100}).json()
        bad = client.get("/v1/jobs", params={"status": "lost"})
    assert [job["id"] for job in top["data"]] == [failed, *reversed(mine)]
    created = [job["created_at"] for job in top["data"]]
    assert created == sorted(created, reverse=True)
    assert len(seen) == len(set(seen)) and {failed, *mine} <= set(seen)
    assert failed in {job["id"] for job in failed_only["data"]}
    assert {job["status"] for job in failed_only["data"]} == {"failed"}
    assert bad.status_code == 422


def test_a_job_not_started_in_time_expires(workerless_api: Stack) -> None:
    with workerless_api.client() as client:
        job = submit(client, "nobody renders this")
        expired = poll_until(client, job["id"], lambda j: j["status"] == "expired", 10)
        stream = read_sse(client, f"/v1/jobs/{job['id']}/events")
        cancel = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert expired["finished_at"] and expired["queue_position"] is None
    assert [event.event for event in stream][-1] == "expired"
    assert cancel.status_code == 409


def test_jobs_and_images_are_deleted_after_retention(short_retention_stack: Stack) -> None:
    images_root = short_retention_stack.workdir / "data" / "images" / "images"
    with short_retention_stack.client() as client:
        job = wait_for_job(client, submit(client, "a short-lived picture")["id"])
        assert job["status"] == "succeeded"
        url = job["images"][0]["url"]
        assert httpx.get(url).status_code == 200 and (images_root / job["id"]).is_dir()
        wait_until(
            lambda: client.get(f"/v1/jobs/{job['id']}").status_code == 404,
            15,
            "the job to pass its retention",
        )
        wait_until(lambda: not (images_root / job["id"]).exists(), 5, "the images to go")
        gone = client.get(f"/v1/jobs/{job['id']}")
        download = httpx.get(url)
    assert gone.json()["error"]["type"] == "not_found"
    assert download.status_code == 404


@pytest.mark.parametrize("prefer", ["wait=0", "respond-async", "wait=abc"])
def test_prefer_without_a_usable_wait_answers_at_once(local_stack: Stack, prefer: str) -> None:
    with local_stack.client() as client:
        response = client.post(
            "/v1/jobs", json={"prompt": "no waiting", **QUICK}, headers={"Prefer": prefer}
        )
    assert response.status_code == 202
    assert "preference-applied" not in response.headers


def test_a_lapsed_lease_is_requeued_and_finished_a_live_one_left_and_a_stale_message_dropped(
    serial_stack: Stack,
) -> None:
    redis = Redis.from_url(serial_stack.env["T2I_REDIS_URL"])
    store = JobStore(redis, retention_s=600)
    owner = serial_stack.api_key.split("_")[1]
    leases = {"render@killed.9": -1, "render@elsewhere.1": 600}
    jobs = {}
    for worker, lease_s in leases.items():
        record = JobRecord(
            id=new_job_id(),
            owner=owner,
            status=JobStatus.QUEUED,
            created_at=utc_now(),
            request=GenerationRequest(prompt=f"held by {worker}", seed=3, **QUICK),
        )
        store.create(record)
        assert store.reserve(record.id, 1, worker, lease_s) is Reservation.RESERVED
        assert store.admit(record.id, Holder(worker, 1), utc_now()).applied
        jobs[worker] = record.id
    dead, live = jobs["render@killed.9"], jobs["render@elsewhere.1"]
    # The dead worker's message, as the broker would restore it: for attempt 1, now stale.
    celery = make_celery(CoreSettings(redis_url=serial_stack.env["T2I_REDIS_URL"]))
    send_render(celery, "txt2img", dead, 1)

    with serial_stack.client() as client:
        rescued = wait_for_job(client, dead)
        untouched = client.get(f"/v1/jobs/{live}").json()
        client.post(f"/v1/jobs/{live}/cancel").raise_for_status()
    assert rescued["status"] == "succeeded" and rescued["attempt"] == 2
    [image] = rescued["images"]
    assert f"/{dead}/2/0.png" in image["url"]
    assert (untouched["status"], untouched["attempt"], untouched["images"]) == ("running", 1, [])
    assert serial_stack.worker is not None
    wait_until(
        lambda: (
            f"dropping the message of job {dead} attempt 1" in serial_stack.worker.log_tail(400)
        ),
        10,
        "the stale message to be dropped",
    )


def test_of_three_slow_jobs_one_runs_and_the_others_wait_queued_with_their_positions(
    local_stack: Stack,
) -> None:
    with local_stack.client() as client:
        # One step apart, so no two of them share a pipeline call.
        jobs = [
            submit(client, f"slow {n}", **{**LONG, "num_inference_steps": 150 - n})
            for n in range(3)
        ]
        ids = [job["id"] for job in jobs]

        def one_running_with_progress() -> bool:
            views = [client.get(f"/v1/jobs/{job_id}").json() for job_id in ids]
            return sum(running_with_progress(view) for view in views) == 1

        wait_until(one_running_with_progress, 60, "one of the jobs to render")
        views = [client.get(f"/v1/jobs/{job_id}").json() for job_id in ids]
        running = next(view for view in views if view["status"] == "running")
        waiting = [view for view in views if view is not running]
        for job_id in ids:
            client.post(f"/v1/jobs/{job_id}/cancel")

    assert running["progress"]["step"] >= 1 and running["started_at"]
    # Held by the worker or not, a job the GPU has not admitted is queued, in order.
    assert [view["status"] for view in waiting] == ["queued", "queued"]
    assert [view["queue_position"] for view in waiting] == [0, 1]
    assert all(view["started_at"] is None and view["progress"] is None for view in waiting)


def test_render_time_is_the_pipeline_call_and_the_wait_is_reported_as_queued(
    local_stack: Stack,
) -> None:
    with local_stack.client() as client:
        # Not batchable together: the worker holds the second while the first renders.
        first = submit(client, "renders first", num_inference_steps=40)
        second = submit(client, "waits for it", num_inference_steps=39)
        first, second = (wait_for_job(client, job["id"]) for job in (first, second))
    assert first["status"] == second["status"] == "succeeded"
    for job in (first, second):
        started, finished = parse_time(job["started_at"]), parse_time(job["finished_at"])
        timings = job["timings"]
        assert timings["queued_s"] == pytest.approx(
            started - parse_time(job["created_at"]), abs=0.01
        )
        assert timings["render_s"] + timings["upload_s"] <= finished - started + 0.01
    if parse_time(second["started_at"]) < parse_time(first["started_at"]):
        first, second = second, first  # the worker took them the other way round
    # The second was not running while the first rendered: its wait counts as queued.
    first_render_ended = parse_time(first["started_at"]) + first["timings"]["render_s"]
    assert parse_time(second["started_at"]) >= first_render_ended - 0.01
