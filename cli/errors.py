"""One line for a failure an operator can fix: which setting or command, never a traceback.

A command that meets a service it cannot reach, a database that was never migrated or a
bad setting says so in one line on stderr and exits with a distinct status: 2 for a bad
setting or argument, 3 for a service. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import redis.exceptions
import sqlalchemy.exc
from confluent_kafka import KafkaException

from eventpipe.database import redacted
from eventpipe.errors import (
    KEY_OF_ANOTHER_KIND,
    ServiceUnanswered,
    TransientError,
    key_of_another_kind,
    schema_missing,
    sqlstate,
)
from eventpipe.settings import Settings

BAD_SETTING = 2
SERVICE = 3


def explain(exc: BaseException, settings: Settings) -> str | None:
    """The line to print for `exc`, or None when it is not an operator's to fix."""
    if isinstance(exc, ServiceUnanswered):
        return str(exc)
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return (f"Redis does not answer at REDIS_URL={redacted(settings.redis_url)}: "
                f"{_first_line(exc)}")
    if key_of_another_kind(exc):
        return (f"{KEY_OF_ANOTHER_KIND} (DLQ_STREAM={settings.dlq_stream}, "
                f"KAFKA_GROUP_ID={settings.kafka_group_id} at "
                f"REDIS_URL={redacted(settings.redis_url)})")
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        where = f"DATABASE_URL={redacted(settings.database_url)}"
        orig = exc.orig
        if schema_missing(exc):
            return f"the database at {where} has no schema yet: run `eventpipe migrate`"
        if isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError) \
                or _odbc_driver_missing(orig):
            return f"the database at {where} cannot be used: {_first_line(orig or exc)}"
    if isinstance(exc, TransientError):  # the pipeline's own, written for operators
        return _first_line(exc)
    if isinstance(exc, KafkaException):
        return (f"Kafka at KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap_servers}: "
                f"{_first_line(exc)}")
    return None


def _odbc_driver_missing(orig: BaseException | None) -> bool:
    """The ODBC driver manager could not load the driver the URL names (unixODBC's "Can't
    open lib", SQLSTATE 01000; IM…: no such data source or driver)."""
    state = sqlstate(orig) if orig is not None else None
    return state is not None and (state == "01000" or state.startswith("IM"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
