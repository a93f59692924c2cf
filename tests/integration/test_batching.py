"""Dynamic batching: in the executor with the real tiny pipeline, and through HTTP."""

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.integration.test_jobs_http import download, pixels, render, submit
from tests.support import Stack, wait_for_job, wait_until
from worker.executor import (
    GpuExecutor,
    HandedBack,
    NotAdmitted,
    RenderCanceled,
    RenderJob,
    RenderOutcome,
)
from worker.kinds import load_renderer
from worker.pipeline import DiffusionRenderer, RenderBatch, RenderItem, StepCallback

STEPS = 4


@pytest.fixture(scope="module")
def renderer(model_cache: Path) -> DiffusionRenderer:
    return load_renderer("tiny", model_cache, "cpu")


class Recorder:
    """The real renderer, remembering the batch of each pipeline call."""

    def __init__(self, renderer: DiffusionRenderer) -> None:
        self.renderer = renderer
        self.calls: list[RenderBatch] = []

    def __call__(self, batch: RenderBatch, on_step: StepCallback | None) -> list:
        self.calls.append(batch)
        if any(item.prompt == "boom" for item in batch.items):
            raise RuntimeError("boom")
        return self.renderer.render(batch, on_step)


@pytest.fixture
def recorder(renderer: DiffusionRenderer) -> Recorder:
    return Recorder(renderer)


@pytest.fixture
def executor(recorder: Recorder) -> Iterator[GpuExecutor]:
    executor = GpuExecutor(recorder, max_batch_images=4, batch_wait_s=0.05)
    yield executor
    executor.shutdown()


def job(*items: RenderItem, size: int = 64, steps: int = STEPS, **shared: object) -> RenderBatch:
    options = {"guidance_scale": 7.5, "scheduler": "dpmpp_2m", **shared}
    return RenderBatch(items=items, width=size, height=size, num_inference_steps=steps, **options)


def item(seed: int, prompt: str = "a cat") -> RenderItem:
    return RenderItem(prompt, "", seed)


def hold_gpu(executor: GpuExecutor) -> threading.Event:
    """Keep the executor busy until the event is set, so jobs submitted meanwhile wait together."""
    release, busy = threading.Event(), threading.Event()

    def on_step(step: int, total: int) -> None:
        busy.set()
        release.wait(30)

    executor.submit(RenderJob(job(item(0, "gate"), size=32), on_step=on_step))
    assert busy.wait(30)
    return release


def array(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def outcomes(futures: list[Future[RenderOutcome]]) -> list[RenderOutcome]:
    return [future.result(timeout=60) for future in futures]


def test_jobs_batched_together_each_get_the_images_they_get_alone(
    executor: GpuExecutor, recorder: Recorder, renderer: DiffusionRenderer
) -> None:
    batches = [job(item(1)), job(item(2, "a dog"), item(3, "a dog")), job(item(4, "a fox"))]
    release = hold_gpu(executor)
    futures = [executor.submit(RenderJob(batch)) for batch in batches]
    release.set()
    results = outcomes(futures)

    assert len({result.batch_id for result in results}) == 1
    assert [result.batch_images for result in results] == [4, 4, 4]
    assert len(recorder.calls) == 2  # the gate, then one call for all three jobs
    for batch, result in zip(batches, results, strict=True):
        alone = renderer.render(batch)
        assert len(result.images) == len(alone) == len(batch.items)
        for together, single in zip(result.images, alone, strict=True):
            assert np.abs(array(together) - array(single)).max() <= 2


def test_incompatible_jobs_never_share_a_pipeline_call(
    executor: GpuExecutor, recorder: Recorder
) -> None:
    batches = [
        job(item(1)),
        job(item(2), size=72),
        job(item(3), steps=STEPS + 1),
        job(item(4), scheduler="euler"),
        job(item(5), guidance_scale=3.0),
        job(item(6)),
    ]
    release = hold_gpu(executor)
    futures = [executor.submit(RenderJob(batch)) for batch in batches]
    release.set()
    results = outcomes(futures)

    # The first and last are compatible and ride together; every other job rides alone.
    assert results[0].batch_id == results[-1].batch_id
    assert len({result.batch_id for result in results}) == 5
    assert sorted(len(call.items) for call in recorder.calls[1:]) == [1, 1, 1, 1, 2]


def test_a_batch_holds_at_most_max_batch_images(executor: GpuExecutor) -> None:
    release = hold_gpu(executor)
    futures = [executor.submit(RenderJob(job(item(seed), item(seed + 100)))) for seed in range(5)]
    release.set()
    results = outcomes(futures)
    assert [result.batch_images for result in results] == [4, 4, 4, 4, 2]
    assert len({result.batch_id for result in results}) == 3


@pytest.fixture
def patient_executor(recorder: Recorder) -> Iterator[GpuExecutor]:
    """No batch wait, and a long wait for announced jobs: a batch waits exactly while one is
    announced, whatever the machine's speed."""
    executor = GpuExecutor(recorder, max_batch_images=4, batch_wait_s=0.0, arrival_wait_s=60.0)
    yield executor
    executor.shutdown()


def test_a_batch_waits_for_the_jobs_announced_to_it(
    patient_executor: GpuExecutor, recorder: Recorder
) -> None:
    arrivals = [patient_executor.announce() for _ in range(3)]
    first = patient_executor.submit(RenderJob(job(item(1))), arrivals[0])
    # The others are still being prepared (a Redis round trip, an input image read) a while.
    time.sleep(0.3)
    later = [
        patient_executor.submit(RenderJob(job(item(seed))), arrival)
        for seed, arrival in zip((2, 3), arrivals[1:], strict=True)
    ]
    results = outcomes([first, *later])

    assert len({result.batch_id for result in results}) == 1
    assert [len(call.items) for call in recorder.calls] == [3]


def test_an_announced_job_given_up_on_holds_nobody_back(
    patient_executor: GpuExecutor, recorder: Recorder
) -> None:
    kept, dropped = patient_executor.announce(), patient_executor.announce()
    future = patient_executor.submit(RenderJob(job(item(1))), kept)
    time.sleep(0.3)
    assert not future.done()  # still waiting for the job on its way
    with dropped:  # its task found the job taken by another worker, say
        pass
    # Rendered once nothing more is on its way, long before the 60 s the batch could wait.
    assert future.result(timeout=30).batch_images == 1
    assert [len(call.items) for call in recorder.calls] == [1]


def test_a_lone_job_waits_for_nothing(patient_executor: GpuExecutor) -> None:
    # Unannounced, it renders at once: well within 30 s, where the batch could wait 60.
    assert patient_executor.submit(RenderJob(job(item(1)))).result(timeout=30).batch_images == 1


def test_each_job_in_a_batch_reports_every_step(executor: GpuExecutor) -> None:
    steps: dict[int, list[tuple[int, int]]] = {1: [], 2: []}
    release = hold_gpu(executor)
    futures = [
        executor.submit(RenderJob(job(item(seed)), on_step=lambda *s, k=seed: steps[k].append(s)))
        for seed in steps
    ]
    release.set()
    assert len({result.batch_id for result in outcomes(futures)}) == 1
    assert steps[1] == steps[2] == [(i, STEPS) for i in range(1, STEPS + 1)]


def test_canceling_one_job_of_a_running_batch_leaves_the_others_to_succeed(
    executor: GpuExecutor, renderer: DiffusionRenderer
) -> None:
    canceled = threading.Event()
    seen: list[int] = []

    def cancel_at_step_two(step: int, total: int) -> None:
        seen.append(step)
        if step == 2:
            canceled.set()

    keep = [job(item(1)), job(item(3))]
    release = hold_gpu(executor)
    first = executor.submit(RenderJob(keep[0]))
    doomed = executor.submit(
        RenderJob(job(item(2)), on_step=cancel_at_step_two, is_canceled=canceled.is_set)
    )
    last = executor.submit(RenderJob(keep[1]))
    release.set()

    with pytest.raises(RenderCanceled):
        doomed.result(timeout=60)
    assert seen == [1, 2]  # nothing reported after the step that saw the cancel
    for batch, result in zip(keep, outcomes([first, last]), strict=True):
        assert result.batch_images == 3
        [alone] = renderer.render(batch)
        assert np.abs(array(result.images[0]) - array(alone)).max() <= 2


def test_canceling_every_job_of_a_running_batch_stops_the_pipeline_call(
    executor: GpuExecutor,
) -> None:
    steps: list[int] = []
    canceled = threading.Event()

    def cancel_at_step_one(step: int, total: int) -> None:
        steps.append(step)
        canceled.set()

    release = hold_gpu(executor)
    futures = [
        executor.submit(RenderJob(job(item(seed)), cancel_at_step_one, canceled.is_set))
        for seed in (1, 2)
    ]
    release.set()
    for future in futures:
        with pytest.raises(RenderCanceled):
            future.result(timeout=60)
    assert steps == [1, 1]
    # The executor goes on with the next job.
    [after] = outcomes([executor.submit(RenderJob(job(item(3))))])
    assert after.batch_images == 1


def test_a_job_canceled_while_it_waits_is_dropped_before_rendering(
    executor: GpuExecutor, recorder: Recorder
) -> None:
    release = hold_gpu(executor)
    dropped = executor.submit(RenderJob(job(item(1, "never")), is_canceled=lambda: True))
    kept = executor.submit(RenderJob(job(item(2))))
    release.set()
    with pytest.raises(RenderCanceled):
        dropped.result(timeout=60)
    assert outcomes([kept])[0].batch_images == 1
    assert all(i.prompt != "never" for call in recorder.calls for i in call.items)


def test_a_render_that_raises_fails_every_job_of_its_batch(executor: GpuExecutor) -> None:
    release = hold_gpu(executor)
    futures = [executor.submit(RenderJob(job(item(1, prompt)))) for prompt in ("boom", "fine")]
    release.set()
    for future in futures:
        with pytest.raises(RuntimeError, match="boom"):
            future.result(timeout=60)


# Through HTTP: a worker that waits long enough for a burst of requests to gather.
BURST = {"width": 256, "height": 256, "num_inference_steps": 2}


def burst(client: httpx.Client, requests: list[dict]) -> list[dict]:
    ids = [submit(client, **{**BURST, **request})["id"] for request in requests]
    jobs = [wait_for_job(client, job_id) for job_id in ids]
    assert all(job["status"] == "succeeded" for job in jobs), jobs
    return jobs


def test_a_burst_of_compatible_jobs_is_served_in_fewer_pipeline_calls_than_jobs(
    batching_stack: Stack,
) -> None:
    with batching_stack.client() as client:
        jobs = burst(client, [{"prompt": f"pebble {seed}", "seed": seed} for seed in range(16)])
    calls: dict[str, list[dict]] = {}
    for finished in jobs:
        calls.setdefault(finished["batch"]["id"], []).append(finished)
    assert len(calls) < len(jobs)
    for members in calls.values():
        assert {m["batch"]["images"] for m in members} == {len(members)}
        assert len(members) <= 8


def test_jobs_batched_over_http_get_the_images_they_get_alone(batching_stack: Stack) -> None:
    requests = [
        {"prompt": "a red kite", "seed": 10},
        {"prompt": "a blue kite", "seed": 20, "num_images": 2},
        {"prompt": "a green kite", "negative_prompt": "blurry", "seed": 30},
    ]
    # Each job's watermark is its own: the pixels compared are the render's, unmarked.
    unmarked = batching_stack.create_key("no watermark", 100_000, watermark_exempt=True)
    with batching_stack.client(unmarked) as client:
        together = burst(client, requests)
        alone = [render(client, **BURST, **request) for request in requests]
    assert len({job["batch"]["id"] for job in together}) < len(together)
    for batched, single in zip(together, alone, strict=True):
        assert single["batch"]["images"] == len(single["images"])
        for a, b in zip(batched["images"], single["images"], strict=True):
            assert np.abs(pixels(download(a["url"])) - pixels(download(b["url"]))).max() <= 2


def test_incompatible_jobs_over_http_are_never_batched_together(batching_stack: Stack) -> None:
    variants = [{}, {"width": 320}, {"num_inference_steps": 3}, {"scheduler": "euler"}]
    variants += [{"guidance_scale": 5.0}, {}]
    with batching_stack.client() as client:
        jobs = burst(client, [{"prompt": "a kite", "seed": 1, **v} for v in variants])
    calls: dict[str, set[tuple]] = {}
    for finished in jobs:
        request = finished["request"]
        shared = tuple(
            request[name]
            for name in ("width", "height", "num_inference_steps", "guidance_scale", "scheduler")
        )
        calls.setdefault(finished["batch"]["id"], set()).add(shared)
    assert all(len(keys) == 1 for keys in calls.values())
    assert len(calls) >= 5


def test_a_round_of_the_loop_that_breaks_fails_its_jobs_and_the_executor_goes_on(
    renderer: DiffusionRenderer,
) -> None:
    def render_with_a_bug(batch: RenderBatch, on_step: StepCallback | None) -> Any:
        if batch.items[0].prompt == "broken":
            return None  # not a list of images: the loop cannot hand out results
        return renderer.render(batch, on_step)

    executor = GpuExecutor(render_with_a_bug)
    try:
        broken = executor.submit(RenderJob(job(item(1, "broken"))))
        with pytest.raises(TypeError):
            broken.result(timeout=60)
        [after] = outcomes([executor.submit(RenderJob(job(item(2))))])
        assert len(after.images) == 1 and executor.healthy()
    finally:
        executor.shutdown()


def test_admission_runs_on_its_own_thread_and_a_refused_job_gets_no_images(
    executor: GpuExecutor, recorder: Recorder
) -> None:
    threads: list[str] = []

    def admit() -> bool:
        threads.append(threading.current_thread().name)
        return True

    def refuse() -> bool:
        return False

    def explode() -> bool:
        raise RuntimeError("admission failed")

    release = hold_gpu(executor)
    refused = executor.submit(RenderJob(job(item(1, "refused")), on_admit=refuse))
    failed = executor.submit(RenderJob(job(item(2, "exploded")), on_admit=explode))
    admitted = executor.submit(RenderJob(job(item(3)), on_admit=admit))
    release.set()
    with pytest.raises(NotAdmitted):
        refused.result(timeout=60)
    with pytest.raises(RuntimeError, match="admission failed"):
        failed.result(timeout=60)
    [outcome] = outcomes([admitted])
    assert outcome.render_s > 0 and len(outcome.images) == 1
    assert threads == ["gpu-admission"]


def test_a_batch_renders_while_the_admission_of_one_of_its_jobs_waits(
    executor: GpuExecutor, recorder: Recorder
) -> None:
    # The admission stands for a Redis round trip that hangs (a paused server).
    redis_back = threading.Event()

    def admit_when_redis_is_back() -> bool:
        return redis_back.wait(60)

    try:
        release = hold_gpu(executor)
        admitted = executor.submit(RenderJob(job(item(1))))
        waiting = executor.submit(RenderJob(job(item(2)), on_admit=admit_when_redis_is_back))
        release.set()
        assert admitted.result(timeout=20).batch_images == 2
        assert not waiting.done()
        # The GPU goes on with other work meanwhile.
        [later] = outcomes([executor.submit(RenderJob(job(item(3), size=32)))])
        assert later.batch_images == 1 and not waiting.done()
    finally:
        redis_back.set()
    outcome = waiting.result(timeout=60)
    assert outcome.batch_id == admitted.result().batch_id and len(outcome.images) == 1
    assert len(recorder.calls) == 3


def test_batch_keys_are_computed_on_the_submitting_thread(renderer: DiffusionRenderer) -> None:
    threads: list[str] = []

    def key(batch: RenderBatch) -> tuple:
        threads.append(threading.current_thread().name)
        return renderer.batch_key(batch)

    executor = GpuExecutor(renderer.render, max_batch_images=4, key=key)
    try:
        release = hold_gpu(executor)
        futures = [executor.submit(RenderJob(job(item(seed)))) for seed in (1, 2)]
        release.set()
        outcomes(futures)
    finally:
        executor.shutdown()
    assert set(threads) == {threading.current_thread().name}


def test_a_stopping_executor_finishes_its_batch_and_hands_back_the_rest(
    executor: GpuExecutor, recorder: Recorder
) -> None:
    release = hold_gpu(executor)
    running = recorder.calls[-1]
    waiting = [executor.submit(RenderJob(job(item(seed, "never")))) for seed in (1, 2)]
    executor.stop_admitting()
    late = executor.submit(RenderJob(job(item(3, "never"))))
    release.set()
    for future in (*waiting, late):
        with pytest.raises(HandedBack):
            future.result(timeout=60)
    assert recorder.calls == [running]


def test_a_paused_executor_admits_nothing_until_resumed(executor: GpuExecutor) -> None:
    admitted = threading.Event()
    executor.pause()
    future = executor.submit(RenderJob(job(item(1)), on_admit=lambda: admitted.set() or True))
    assert not admitted.wait(0.5) and not future.done()
    assert executor.healthy()
    executor.resume()
    assert outcomes([future])[0].batch_images == 1 and admitted.is_set()


def test_a_render_that_hangs_makes_the_executor_unhealthy(renderer: DiffusionRenderer) -> None:
    unblock = threading.Event()

    def hanging_render(batch: RenderBatch, on_step: StepCallback | None) -> list:
        unblock.wait(30)
        return renderer.render(batch, on_step)

    executor = GpuExecutor(hanging_render, stall_s=0.3)
    try:
        assert executor.healthy()
        future = executor.submit(RenderJob(job(item(1))))
        wait_until(lambda: not executor.healthy(), 10, "the stall to be noticed")
        unblock.set()
        outcomes([future])
        assert executor.healthy()
    finally:
        unblock.set()
        executor.shutdown()
