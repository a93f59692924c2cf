"""Batching rules and speed-lever defaults: pure logic."""

from dataclasses import replace

import pytest
import torch

from shared.settings import WorkerSettings
from worker.executor import RenderJob, batch_key, merge
from worker.pipeline import RenderBatch, RenderItem, SpeedLevers


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


def test_speed_levers_default_on_with_cuda_only() -> None:
    assert SpeedLevers.for_device(torch.device("cpu")) == SpeedLevers()
    on_gpu = SpeedLevers.for_device(torch.device("cuda"))
    assert on_gpu.compile and on_gpu.cuda_graphs and on_gpu.fuse_qkv and on_gpu.cudnn_benchmark
    assert on_gpu.compile_vae and not on_gpu.vae_channels_last
    assert not on_gpu.channels_last
    assert not SpeedLevers.for_device(torch.device("cuda"), compile=False).compile


def test_a_worker_reserves_the_batch_it_renders_and_one_more(monkeypatch) -> None:
    monkeypatch.setenv("T2I_MAX_BATCH_IMAGES", "4")
    assert WorkerSettings().task_threads == 8
    monkeypatch.setenv("T2I_CONCURRENCY", "3")
    assert WorkerSettings().task_threads == 3
