"""Object storage: one interface, a local directory backend and an S3 backend."""

import hashlib
import hmac
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, urlencode

import boto3
from botocore.config import Config

from shared.settings import StorageSettings


def job_prefix(prefix: str, job_id: str) -> str:
    """Everything of one job lies under this prefix; an S3 lifecycle rule on `prefix/` ages it."""
    return f"{prefix}/{job_id}"


def image_key(prefix: str, job_id: str, index: int, extension: str) -> str:
    """Deterministic, so a retried upload overwrites instead of duplicating."""
    return f"{job_prefix(prefix, job_id)}/{index}.{extension}"


class StorageError(Exception):
    """Storage refused or could not be reached."""


class ObjectStorage(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    def get(self, key: str) -> bytes:
        """The object's bytes; StorageError when it is missing or unreachable."""

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
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a reader never sees half a file.
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, path)

    def get(self, key: str) -> bytes:
        try:
            return self.path_for(key).read_bytes()
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
            raise StorageError(f"local storage {self.root} is not writable: {exc}") from exc


class S3Storage:
    """Any S3-compatible store (AWS S3, MinIO, R2); URLs are presigned on each read."""

    def __init__(self, settings: StorageSettings) -> None:
        self._bucket = settings.s3_bucket
        self._url_ttl_s = settings.url_ttl_s
        self._client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=settings.s3_secret_access_key,
            config=Config(
                signature_version="s3v4",
                connect_timeout=5,
                read_timeout=30,
                retries={"max_attempts": 3, "mode": "standard"},
            ),
        )

    def put(self, key: str, data: bytes, content_type: str) -> None:
        try:
            self._client.put_object(
                Bucket=self._bucket, Key=key, Body=data, ContentType=content_type
            )
        except Exception as exc:
            raise StorageError(f"upload of {key} failed: {exc}") from exc

    def get(self, key: str) -> bytes:
        try:
            return self._client.get_object(Bucket=self._bucket, Key=key)["Body"].read()
        except Exception as exc:
            raise StorageError(f"reading {key} failed: {exc}") from exc

    def download_url(self, key: str, base_url: str) -> str:
        return self._client.generate_presigned_url(
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
            raise StorageError(f"deleting {prefix}/ failed: {exc}") from exc
        return deleted

    def check(self) -> None:
        try:
            self._client.head_bucket(Bucket=self._bucket)
        except Exception as exc:
            raise StorageError(f"bucket {self._bucket} is not reachable: {exc}") from exc


def make_storage(settings: StorageSettings) -> LocalStorage | S3Storage:
    if settings.storage == "s3":
        return S3Storage(settings)
    return LocalStorage(settings.local_dir, settings.signing_secret, settings.url_ttl_s)
