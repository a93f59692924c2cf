"""Every client connection to Redis killed again and again while a worker consumes: the worker
reconnects and goes on, and every job the API accepted ends once."""

import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx

from shared.queue import WORKERS_KEY
from tests.chaos.conftest import (
    SMALL,
    Cluster,
    assert_all_succeeded,
    assert_stored_once,
    renders_of,
    succeeded_events,
)

CHAOS_S = 25
KILL_EVERY_S = 0.2
SUBMIT_EVERY_S = 0.5
# What the worker logs on its way out when its Celery consumer or its executor gave up.
EXIT_LINES = (
    "the Celery consumer stopped without being asked to",
    "this worker exits to be restarted",
)


def test_a_worker_whose_redis_connections_are_killed_every_fifth_of_a_second_goes_on(
    fresh: Cluster,
) -> None:
    worker = fresh.start_ready_worker()
    assert worker.popen is not None
    pid = worker.popen.pid
    name = fresh.worker_name(worker)
    stop = threading.Event()
    accepted: list[str] = []
    answers: Counter[int] = Counter()

    def submit_trickle() -> None:
        # One try a job: a job counts only once the API has answered 202.
        while not stop.is_set():
            steps = random.randint(2, 4)
            body = {**SMALL, "prompt": "under CLIENT KILL", "num_inference_steps": steps}
            try:
                with fresh.client(timeout_s=5) as client:
                    response = client.post("/v1/jobs", json=body)
            except httpx.HTTPError:
                answers[0] += 1
            else:
                answers[response.status_code] += 1
                if response.status_code == 202:
                    accepted.append(response.json()["id"])
                else:
                    assert response.status_code >= 500, response.text
            stop.wait(SUBMIT_EVERY_S)

    def kill_connections() -> int:
        killer = fresh.redis()
        killed = 0
        # The killer's own connection is spared (SKIPME yes): every other normal client goes,
        # the worker's broker and store connections and the API's alike.
        while not stop.wait(KILL_EVERY_S):
            killed += killer.client_kill_filter(_type="normal")
        return killed

    with ThreadPoolExecutor(2) as pool:
        submitting = pool.submit(submit_trickle)
        killing = pool.submit(kill_connections)
        started = time.monotonic()
        while time.monotonic() - started < CHAOS_S and worker.alive():
            time.sleep(0.5)
        stop.set()
        submitting.result()
        killed = killing.result()
    print(f"\n{killed} connections killed; answers {dict(answers)}; {len(accepted)} accepted")
    reconnects = worker.log_path.read_text(errors="replace").count("Connection to broker lost")
    print(f"the consumer reconnected {reconnects} times")

    assert worker.alive(), f"the worker exited ({worker.popen.returncode}):\n{worker.log_tail()}"
    assert killed > CHAOS_S / KILL_EVERY_S / 2
    assert len(accepted) >= 10
    records = fresh.wait_terminal(accepted, 120)
    assert_all_succeeded(records)
    assert len(set(accepted)) == len(accepted)
    assert_stored_once(fresh, records)
    for record in records:
        assert succeeded_events(fresh, record.id) == 1
        attempts = [line.split(" attempt ")[1].split()[0] for line in renders_of(fresh, record.id)]
        # An attempt renders once; a later attempt only because the one before never finished.
        assert len(attempts) == len(set(attempts)) and str(record.attempt) in attempts

    # The same process all along, never restarted, still in the live set.
    assert worker.alive() and worker.popen.pid == pid
    assert fresh.redis().zscore(WORKERS_KEY, name) is not None
    # Celery's line for each reconnect: the kills did reach the consumer, not only the store.
    assert reconnects >= 10
    log = worker.log_path.read_text(errors="replace")
    for line in EXIT_LINES:
        assert line not in log, worker.log_tail()
