"""Settings: typed from the environment, `.env` below it, every variable documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from eventpipe.settings import Settings, SettingsError, env_vars, provided

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_and_typed_overrides() -> None:
    settings = Settings.from_env({"KAFKA_PARTITIONS": "3", "RETRY_BACKOFF_BASE_S": "0.5",
                                  "DATABASE_URL": "sqlite:///x.db", "DLQ_API_TOKEN": ""})
    assert settings.kafka_partitions == 3 and settings.retry_backoff_base_s == 0.5
    assert settings.database_url == "sqlite:///x.db"
    assert settings.dlq_api_token == ""
    assert Settings.from_env({}).kafka_topic == "events"


def test_a_bad_value_names_its_variable() -> None:
    with pytest.raises(SettingsError, match="KAFKA_PARTITIONS='twelve'"):
        Settings.from_env({"KAFKA_PARTITIONS": "twelve"})


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.kafka_topic = "other"  # type: ignore[misc]


def test_env_example_documents_every_variable_with_its_default() -> None:
    documented = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            documented[name] = value
    assert documented == {env: str(default) for env, default, _ in env_vars()}


def test_only_values_other_than_the_defaults_count_as_provided() -> None:
    copied_example = Settings.from_env({env: str(default) for env, default, _ in env_vars()})
    assert provided(copied_example) == frozenset()
    chosen = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": "kafka:9092", "WEB_PORT": "8000"})
    assert provided(chosen) == {"KAFKA_BOOTSTRAP_SERVERS"}
