import pytest
from pydantic import ValidationError

from shared.settings import CoreSettings, LogSettings, StorageSettings, WorkerSettings


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


@pytest.mark.parametrize(
    ("variable", "value", "settings_class"),
    [
        ("T2I_SIGNING_SECRET", "replace-me", StorageSettings),
        ("T2I_S3_SECRET_ACCESS_KEY", "replace-me", StorageSettings),
        ("T2I_REDIS_URL", "redis://:replace-me@redis:6379/0", CoreSettings),
    ],
)
def test_the_deployment_files_placeholders_are_refused_in_production(
    monkeypatch, variable: str, value: str, settings_class: type
) -> None:
    monkeypatch.setenv("T2I_SIGNING_SECRET", "a-real-secret")
    monkeypatch.setenv(variable, value)
    assert settings_class()  # development takes anything
    monkeypatch.setenv("T2I_ENV", "production")
    with pytest.raises(ValidationError, match=variable):
        settings_class()


def test_logs_are_text_unless_asked_for_json(monkeypatch) -> None:
    assert LogSettings().log_format == "text"
    monkeypatch.setenv("T2I_LOG_FORMAT", "json")
    assert LogSettings().log_format == "json"
    monkeypatch.setenv("T2I_LOG_FORMAT", "xml")
    with pytest.raises(ValidationError):
        LogSettings()
