import socket
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from shared.settings import StorageSettings
from shared.storage import (
    LocalStorage,
    S3Storage,
    StorageError,
    attempt_prefix,
    image_key,
    job_prefix,
)


def test_image_keys_are_deterministic_and_lie_under_their_attempt_and_job() -> None:
    key = image_key("images", "abc", 3, 2, "webp")
    assert key == "images/abc/3/2.webp"
    assert key.startswith(attempt_prefix("images", "abc", 3) + "/")
    assert key.startswith(job_prefix("images", "abc") + "/")
    assert not key.startswith(attempt_prefix("images", "abc", 1) + "/")


def test_local_put_and_signed_url_round_trip(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, "secret", url_ttl_s=60)
    storage.put("images/job/0.png", b"png-bytes", "image/png")
    assert (tmp_path / "images/job/0.png").read_bytes() == b"png-bytes"
    assert storage.exists("images/job/0.png")
    assert storage.get("images/job/0.png") == b"png-bytes"
    with pytest.raises(StorageError):
        storage.get("images/job/1.png")

    url = urlparse(storage.download_url("images/job/0.png", "http://api:8000/"))
    assert url.path == "/v1/files/images/job/0.png"
    query = {name: values[0] for name, values in parse_qs(url.query).items()}
    expires, signature = int(query["expires"]), query["signature"]
    assert time.time() < expires <= time.time() + 61
    assert storage.verify("images/job/0.png", expires, signature)
    assert not storage.verify("images/job/1.png", expires, signature)
    assert not storage.verify("images/job/0.png", expires + 1, signature)
    assert not LocalStorage(tmp_path, "other", 60).verify("images/job/0.png", expires, signature)


def test_expired_signatures_fail(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, "secret", url_ttl_s=60)
    past = int(time.time()) - 1
    assert not storage.verify("k.png", past, storage.signature("k.png", past))


@pytest.mark.parametrize("key", ["../outside.png", "images/../../x", "/etc/passwd", ""])
def test_keys_cannot_escape_the_root(tmp_path: Path, key: str) -> None:
    with pytest.raises(StorageError):
        LocalStorage(tmp_path / "root", "secret", 60).path_for(key)


def test_s3_urls_are_signed_for_the_public_endpoint_when_there_is_one() -> None:
    common = {
        "storage": "s3",
        "s3_bucket": "txt2img",
        "s3_endpoint_url": "http://minio:9000",
        "s3_access_key_id": "key",
        "s3_secret_access_key": "secret",
    }
    inside = S3Storage(StorageSettings(**common)).download_url("images/j/0.png", "")
    public = S3Storage(
        StorageSettings(**common, s3_public_endpoint_url="http://localhost:9000")
    ).download_url("images/j/0.png", "")
    assert inside.startswith("http://minio:9000/txt2img/images/j/0.png?")
    assert public.startswith("http://localhost:9000/txt2img/images/j/0.png?")
    assert "X-Amz-Signature=" in public


def test_storage_errors_name_no_internal_address(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    settings = StorageSettings(
        storage="s3",
        s3_endpoint_url=f"http://127.0.0.1:{closed_port}",
        s3_access_key_id="test",
        s3_secret_access_key="test",
        data_dir=tmp_path,
    )
    storage = S3Storage(settings)
    for attempt in (
        lambda: storage.put("images/job/1/0.png", b"png", "image/png"),
        storage.check,
        lambda: storage.delete_prefix("images/job"),
    ):
        with pytest.raises(StorageError) as failure:
            attempt()
        assert "127.0.0.1" not in str(failure.value) and str(closed_port) not in str(failure.value)
        assert "unreachable" in str(failure.value)
