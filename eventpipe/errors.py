"""The two kinds of failure, and the one place that decides which kind an exception is.

A `PermanentError` will fail the same way however often it is tried: the event goes to the
dead-letter queue at once. A `TransientError` is about the world, not the event (a database
that is down, a deadlock, a timeout): the work is retried with backoff and never dead-lettered.
"""

from __future__ import annotations

import enum
import re
import sqlite3

import sqlalchemy.exc
from redis import exceptions as redis_exceptions


class PipelineError(Exception):
    """Base of the project's own errors."""


class PermanentError(PipelineError):
    """Retrying cannot help: dead-letter the event now."""


class InvalidEvent(PermanentError):
    """The bytes are not a valid event; `field` names the offending part of the message."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class TransientError(PipelineError):
    """The world failed, not the event: retry later."""


class DatabaseUnresponsive(TransientError):
    """A batch's time limit ran out while it waited on the database: a server that answers
    nothing (packets dropped, no reset) is the world failing, not the batch's events."""


class ServiceUnanswered(PipelineError):
    """A service the settings name does not answer; the message names the setting and what
    to do. Every command says it in one line and exits with status 3 (`cli.errors`)."""


# Redis took no write, for now: it does not answer, or answers as a replica (a failover left
# the client on the old primary) or at its memory bound.
REDIS_UNAVAILABLE: tuple[type[redis_exceptions.RedisError], ...] = (
    redis_exceptions.ConnectionError,
    redis_exceptions.TimeoutError,
    redis_exceptions.ReadOnlyError,
    redis_exceptions.OutOfMemoryError,
)

_TRANSIENT: tuple[type[BaseException], ...] = (
    TransientError,
    sqlalchemy.exc.TimeoutError,  # the connection pool is exhausted
    sqlalchemy.exc.DisconnectionError,
    *REDIS_UNAVAILABLE,
    ConnectionError,
    TimeoutError,
)

# Errors of a server that takes no writes: whatever connections reach it, none will (a
# failover that left them on a standby, a name not moved yet), so the pool makes new ones
# (`eventpipe.database`). The world's failures too.
_READ_ONLY_SQLSTATES = frozenset({"25006"})  # PostgreSQL: a read-only transaction
_READ_ONLY_MSSQL_ERRORS = frozenset({3906})  # SQL Server: the database is read-only
# SQLSTATEs (PostgreSQL, SQL Server through ODBC) that say the world failed, not the event.
_TRANSIENT_SQLSTATE_CLASSES = frozenset({
    "08",  # connection exception
    "53",  # insufficient resources (too many connections, out of memory, disk full)
    "57",  # operator intervention: shutdown, statement timeout (57014), cannot connect now
    "58",  # system error (I/O)
    "HYT",  # ODBC: timeout expired (HYT00, HYT01)
})
_TRANSIENT_SQLSTATES = _READ_ONLY_SQLSTATES | frozenset({
    "40001",  # serialization failure; SQL Server's deadlock victim (1205)
    "40P01",  # PostgreSQL: deadlock detected
    "55P03",  # PostgreSQL: lock not available (lock_timeout)
    "55006",  # object in use
})
# SQL Server's native error numbers, for drivers that report a generic SQLSTATE (HY000).
_TRANSIENT_MSSQL_ERRORS = _READ_ONLY_MSSQL_ERRORS | frozenset({
    -2,  # client-side timeout
    233, 10053, 10054, 10060, 64,  # the connection was broken
    1205,  # deadlock victim
    1222,  # lock request time out (LOCK_TIMEOUT)
    4060, 40197, 40501, 40613, 49918, 49919, 49920,  # database unavailable / busy (Azure)
    # More of the errors Microsoft's clients retry.
    121, 1204, 4221, 40143, 40540, 41301, 41302, 41305, 41325, 41839, 42108, 42109,
    10928, 10929, 10936,  # a resource limit of the database or its pool (Azure)
    9002, 1105, 40544,  # the log, a filegroup or the database's size quota is full
    701, 8645,  # out of memory
})
# pyodbc ends each diagnostic record with "(<native error>) (<ODBC function>)".
_MSSQL_ERROR_NUMBER = re.compile(r"\((-?\d+)\) \(SQL\w+\)")


class FailureKind(enum.Enum):
    """What an exception says about retrying the work that raised it."""

    TRANSIENT = "transient"  # the world failed: retry later, never dead-letter
    DATA = "data"  # the database cannot store a value of the event: permanent
    CONSTRAINT = "constraint"  # the database refused the event by a constraint: permanent
    UNKNOWN = "unknown"  # nobody foresaw it: retried alone a bounded number of times


def classify(exc: BaseException) -> FailureKind:
    """The one place that decides. Database errors are judged by SQLSTATE and native error
    number first, since a driver's exception class does not say enough: pyodbc raises a
    deadlock as a plain `Error`, and an `OperationalError` may be a value the database refused."""
    if isinstance(exc, _TRANSIENT) or unresponsive(exc) or schema_out_of_step(exc):
        return FailureKind.TRANSIENT
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        if exc.connection_invalidated:
            return FailureKind.TRANSIENT
        by_code = _by_codes(exc.orig)
        if by_code is not None:
            return by_code
    if isinstance(exc, sqlalchemy.exc.OperationalError):  # SQLite: "database is locked"
        return FailureKind.TRANSIENT
    if isinstance(exc, sqlalchemy.exc.DataError):
        return FailureKind.DATA
    if isinstance(exc, sqlalchemy.exc.IntegrityError):
        return FailureKind.CONSTRAINT
    return FailureKind.UNKNOWN


def read_only(orig: BaseException) -> bool:
    """Whether a driver's error says the server takes no writes: a standby, a secondary."""
    return sqlstate(orig) in _READ_ONLY_SQLSTATES \
        or bool(_mssql_error_numbers(orig) & _READ_ONLY_MSSQL_ERRORS)


def unresponsive(exc: BaseException) -> bool:
    """Whether `exc` is, or was raised while handling, a `DatabaseUnresponsive`: a driver
    interrupted mid-exchange fails again as it cleans up (psycopg's "another command is
    already in progress", "can't change 'autocommit' now"), and that error says nothing of
    the batch's events."""
    seen: BaseException | None = exc
    for _ in range(10):  # a chain, not a cycle: bounded all the same
        if seen is None:
            return False
        if isinstance(seen, DatabaseUnresponsive):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _by_codes(orig: BaseException | None) -> FailureKind | None:
    if orig is None:
        return None
    state = sqlstate(orig)
    if state is not None and (state in _TRANSIENT_SQLSTATES
                              or state[:2] in _TRANSIENT_SQLSTATE_CLASSES
                              or state[:3] in _TRANSIENT_SQLSTATE_CLASSES):
        return FailureKind.TRANSIENT
    if _mssql_error_numbers(orig) & _TRANSIENT_MSSQL_ERRORS:
        return FailureKind.TRANSIENT
    if state is not None and state.startswith("22"):
        return FailureKind.DATA
    if state is not None and state.startswith("23"):
        return FailureKind.CONSTRAINT
    return None


# "relation does not exist" (PostgreSQL), "Invalid object name" (SQL Server).
_MISSING_TABLE = frozenset({"42P01", "42S02"})
# A column not there (PostgreSQL's 42703, ODBC's 42S22), or a table: the schema is older
# than the code, or gone.
_OUT_OF_STEP = _MISSING_TABLE | {"42703", "42S22"}


def schema_missing(exc: BaseException) -> bool:
    """Whether the database said a table is not there: it was never migrated."""
    return _said(exc, _MISSING_TABLE, ("no such table",))


def schema_out_of_step(exc: BaseException) -> bool:
    """Whether the database lacks a table or column the code names: a schema never
    migrated, dropped, or older than the code (a worker deployed before `eventpipe migrate`
    ran). The world's failure, not the events': on SQLite, whose error for it is an
    `OperationalError`, it always was one."""
    return _said(exc, _OUT_OF_STEP, ("no such table", "no such column"))


def _said(exc: BaseException, states: frozenset[str], sqlite_says: tuple[str, ...]) -> bool:
    """By SQLSTATE; SQLite, which has none, by how its message begins (never by what the
    text holds further on: PostgreSQL's message quotes the row, whose values an event
    chose)."""
    if not isinstance(exc, sqlalchemy.exc.DBAPIError) or exc.orig is None:
        return False
    if isinstance(exc.orig, sqlite3.Error):
        return str(exc.orig).startswith(sqlite_says)
    return sqlstate(exc.orig) in states


KEY_OF_ANOTHER_KIND = ("a Redis key of this pipeline holds a value of another kind: another "
                       "program writes there; give the pipeline a Redis database of its own")


def key_of_another_kind(exc: BaseException) -> bool:
    """Whether Redis refused a command for a key holding another kind of value (WRONGTYPE):
    a key the pipeline names (the DLQ stream, the offset ledger, the status board) was
    written by something else. Retrying cannot help, nor is any event at fault."""
    return isinstance(exc, redis_exceptions.ResponseError) and "WRONGTYPE" in str(exc)


def sqlstate(orig: BaseException) -> str | None:
    """The SQLSTATE a driver attached: psycopg's `sqlstate`, pyodbc's first argument."""
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if isinstance(code, str) and len(code) == 5:
        return code.upper()
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], str) and len(args[0]) == 5 and args[0].isalnum():
        return args[0].upper()
    return None


def _mssql_error_numbers(orig: BaseException) -> set[int]:
    """pyodbc puts SQL Server's error numbers in the message, e.g. "… deadlocked … (1205)
    (SQLExecDirectW)"."""
    text = " ".join(str(arg) for arg in getattr(orig, "args", ())[1:])
    return {int(number) for number in _MSSQL_ERROR_NUMBER.findall(text)}


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same work later can succeed."""
    return classify(exc) is FailureKind.TRANSIENT
