import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from shared.storage import LocalStorage, StorageError, image_key


def test_image_keys_are_deterministic() -> None:
    assert image_key("images", "abc", 2, "webp") == "images/abc/2.webp"


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
