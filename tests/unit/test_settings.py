"""Settings: typed from the environment, `.env` below it, every variable documented."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from eventpipe.settings import (
    MAX_BATCH_EVENTS,
    MAX_DATABASE_TIMEOUT_S,
    MAX_PARTITIONS,
    MAX_SECONDS,
    Settings,
    SettingsError,
    env_vars,
    environment,
    provided,
    render_env_example,
    render_markdown,
)

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


def test_a_fetch_wait_librdkafka_would_time_out_on_is_refused() -> None:
    assert Settings.from_env({"KAFKA_FETCH_WAIT_MAX_MS": "59000"}).kafka_fetch_wait_max_ms \
        == 59000
    for value in ("59001", "-1"):
        with pytest.raises(SettingsError, match=f"KAFKA_FETCH_WAIT_MAX_MS={value}"):
            Settings.from_env({"KAFKA_FETCH_WAIT_MAX_MS": value})


@pytest.mark.parametrize(("env", "value", "said"), [
    # A review's finding: Python's own words, "invalid literal for int() with base 10".
    ("BATCH_MAX_EVENTS", "1.5", "BATCH_MAX_EVENTS='1.5': not a whole number"),
    ("RETRY_BACKOFF_BASE_S", "soon", "RETRY_BACKOFF_BASE_S='soon': not a number"),
    ("TASK_TIME_LIMIT_S", "-1", "TASK_TIME_LIMIT_S=-1.0: must be a number, 0 or more"),
    ("TASK_TIME_LIMIT_S", "0", "TASK_TIME_LIMIT_S=0.0: must be greater than 0"),
    ("TASK_TIME_LIMIT_S", "nan", "TASK_TIME_LIMIT_S=nan: must be a number, 0 or more"),
    ("MAX_FUTURE_SKEW_S", "-3600", "MAX_FUTURE_SKEW_S=-3600.0: must be a number, 0 or more"),
    ("PARK_TIMEOUT_S", "inf", "PARK_TIMEOUT_S=inf: must be a number, 0 or more"),
    ("RETRY_BACKOFF_BASE_S", "-1", "RETRY_BACKOFF_BASE_S=-1.0: must be a number, 0 or more"),
    ("CRASH_MAX_ATTEMPTS", "-2", "CRASH_MAX_ATTEMPTS=-2: must be a number, 0 or more"),
    ("KAFKA_SESSION_TIMEOUT_MS", "0", "KAFKA_SESSION_TIMEOUT_MS=0: must be greater than 0"),
    # librdkafka's bound: said by the client only as the bridge starts, as Kafka's failure.
    ("KAFKA_SESSION_TIMEOUT_MS", "99999999",
     "KAFKA_SESSION_TIMEOUT_MS=99999999: must be between 1 and 3600000"),
    ("DLQ_MAX_BYTES", "0", "DLQ_MAX_BYTES=0: must be greater than 0"),
    ("WEB_PORT", "99999", "WEB_PORT=99999: must be a port, 0 to 65535"),
    ("DATABASE_URL", "mysql://u@h/db", "DATABASE_URL: 'mysql' is not a supported database"),
    ("REDIS_URL", "http://:secret@x", "REDIS_URL: 'http' is not a Redis URL's scheme"),
    ("CELERY_BROKER_URL", "foo://:secret@x", "CELERY_BROKER_URL: 'foo' is not a transport"),
    ("CELERY_BROKER_URL", "redis://a:6379/1;bar://b", "CELERY_BROKER_URL: 'bar' is not a"),
    # Each was a traceback where it was first used, or (a database that is no number)
    # database 0 without a word, which may be another program's.
    ("REDIS_URL", "redis://:secret@h:abc/0", "REDIS_URL: its port is not a number"),
    ("REDIS_URL", "redis://h:99999/0", "REDIS_URL: its port is not a number from 0 to 65535"),
    ("REDIS_URL", "redis://h:6379/abc", "REDIS_URL: its database, after the host, is not a"),
    ("CELERY_BROKER_URL", "redis://a:6379/1;redis://b:x/1", "CELERY_BROKER_URL: its port is"),
    ("CELERY_BROKER_URL", "amqp://u:p@h:5672x/vhost", "CELERY_BROKER_URL: its port is not"),
    ("DATABASE_URL", "postgresql+psycopg://u@h:abc/db", "DATABASE_URL: not a SQLAlchemy URL, "
                                                        "or its port is no number"),
    # A traceback at every command, `migrate` too.
    ("REDIS_URL", "redis://:p[ss@h:6379/1", "REDIS_URL: not a URL (URL-encode"),
    ("CELERY_BROKER_URL", "redis://:p]ss@h:6379/1", "CELERY_BROKER_URL: not a URL"),
    # A traceback at each command that reads the DLQ; a worker that hung.
    ("REDIS_URL", "redis://h:6379/0?socket_timeout=abc",
     "REDIS_URL: Invalid value for 'socket_timeout' in connection URL."),
    # Times that passed, then overflowed where they were used: a reconciler round failing at
    # every try (a parking deadline past the year 9999), every batch failing as its
    # processor was made, workers exiting at each start, every connection refused.
    ("PARK_TIMEOUT_S", "1e12", "PARK_TIMEOUT_S=1000000000000.0: at most 315360000 (ten "
                               "years)"),
    ("MAX_FUTURE_SKEW_S", "1e308", "MAX_FUTURE_SKEW_S=1e+308: at most 315360000"),
    ("RETRY_BACKOFF_MAX_S", "1e308", "RETRY_BACKOFF_MAX_S=1e+308: at most 315360000"),
    ("BATCH_MAX_WAIT_MS", "1" + "0" * 30, "BATCH_MAX_WAIT_MS=1000000000000000000000000000000: "
                                          "at most 315360000000 (ten years)"),
    ("DATABASE_STATEMENT_TIMEOUT_S", "3e6",
     "DATABASE_STATEMENT_TIMEOUT_S=3000000.0: at most 2147483 (the database's bound)"),
    ("DATABASE_LOCK_TIMEOUT_S", "1e12", "DATABASE_LOCK_TIMEOUT_S=1000000000000.0: at most"),
    # Refused by Kafka only once the bridge or a worker asked for the topic.
    ("KAFKA_TOPIC", "my events", "KAFKA_TOPIC='my events': Kafka names a topic with at most "
                                 "241 of a-z, A-Z, 0-9, '.', '_' and '-'"),
    ("KAFKA_TOPIC", "événements", "KAFKA_TOPIC='événements': Kafka names a topic"),
    ("KAFKA_TOPIC", "e" * 242, "KAFKA_TOPIC='eeee"),
    ("KAFKA_TOPIC", "..", "KAFKA_TOPIC='..': Kafka names a topic"),
    # A traceback: an integer past a double's range has no float to be checked as one.
    ("DLQ_MAX_ENTRIES", "1" + "0" * 400, "DLQ_MAX_ENTRIES=1000000000000000000000000000000000"),
    ("RETRY_MAX_ATTEMPTS", str(2**63), f"RETRY_MAX_ATTEMPTS={2**63}: at most "
                                       "9223372036854775807 (2**63 - 1)"),
    # The bridge's every read refused by the Kafka client.
    ("BATCH_MAX_EVENTS", "1000001", "BATCH_MAX_EVENTS=1000001: at most 1000000, the most the "
                                    "Kafka client hands over at once"),
])
def test_values_no_process_runs_with_are_refused(env: str, value: str, said: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({env: value})
    assert str(caught.value).startswith(said)


def test_the_longest_values_allowed_are_taken() -> None:
    longest = Settings.from_env({
        "PARK_TIMEOUT_S": str(MAX_SECONDS), "BATCH_MAX_WAIT_MS": str(MAX_SECONDS * 1000),
        "DATABASE_STATEMENT_TIMEOUT_S": str(MAX_DATABASE_TIMEOUT_S),
        "BATCH_MAX_EVENTS": str(MAX_BATCH_EVENTS), "KAFKA_TOPIC": "e." * 120 + "_"})
    assert len(longest.kafka_topic) == 241
    # Each as it is used: a parking deadline, the database's timeout in milliseconds.
    assert datetime.now(UTC) + timedelta(seconds=longest.park_timeout_s) < datetime.max.replace(
        tzinfo=UTC)
    assert longest.database_statement_timeout_s * 1000 < 2**31


@pytest.mark.parametrize("url", ["redis://h:6379/1", "rediss://h/1", "amqp://u:p@h/vhost",
                                 "pyamqp://h//", "sentinel://h:26379;sentinel://g:26379",
                                 "sqla+postgresql://u@h/db"])
def test_every_transport_celery_knows_is_a_broker(url: str) -> None:
    assert Settings.from_env({"CELERY_BROKER_URL": url}).celery_broker_url == url


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.kafka_topic = "other"  # type: ignore[misc]


def test_env_example_and_the_configuration_page_are_generated_from_the_settings() -> None:
    # Regenerate both with `make config-docs` when a setting changes.
    assert (ROOT / ".env.example").read_text() == render_env_example()
    assert (ROOT / "docs" / "configuration.md").read_text() == render_markdown()


def test_every_setting_is_documented_and_every_documented_setting_exists() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", page, flags=re.MULTILINE))
    assert documented == {env for env, _, _ in env_vars()}
    example = (ROOT / ".env.example").read_text()
    assert set(re.findall(r"^# ([A-Z0-9_]+)=", example, flags=re.MULTILINE)) == documented


def test_a_variable_counts_as_provided_when_it_is_given_a_value() -> None:
    # Even the default value: a Kafka of one's own at 127.0.0.1:9092 is not replaced by Tansu.
    assert provided({"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092", "PATH": "/bin"}) == {
        "KAFKA_BOOTSTRAP_SERVERS"}
    assert provided({"DATABASE_URL": "", "WEB_PORT": "8000"}) == {"WEB_PORT"}


@pytest.mark.parametrize("blank", ["", "  "])
def test_a_setting_given_no_value_keeps_its_default(blank: str) -> None:
    """Before: `WEB_HOST=` bound the API to every interface under gunicorn (`:8000`), and
    `KAFKA_BOOTSTRAP_SERVERS=` failed only once a client had timed out."""
    settings = Settings.from_env({"WEB_HOST": blank, "KAFKA_BOOTSTRAP_SERVERS": blank,
                                  "KAFKA_GROUP_ID": blank, "DLQ_STREAM": blank,
                                  "WEB_PORT": blank})
    defaults = Settings()
    assert (settings.web_host, settings.kafka_bootstrap_servers, settings.kafka_group_id,
            settings.dlq_stream, settings.web_port) == (
        defaults.web_host, defaults.kafka_bootstrap_servers, defaults.kafka_group_id,
        defaults.dlq_stream, defaults.web_port)


def test_a_misspelt_setting_in_the_env_file_is_named_not_ignored_in_silence(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `.env` holding `DATABSE_URL=…` was ignored, and `eventpipe up` started on the
    embedded SQLite instead, saying nothing."""
    dotenv = tmp_path / ".env"
    dotenv.write_text("DATABSE_URL=postgresql+psycopg://db/events\nPUBLISH_ADDRESS=0.0.0.0\n")
    assert environment(dotenv, {})["DATABSE_URL"] == "postgresql+psycopg://db/events"
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 1 and "DATABSE_URL" in said[0] and "did you mean DATABASE_URL?" in said[0]
    # The compose file's own variables, and anything unlike a setting, are not settings.
    dotenv.write_text("PUBLISH_ADDRESS=0.0.0.0\nKAFKA_CLUSTER_ID=x\nWEB_PUBLISHED_PORT=8080\n"
                      "HTTP_PROXY=http://proxy\n")
    assert environment(dotenv, {"PATH": "/bin"})["PUBLISH_ADDRESS"] == "0.0.0.0"
    assert capsys.readouterr().err == ""


def test_a_misspelt_setting_in_the_environment_is_named_not_ignored_in_silence(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A review's finding: `DATABSE_URL=… eventpipe migrate` migrated a new SQLite file
    instead, and `REDIS_URLL=… eventpipe dlq list` read the default Redis, without a word:
    only `.env` was looked at for names nearly a setting's."""
    environ = {"DATABSE_URL": "postgresql+psycopg://db/events", "PATH": "/bin",
               "HTTP_PROXY": "http://proxy", "PUBLISH_ADDRESS": "0.0.0.0",
               "DATABASE_USER": "another program's"}
    assert environment(tmp_path / ".env", environ)["DATABSE_URL"] == environ["DATABSE_URL"]
    said = capsys.readouterr().err.splitlines()
    assert said == ["eventpipe: DATABSE_URL in the environment is no setting, and is ignored: "
                    "did you mean DATABASE_URL?"]


@pytest.mark.parametrize(("env", "url"), [
    ("DATABASE_URL", "postgresql+psycopg://app:S3cretPw@db:54x2/app"),
    ("REDIS_URL", "redis://:s3cr#etPw@host:6379/0"),
    ("REDIS_URL", "redis://:qq/zzw0rd@host:6379/0"),
    ("CELERY_BROKER_URL", "amqp://u:s3cr?etPw@host:5672/vhost"),
])
def test_a_url_refused_is_not_repeated_nor_any_part_of_its_password(env: str, url: str) -> None:
    """Said on stderr, which goes to the logs: a password not URL-encoded moves part of
    itself into the port or the path."""
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({env: url})
    assert str(caught.value).startswith(f"{env}: ")
    assert not any(part in str(caught.value) for part in ("S3cret", "s3cr", "etPw", "qq", "zzw0rd"))


def test_an_env_file_that_is_not_utf8_is_a_bad_setting_not_a_traceback(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_bytes("DLQ_API_TOKEN=p\u00e4ss\n".encode("latin-1"))
    with pytest.raises(SettingsError, match=r"\.env: not UTF-8 text \(byte 15\)"):
        environment(dotenv, {})


@pytest.mark.parametrize(("text", "line"), [
    ("DATABASE_URL=postgresql+psycopg://db/events\nLOG_LEVEL=\"DEBUG\n", 2),
    ("# the pipeline\nKAFKA_TOPIC events\n", 2),
    ("LOG_LEVEL: DEBUG\n", 1),
    ("WEB_PORT=8080\n\nDLQ_API_TOKEN='s3cret\nREDIS_URL=redis://r\n", 3),
])
def test_an_env_file_line_that_is_not_name_value_is_a_bad_setting_not_dropped(
        tmp_path: Path, text: str, line: int) -> None:
    """Before: python-dotenv logged a warning and left the line out, so its setting kept its
    default (an unclosed quote sent `DLQ_API_TOKEN` and every line after it nowhere)."""
    dotenv = tmp_path / ".env"
    dotenv.write_text(text)
    with pytest.raises(SettingsError) as caught:
        environment(dotenv, {})
    said = str(caught.value)
    assert said.startswith(f"{dotenv}, line {line}: ") and "NAME=value" in said
    assert "s3cret" not in said and "\n" not in said  # one line, and no value repeated


def test_an_env_file_that_cannot_be_read_is_a_bad_setting_not_a_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `.env` of mode 600 owned by another user (the tests run as root, who reads it)."""
    dotenv = tmp_path / ".env"
    dotenv.write_text("WEB_PORT=8080\n")

    def refused(path: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "read_text", refused)
    with pytest.raises(SettingsError, match=r"\.env: cannot be read \(Permission denied\)$"):
        environment(dotenv, {})


def test_a_partition_count_of_a_typo_is_refused_not_tried() -> None:
    """A review's finding: KAFKA_PARTITIONS=99999999999 made `eventpipe status` a MemoryError
    (a row and a queue a partition), 5000000 a command still running after minutes."""
    assert Settings.from_env({"KAFKA_PARTITIONS": str(MAX_PARTITIONS)}).kafka_partitions \
        == MAX_PARTITIONS
    with pytest.raises(SettingsError, match=rf"^KAFKA_PARTITIONS=99999999999: at most "
                                            rf"{MAX_PARTITIONS}$"):
        Settings.from_env({"KAFKA_PARTITIONS": "99999999999"})


def test_the_largest_answer_readers_take_is_within_the_kafka_clients_bounds() -> None:
    """KAFKA_RECEIVE_MAX_BYTES (new): librdkafka refuses one under its fetches' size, or past
    2 GiB, only as a consumer is made."""
    assert Settings.from_env({}).kafka_receive_max_bytes == 256 * 1024 * 1024
    for bad in ("1000", "2147483648"):
        with pytest.raises(SettingsError, match=rf"^KAFKA_RECEIVE_MAX_BYTES={bad}: must be "):
            Settings.from_env({"KAFKA_RECEIVE_MAX_BYTES": bad})


def test_prepared_statements_are_on_or_off() -> None:
    assert Settings.from_env({}).database_prepared_statements == "on"
    assert Settings.from_env({"DATABASE_PREPARED_STATEMENTS": "off"}
                             ).database_prepared_statements == "off"
    with pytest.raises(SettingsError, match=r"^DATABASE_PREPARED_STATEMENTS='no': use one of "
                                            r"on, off$"):
        Settings.from_env({"DATABASE_PREPARED_STATEMENTS": "no"})


def test_a_blank_variable_is_not_provided() -> None:
    assert provided({"KAFKA_BOOTSTRAP_SERVERS": " ", "DATABASE_URL": "\t"}) == frozenset()


@pytest.mark.parametrize("url", ["postgresql+psycopg2://db/events",
                                 "postgresql+asyncpg://db/events",
                                 "mssql+pymssql://db/events"])
def test_a_database_url_whose_driver_is_not_installed_is_refused(url: str) -> None:
    with pytest.raises(SettingsError, match=r"DATABASE_URL: the driver .* cannot be loaded"):
        Settings.from_env({"DATABASE_URL": url})


@pytest.mark.parametrize("url", ["postgresql+psycopg://app@db:5432/",
                                 "postgresql+psycopg://app:S3cretPw@db:5432",
                                 "postgresql+psycopg://app:S3cretPw@db/?sslmode=require"])
def test_a_postgresql_url_that_names_no_database_is_refused(url: str) -> None:
    """libpq would use the database named after the login (the server's `postgres`), and
    `eventpipe migrate` make the tables there."""
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"DATABASE_URL": url})
    assert str(caught.value).startswith("DATABASE_URL names no database: name it after the "
                                        "host (postgresql+psycopg://user@host:5432/dbname)")
    assert "S3cret" not in str(caught.value)


@pytest.mark.parametrize("url", ["postgresql+psycopg://app@db:5432/events",
                                 "postgresql+psycopg://app@/?host=/run/pg&dbname=events",
                                 "postgresql+psycopg://?service=events"])
def test_a_postgresql_database_named_by_a_parameter_or_service_is_taken(url: str) -> None:
    assert Settings.from_env({"DATABASE_URL": url}).database_url == url
