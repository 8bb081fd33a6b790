"""The two kinds of failure, and the one place that decides which kind an exception is.

A `PermanentError` will fail the same way however often it is tried: the event goes to the
dead-letter queue at once. A `TransientError` is about the world, not the event (a database
that is down, a deadlock, a timeout): the work is retried with backoff and never dead-lettered.
"""

from __future__ import annotations

import enum
import re
import sqlite3
from urllib.parse import parse_qs, urlsplit

import sqlalchemy.exc
from redis import exceptions as redis_exceptions

from eventpipe.settings import REDIS_SCHEMES, Settings


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
# PostgreSQL could not run a statement a connection prepared (`eventpipe.database`): the
# server connection does not have it (26000) or has another by its name (42P05), as a pooler
# in transaction mode that does not keep them gives; or has one whose parameters or result
# no longer fit (08P01 at the Bind, 0A000 as it checks the plan: a migration meanwhile). Told
# by where the server raised it, not by its message, which may be in another language.
_PREPARED_FAILED = frozenset({("26000", None), ("42P05", None),
                              ("08P01", "exec_bind_message"),
                              ("0A000", "RevalidateCachedQuery")})
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
    if isinstance(exc, _TRANSIENT) or unresponsive(exc) or schema_out_of_step(exc) \
            or privilege_missing(exc):
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
    if prepared_statement_failed(orig):
        return FailureKind.TRANSIENT
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


def prepared_statement_failed(orig: BaseException) -> bool:
    """Whether PostgreSQL could not run a statement this connection prepared, as prepared:
    the world's failure, whatever the statement's values."""
    state = sqlstate(orig)
    where = getattr(getattr(orig, "diag", None), "source_function", None)
    return (state, None) in _PREPARED_FAILED or (state, where) in _PREPARED_FAILED


# "relation does not exist" (PostgreSQL), "Invalid object name" (SQL Server).
_MISSING_TABLE = frozenset({"42P01", "42S02"})
# A column not there (PostgreSQL's 42703, ODBC's 42S22), or a table; or no key for an
# upsert's ON CONFLICT (42P10: a restore loads the rows first and the keys last, a key
# rebuilt by hand): the schema is older than the code, gone, or not whole yet.
_OUT_OF_STEP = _MISSING_TABLE | {"42703", "42S22", "42P10"}


def schema_missing(exc: BaseException) -> bool:
    """Whether the database said a table is not there: it was never migrated."""
    return _said(exc, _MISSING_TABLE, ("no such table",))


def schema_out_of_step(exc: BaseException) -> bool:
    """Whether the database lacks a table, column or key the code names: a schema never
    migrated, dropped, older than the code (a worker deployed before `eventpipe migrate`
    ran), or being restored. The world's failure, not the events': on SQLite, whose error
    for it is an `OperationalError`, it always was one."""
    return _said(exc, _OUT_OF_STEP, ("no such table", "no such column",
                                     "ON CONFLICT clause does not match any PRIMARY KEY"))


def _said(exc: BaseException, states: frozenset[str], sqlite_says: tuple[str, ...]) -> bool:
    """By SQLSTATE; SQLite, which has none, by how its message begins (never by what the
    text holds further on: PostgreSQL's message quotes the row, whose values an event
    chose)."""
    if not isinstance(exc, sqlalchemy.exc.DBAPIError) or exc.orig is None:
        return False
    if isinstance(exc.orig, sqlite3.Error):
        return str(exc.orig).startswith(sqlite_says)
    return sqlstate(exc.orig) in states


# A login refused something for want of a grant: PostgreSQL's insufficient_privilege; SQL
# Server's, which its ODBC driver reports under the generic 42000, by native number: 229 and
# 230 (on an object, a column), 262 (a statement in a database: CREATE TABLE, CREATE
# DATABASE), 300 (on a server-level object), 297 and 15247 (the user may not do this), 916 (a
# database the login has no user in), 2760 (a schema missing or not usable by the login).
_PRIVILEGE_SQLSTATES = frozenset({"42501"})
_PRIVILEGE_SAID = ("permission denied", "must be owner")
_PRIVILEGE_MSSQL_ERRORS = frozenset({229, 230, 262, 297, 300, 916, 2760, 15247})


def privilege_missing(exc: BaseException) -> bool:
    """Whether the database refused the login a privilege (a table, a schema, creating a
    database), or SQLite could not write its file (SQLITE_READONLY and its extended codes).
    The grants, not the events, are at fault, whichever the events: the world's failure, to
    wait for an operator to grant it, never a reason to dead-letter."""
    if not isinstance(exc, sqlalchemy.exc.DBAPIError) or exc.orig is None:
        return False
    if isinstance(exc.orig, sqlite3.Error):
        code = getattr(exc.orig, "sqlite_errorcode", None)
        return isinstance(code, int) and code & 0xFF == sqlite3.SQLITE_READONLY
    # PostgreSQL says a row-level security policy's refusal of a row under the same SQLSTATE:
    # the row's values, hence the event, are at fault there. A grant's want is known by how
    # the server's message begins (never by what it holds further on: a row's values).
    return (sqlstate(exc.orig) in _PRIVILEGE_SQLSTATES
            and str(exc.orig).startswith(_PRIVILEGE_SAID)) \
        or bool(_mssql_error_numbers(exc.orig) & _PRIVILEGE_MSSQL_ERRORS)


KEY_OF_ANOTHER_KIND = ("a Redis key of this pipeline holds a value of another kind: another "
                       "program writes there; give the pipeline a Redis database of its own")


def key_of_another_kind(exc: BaseException) -> bool:
    """Whether Redis refused a command for a key holding another kind of value (WRONGTYPE):
    a key the pipeline names (the DLQ stream, the offset ledger, the status board) was
    written by something else. Retrying cannot help, nor is any event at fault."""
    # By what Redis answered, not the whole text: a pipeline's error quotes the command's
    # arguments, a DLQ key among them, which an event chose.
    return "WRONGTYPE" in (redis_said(exc) or "")


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


# -- what Redis and SQLite say that no retry mends: an operator's to fix ---------------------

# Said by Redis as a client selects a database its `databases` setting does not count.
_NO_SUCH_DATABASE = "DB index is out of range"
# redis-py's words before what Redis answered to a command of a pipeline.
_OF_PIPELINE = " of pipeline caused error: "


def redis_said(exc: BaseException) -> str | None:
    """What a Redis server answered instead of doing a command (an error reply), without
    redis-py's words about the pipeline it was in; None for any other failure."""
    if not isinstance(exc, redis_exceptions.ResponseError):
        return None
    # The last: the command's arguments, quoted before, are anyone's.
    return str(exc).rpartition(_OF_PIPELINE)[2]


def no_redis_database(exc: BaseException) -> bool:
    """Whether Redis said it has no database of the number a URL names."""
    return redis_said(exc) == _NO_SUCH_DATABASE


def redis_database_missing(settings: Settings) -> tuple[str, int]:
    """The setting, and its database number, that Redis said it does not have. The error
    does not say which of the two URLs' servers said it: the larger number is beyond the
    server's databases if either is (numbered from 0), REDIS_URL's on a tie."""
    urls = [("REDIS_URL", settings.redis_url)] + [
        ("CELERY_BROKER_URL", url) for url in settings.celery_broker_url.split(";")
        if url.partition("://")[0] in REDIS_SCHEMES]
    numbers = [(name, redis_database(url)) for name, url in urls]
    return max(numbers, key=lambda named: named[1])  # max keeps the first of equals


def redis_database(url: str) -> int:
    """The database number a Redis URL names, read as redis-py reads it: `?db=` first, then
    the path but of a socket's URL; 0 when it names none."""
    parts = urlsplit(url)
    path = "" if parts.scheme == "unix" else parts.path.strip("/")
    number = parse_qs(parts.query).get("db", [path])[0]
    return int(number) if number.isdigit() else 0


NO_REDIS_DATABASE = ("the Redis server there has no database {number} (a server has 16, "
                     "0 to 15, unless its `databases` setting says more)")


def redis_refuses_writes(exc: BaseException) -> str | None:
    """Why Redis refuses every write for now, when it is its state and not the command:
    memory, or a snapshot it failed to save. An operator's to fix; it then passes."""
    said = redis_said(exc)
    if said is None:
        return None
    if isinstance(exc, redis_exceptions.OutOfMemoryError) or said.startswith("OOM "):
        return ("it is at its memory bound (maxmemory) and evicts nothing: free memory, or "
                "raise the bound")
    if said.startswith("MISCONF "):
        return "it cannot save its snapshot to disk (MISCONF): see its log"
    return None


def not_a_sqlite_database(exc: BaseException) -> bool:
    """Whether SQLite found the file DATABASE_URL names is none of its databases, or is
    damaged (SQLITE_NOTADB, SQLITE_CORRUPT and its extended codes): no retry mends it."""
    if not isinstance(exc, sqlalchemy.exc.DBAPIError):
        return False
    code = getattr(exc.orig, "sqlite_errorcode", None)
    return isinstance(exc.orig, sqlite3.DatabaseError) and isinstance(code, int) \
        and code & 0xFF in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT)
