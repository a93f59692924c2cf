"""Batching rules and speed-lever defaults: pure logic."""

from dataclasses import replace

import pytest
import torch

from shared.settings import WorkerSettings
from worker.executor import RenderJob, batch_key, merge
from worker.pipeline import RenderBatch, RenderItem, SpeedLevers, batch_buckets, padded_count


def _batch(*seeds: int, **shared: object) -> RenderBatch:
    options = {
        "width": 512,
        "height": 512,
        "num_inference_steps": 25,
        "guidance_scale": 7.5,
        "scheduler": "dpmpp_2m",
        **shared,
    }
    return RenderBatch(items=tuple(RenderItem("p", "", s) for s in seeds), **options)


@pytest.mark.parametrize(
    "change",
    [
        {"width": 768},
        {"height": 640},
        {"num_inference_steps": 30},
        {"guidance_scale": 5.0},
        {"scheduler": "euler"},
    ],
)
def test_jobs_differing_in_any_shared_setting_are_incompatible(change: dict) -> None:
    assert batch_key(_batch(1)) != batch_key(_batch(1, **change))


def test_prompts_and_seeds_do_not_matter_for_compatibility() -> None:
    other = replace(_batch(1), items=(RenderItem("q", "neg", 9),))
    assert batch_key(_batch(1)) == batch_key(other)


def test_merge_keeps_every_item_in_job_order() -> None:
    merged = merge([RenderJob(_batch(1, 2)), RenderJob(_batch(3))])
    assert [item.seed for item in merged.items] == [1, 2, 3]
    assert batch_key(merged) == batch_key(_batch(1))


def test_warmed_batch_sizes_are_powers_of_two_and_the_maximum() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(6) == [1, 2, 4, 6]


def test_a_batch_is_padded_to_the_smallest_warmed_size_that_holds_it() -> None:
    assert padded_count(3, [1, 2, 4, 8]) == 4
    assert padded_count(4, [1, 2, 4, 8]) == 4
    assert padded_count(9, [1, 2, 4, 8]) == 9
    assert padded_count(3, []) == 3


def test_speed_levers_default_on_with_cuda_only() -> None:
    assert SpeedLevers.for_device(torch.device("cpu")) == SpeedLevers()
    on_gpu = SpeedLevers.for_device(torch.device("cuda"))
    assert on_gpu.compile and on_gpu.cuda_graphs and on_gpu.fuse_qkv
    assert not on_gpu.channels_last
    assert not SpeedLevers.for_device(torch.device("cuda"), compile=False).compile


def test_a_worker_reserves_about_one_batch(monkeypatch) -> None:
    monkeypatch.setenv("T2I_MAX_BATCH_IMAGES", "4")
    assert WorkerSettings().task_threads == 4
    monkeypatch.setenv("T2I_CONCURRENCY", "3")
    assert WorkerSettings().task_threads == 3
