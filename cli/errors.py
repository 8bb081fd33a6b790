"""One line for a failure an operator can fix: which setting or command, never a traceback.

A command that meets a service it cannot reach, a database that was never migrated or a
bad setting says so in one line on stderr and exits with a distinct status: 2 for a bad
setting or argument, 3 for a service. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re
import sqlite3
from urllib.parse import urlsplit

import redis.exceptions
import sqlalchemy.exc
from confluent_kafka import KafkaError, KafkaException

from eventpipe.database import redacted
from eventpipe.errors import (
    KEY_OF_ANOTHER_KIND,
    NO_REDIS_DATABASE,
    ServiceUnanswered,
    TransientError,
    key_of_another_kind,
    no_redis_database,
    not_a_sqlite_database,
    privilege_missing,
    redis_database_missing,
    redis_refuses_writes,
    schema_missing,
    sqlstate,
)
from eventpipe.settings import Settings

BAD_SETTING = 2
SERVICE = 3
# How a line of a bad setting begins, as `eventpipe` says those the settings refuse.
BAD = "bad setting: "
# Kafka, or its client, has no topic of the name asked for.
_NO_SUCH_TOPIC = (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC)
# The settings librdkafka is handed, by the name it gives them in its complaints.
_KAFKA_PROPERTIES = {"bootstrap.servers": "KAFKA_BOOTSTRAP_SERVERS",
                     "group.id": "KAFKA_GROUP_ID",
                     "session.timeout.ms": "KAFKA_SESSION_TIMEOUT_MS",
                     "fetch.wait.max.ms": "KAFKA_FETCH_WAIT_MAX_MS"}


def explain(exc: BaseException, settings: Settings) -> str | None:
    """The line to print for `exc`, or None when it is not an operator's to fix."""
    if isinstance(exc, ServiceUnanswered):
        return str(exc)
    if isinstance(exc, redis.exceptions.AuthenticationError):  # it answered: no to the login
        url = settings.redis_url
        named = "refuses the credentials it names" if _names_credentials(url) \
            else "asks for credentials it does not name"
        return f"Redis at REDIS_URL={redacted(url)} {named}: {_first_line(exc)}"
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return (f"Redis does not answer at REDIS_URL={redacted(settings.redis_url)}: "
                f"{_first_line(exc)}")
    if no_redis_database(exc):
        setting, number = redis_database_missing(settings)
        url = getattr(settings, setting.lower())
        return f"{BAD}{setting}={redacted(url)}: {NO_REDIS_DATABASE.format(number=number)}"
    refused = redis_refuses_writes(exc)
    if refused is not None:
        return f"Redis at REDIS_URL={redacted(settings.redis_url)} refuses writes: {refused}"
    if key_of_another_kind(exc):
        return (f"{KEY_OF_ANOTHER_KIND} (DLQ_STREAM={settings.dlq_stream}, "
                f"KAFKA_GROUP_ID={settings.kafka_group_id} at "
                f"REDIS_URL={redacted(settings.redis_url)})")
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        where = f"DATABASE_URL={redacted(settings.database_url)}"
        orig = exc.orig
        if schema_missing(exc):
            return f"the database at {where} has no schema yet: run `eventpipe migrate`"
        if privilege_missing(exc):
            if isinstance(orig, sqlite3.Error):  # no login: the file's owner and mode decide
                return (f"the database at {where} is read-only to this process: "
                        f"{_first_line(orig)}; open it read-write, as a user that may write "
                        "the file and its directory")
            return (f"the database login at {where} lacks a privilege: "
                    f"{_server_said(orig or exc)}; grant it, or run `eventpipe migrate` with "
                    "the migration's login")
        if not_a_sqlite_database(exc):
            return (f"the database at {where} is not a SQLite database, or is damaged: "
                    f"{_first_line(orig or exc)}")
        # No statement: refused as it connected, whatever the driver calls it (psycopg's
        # ProgrammingError for an option of the URL it cannot read, `?connect_timeout=abc`).
        if isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError) \
                or exc.statement is None or _odbc_driver_missing(orig):
            return f"the database at {where} cannot be used: {_first_line(orig or exc)}"
    if isinstance(exc, TransientError):  # the pipeline's own, written for operators
        return _first_line(exc)
    if isinstance(exc, KafkaException):
        error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        said = (_first_line_of(error.str()) or error.name()) if error is not None \
            else _first_line(exc)
        if error is not None and error.code() in (KafkaError._INVALID_ARG,
                                                  KafkaError.INVALID_CONFIG):
            return f"{BAD}{_kafka_settings(said, settings)}: Kafka's client refuses it: {said}"
        # `eventpipe.verify` says it in words only, of the topic the settings name.
        if (error is not None and error.code() in _NO_SUCH_TOPIC) \
                or said == f"topic {settings.kafka_topic!r} not found":
            return (f"{BAD}KAFKA_TOPIC={settings.kafka_topic}: Kafka at "
                    f"KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap_servers} has no such "
                    "topic")
        return f"Kafka at KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap_servers}: {said}"
    return None


def status_of(line: str) -> int:
    """The exit status of a line of `explain`: a bad setting's says so first."""
    return BAD_SETTING if line.startswith(BAD) else SERVICE


def _kafka_settings(said: str, settings: Settings) -> str:
    """The settings, with their values, whose librdkafka properties the client's complaint
    names; all it is handed when it names none of them (a property derived from them)."""
    named = [env for prop, env in _KAFKA_PROPERTIES.items() if prop in said] \
        or list(_KAFKA_PROPERTIES.values())
    return ", ".join(f"{env}={getattr(settings, env.lower())}" for env in named)


def _names_credentials(url: str) -> bool:
    """Whether a Redis URL gives a user or a password (Redis asks for them when none is)."""
    try:
        parts = urlsplit(url)
        return parts.username is not None or parts.password is not None
    except ValueError:  # a URL redis-py took but urllib does not: say what Redis said
        return True


def _odbc_driver_missing(orig: BaseException | None) -> bool:
    """The ODBC driver manager could not load the driver the URL names (unixODBC's "Can't
    open lib", SQLSTATE 01000; IM…: no such data source or driver)."""
    state = sqlstate(orig) if orig is not None else None
    return state is not None and (state == "01000" or state.startswith("IM"))


# pyodbc's message: "[42000] [Microsoft][ODBC Driver 18 for SQL Server][SQL Server]<what the
# server said> (229) (SQLExecDirectW)", as the second of its arguments.
_ODBC_SOURCES = re.compile(r"^(?:\[[^\]]*\]\s*)+")
_ODBC_TAIL = re.compile(r"\s*\(-?\d+\) \(SQL\w+\).*$", re.DOTALL)


def _server_said(orig: BaseException) -> str:
    """The first line of what the database server said: psycopg's message as it is; of
    pyodbc's, the server's words without the driver's brackets and the error's number."""
    args: tuple[object, ...] = getattr(orig, "args", ())
    message = args[1] if len(args) == 2 and isinstance(args[0], str) else None
    if isinstance(message, str):
        said = _ODBC_TAIL.sub("", _ODBC_SOURCES.sub("", message))
        return _first_line_of(said) or _first_line(orig)
    return _first_line(orig)


def _first_line(exc: BaseException) -> str:
    return _first_line_of(str(exc)) or type(exc).__name__


def _first_line_of(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0] if text else ""
