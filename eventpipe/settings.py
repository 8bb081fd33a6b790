"""Configuration: one frozen object built once from the environment and an optional `.env`.

Nothing else in the project reads `os.environ`. Every field names its variable and its default
in one place (`_field`), so `.env.example` can be checked against this module by a test.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from dotenv import dotenv_values


class SettingsError(ValueError):
    """A configuration variable holds a value that cannot be used."""


def _field(env: str, default: Any, doc: str) -> Any:
    return field(default=default, metadata={"env": env, "doc": doc})


@dataclass(frozen=True, slots=True)
class Settings:
    # Database
    database_url: str = _field(
        "DATABASE_URL", "sqlite:///var/eventpipe.db",
        "SQLAlchemy URL: mssql+pyodbc://…, postgresql+psycopg://… or sqlite:///path",
    )
    database_pool_size: int = _field("DATABASE_POOL_SIZE", 5, "Connections kept per process")
    database_max_overflow: int = _field(
        "DATABASE_MAX_OVERFLOW", 10, "Extra connections allowed under burst"
    )
    database_pool_timeout_s: float = _field(
        "DATABASE_POOL_TIMEOUT_S", 10.0, "Seconds to wait for a pooled connection"
    )
    # Kafka
    kafka_bootstrap_servers: str = _field(
        "KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092", "Kafka brokers, comma-separated"
    )
    kafka_topic: str = _field("KAFKA_TOPIC", "events", "Topic the events are published to")
    kafka_partitions: int = _field(
        "KAFKA_PARTITIONS", 12, "Partitions of the topic (one Celery queue per partition)"
    )
    kafka_group_id: str = _field("KAFKA_GROUP_ID", "eventpipe-bridge", "Bridge consumer group")
    kafka_session_timeout_ms: int = _field(
        "KAFKA_SESSION_TIMEOUT_MS", 6000, "Consumer group session timeout"
    )
    # Redis: the DLQ and the delivery ledger live here, apart from the Celery broker, so that
    # losing the broker's queued messages never loses what is needed to recover them.
    redis_url: str = _field("REDIS_URL", "redis://127.0.0.1:6379/0", "DLQ and delivery ledger")
    celery_broker_url: str = _field(
        "CELERY_BROKER_URL", "redis://127.0.0.1:6379/1", "Celery broker (per-partition queues)"
    )
    # Bridge
    batch_max_events: int = _field("BATCH_MAX_EVENTS", 500, "Events of one partition per task")
    batch_max_wait_ms: int = _field(
        "BATCH_MAX_WAIT_MS", 50, "Longest wait to fill a batch before sending it"
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
        "SHUTDOWN_DRAIN_TIMEOUT_S", 20.0, "On SIGTERM or revoke, how long to wait for work"
    )
    # Retries
    retry_max_attempts: int = _field(
        "RETRY_MAX_ATTEMPTS", 8,
        "Attempts for an event whose parent is missing (or that fails alone with an "
        "unforeseen error) before it is dead-lettered"
    )
    retry_backoff_base_s: float = _field(
        "RETRY_BACKOFF_BASE_S", 1.0, "First retry delay; doubles each attempt, with jitter"
    )
    retry_backoff_max_s: float = _field("RETRY_BACKOFF_MAX_S", 60.0, "Longest retry delay")
    # Dead-letter queue
    dlq_stream: str = _field("DLQ_STREAM", "eventpipe:dlq", "Redis Stream holding the DLQ")
    dlq_max_entries: int = _field(
        "DLQ_MAX_ENTRIES", 100_000, "DLQ bound: when full, dead-lettering fails loudly"
    )
    dlq_api_token: str = _field(
        "DLQ_API_TOKEN", "", "Bearer token for the DLQ endpoints; empty disables them"
    )
    # Processes
    log_level: str = _field("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR")
    web_host: str = _field("WEB_HOST", "127.0.0.1", "Address the API listens on")
    web_port: int = _field("WEB_PORT", 8000, "Port the API listens on")
    web_workers: int = _field(
        "WEB_WORKERS", 0, "gunicorn worker processes for the API; 0: two per core, plus one"
    )
    flower_port: int = _field("FLOWER_PORT", 5555, "Flower's port under `eventpipe up`")
    bridge_metrics_port: int = _field("BRIDGE_METRICS_PORT", 9101, "Bridge /metrics port")
    worker_metrics_port: int = _field("WORKER_METRICS_PORT", 9102, "Worker host /metrics port")

    @classmethod
    def from_env(cls, environ: Mapping[str, str | None]) -> Settings:
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is None or (raw == "" and f.type != "str"):
                continue
            values[f.name] = _convert(f.metadata["env"], raw, _CONVERTERS[f.type])
        return cls(**values)


def _convert(env: str, raw: str, convert: Callable[[str], Any]) -> Any:
    try:
        return convert(raw.strip())
    except ValueError as exc:
        raise SettingsError(f"{env}={raw!r}: {exc}") from exc


_CONVERTERS: dict[Any, Callable[[str], Any]] = {"str": str, "int": int, "float": float}


def env_vars() -> list[tuple[str, Any, str]]:
    """(variable, default, description) for every setting, in declaration order."""
    return [(f.metadata["env"], f.default, f.metadata["doc"]) for f in dataclasses.fields(Settings)]


@cache
def _environment() -> dict[str, str | None]:
    """The real environment over the values of `.env` in the working directory."""
    dotenv = Path(os.environ.get("EVENTPIPE_ENV_FILE", ".env"))
    file_values = dotenv_values(dotenv) if dotenv.is_file() else {}
    return {**file_values, **os.environ}


@cache
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings.from_env(_environment())


def provided(settings: Settings | None = None) -> frozenset[str]:
    """The variables whose value differs from the default (so a copy of `.env.example`,
    which holds the defaults, provides nothing)."""
    chosen, defaults = settings or get_settings(), Settings()
    return frozenset(f.metadata["env"] for f in dataclasses.fields(Settings)
                     if getattr(chosen, f.name) != getattr(defaults, f.name))


def child_environment(overrides: Mapping[str, str]) -> dict[str, str]:
    """The environment for a child process of ours: this one's, with `overrides`."""
    return {**os.environ, **overrides}
