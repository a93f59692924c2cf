import pytest
from pydantic import ValidationError

from shared.settings import StorageSettings, WorkerSettings


def test_placeholder_signing_secret_refused_in_production(monkeypatch) -> None:
    monkeypatch.setenv("T2I_ENV", "production")
    with pytest.raises(ValidationError, match="T2I_SIGNING_SECRET"):
        StorageSettings()
    monkeypatch.setenv("T2I_SIGNING_SECRET", "a-real-secret")
    assert StorageSettings().signing_secret == "a-real-secret"


def test_fault_injection_refused_in_production(monkeypatch) -> None:
    monkeypatch.setenv("T2I_ENV", "production")
    monkeypatch.setenv("T2I_DEBUG_FAIL_PROMPT", "boom")
    with pytest.raises(ValidationError, match="T2I_DEBUG_FAIL_PROMPT"):
        WorkerSettings()


def test_settings_come_from_t2i_variables(monkeypatch) -> None:
    monkeypatch.setenv("T2I_STORAGE", "s3")
    monkeypatch.setenv("T2I_S3_BUCKET", "pictures")
    settings = StorageSettings()
    assert (settings.storage, settings.s3_bucket) == ("s3", "pictures")
