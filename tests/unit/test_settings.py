import pytest
from pydantic import ValidationError

from shared.redisconn import broker_sentinel_options, broker_url, end_wait_args, wait_args
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


def test_sentinels_carry_the_urls_credentials_and_database_to_celery(monkeypatch) -> None:
    monkeypatch.setenv("T2I_REDIS_URL", "redis://:p%40ss@ignored:6379/3")
    monkeypatch.setenv("T2I_REDIS_SENTINELS", "s1:26379, s2:26380")
    monkeypatch.setenv("T2I_REDIS_SENTINEL_MASTER", "images")
    monkeypatch.setenv("T2I_REDIS_SENTINEL_PASSWORD", "watch")
    settings = CoreSettings()
    assert settings.sentinel_addresses == [("s1", 26379), ("s2", 26380)]
    assert broker_url(settings) == "sentinel://:p%40ss@s1:26379/3;sentinel://:p%40ss@s2:26380/3"
    options = broker_sentinel_options(settings)
    assert options["master_name"] == "images"
    assert options["sentinel_kwargs"]["password"] == "watch"


def test_without_sentinels_the_broker_is_the_redis_url_and_writes_wait_for_no_replica() -> None:
    settings = CoreSettings(redis_url="redis://127.0.0.1:6390/1")
    assert broker_url(settings) == "redis://127.0.0.1:6390/1"
    assert broker_sentinel_options(settings) == {}
    assert wait_args(settings) is None
    assert wait_args(CoreSettings(redis_replica_acks=1, redis_replica_ack_timeout_s=0.25)) == (
        1,
        250,
    )
    assert end_wait_args(settings) is None


def test_under_sentinel_a_jobs_end_waits_for_a_replica_unless_the_operator_says_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("T2I_REDIS_SENTINELS", "s1:26379")
    monkeypatch.setenv("T2I_REDIS_REPLICA_ACK_TIMEOUT_S", "0.5")
    settings = CoreSettings()
    assert end_wait_args(settings) == (1, 500)
    assert wait_args(settings) is None
    monkeypatch.setenv("T2I_REDIS_REPLICA_ACKS", "0")
    assert end_wait_args(CoreSettings()) is None
    monkeypatch.setenv("T2I_REDIS_REPLICA_ACKS", "2")
    assert end_wait_args(CoreSettings()) == wait_args(CoreSettings()) == (2, 500)


@pytest.mark.parametrize("sentinels", ["s1", "s1:port", ":26379", "s1:26379,s2"])
def test_a_sentinel_address_that_is_not_host_port_is_refused(sentinels: str) -> None:
    with pytest.raises(ValidationError, match="is not host:port"):
        CoreSettings(redis_sentinels=sentinels)
