"""The Python client and the `txt2img` CLI against a real API and worker (tiny model)."""

import asyncio
import contextlib
import hashlib
import io
import json
import os
import pty
import shlex
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from txt2img import (
    APIConnectionError,
    AsyncClient,
    Client,
    Conflict,
    JobFailed,
    JobOut,
    JobStatus,
    NotFound,
    Preview,
    Progress,
    Unauthorized,
    ValidationError,
    WaitTimeout,
)

from tests.conftest import FAIL_PROMPT
from tests.support import REPO_ROOT, Stack, free_port, service_env

SMALL = {"width": 256, "height": 256, "num_inference_steps": 4}
# Long enough that the job is still queued or running when the test acts on it.
LONG = {"width": 512, "height": 512, "num_inference_steps": 150}
CLI = [sys.executable, "-m", "txt2img.cli"]


@pytest.fixture
def client(local_stack: Stack) -> Iterator[Client]:
    with Client(local_stack.base_url, local_stack.api_key, timeout=10) as client:
        yield client


class NoStreamClient(Client):
    """A client whose event-stream URL is one the real API answers with 404."""

    events_path = "/v1/jobs/{job_id}/no-such-stream"


def image_size(path: Path) -> tuple[str, tuple[int, int]]:
    image = Image.open(io.BytesIO(path.read_bytes()))
    return image.format, image.size


def test_generate_and_download_a_png_of_the_requested_size(client: Client, tmp_path: Path) -> None:
    job = client.generate("a lighthouse at dusk", seed=7, **{**SMALL, "height": 320})
    assert job.status is JobStatus.SUCCEEDED
    [image] = job.images
    assert (image.width, image.height, image.seed) == (256, 320, 7)
    path = client.download(image, tmp_path / "lighthouse.png")
    assert image_size(path) == ("PNG", (256, 320))


def test_several_images_are_saved_with_index_suffixes(client: Client, tmp_path: Path) -> None:
    job = client.generate("two teapots", num_images=2, output_format="webp", **SMALL)
    paths = client.download_all(job, tmp_path / "teapot.webp")
    assert [path.name for path in paths] == ["teapot_0.webp", "teapot_1.webp"]
    assert all(image_size(path) == ("WEBP", (256, 256)) for path in paths)


def test_wait_follows_the_event_stream_with_rising_progress(client: Client) -> None:
    job = client.submit("a red kite", **{**SMALL, "num_inference_steps": 40})
    reported: list[Progress] = []
    final = client.wait(job.id, timeout_s=60, on_progress=reported.append)
    assert final.status is JobStatus.SUCCEEDED and final.images
    steps = [progress.step for progress in reported]
    assert len(steps) >= 2 and steps == sorted(set(steps)), steps
    assert steps[-1] == reported[-1].total == 40

    events = list(client.events(job.id))
    names = [event.event for event in events]
    assert names[0] == "queued" and "running" in names and names[-1] == "succeeded"
    assert events[-1].job is not None and events[-1].job.id == job.id
    progress = [event.progress for event in events if event.progress is not None]
    assert progress and progress[-1].step == 40


def test_generate_hands_each_newer_preview_to_on_preview(client: Client) -> None:
    seen: list[Preview] = []
    job = client.generate(
        "a red kite",
        **{**SMALL, "num_inference_steps": 40},
        preview={"every_n_steps": 4, "format": "jpeg", "max_size": 64},
        on_preview=seen.append,
    )
    assert job.status is JobStatus.SUCCEEDED and job.preview is None
    steps = [preview.step for preview in seen]
    assert steps and steps == sorted(set(steps)) and all(step % 4 == 0 for step in steps)
    for preview in seen:
        assert preview.content_type == "image/jpeg" and preview.total == 40
        assert Image.open(io.BytesIO(preview.data)).size == (preview.width, preview.height)


def test_events_resume_after_a_last_event_id(client: Client) -> None:
    job = client.generate("a harbour", **SMALL)
    events = list(client.events(job.id))
    resumed = list(client.events(job.id, last_event_id=events[0].id))
    assert [event.id for event in resumed] == [event.id for event in events[1:]]
    assert resumed[-1].event == "succeeded"


class DroppingProxy:
    """A TCP proxy to the API that cuts the first event-stream connection after `cut_after_s`."""

    def __init__(self, upstream_port: int, cut_after_s: float) -> None:
        self.upstream_port = upstream_port
        self.cut_after_s = cut_after_s
        self.heads: list[bytes] = []
        self.cuts = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self.server.close()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.server.accept()
                threading.Thread(target=self._pipe, args=(conn,), daemon=True).start()

    @staticmethod
    def _copy(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)

    def _pipe(self, conn: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        with conn, upstream:
            head = conn.recv(65536)
            self.heads.append(head)
            upstream.sendall(head)
            threading.Thread(target=self._copy, args=(conn, upstream), daemon=True).start()
            cut = b"/events " in head.split(b"\r\n")[0] and self.cuts == 0
            self.cuts += cut
            deadline = time.monotonic() + self.cut_after_s if cut else float("inf")
            upstream.settimeout(0.05)
            while time.monotonic() < deadline:
                try:
                    data = upstream.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                conn.sendall(data)
            # Unlike close(), shutdown() also wakes the thread blocked reading `conn`.
            for sock in (conn, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def test_events_reconnect_with_last_event_id_after_a_dropped_connection(
    local_stack: Stack, client: Client
) -> None:
    job = client.submit("a dropped stream", **{**SMALL, "num_inference_steps": 100})
    proxy = DroppingProxy(local_stack.api_port, cut_after_s=0.6)
    try:
        with Client(f"http://127.0.0.1:{proxy.port}", local_stack.api_key, timeout=10) as proxied:
            events = list(proxied.events(job.id))
    finally:
        proxy.close()
    heads = [head.lower() for head in proxy.heads]
    assert proxy.cuts == 1 and len(heads) >= 2
    assert b"last-event-id: " not in heads[0] and b"last-event-id: " in heads[1]
    ids = [event.id for event in events if event.event != "position"]
    assert ids == sorted(set(ids)) and events[-1].event == "succeeded"
    replayed = client.events(job.id)
    assert ids == [event.id for event in replayed if event.event != "position"]


def test_wait_falls_back_to_polling_when_the_stream_is_unusable(local_stack: Stack) -> None:
    with NoStreamClient(local_stack.base_url, local_stack.api_key, timeout=10) as client:
        with pytest.raises(NotFound):
            list(client.events("anything"))
        job = client.generate("a lantern", **SMALL)
        assert job.status is JobStatus.SUCCEEDED and job.images
        submitted = client.submit("a lantern again", **SMALL)
        assert client.wait(submitted.id, timeout_s=60).status is JobStatus.SUCCEEDED


def test_wait_without_sse_polls_to_the_end(client: Client) -> None:
    job = client.generate("a cloud", use_sse=False, **SMALL)
    assert job.status is JobStatus.SUCCEEDED


def test_wait_times_out_then_cancel_and_cancel_again_conflicts(client: Client) -> None:
    job = client.submit("a long render", **LONG)
    with pytest.raises(WaitTimeout):
        client.wait(job.id, timeout_s=0.3)
    canceled = client.cancel(job.id)
    assert canceled.status is JobStatus.CANCELED
    assert client.wait(job.id, timeout_s=30).status is JobStatus.CANCELED
    with pytest.raises(Conflict) as raised:
        client.cancel(job.id)
    assert raised.value.status_code == 409 and raised.value.type == "conflict"


def test_a_failed_job_in_generate_raises_job_failed(client: Client) -> None:
    with pytest.raises(JobFailed) as raised:
        client.generate(FAIL_PROMPT, **SMALL)
    assert raised.value.job.status is JobStatus.FAILED
    assert raised.value.job.error is not None and raised.value.type == "render_error"


def test_unknown_job_raises_not_found(client: Client) -> None:
    for call in (client.get, client.cancel, lambda job_id: list(client.events(job_id))):
        with pytest.raises(NotFound) as raised:
            call("no-such-job")
        assert raised.value.status_code == 404
        assert "no-such-job" in raised.value.message


def test_invalid_request_raises_validation_error_with_details(client: Client) -> None:
    with pytest.raises(ValidationError) as raised:
        client.submit("a cat", width=300)
    error = raised.value
    assert error.status_code == 422 and error.type == "validation_error"
    assert any(detail["loc"][-1] == "width" for detail in error.details)


def test_submit_with_idempotency_key_and_prefer_wait(client: Client) -> None:
    key = uuid.uuid4().hex
    first = client.submit("a bridge", idempotency_key=key, wait_s=30, **SMALL)
    assert first.status is JobStatus.SUCCEEDED
    again = client.submit("a bridge", idempotency_key=key, **SMALL)
    assert again.id == first.id
    with pytest.raises(Conflict):
        client.submit("another bridge", idempotency_key=key, **SMALL)


def test_list_pages_newest_first(client: Client) -> None:
    newer = [client.generate(f"list item {index}", **SMALL).id for index in range(2)]
    page = client.list(status="succeeded", limit=1)
    assert [job.id for job in page.data] == newer[-1:] and page.next_cursor
    following = client.list(status=JobStatus.SUCCEEDED, limit=1, cursor=page.next_cursor)
    assert [job.id for job in following.data] == newer[:1]


def test_a_wrong_key_raises_unauthorized(local_stack: Stack) -> None:
    with (
        Client(local_stack.base_url, "t2i_wrong.key", timeout=10) as client,
        pytest.raises(Unauthorized) as raised,
    ):
        client.get("anything")
    assert raised.value.status_code == 401


def test_unreachable_api_raises_connection_error() -> None:
    with (
        Client(f"http://127.0.0.1:{free_port()}", timeout=2) as client,
        pytest.raises(APIConnectionError),
    ):
        client.get("anything")


def test_async_client_end_to_end(local_stack: Stack, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with AsyncClient(local_stack.base_url, local_stack.api_key, timeout=10) as client:
            reported: list[Progress] = []
            job = await client.generate(
                "an async owl", on_progress=reported.append, **{**SMALL, "width": 320}
            )
            assert job.status is JobStatus.SUCCEEDED
            assert reported and reported[-1].step == reported[-1].total == 4
            [path] = await client.download_all(job, tmp_path / "owl.png")
            assert image_size(path) == ("PNG", (320, 256))
            names = [event.event async for event in client.events(job.id)]
            assert names[0] == "queued" and names[-1] == "succeeded"
            assert (await client.get(job.id)).id == job.id
            assert (await client.list(limit=1)).data
            with pytest.raises(NotFound):
                await client.get("no-such-job")
            with pytest.raises(ValidationError):
                await client.submit("an owl", num_inference_steps=0)
            long = await client.submit("a long async render", **LONG)
            assert (await client.cancel(long.id)).status is JobStatus.CANCELED
            with pytest.raises(Conflict):
                await client.cancel(long.id)

    asyncio.run(scenario())


def run_cli(stack: Stack, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args],
        env=service_env(T2I_API_URL=stack.base_url, T2I_API_KEY=stack.api_key),
        cwd=cwd or REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, error_type: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("txt2img: error:")
    assert error_type in result.stderr


def run_cli_on_a_terminal(stack: Stack, *args: str) -> tuple[int, str, str]:
    """The CLI with its stderr on a pseudo-terminal: exit status, stdout, what the terminal got."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [*CLI, *args],
        env=service_env(T2I_API_URL=stack.base_url, T2I_API_KEY=stack.api_key),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=terminal,
    )
    os.close(terminal)
    shown = b""
    with contextlib.suppress(OSError):  # EIO once the CLI has exited and closed the terminal
        while chunk := os.read(controller, 4096):
            shown += chunk
    os.close(controller)
    stdout, _ = process.communicate(timeout=120)
    return process.returncode, stdout.decode(), shown.decode()


def test_cli_generate_draws_a_progress_bar_on_a_terminal(
    local_stack: Stack, tmp_path: Path
) -> None:
    output = tmp_path / "cat.png"
    status, stdout, terminal = run_cli_on_a_terminal(
        local_stack, "generate", "a cat", "-o", str(output), "-W", "256", "-H", "256", "-s", "4"
    )
    assert status == 0, terminal
    assert image_size(output) == ("PNG", (256, 256))
    job_line, saved_line = stdout.splitlines()
    assert job_line.startswith("job ") and saved_line == f"saved {output}"
    assert "\r[" in terminal and "4/4" in terminal and "Traceback" not in terminal


def test_cli_generate_keeps_the_latest_preview_in_a_file_and_says_so(
    local_stack: Stack, tmp_path: Path
) -> None:
    output, preview = tmp_path / "cat.png", tmp_path / "now.webp"
    status, _, terminal = run_cli_on_a_terminal(
        local_stack,
        *("generate", "a cat", "-o", str(output), "-W", "256", "-H", "256", "-s", "40"),
        *("--preview", str(preview), "--preview-every", "4"),
    )
    assert status == 0, terminal
    assert image_size(preview)[0] == "WEBP" and image_size(output) == ("PNG", (256, 256))
    assert f"preview {preview} (step " in terminal
    job = run_cli(local_stack, "list", "--limit", "1").stdout.split()[0]
    request = json.loads(run_cli(local_stack, "status", job).stdout)["request"]
    assert request["preview"] == {"every_n_steps": 4, "format": "webp", "max_size": 256}


def test_cli_generate_into_a_log_file_writes_no_progress_bar(
    local_stack: Stack, tmp_path: Path
) -> None:
    output = tmp_path / "cat.png"
    result = run_cli(
        local_stack,
        "generate",
        "a cat",
        "-o",
        str(output),
        "-W",
        "256",
        "-H",
        "256",
        "-s",
        "4",
        "--seed",
        "3",
    )
    assert result.returncode == 0, result.stderr
    assert image_size(output) == ("PNG", (256, 256))
    assert result.stdout.splitlines()[1] == f"saved {output}"
    assert result.stderr == ""


def test_cli_generate_several_images_takes_the_format_from_the_suffix(
    local_stack: Stack, tmp_path: Path
) -> None:
    result = run_cli(
        local_stack,
        "generate",
        "two dogs",
        "-o",
        "dog.jpg",
        "-N",
        "2",
        "-q",
        "-W",
        "256",
        "-H",
        "256",
        "-s",
        "2",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert [image_size(tmp_path / name)[0] for name in ("dog_0.jpg", "dog_1.jpg")] == ["JPEG"] * 2


def test_cli_no_wait_prints_the_bare_id_for_wait_and_download(
    local_stack: Stack, tmp_path: Path
) -> None:
    txt2img = shlex.join(CLI)
    script = (
        f'J=$({txt2img} generate "a fox" -W 256 -H 256 -s 3 --no-wait) '
        f'&& {txt2img} wait "$J" && {txt2img} download "$J" -o fox.png && echo "id=$J"'
    )
    result = subprocess.run(
        ["bash", "-c", script],
        env=service_env(T2I_API_URL=local_stack.base_url, T2I_API_KEY=local_stack.api_key),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().splitlines()[-1].removeprefix("id=")
    assert f"job {job_id} succeeded" in result.stdout and "saved fox.png" in result.stdout
    assert image_size(tmp_path / "fox.png") == ("PNG", (256, 256))

    long_job = ("generate", "a fox", "-W", "1024", "-H", "1024", "-s", "150")
    printed = run_cli(local_stack, *long_job, "--no-wait", "--json")
    job = json.loads(printed.stdout)
    assert printed.returncode == 0 and job["status"] in ("queued", "running")
    early = run_cli(local_stack, "download", job["id"], cwd=tmp_path)
    assert early.returncode == 1 and f"txt2img wait {job['id']}" in early.stderr
    assert run_cli(local_stack, "cancel", job["id"]).returncode == 0


def test_cli_status_and_cancel(local_stack: Stack, client: Client) -> None:
    job = client.submit("a long cli render", **LONG)
    status = run_cli(local_stack, "status", job.id)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["id"] == job.id

    canceled = run_cli(local_stack, "cancel", job.id)
    assert canceled.returncode == 0, canceled.stderr
    assert canceled.stdout.strip() == f"job {job.id} canceled"
    assert_one_line_error(run_cli(local_stack, "cancel", job.id), "conflict")


def test_cli_errors_exit_non_zero_with_one_line(local_stack: Stack, tmp_path: Path) -> None:
    assert_one_line_error(run_cli(local_stack, "status", "no-such-job"), "not_found")
    assert_one_line_error(
        run_cli(local_stack, "generate", "a cat", "-W", "300", cwd=tmp_path), "validation_error"
    )
    failed = run_cli(local_stack, "generate", FAIL_PROMPT, "-s", "2", "-q", cwd=tmp_path)
    assert_one_line_error(failed, "render_error")
    assert list(tmp_path.iterdir()) == []
    wrong_key = run_cli(local_stack, "--api-key", "t2i_wrong.key", "status", "x")
    assert_one_line_error(wrong_key, "unauthorized")
    unreachable = run_cli(
        local_stack, "--api-url", f"http://127.0.0.1:{free_port()}", "status", "x"
    )
    assert_one_line_error(unreachable, "connection_error")


def _submitted_job(client: Client, result: subprocess.CompletedProcess) -> JobOut:
    """The job a `generate --no-wait` printed the id of, once it has ended."""
    assert result.returncode == 0, result.stderr
    return client.wait(result.stdout.strip(), timeout_s=180)


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_inpaints_from_an_init_image_and_a_mask_with_a_strength(
    local_stack: Stack, client: Client, tmp_path: Path
) -> None:
    photo, mask = REPO_ROOT / "examples" / "photo.png", REPO_ROOT / "examples" / "mask.png"
    result = run_cli(
        local_stack,
        "generate",
        "a harbour",
        "-W", "256", "-H", "256", "-s", "4",
        "--init-image", str(photo),
        "--mask", str(mask),
        "--strength", "0.7",
        "-o", str(tmp_path / "out.png"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.splitlines()[0].removeprefix("job ")
    job = client.get(job_id)
    assert job.status is JobStatus.SUCCEEDED
    assert job.request.init_image == _sha256(photo)
    assert job.request.mask_image == _sha256(mask)
    assert job.request.strength == 0.7
    assert image_size(tmp_path / "out.png") == ("PNG", (256, 256))


def test_cli_applies_a_lora_at_its_scale_and_follows_a_control_image(
    customization_stack: Stack, tmp_path: Path
) -> None:
    photo = REPO_ROOT / "examples" / "photo.png"
    small = ("-W", "256", "-H", "256", "-s", "4", "--no-wait")
    with Client(customization_stack.base_url, customization_stack.api_key, timeout=10) as client:
        lora = run_cli(
            customization_stack, "generate", "a cat", *small,
            "--lora", "tiny-style:0.8", "--lora", "tiny-other",
        )  # fmt: skip
        job = _submitted_job(client, lora)
        assert job.status is JobStatus.SUCCEEDED, job
        assert [(spec["name"], spec["scale"]) for spec in job.request.loras] == [
            ("tiny-style", 0.8),
            ("tiny-other", 1.0),
        ]
        control = run_cli(
            customization_stack, "generate", "a cat", *small, "--control", f"canny:{photo}"
        )
        job = _submitted_job(client, control)
        assert job.status is JobStatus.SUCCEEDED, job
        assert job.request.control is not None
        assert job.request.control["type"] == "canny"
        assert job.request.control["image"] == _sha256(photo)


@pytest.mark.parametrize(
    "options",
    [
        ("--lora", "tiny style"),
        ("--lora", "tiny-style:strong"),
        ("--lora", "tiny-style:0.5:1"),
        ("--control", "canny"),
        ("--init-image", "no-such-file.png"),
        ("--init-image", "examples/photo.png", "--strength", "1.5"),
        ("--mask", "examples/mask.png"),
        ("--init-image", "examples/photo.png", "--control", "canny:examples/photo.png"),
    ],
)
def test_cli_bad_image_options_are_one_argparse_error_line(
    local_stack: Stack, options: tuple[str, ...]
) -> None:
    result = run_cli(local_stack, "generate", "a cat", *options)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    [error] = [line for line in result.stderr.splitlines() if "error:" in line]
    assert error == result.stderr.splitlines()[-1]
    assert error.startswith("txt2img generate: error:"), error
