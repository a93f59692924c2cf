"""Fair share of the worker pool between API keys, decided as late as possible.

Queued jobs wait in Redis, in one sorted set per (lane, key), interactive before batch and then
in arrival order. A lane is the broker queue the jobs go to (one per model where models have
their own queues). The broker holds only a short window of each lane: about one batch per live
worker of messages that no worker has started yet. Whenever a slot of that window frees (a job
starts, ends, is canceled or goes back to the queue) or a job arrives, the same Lua script that
made the change moves the next job, under the fair order, into the broker as a normal Celery
task message. So a burst of one key fixes the order of at most one window's jobs.

The fair order is stride scheduling: each active key has a pass, the key with the lowest pass
sends next and its pass grows by 1 / weight; a key that becomes active starts at the pass of the
last job sent, so it neither jumps ahead with credit saved while idle nor waits behind a burst.
A key whose dispatched and running jobs reach its `max_running` leaves the active set until one
of them ends.

Each lane also keeps the set of keys with jobs waiting or in flight in it, so what an autoscaler
reads (the jobs waiting and running per lane) costs a read per such key, not a scan.

The scripts are shared/lua/fragments/fair.lua, pasted into the job store's scripts
(shared/jobscripts.py), which know the job's state change they come with, and the positions and
backlog scripts beside them in shared/lua/.
"""

import base64
import json
from functools import lru_cache

from celery import Celery

from shared.apikeys import RECORD_PREFIX
from shared.keys import JOB_PREFIX
from shared.queue import WORKERS_KEY, render_message, worker_info_key

FAIR_PREFIX = "t2i:fair:"
LANES_KEY = FAIR_PREFIX + "lanes"
# Interactive jobs of a key go before its batch jobs; within a band, arrival order.
PRIORITY_BANDS = {"interactive": 0, "batch": 1}
BAND_SIZE = 10**13

_JOB_PLACEHOLDER = "@JOB@"
_ATTEMPT_SENTINEL = 987654321


def active_key(lane: str) -> str:
    return f"{FAIR_PREFIX}{lane}:active"


def ahead_key(lane: str) -> str:
    return f"{FAIR_PREFIX}{lane}:ahead"


def key_queue_key(lane: str, owner: str | None) -> str:
    return f"{FAIR_PREFIX}{lane}:q:{owner or '-'}"


def inflight_key(lane: str, owner: str | None) -> str:
    return f"{FAIR_PREFIX}{lane}:inflight:{owner or '-'}"


def lane_keys_key(lane: str) -> str:
    """The keys with jobs waiting or in flight in the lane."""
    return f"{FAIR_PREFIX}{lane}:keys"


@lru_cache
def _message_templates() -> tuple[str, str]:
    """(envelope, body) of a render message with placeholders: @JOB@, @ATTEMPT@, @TASK@, @TAG@,
    @QUEUE@ and, in the envelope, @BODY@ for the body in base64."""
    message = json.loads(
        render_message(
            Celery("txt2img"),
            "@QUEUE@",
            _JOB_PLACEHOLDER,
            _ATTEMPT_SENTINEL,
            task_id="@TASK@",
            delivery_tag="@TAG@",
            origin="txt2img-dispatch",
        )
    )
    body = base64.b64decode(message["body"]).decode()
    message["body"] = "@BODY@"
    sentinel = str(_ATTEMPT_SENTINEL)
    return json.dumps(message).replace(sentinel, "@ATTEMPT@"), body.replace(sentinel, "@ATTEMPT@")


def fair_constants(worker_max_age_s: float, dispatched_key: str) -> dict[str, str]:
    """The values the fair-share fragment (shared/lua/fragments/fair.lua) is loaded with;
    `dispatched_key` is the job store's set of jobs sent and not yet reserved."""
    envelope, body = _message_templates()
    return {
        "FAIR_PREFIX": FAIR_PREFIX,
        "APIKEY_PREFIX": RECORD_PREFIX,
        "JOB_PREFIX": JOB_PREFIX,
        "WORKERS_KEY": WORKERS_KEY,
        "WORKER_INFO_PREFIX": worker_info_key(""),
        "WORKER_MAX_AGE": repr(float(worker_max_age_s)),
        "DISPATCHED_KEY": dispatched_key,
        "MESSAGE_TEMPLATE": envelope,
        "BODY_TEMPLATE": body,
    }
