"""Object storage: one interface, a local directory backend and an S3 backend."""

import hashlib
import hmac
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlencode

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from shared.settings import StorageSettings

log = logging.getLogger(__name__)


def job_prefix(prefix: str, job_id: str) -> str:
    """Everything of one job lies under this prefix; an S3 lifecycle rule on `prefix/` ages it."""
    return f"{prefix}/{job_id}"


def attempt_prefix(prefix: str, job_id: str, attempt: int) -> str:
    """One attempt's objects: a worker that lost the job deletes these, never another's."""
    return f"{job_prefix(prefix, job_id)}/{attempt}"


def image_key(prefix: str, job_id: str, attempt: int, index: int, extension: str) -> str:
    """Deterministic, so a retried upload overwrites instead of duplicating."""
    return f"{attempt_prefix(prefix, job_id, attempt)}/{index}.{extension}"


def input_key(prefix: str, job_id: str, name: str) -> str:
    """A job's input image (`init`, `mask`), stored by the API as PNG before the job is queued."""
    return f"{job_prefix(prefix, job_id)}/inputs/{name}.png"


class StorageError(Exception):
    """Storage refused or could not be reached. The message names no internal address: it may
    reach clients (a job's error, /ready); the cause, with the details, goes to the logs."""


_MISSING = "the image is no longer stored (deleted after its retention, or lost)"
_S3_MISSING_CODES = frozenset({"NoSuchKey", "404"})


class MissingObject(StorageError):
    """The store answers, and has no such object (deleted after its retention, or lost)."""


class ObjectStorage(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    def get(self, key: str) -> bytes:
        """The object's bytes; MissingObject when it is not there, StorageError when the store
        cannot be read."""

    def download_url(self, key: str, base_url: str) -> str: ...

    def exists(self, key: str) -> bool: ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with `prefix/`; how many there were."""

    def check(self) -> None:
        """Raise StorageError when the backend cannot take writes."""


class LocalStorage:
    """A directory on this machine; the API serves its files through HMAC-signed URLs."""

    def __init__(self, root: Path, signing_secret: str, url_ttl_s: int) -> None:
        self.root = root.resolve()
        self._secret = signing_secret.encode()
        self._url_ttl_s = url_ttl_s

    def path_for(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise StorageError(f"key escapes the storage root: {key!r}")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self.path_for(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename, so a reader never sees half a file.
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
                tmp.write(data)
            os.replace(tmp.name, path)
        except OSError as exc:
            log.warning("writing %s failed: %s", path, exc)
            raise StorageError(f"upload of {key} failed: local storage is not writable") from exc

    def get(self, key: str) -> bytes:
        try:
            return self.path_for(key).read_bytes()
        except FileNotFoundError as exc:
            raise MissingObject(_MISSING) from exc
        except OSError as exc:
            raise StorageError(f"reading {key} failed: {exc.strerror}") from exc

    def exists(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def delete_prefix(self, prefix: str) -> int:
        directory = self.path_for(prefix)
        if not directory.is_dir():
            return 0
        files = [path for path in directory.rglob("*") if path.is_file()]
        shutil.rmtree(directory, ignore_errors=True)
        return len(files)

    def signature(self, key: str, expires: int) -> str:
        message = f"{key}\n{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def download_url(self, key: str, base_url: str) -> str:
        expires = int(time.time()) + self._url_ttl_s
        query = urlencode({"expires": expires, "signature": self.signature(key, expires)})
        return f"{base_url.rstrip('/')}/v1/files/{quote(key)}?{query}"

    def verify(self, key: str, expires: int, signature: str) -> bool:
        if expires < time.time():
            return False
        return hmac.compare_digest(self.signature(key, expires).encode(), signature.encode())

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root):
                pass
        except OSError as exc:
            log.warning("local storage %s is not writable: %s", self.root, exc)
            raise StorageError("local storage is not writable") from exc


def _s3_failure(action: str, exc: Exception) -> StorageError:
    log.warning("S3 %s failed: %s", action, exc)
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "unknown")
        return StorageError(f"{action} failed: the object store answered {code}")
    return StorageError(f"{action} failed: the object store is unreachable ({type(exc).__name__})")


class S3Storage:
    """Any S3-compatible store (AWS S3, MinIO, R2); URLs are presigned on each read."""

    def __init__(self, settings: StorageSettings) -> None:
        self._bucket = settings.s3_bucket
        self._url_ttl_s = settings.url_ttl_s
        self._client = self._make_client(settings, settings.s3_endpoint_url, connect_s=3, read_s=15)
        # Readiness must answer within its own deadline, whatever the store does.
        self._probe_client = self._make_client(
            settings, settings.s3_endpoint_url, connect_s=1, read_s=1
        )
        # Signing a URL needs no connection: this client only signs, for where clients reach.
        self._signer = self._client
        if settings.s3_public_endpoint_url:
            self._signer = self._make_client(
                settings, settings.s3_public_endpoint_url, connect_s=3, read_s=15
            )

    @staticmethod
    def _make_client(
        settings: StorageSettings, endpoint_url: str | None, connect_s: float, read_s: float
    ) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=settings.s3_secret_access_key,
            config=Config(
                signature_version="s3v4",
                connect_timeout=connect_s,
                read_timeout=read_s,
                # Callers retry with their own backoff and deadline.
                retries={"max_attempts": 1, "mode": "standard"},
            ),
        )

    def put(self, key: str, data: bytes, content_type: str) -> None:
        try:
            self._client.put_object(
                Bucket=self._bucket, Key=key, Body=data, ContentType=content_type
            )
        except Exception as exc:
            raise _s3_failure(f"upload of {key}", exc) from exc

    def get(self, key: str) -> bytes:
        try:
            return self._client.get_object(Bucket=self._bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _S3_MISSING_CODES:
                raise MissingObject(_MISSING) from exc
            raise StorageError(f"reading {key} failed: {exc}") from exc
        except Exception as exc:
            raise StorageError(f"reading {key} failed: {exc}") from exc

    def download_url(self, key: str, base_url: str) -> str:
        return self._signer.generate_presigned_url(
            "get_object",
            Params={"Bucket": self._bucket, "Key": key},
            ExpiresIn=self._url_ttl_s,
        )

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self._bucket, Key=key)
        except self._client.exceptions.ClientError:
            return False
        return True

    def delete_prefix(self, prefix: str) -> int:
        deleted = 0
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self._bucket, Prefix=prefix.rstrip("/") + "/"
            )
            for page in pages:
                objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if objects:
                    self._client.delete_objects(
                        Bucket=self._bucket, Delete={"Objects": objects, "Quiet": True}
                    )
                    deleted += len(objects)
        except Exception as exc:
            raise _s3_failure(f"deleting {prefix}/", exc) from exc
        return deleted

    def check(self) -> None:
        try:
            self._probe_client.head_bucket(Bucket=self._bucket)
        except Exception as exc:
            raise _s3_failure(f"reaching bucket {self._bucket}", exc) from exc


def make_storage(settings: StorageSettings) -> LocalStorage | S3Storage:
    if settings.storage == "s3":
        return S3Storage(settings)
    return LocalStorage(settings.local_dir, settings.signing_secret, settings.url_ttl_s)
