"""`make run` as an operator runs it: one ready line; jobs through it; /metrics on the API (two
processes) and on each worker; /info; the docs with no internet; JSON log lines that carry the
job id; and a clean stop on SIGTERM or Ctrl-C to its process group."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.info import SCHEDULERS, SERVICE_VERSION
from tests.support import (
    REPO_ROOT,
    Process,
    WebhookReceiver,
    free_port,
    port_open,
    service_env,
    wait_for_job,
    wait_until,
)
from worker.pipeline import SpeedLevers

FAIL_PROMPT = "fail-on-purpose"
READY_LINE = "txt2img-service ready"
# make's own status line when what it ran ends on a signal: not a line of ours.
MAKE_STATUS = re.compile(r"^make(\[\d+\])?: \*\*\* ")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class MakeRun:
    """`make run` in a process group of its own, as a terminal would run it."""

    process: Process
    data_dir: Path
    api_port: int
    metrics_port: int
    webhook_metrics_port: int

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def worker(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def webhooks(self) -> str:
        return f"http://127.0.0.1:{self.webhook_metrics_port}"

    def stdout(self) -> str:
        return self.process.log_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.process.stderr_path.read_text(errors="replace")

    def client(self) -> httpx.Client:
        key = (self.data_dir / "dev-api-key").read_text().strip()
        return httpx.Client(
            base_url=self.api, timeout=10, headers={"Authorization": f"Bearer {key}"}
        )

    def wait_ready(self) -> None:
        def ready() -> bool:
            if not self.process.alive():
                raise RuntimeError(f"make run exited:\n{self.stdout()}\n{self.stderr()[-3000:]}")
            return READY_LINE in self.stdout()

        wait_until(ready, 180, "make run's ready line")

    def stop(self, sig: signal.Signals) -> None:
        assert self.process.popen is not None
        os.killpg(self.process.popen.pid, sig)
        self.process.popen.wait(90)


def start_make_run(workdir: Path, model_cache: Path, redis_url: str, **env: str) -> MakeRun:
    workdir.mkdir(parents=True, exist_ok=True)
    run = MakeRun(
        process=Process(
            "make-run",
            ["make", "--no-print-directory", "run"],
            {
                # A make that runs the tests passes its own flags down; this one starts afresh.
                **{k: v for k, v in service_env().items() if not k.startswith(("MAKE", "MFLAGS"))},
                "T2I_REDIS_URL": redis_url,
                "T2I_MODEL_ID": "tiny",
                "T2I_MODEL_CACHE_DIR": str(model_cache),
                "T2I_DATA_DIR": str(workdir / "data"),
                "T2I_HEARTBEAT_INTERVAL_S": "1",
                **env,
            },
            workdir / "make-run.log",
            own_group=True,
        ),
        data_dir=workdir / "data",
        api_port=int(env["T2I_PORT"]),
        metrics_port=int(env["T2I_METRICS_PORT"]),
        webhook_metrics_port=int(env["T2I_WEBHOOK_METRICS_PORT"]),
    )
    run.process.start()
    return run


def ports() -> dict[str, str]:
    return {
        "T2I_PORT": str(free_port()),
        "T2I_METRICS_PORT": str(free_port()),
        "T2I_WEBHOOK_METRICS_PORT": str(free_port()),
    }


@pytest.fixture(scope="module")
def running(workdir: Path, model_cache: Path, redis_port: int) -> Iterator[MakeRun]:
    """JSON logs, two API processes, a webhook worker allowed to call loopback."""
    run = start_make_run(
        workdir / "make-run-json",
        model_cache,
        f"redis://127.0.0.1:{redis_port}/8",
        T2I_LOG_FORMAT="json",
        T2I_API_PROCESSES="2",
        T2I_DEBUG_FAIL_PROMPT=FAIL_PROMPT,
        T2I_WEBHOOK_ALLOWLIST="127.0.0.1",
        **ports(),
    )
    run.wait_ready()
    yield run
    if run.process.alive():
        run.stop(signal.SIGTERM)


def scrape(url: str) -> Samples:
    """Every sample of a /metrics page, read with prometheus-client's own parser."""
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def submit(client: httpx.Client, prompt: str = "a lighthouse", **extra: object) -> str:
    body = {"prompt": prompt, "width": 256, "height": 256, "num_inference_steps": 2, **extra}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def test_make_run_says_ready_once_when_its_worker_has_loaded_the_model(running: MakeRun) -> None:
    ready_lines = [line for line in running.stdout().splitlines() if READY_LINE in line]
    assert ready_lines == [
        f"{READY_LINE}: API on {running.api} (docs at /docs, metrics at /metrics); worker metrics "
        f"on port(s) {running.metrics_port}; webhook worker on {running.webhook_metrics_port}; "
        "Ctrl-C stops it."
    ]
    # The API that answers is the one this make run started.
    assert httpx.get(f"{running.api}/health").json()["instance"].startswith("make-run-")
    assert httpx.get(f"{running.api}/ready").status_code == 200
    assert httpx.get(f"{running.worker}/ready").status_code == 200
    assert httpx.get(f"{running.webhooks}/ready").status_code == 200


@pytest.mark.parametrize("setting", ["T2I_PORT", "T2I_METRICS_PORT", "T2I_WEBHOOK_METRICS_PORT"])
def test_a_second_make_run_on_a_taken_port_exits_at_once_naming_it(
    running: MakeRun, workdir: Path, model_cache: Path, setting: str
) -> None:
    taken = {
        "T2I_PORT": running.api_port,
        "T2I_METRICS_PORT": running.metrics_port,
        "T2I_WEBHOOK_METRICS_PORT": running.webhook_metrics_port,
    }[setting]
    assert running.process.alive()
    second = start_make_run(
        workdir / f"make-run-second-{setting}",
        model_cache,
        running.process.env["T2I_REDIS_URL"],
        **{**ports(), setting: str(taken)},
    )
    assert second.process.popen is not None
    exit_code = second.process.popen.wait(10)
    assert exit_code != 0
    assert f"port {taken} on 127.0.0.1 is taken" in second.stderr()
    assert f"set {setting} to a free port" in second.stderr()
    assert READY_LINE not in second.stdout()
    # The first one never noticed.
    assert httpx.get(f"{running.api}/ready").status_code == 200


def test_a_job_moves_the_counters_of_the_api_and_of_each_worker(running: MakeRun) -> None:
    before = {url: scrape(url) for url in (running.api, running.worker, running.webhooks)}
    with running.client() as client, WebhookReceiver() as receiver:
        job_id = submit(client, webhook={"url": receiver.url})
        assert wait_for_job(client, job_id)["status"] == "succeeded"
        receiver.wait_for(1)
    deliveries = "txt2img_webhook_deliveries_total"
    delivered_before = value(before[running.webhooks], deliveries, outcome="delivered")
    wait_until(
        lambda: value(scrape(running.webhooks), deliveries, outcome="delivered") > delivered_before,
        20,
        "the delivery to be counted",
    )
    after = {url: scrape(url) for url in (running.api, running.worker, running.webhooks)}

    def grew(url: str, name: str, **labels: str) -> float:
        return value(after[url], name, **labels) - value(before[url], name, **labels)

    worker = running.worker
    assert grew(worker, "txt2img_jobs_finished_total", outcome="succeeded") == 1
    for phase in ("queued", "render", "upload"):
        assert grew(worker, f"txt2img_job_{phase}_seconds_count") == 1
    assert grew(worker, "txt2img_job_render_seconds_sum") > 0
    assert grew(worker, "txt2img_pipeline_calls_total") == 1
    assert grew(worker, "txt2img_pipeline_call_images_count") == 1
    assert grew(worker, "txt2img_pipeline_call_images_sum") == 1

    api = running.api
    assert grew(api, "txt2img_jobs_submitted_total") == 1
    requests = "txt2img_http_requests_total"
    assert grew(api, requests, method="POST", route="/v1/jobs", status="202") == 1
    assert grew(api, requests, method="GET", route="/v1/jobs/{job_id}", status="200") >= 1
    assert value(after[api], "txt2img_queue_depth") == 0
    assert value(after[api], "txt2img_workers_alive", model="tiny") == 1

    assert grew(running.webhooks, deliveries, outcome="delivered") == 1
    # Labels stay bounded: no job id ever becomes a label value.
    for url in after:
        assert job_id not in httpx.get(f"{url}/metrics").text


def test_every_api_process_reports_the_sum_of_all_of_them(running: MakeRun) -> None:
    def health_count(samples: Samples) -> float:
        return value(
            samples, "txt2img_http_requests_total", method="GET", route="/health", status="200"
        )

    before = health_count(scrape(running.api))
    requests = 40
    for _ in range(requests):
        # A new connection each time, so the kernel hands them to either process.
        assert httpx.get(f"{running.api}/health").status_code == 200
    seen = [health_count(scrape(running.api)) for _ in range(8)]
    assert seen == [before + requests] * 8
    started = re.findall(r"Started server process \[(\d+)\]", running.stderr())
    assert len(set(started)) == 2


def test_info_names_the_live_worker_its_model_levers_and_the_limits(running: MakeRun) -> None:
    info = httpx.get(f"{running.api}/info").raise_for_status().json()
    assert info["version"] == SERVICE_VERSION
    assert info["models"] == ["tiny"]
    assert info["schedulers"] == SCHEDULERS
    limits = info["limits"]
    # Any family's sizes; the model's own family narrows them.
    assert (limits["width"]["minimum"], limits["width"]["maximum"]) == (256, 2048)
    assert limits["width"]["multiple_of"] == 8
    [served] = info["served_models"]
    assert (served["id"], served["family"], served["default_width"]) == ("tiny", "sd15", 512)
    assert (served["width"]["minimum"], served["width"]["maximum"]) == (256, 1024)
    assert limits["num_inference_steps"]["maximum"] == 150
    (worker,) = info["workers"]
    assert (worker["model"], worker["device"], worker["max_batch_images"]) == ("tiny", "cpu", 8)
    assert worker["family"] == "sd15"
    # Every lever, each off: on a CPU none of them pays.
    assert worker["levers"] == dataclasses.asdict(SpeedLevers())
    assert not any(worker["levers"].values())
    assert 0 <= worker["last_seen_s"] < 5


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [url for name, url in attrs if name in ("src", "href") and url]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_render_from_assets_the_service_serves_itself(running: MakeRun, page: str) -> None:
    html = httpx.get(f"{running.api}{page}").raise_for_status().text
    assert not re.search(r"https?://", html), "the page refers to another host"
    parser = _Assets()
    parser.feed(html)
    assert any(url.endswith(".js") for url in parser.urls)
    # The scripts then load the OpenAPI document, from the service too.
    urls = [*parser.urls, "/openapi.json"]
    for url in urls:
        asset = httpx.get(urljoin(f"{running.api}{page}", url))
        assert asset.status_code == 200 and asset.content, url
    assert parser.urls


def test_health_probe_commands_answer_for_each_process(running: MakeRun) -> None:
    env = {
        **service_env(),
        "T2I_PORT": str(running.api_port),
        "T2I_METRICS_PORT": str(running.metrics_port),
        "T2I_WEBHOOK_METRICS_PORT": str(running.webhook_metrics_port),
    }

    def probe(target: str, **overrides: str) -> int:
        return subprocess.run(
            [sys.executable, "-m", "shared.probe", target],
            env={**env, **overrides},
            cwd=REPO_ROOT,
            capture_output=True,
            timeout=30,
        ).returncode

    assert [probe(target) for target in ("api", "worker", "webhooks")] == [0, 0, 0]
    assert probe("worker", T2I_METRICS_PORT=str(free_port())) == 1


def _log_entries(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if not MAKE_STATUS.match(line)]


def test_json_log_lines_carry_the_id_of_the_job_they_are_about(running: MakeRun) -> None:
    with running.client() as client:
        # Different steps, so the two never share the pipeline call the failure breaks.
        succeeded, failed = submit(client), submit(client, FAIL_PROMPT, num_inference_steps=3)
        assert wait_for_job(client, succeeded)["status"] == "succeeded"
        assert wait_for_job(client, failed)["status"] == "failed"

    def celery_logged_the_failure() -> bool:
        entries = _log_entries(running.stderr())
        return any(
            e["logger"] == "celery.app.trace" and failed in e["message"] + json.dumps(e)
            for e in entries
        )

    # Celery logs a failed task once the job is already failed for its clients.
    wait_until(celery_logged_the_failure, 20, "Celery's line about the failed task")
    entries = _log_entries(running.stderr())
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)
    for job_id in (succeeded, failed):
        about = [entry for entry in entries if job_id in json.dumps(entry)]
        assert about and all(entry.get("job_id") == job_id for entry in about), about
        loggers = {entry["logger"] for entry in about}
        assert {"api.routes.jobs", "worker.jobs"} <= loggers
    failure = [e for e in entries if e.get("job_id") == failed and e["level"] == "ERROR"]
    # Celery's own line about the failed task, traceback included, carries the id too.
    assert any(e["logger"] == "celery.app.trace" and "exception" in e for e in failure)


def test_sigterm_to_its_process_group_stops_everything_without_a_traceback(
    running: MakeRun,
) -> None:
    logged_before = len(_log_entries(running.stderr()))
    running.stop(signal.SIGTERM)
    output = running.stdout() + running.stderr()
    assert not any(line.startswith("Traceback") for line in output.splitlines())
    for port in (running.api_port, running.metrics_port, running.webhook_metrics_port):
        assert not port_open(port)
    while_stopping = _log_entries(running.stderr())[logged_before:]
    assert [e for e in while_stopping if e["level"] not in ("INFO", "DEBUG")] == []
    shutdowns = [e for e in while_stopping if "warm shutdown" in e["message"]]
    assert len(shutdowns) == 2  # the render worker and the webhook worker


def _processes_of(data_dir: Path) -> list[int]:
    """The live processes started with this T2I_DATA_DIR, whatever their process group."""
    marker = f"T2I_DATA_DIR={data_dir}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def test_ctrl_c_stops_the_workers_of_two_models_and_the_redis_make_run_started(
    tmp_path: Path, model_cache: Path
) -> None:
    """Text logs, the default; two workers of the default model and one of EXTRA_MODELS's tiny
    SDXL model on its own queue, each on its own metrics port; Redis started by make run itself
    and stopped last."""
    redis_port = free_port()
    run = start_make_run(
        tmp_path,
        model_cache,
        f"redis://127.0.0.1:{redis_port}/0",
        WORKERS="2",
        EXTRA_MODELS="tiny-xl",
        **ports(),
    )
    try:
        run.wait_ready()
        assert port_open(redis_port)
        first_log_line = run.stderr().splitlines()[0]
        assert " INFO " in first_log_line and not first_log_line.startswith("{")
        # The next free ports after the first worker's, past the webhook worker's.
        [found] = re.findall(r"worker metrics on port\(s\) (\d+) (\d+) (\d+);", run.stdout())
        worker_ports = [int(port) for port in found]
        assert worker_ports[0] == run.metrics_port and worker_ports == sorted(worker_ports)
        for port in worker_ports:
            assert httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200
        info = httpx.get(f"{run.api}/info").raise_for_status().json()
        families = {(worker["model"], worker["family"]) for worker in info["workers"]}
        assert families == {("tiny", "sd15"), ("tiny-xl", "sdxl")}
        with run.client() as client:
            models = client.get("/v1/models").raise_for_status().json()["data"]
            assert [(m["id"], m["default"], m["workers"]) for m in models] == [
                ("tiny", True, 2),
                ("tiny-xl", False, 1),
            ]
            job_id = submit(client, model="tiny-xl", width=512, height=512)
            job = wait_for_job(client, job_id)
        assert job["status"] == "succeeded", job
        assert job["request"]["model"] == "tiny-xl"
    finally:
        run.stop(signal.SIGINT)
    output = run.stdout() + run.stderr()
    assert "Traceback" not in output and " ERROR " not in output
    # Three render workers, the webhook worker.
    assert run.stderr().count("warm shutdown") == 4
    for port in (redis_port, run.api_port, *worker_ports, run.webhook_metrics_port):
        assert not port_open(port)
    assert _processes_of(run.data_dir) == []


def test_a_second_ctrl_c_while_it_starts_leaves_nothing_behind(
    tmp_path: Path, model_cache: Path
) -> None:
    redis_port = free_port()
    run = start_make_run(tmp_path, model_cache, f"redis://127.0.0.1:{redis_port}/0", **ports())
    # Everything started (each process listens before it is ready), nothing ready yet.
    every_port = (redis_port, run.api_port, run.metrics_port, run.webhook_metrics_port)
    try:
        wait_until(lambda: all(map(port_open, every_port)), 120, "every port of make run")
    finally:
        assert run.process.popen is not None
        os.killpg(run.process.popen.pid, signal.SIGINT)
        # The second while the first is stopping the services.
        time.sleep(0.3)
        os.killpg(run.process.popen.pid, signal.SIGINT)
        run.process.popen.wait(30)
    wait_until(lambda: _processes_of(run.data_dir) == [], 10, "every process make run started")
    for port in every_port:
        assert not port_open(port)
