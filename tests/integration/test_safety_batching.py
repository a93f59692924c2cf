"""The safety checker combines the checks of jobs that finish together into one call, and each
job still gets the flags of its own images."""

import threading
from pathlib import Path

import pytest
import torch
from PIL.Image import Image

from shared.schema import GenerationRequest
from shared.settings import DEFAULT_MODEL_ID
from worker.kinds import load_renderer
from worker.models import model_source
from worker.render_types import RenderBatch
from worker.safety import SafetyChecker
from worker.tiny_model import FLAGGED_REQUEST


@pytest.fixture(scope="module")
def images(model_cache: Path) -> list[Image]:
    """The image the tiny checker flags, then three it does not."""
    renderer = load_renderer("tiny", model_cache, "cpu")
    requests = [{**FLAGGED_REQUEST, "seed": seed} for seed in (4242, 1, 2, 3)]
    return [
        renderer.render(RenderBatch.from_request(GenerationRequest(**request)))[0]
        for request in requests
    ]


@pytest.fixture
def checker(model_cache: Path) -> SafetyChecker:
    source = model_source("tiny", model_cache, DEFAULT_MODEL_ID)
    return SafetyChecker.load(source, None, model_cache, torch.device("cpu"), torch.float32)


def check_together(checker: SafetyChecker, jobs: list[list[Image]]) -> dict[int, object]:
    """Each job's flags (or what it raised), its check queued while a call is in progress."""
    results: dict[int, object] = {}

    def check(n: int, job: list[Image]) -> None:
        try:
            results[n] = checker.flagged(job)
        except Exception as exc:
            results[n] = exc

    with checker._lock:
        threads = [threading.Thread(target=check, args=item) for item in enumerate(jobs)]
        for thread in threads:
            thread.start()
        waited = threading.Event()
        while len(checker._queued) < len(jobs) and not waited.wait(0.01):
            pass
    for thread in threads:
        thread.join(60)
    return results


def test_jobs_checked_meanwhile_share_one_call_and_each_gets_its_own_flags(
    checker: SafetyChecker, images: list[Image]
) -> None:
    alone = [checker.flagged([image]) for image in images]
    assert alone == [[True], [False], [False], [False]]
    calls_before = checker.calls
    jobs = [[images[1], images[0]], [images[2]], [images[3], images[1], images[0]]]
    results = check_together(checker, jobs)
    assert results == {0: [False, True], 1: [False], 2: [False, False, True]}
    assert checker.calls - calls_before == 1


def test_a_failing_call_fails_every_check_it_combined(
    checker: SafetyChecker, images: list[Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(**_: object) -> None:
        raise RuntimeError("the checker broke")

    monkeypatch.setattr(checker._checker, "forward", broken)
    results = check_together(checker, [images[:1], images[1:3]])
    assert [str(results[n]) for n in (0, 1)] == ["the checker broke"] * 2
