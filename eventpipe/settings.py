"""Configuration: one frozen object built once from the environment and an optional `.env`.

Nothing else in the project reads `os.environ`. Every field names its variable and its default
in one place (`_field`), so `.env.example` can be checked against this module by a test.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dotenv import dotenv_values
from dotenv.parser import parse_stream
from kombu.transport import TRANSPORT_ALIASES
from redis.connection import parse_url
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("auto", "json", "text")
SWITCH = ("on", "off")
DATABASES = ("postgresql", "mssql", "sqlite")  # SQLAlchemy's backend names
SUPPORTED_URLS = "postgresql+psycopg://, mssql+pyodbc:// or sqlite:///"
REDIS_SCHEMES = ("redis", "rediss", "unix")
MAX_PARTITIONS = 10_000
# The longest time a setting may name: ten years, "never" for any of them. Beyond it (and
# well before the float's bound) they overflow where they are used: a date past the year
# 9999, a timer's or a driver's bound, a retry's due time.
MAX_SECONDS = 10 * 365 * 24 * 3600
# PostgreSQL's and SQL Server's bound on a statement or lock timeout: 2**31 - 1 milliseconds.
MAX_DATABASE_TIMEOUT_MS = 2**31 - 1
MAX_DATABASE_TIMEOUT_S = MAX_DATABASE_TIMEOUT_MS // 1000
# The most any count or size may be: what Redis, the databases and the Kafka client count to.
MAX_COUNT = 2**63 - 1
# The most messages the Kafka client hands over at once (confluent-kafka's `consume`).
MAX_BATCH_EVENTS = 1_000_000
# Kafka's longest topic name, 249, less the worker pool's suffix (`tasks.pool.pool_topic`).
MAX_TOPIC_LENGTH = 249 - len(".workers")
_TOPIC = re.compile(f"[A-Za-z0-9._-]{{1,{MAX_TOPIC_LENGTH}}}")
# How redis-py reads a URL's options (`?socket_timeout=…`), typed here: redis-py's is not.
_redis_url_options: Callable[[str], dict[str, Any]] = parse_url


class SettingsError(ValueError):
    """A configuration variable holds a value that cannot be used."""


def _field(env: str, default: Any, doc: str) -> Any:
    return field(default=default, metadata={"env": env, "doc": doc})


@dataclass(frozen=True, slots=True)
class Settings:
    # Database
    database_url: str = _field(
        "DATABASE_URL", "sqlite:///var/eventpipe.db",
        "SQLAlchemy URL: mssql+pyodbc://… (SQL Server 2019 or later: event ids are compared "
        "as UTF-8 there), postgresql+psycopg://… or sqlite:///path",
    )
    database_pool_size: int = _field("DATABASE_POOL_SIZE", 5, "Connections kept per process")
    database_max_overflow: int = _field(
        "DATABASE_MAX_OVERFLOW", 10, "Extra connections allowed under burst"
    )
    database_pool_timeout_s: float = _field(
        "DATABASE_POOL_TIMEOUT_S", 10.0, "Seconds to wait for a pooled connection"
    )
    database_statement_timeout_s: float = _field(
        "DATABASE_STATEMENT_TIMEOUT_S", 60.0,
        "A statement running longer is cancelled and its work retried (0: no limit)",
    )
    database_lock_timeout_s: float = _field(
        "DATABASE_LOCK_TIMEOUT_S", 20.0,
        "Longest wait for a row or table lock before the work is retried (0: no limit)",
    )
    database_prepared_statements: str = _field(
        "DATABASE_PREPARED_STATEMENTS", "on",
        "PostgreSQL: the batches' writes as prepared statements, planned once per connection "
        "(on, off). Behind a pooler in transaction mode that does not keep them (PgBouncer "
        "before 1.22, or without max_prepared_statements) each connection retries one batch, "
        "then prepares nothing: off spares that",
    )
    # Kafka
    kafka_bootstrap_servers: str = _field(
        "KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092", "Kafka brokers, comma-separated"
    )
    kafka_topic: str = _field("KAFKA_TOPIC", "events", "Topic the events are published to")
    kafka_partitions: int = _field(
        "KAFKA_PARTITIONS", 12, "Partitions of the topic (one Celery queue per partition); a "
        "bridge given a partition beyond them stops. Fewer queues per worker process, less "
        "latency at light traffic (docs/performance.md)"
    )
    kafka_group_id: str = _field("KAFKA_GROUP_ID", "eventpipe-bridge", "Bridge consumer group")
    kafka_session_timeout_ms: int = _field(
        "KAFKA_SESSION_TIMEOUT_MS", 6000, "Consumer group session timeout, of the bridges' "
        "group and of the worker pool's: how long a silent member keeps its partitions"
    )
    kafka_fetch_wait_max_ms: int = _field(
        "KAFKA_FETCH_WAIT_MAX_MS", 25, "Longest the bridge's fetch waits at the broker for new "
        "messages. Apache Kafka answers as soon as one arrives, so this only spaces the fetches "
        "of an idle topic; a broker that holds every fetch this long (Tansu, the embedded one) "
        "adds up to it to each event's latency, and a lower value costs it more requests and CPU"
    )
    kafka_receive_max_bytes: int = _field(
        "KAFKA_RECEIVE_MAX_BYTES", 268_435_456, "Largest answer of Kafka's a reader takes: a "
        "message larger, or a compressed record batch that decompresses to more, is not read "
        "(60000000 to 2147483647). At least the topic's max.message.bytes; zstd batches of highly "
        "repetitive events may decompress to 100 times their size"
    )
    max_future_skew_s: float = _field(
        "MAX_FUTURE_SKEW_S", 300.0,
        "An occurredAt later than its message's Kafka timestamp by more than this is invalid",
    )
    # Redis: the DLQ and the offset ledger live here, apart from the Celery broker, so that
    # losing the broker's queued messages never loses what is needed to recover them.
    redis_url: str = _field("REDIS_URL", "redis://127.0.0.1:6379/0", "DLQ and offset ledger")
    celery_broker_url: str = _field(
        "CELERY_BROKER_URL", "redis://127.0.0.1:6379/1", "Celery broker (per-partition queues)"
    )
    # Bridge
    batch_max_events: int = _field("BATCH_MAX_EVENTS", 500, "Events of one partition per task")
    batch_max_bytes: int = _field(
        "BATCH_MAX_BYTES", 4 * 1024 * 1024,
        "Message bytes of one partition per task (a larger message travels alone)",
    )
    batch_max_wait_ms: int = _field(
        "BATCH_MAX_WAIT_MS", 0,
        "How long a batch waits for more messages; 0 sends what each poll of Kafka returned "
        "at once. While the partition's last task still waits in its queue, it waits for that",
    )
    max_in_flight_per_partition: int = _field(
        "MAX_IN_FLIGHT_PER_PARTITION", 5000,
        "Events handed on but not yet done before a partition is paused",
    )
    redelivery_timeout_s: float = _field(
        "REDELIVERY_TIMEOUT_S", 60.0,
        "A partition's oldest unfinished event with no sign of life for this long is re-read",
    )
    commit_interval_s: float = _field(
        "COMMIT_INTERVAL_S", 1.0, "How often done offsets are looked up and committed"
    )
    shutdown_drain_timeout_s: float = _field(
        "SHUTDOWN_DRAIN_TIMEOUT_S", 20.0,
        "On SIGTERM or revoke, how long to wait for work; a worker's batch still running then "
        "is ended and retried",
    )
    # Retries
    retry_max_attempts: int = _field(
        "RETRY_MAX_ATTEMPTS", 5,
        "Attempts for an event that fails alone with an unforeseen error before it is "
        "dead-lettered (failures of the world are retried without limit)"
    )
    crash_max_attempts: int = _field(
        "CRASH_MAX_ATTEMPTS", 3,
        "Times one message may kill its worker process before it is dead-lettered",
    )
    park_timeout_s: float = _field(
        "PARK_TIMEOUT_S", 3600.0,
        "How long an event waits for its parent before it also shows in the DLQ "
        "(it still applies by itself if the parent arrives later)",
    )
    task_time_limit_s: float = _field(
        "TASK_TIME_LIMIT_S", 300.0,
        "A batch still running after this long is stopped: retried later if it was waiting "
        "on the database, else its messages are isolated",
    )
    retry_backoff_base_s: float = _field(
        "RETRY_BACKOFF_BASE_S", 1.0, "First retry delay; doubles each attempt, with jitter"
    )
    retry_backoff_max_s: float = _field("RETRY_BACKOFF_MAX_S", 60.0, "Longest retry delay")
    # Dead-letter queue
    dlq_stream: str = _field("DLQ_STREAM", "eventpipe:dlq", "Redis Stream holding the DLQ")
    dlq_max_entries: int = _field(
        "DLQ_MAX_ENTRIES", 100_000,
        "DLQ bound in entries: when full, new dead letters wait in SQL, loudly",
    )
    dlq_max_bytes: int = _field(
        "DLQ_MAX_BYTES", 256 * 1024 * 1024,
        "DLQ bound in bytes of its Redis stream: when full, new dead letters wait in SQL",
    )
    dlq_api_token: str = _field(
        "DLQ_API_TOKEN", "", "Bearer token for the DLQ endpoints; empty disables them"
    )
    # Processes
    log_level: str = _field("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR")
    log_format: str = _field(
        "LOG_FORMAT", "auto", "json (one JSON object per line), text (for people), or auto: "
        "text on a terminal, JSON lines into files, pipes and log collectors"
    )
    web_host: str = _field("WEB_HOST", "127.0.0.1", "Address the API listens on")
    web_port: int = _field("WEB_PORT", 8000, "Port the API listens on")
    web_workers: int = _field(
        "WEB_WORKERS", 0, "gunicorn worker processes for the API; 0: two per core, plus one "
        "(`eventpipe up`: as many as its worker processes)"
    )
    flower_port: int = _field("FLOWER_PORT", 5555, "Flower's port under `eventpipe up`")
    metrics_host: str = _field(
        "METRICS_HOST", "127.0.0.1", "Address the bridge's and the worker hosts' /metrics "
        "listen on, as WEB_HOST for the API (0.0.0.0: every interface, for a Prometheus on "
        "another host)"
    )
    bridge_metrics_port: int = _field("BRIDGE_METRICS_PORT", 9101, "Bridge /metrics port")
    worker_metrics_port: int = _field("WORKER_METRICS_PORT", 9102, "Worker host /metrics port")

    def __post_init__(self) -> None:
        """Refuse values no process could run with, naming the variable."""
        if self.log_level.upper() not in LOG_LEVELS:
            raise SettingsError(f"LOG_LEVEL={self.log_level!r}: use one of "
                                f"{', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            raise SettingsError(f"LOG_FORMAT={self.log_format!r}: use one of "
                                f"{', '.join(LOG_FORMATS)}")
        prepared = self.database_prepared_statements
        if prepared not in SWITCH:
            raise SettingsError(f"DATABASE_PREPARED_STATEMENTS={prepared!r}: use one of "
                                f"{', '.join(SWITCH)}")
        try:
            url = make_url(self.database_url)
        except (ArgumentError, ValueError):  # ValueError: a port that is no number
            # Not repeated: the URL may hold a password.
            raise SettingsError("DATABASE_URL: not a SQLAlchemy URL, or its port is no number "
                                "(e.g. postgresql+psycopg://user@host:5432/db; URL-encode "
                                f"{_URL_SPECIALS} in a password)") from None
        if url.get_backend_name() not in DATABASES:
            raise SettingsError(f"DATABASE_URL: {url.get_backend_name()!r} is not a supported "
                                f"database: use {SUPPORTED_URLS}")
        # libpq, given no database, takes the one named after the login: `eventpipe migrate`
        # would make the tables there (the server's `postgres`, say). A service file or a
        # `dbname` parameter may name it instead.
        if url.get_backend_name() == "postgresql" and not url.database \
                and not {"dbname", "service"} & url.query.keys():
            raise SettingsError("DATABASE_URL names no database: name it after the host "
                                "(postgresql+psycopg://user@host:5432/dbname)")
        try:  # here, not as the first connection fails with a traceback
            url.get_dialect().import_dbapi()
        except (ImportError, ArgumentError) as exc:
            raise SettingsError(f"DATABASE_URL: the driver {url.get_driver_name()!r} cannot be "
                                f"loaded ({exc}): use {SUPPORTED_URLS}") from None
        scheme = self.redis_url.partition("://")[0]
        if scheme not in REDIS_SCHEMES:  # the URL itself may hold a password: not repeated
            raise SettingsError(f"REDIS_URL: {scheme!r} is not a Redis URL's scheme: use "
                                "redis://, rediss:// or unix://")
        _check_server_url("REDIS_URL", self.redis_url)
        try:  # its options, as redis-py reads them: here, not at the first connection
            _redis_url_options(self.redis_url)
        except ValueError as exc:  # its words name the option, never the URL
            raise SettingsError(f"REDIS_URL: {exc}") from None
        for broker in self.celery_broker_url.split(";"):  # Celery's brokers to fail over to
            transport = broker.partition("://")[0].partition("+")[0].lower()
            # (a dotted name is a transport class of one's own)
            if transport not in TRANSPORT_ALIASES and "." not in transport:
                raise SettingsError(f"CELERY_BROKER_URL: {transport!r} is not a transport "
                                    "Celery knows: use redis://, rediss:// or amqp:// "
                                    "(RabbitMQ)")
            _check_server_url("CELERY_BROKER_URL", broker)
        # No setting is a count, a size or a time below 0 (MAX_FUTURE_SKEW_S=-3600 would
        # dead-letter every event of the last hour), nor NaN, which passes every comparison
        # below.
        for setting in dataclasses.fields(self):
            value = getattr(self, setting.name)
            # (An integer is finite, and one past a double's range has no float to test.)
            negative = value < 0 if setting.type == "int" else \
                setting.type == "float" and not (math.isfinite(value) and value >= 0)
            if negative:
                raise SettingsError(f"{setting.metadata['env']}={value!r}: must be a number, "
                                    "0 or more")
        # librdkafka wants it a second under its socket timeout (60 s), or requests time out.
        if not 0 <= self.kafka_fetch_wait_max_ms <= 59_000:
            raise SettingsError(f"KAFKA_FETCH_WAIT_MAX_MS={self.kafka_fetch_wait_max_ms!r}: "
                                "must be between 0 and 59000")
        # librdkafka's bounds, and room for its fetches' default size (50 MB) under it.
        if not 60_000_000 <= self.kafka_receive_max_bytes <= 2_147_483_647:
            raise SettingsError(f"KAFKA_RECEIVE_MAX_BYTES={self.kafka_receive_max_bytes!r}: "
                                "must be between 60000000 and 2147483647")
        # librdkafka's bound, which it says only as a consumer is made (the bridge's, the
        # worker pool's): an hour.
        if self.kafka_session_timeout_ms > 3_600_000:
            raise SettingsError(f"KAFKA_SESSION_TIMEOUT_MS={self.kafka_session_timeout_ms!r}: "
                                "must be between 1 and 3600000")
        for env, value in (("KAFKA_PARTITIONS", self.kafka_partitions),
                           ("BATCH_MAX_EVENTS", self.batch_max_events),
                           ("MAX_IN_FLIGHT_PER_PARTITION", self.max_in_flight_per_partition)):
            if value < 1:
                raise SettingsError(f"{env}={value!r}: must be at least 1")
        if self.batch_max_events > MAX_BATCH_EVENTS:
            raise SettingsError(f"BATCH_MAX_EVENTS={self.batch_max_events!r}: at most "
                                f"{MAX_BATCH_EVENTS}, the most the Kafka client hands over at once")
        self._within_bounds()
        # A queue, a row of the status and a series per partition: a typo of a few digits
        # more would take the memory (`eventpipe status` of 10**11 partitions), not a topic.
        if self.kafka_partitions > MAX_PARTITIONS:
            raise SettingsError(f"KAFKA_PARTITIONS={self.kafka_partitions!r}: at most "
                                f"{MAX_PARTITIONS}")
        # Values no process runs with: a task limit of 0 or less fails every batch, a port
        # beyond 65535 is silently some other one.
        for env, amount in (("TASK_TIME_LIMIT_S", self.task_time_limit_s),
                            ("REDELIVERY_TIMEOUT_S", self.redelivery_timeout_s),
                            ("COMMIT_INTERVAL_S", self.commit_interval_s),
                            ("KAFKA_SESSION_TIMEOUT_MS", self.kafka_session_timeout_ms),
                            ("DLQ_MAX_ENTRIES", self.dlq_max_entries),
                            ("DLQ_MAX_BYTES", self.dlq_max_bytes),
                            ("DATABASE_POOL_SIZE", self.database_pool_size)):
            if amount <= 0:
                raise SettingsError(f"{env}={amount!r}: must be greater than 0")
        for env, port in (("WEB_PORT", self.web_port), ("FLOWER_PORT", self.flower_port),
                          ("BRIDGE_METRICS_PORT", self.bridge_metrics_port),
                          ("WORKER_METRICS_PORT", self.worker_metrics_port)):
            if not 0 <= port <= 65535:
                raise SettingsError(f"{env}={port!r}: must be a port, 0 to 65535")
        if not self.kafka_topic.strip():
            raise SettingsError("KAFKA_TOPIC is empty: name the events' topic")
        # Kafka's own rule, with room for the worker pool's topic (`{topic}.workers`): said
        # here, not as a broker's refusal once the bridge or a worker runs.
        if _TOPIC.fullmatch(self.kafka_topic) is None or self.kafka_topic in (".", ".."):
            raise SettingsError(f"KAFKA_TOPIC={self.kafka_topic!r}: Kafka names a topic with "
                                f"at most {MAX_TOPIC_LENGTH} of a-z, A-Z, 0-9, '.', '_' and "
                                "'-' (the worker pool's topic adds '.workers' to it)")

    def _within_bounds(self) -> None:
        """No time longer than the process, its database or its dates can hold, and no
        count or size beyond what Redis, the databases and the Kafka client count to."""
        for setting in dataclasses.fields(self):
            env = setting.metadata["env"]
            value = getattr(self, setting.name)
            if env in ("DATABASE_STATEMENT_TIMEOUT_S", "DATABASE_LOCK_TIMEOUT_S"):
                bound, unit = MAX_DATABASE_TIMEOUT_S, "the database's bound"
            elif env.endswith("_S"):
                bound, unit = MAX_SECONDS, "ten years"
            elif env.endswith("_MS"):
                bound, unit = MAX_SECONDS * 1000, "ten years"
            elif setting.type == "int":
                bound, unit = MAX_COUNT, "2**63 - 1"
            else:
                continue
            if value > bound:
                raise SettingsError(f"{env}={value!r}: at most {bound} ({unit})")

    @classmethod
    def from_env(cls, environ: Mapping[str, str | None]) -> Settings:
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"])
            # Given no value, a setting keeps its default: `WEB_HOST=` is not "every
            # interface", nor `KAFKA_BOOTSTRAP_SERVERS=` a broker named "".
            if raw is None or not raw.strip():
                continue
            values[f.name] = _convert(f.metadata["env"], raw, _CONVERTERS[f.type])
        return cls(**values)


def _check_server_url(env: str, url: str) -> None:
    """A port that is a number, and a Redis database that is one: redis-py takes
    `redis://host/abc` for database 0 without a word, which may be another program's. Said
    without any of the URL, which may hold a password (one not URL-encoded is what moves
    text into the port or the path)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # a '[' or ']' around no IPv6 address: a password's, not URL-encoded
        raise SettingsError(f"{env}: not a URL (URL-encode {_URL_SPECIALS}, '[' and ']' in a "
                            "password)") from None
    try:
        parts.port  # noqa: B018 - read for the ValueError of a port that is no number
    except ValueError:
        raise SettingsError(f"{env}: its port is not a number from 0 to 65535 (URL-encode "
                            f"{_URL_SPECIALS} in a password)") from None
    database = parts.path.strip("/")
    if parts.scheme in ("redis", "rediss") and database and not database.isdigit():
        raise SettingsError(f"{env}: its database, after the host, is not a number (redis://"
                            f"host:6379/0; URL-encode {_URL_SPECIALS} in a password)")


_URL_SPECIALS = "':', '@', '/', '#', '?'"


def _convert(env: str, raw: str, convert: Callable[[str], Any]) -> Any:
    try:
        return convert(raw.strip())
    except ValueError as exc:
        raise SettingsError(f"{env}={raw!r}: {exc}") from exc


def _whole(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError("not a whole number") from None


def _number(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError("not a number") from None


_CONVERTERS: dict[Any, Callable[[str], Any]] = {"str": str, "int": _whole, "float": _number}


def env_vars() -> list[tuple[str, Any, str]]:
    """(variable, default, description) for every setting, in declaration order."""
    return [(f.metadata["env"], f.default, f.metadata["doc"]) for f in dataclasses.fields(Settings)]


# What `.env` may hold besides settings: the variables of docker-compose.yml (a test keeps
# the list in step with the file).
COMPOSE_VARIABLES = frozenset({
    "EVENTPIPE_IMAGE_TAG", "FLOWER_PUBLISHED_PORT", "GRAFANA_ADMIN_PASSWORD",
    "GRAFANA_ADMIN_USER", "GRAFANA_PUBLISHED_PORT", "KAFKA_CLUSTER_ID", "KAFKA_HEAP_OPTS",
    "KAFKA_PUBLISHED_PORT", "MSSQL_APP_PASSWORD", "MSSQL_PID", "MSSQL_PUBLISHED_PORT",
    "MSSQL_SA_PASSWORD", "OPERATOR_PUBLISH_ADDRESS", "PROMETHEUS_PUBLISHED_PORT",
    "PROMETHEUS_RETENTION", "PUBLISH_ADDRESS", "REDIS_PUBLISHED_PORT", "WEB_PUBLISHED_PORT"})


def environment(dotenv: Path, environ: Mapping[str, str]) -> dict[str, str | None]:
    """`environ` over the values of the file `dotenv`, if there is one. A name in either that
    is nearly a setting's is said on stderr, naming the setting: misspelt, it would be
    ignored and its default used without a word (`DATABSE_URL`: the embedded SQLite). Said,
    not refused: the file and the environment may be shared with other programs, whose names
    (`DATABASE_USER`) may be near ours."""
    file_values = _dotenv_values(dotenv) if dotenv.is_file() else {}
    _say_near_misses(file_values, f"in {dotenv}", 0.85)
    # Nearer there: the environment holds more programs' names (`DATABASE_USER`, 0.88).
    _say_near_misses(environ, "in the environment", 0.9)
    return {**file_values, **environ}


def _say_near_misses(names: Iterable[str], where: str, cutoff: float) -> None:
    known = [env for env, _, _ in env_vars()]
    for name in names:
        if name in known or name in COMPOSE_VARIABLES:
            continue
        if close := difflib.get_close_matches(name, known, n=1, cutoff=cutoff):
            print(f"eventpipe: {name} {where} is no setting, and is ignored: did you mean "
                  f"{close[0]}?", file=sys.stderr)


def _dotenv_values(dotenv: Path) -> dict[str, str | None]:
    """The file's values, refused whole if a line is not `NAME=value` (a comment, a blank):
    python-dotenv only logs such a line and leaves it out, so that its setting, and with an
    unclosed quote every one after it, would keep its default."""
    try:
        text = dotenv.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SettingsError(f"{dotenv}: not UTF-8 text (byte {exc.start}); save it as "
                            "UTF-8") from None
    except OSError as exc:
        raise SettingsError(f"{dotenv}: cannot be read ({exc.strerror})") from None
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:  # the line itself is not repeated: it may hold a password
            read = binding.original.string  # from the blank lines before it
            line = binding.original.line + read[:len(read) - len(read.lstrip())].count("\n")
            raise SettingsError(f"{dotenv}, line {line}: not NAME=value (a quote left open? "
                                "`NAME: value`, which compose reads, is no line of a .env "
                                "here)")
    return dotenv_values(stream=io.StringIO(text))


@cache
def _environment() -> dict[str, str | None]:
    """The real environment over the values of `.env` in the working directory."""
    return environment(Path(os.environ.get("EVENTPIPE_ENV_FILE", ".env")), os.environ)


@cache
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings.from_env(_environment())


def settings_or_exit(program: str,
                     check: Callable[[Settings], None] | None = None) -> Settings:
    """The process's settings, for a program started other than by `eventpipe` (gunicorn,
    `celery -A tasks`): a bad setting is one line naming it and exit status 2, as with
    `eventpipe`, rather than the traceback of a module that failed to load. `check`: what
    else the program refuses, by raising `SettingsError`."""
    try:
        settings = get_settings()
        if check is not None:
            check(settings)
        return settings
    except SettingsError as exc:
        print(f"{program}: bad setting: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def provided(environment: Mapping[str, str | None] | None = None) -> frozenset[str]:
    """The variables given a value, in the environment or in `.env`: whatever it is, even the
    default, it was chosen (so `eventpipe up` uses a Kafka at 127.0.0.1:9092 if told so)."""
    chosen = _environment() if environment is None else environment
    known = {f.metadata["env"] for f in dataclasses.fields(Settings)}
    return frozenset(name for name, value in chosen.items()
                     if name in known and value and value.strip())


def child_environment(overrides: Mapping[str, str]) -> dict[str, str]:
    """The environment for a child process of ours: this one's, with `overrides`."""
    return {**os.environ, **overrides}


_SECTIONS = (("DATABASE_", "Database"), ("KAFKA_", "Kafka"), ("MAX_FUTURE", "Kafka"),
             ("REDIS_", "Redis"), ("CELERY_", "Redis"), ("RETRY_", "Retries"),
             ("CRASH_", "Retries"), ("PARK_", "Retries"), ("DLQ_", "Dead-letter queue"))


def section_of(env: str) -> str:
    """The heading a variable is documented under."""
    return next((title for prefix, title in _SECTIONS if env.startswith(prefix)), "Processes")


def render_env_example() -> str:
    """`.env.example`: every variable, commented out, with its default and what it does."""
    lines = ["# eventpipe configuration: every variable is optional and shown with its default.",
             "# Copy to .env (read from the working directory) and uncomment what you change;",
             "# the environment wins over .env. Generated from eventpipe/settings.py",
             "# (`make config-docs`); docs/configuration.md says the same."]
    for env, default, doc in env_vars():
        lines += ["", f"# {doc}", f"# {env}={default}"]
    return "\n".join(lines) + "\n"


def render_markdown() -> str:
    """docs/configuration.md: one table per section."""
    out = ["# Configuration", "",
           "Every setting is an environment variable, read once at start-up from the "
           "environment and from `.env` in the working directory (the environment wins). "
           "A variable given no value (`WEB_HOST=`) keeps its default. A name in `.env` or "
           "the environment that is nearly a setting's (`DATABSE_URL`) is said on stderr, "
           "naming the setting, rather than ignored in silence (nearer in the environment, "
           "which other programs' names share), and a line that is not `NAME=value` (a quote "
           "left open) stops the program, naming the line. "
           "`.env.example` lists them all with their defaults. This page is generated from "
           "`eventpipe/settings.py` by `make config-docs`; a test keeps it in step."]
    sections: dict[str, list[str]] = {}
    for env, default, doc in env_vars():
        shown = f"`{default}`" if default != "" else "(empty)"
        sections.setdefault(section_of(env), []).append(f"| `{env}` | {shown} | {doc} |")
    for title, rows in sections.items():
        out += ["", f"## {title}", "", "| variable | default | what it does |", "|---|---|---|",
                *rows]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    # `python -m eventpipe.settings`: rewrite the generated files from this module.
    root = Path(__file__).resolve().parent.parent
    (root / ".env.example").write_text(render_env_example())
    (root / "docs" / "configuration.md").write_text(render_markdown())
