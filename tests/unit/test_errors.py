"""Which failures are the world's and which are the event's: by SQLSTATE and native error
number on every supported driver, not by the driver's exception class alone (issue 9)."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest
import sqlalchemy.exc

from eventpipe.database import redacted
from eventpipe.errors import (
    DatabaseUnresponsive,
    FailureKind,
    classify,
    is_transient,
    read_only,
    sqlstate,
)


class PyodbcError(Exception):
    """What pyodbc raises: args are (SQLSTATE, message); the message ends with the native
    error number and the ODBC function."""


def wrapped(kind: type[sqlalchemy.exc.DBAPIError], orig: BaseException) -> BaseException:
    return kind("MERGE …", {}, orig)


def mssql(state: str, text: str, number: int) -> PyodbcError:
    return PyodbcError(state, f"[{state}] [Microsoft][ODBC Driver 18 for SQL Server][SQL Server]"
                       f"{text} ({number}) (SQLExecDirectW)")


def postgres(error: type[psycopg.Error], message: str = "boom") -> psycopg.Error:
    return error(message)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        # SQL Server through pyodbc: all of these are a plain DBAPIError in SQLAlchemy.
        (wrapped(sqlalchemy.exc.DBAPIError, mssql(
            "40001", "Transaction (Process ID 52) was deadlocked on lock resources", 1205)),
         FailureKind.TRANSIENT),
        (wrapped(sqlalchemy.exc.DBAPIError, mssql(
            "HY000", "Lock request time out period exceeded.", 1222)), FailureKind.TRANSIENT),
        (wrapped(sqlalchemy.exc.DBAPIError, mssql("HYT00", "Query timeout expired", 0)),
         FailureKind.TRANSIENT),
        (wrapped(sqlalchemy.exc.DBAPIError, mssql(
            "08S01", "Communication link failure", 10054)), FailureKind.TRANSIENT),
        (wrapped(sqlalchemy.exc.DBAPIError, mssql(
            "22001", "String or binary data would be truncated in column 'nvarchar(64)'.",
            2628)), FailureKind.DATA),
        (wrapped(sqlalchemy.exc.IntegrityError, mssql(
            "23000", "Violation of PRIMARY KEY constraint", 2627)), FailureKind.CONSTRAINT),
        # PostgreSQL through psycopg.
        (wrapped(sqlalchemy.exc.OperationalError, postgres(psycopg.errors.DeadlockDetected)),
         FailureKind.TRANSIENT),
        (wrapped(sqlalchemy.exc.OperationalError,
                 postgres(psycopg.errors.SerializationFailure)), FailureKind.TRANSIENT),
        (wrapped(sqlalchemy.exc.OperationalError, postgres(psycopg.errors.QueryCanceled)),
         FailureKind.TRANSIENT),
        (wrapped(sqlalchemy.exc.OperationalError, postgres(psycopg.errors.LockNotAvailable)),
         FailureKind.TRANSIENT),
        (wrapped(sqlalchemy.exc.OperationalError, postgres(psycopg.errors.AdminShutdown)),
         FailureKind.TRANSIENT),
        (wrapped(sqlalchemy.exc.DataError,
                 postgres(psycopg.errors.NumericValueOutOfRange)), FailureKind.DATA),
        (wrapped(sqlalchemy.exc.DataError,
                 postgres(psycopg.errors.CharacterNotInRepertoire)), FailureKind.DATA),
        (wrapped(sqlalchemy.exc.IntegrityError, postgres(psycopg.errors.UniqueViolation)),
         FailureKind.CONSTRAINT),
        # A table or column the code names is not there: the schema is gone, or older than
        # the code. Retried until `eventpipe migrate` runs, as SQLite always did.
        (wrapped(sqlalchemy.exc.ProgrammingError, postgres(psycopg.errors.UndefinedTable)),
         FailureKind.TRANSIENT),
        (wrapped(sqlalchemy.exc.ProgrammingError, postgres(psycopg.errors.UndefinedColumn)),
         FailureKind.TRANSIENT),
        (wrapped(sqlalchemy.exc.ProgrammingError, mssql(
            "42S02", "Invalid object name 'inventory'.", 208)), FailureKind.TRANSIENT),
        (wrapped(sqlalchemy.exc.ProgrammingError, mssql(
            "42S22", "Invalid column name 'version_at'.", 207)), FailureKind.TRANSIENT),
        (wrapped(sqlalchemy.exc.OperationalError, sqlite3.OperationalError(
            "no such table: inventory")), FailureKind.TRANSIENT),
        (wrapped(sqlalchemy.exc.OperationalError, sqlite3.OperationalError(
            "no such column: version_at")), FailureKind.TRANSIENT),
        # What an event chose, quoted in the message, is not what the database said.
        (wrapped(sqlalchemy.exc.IntegrityError, postgres(
            psycopg.errors.CheckViolation, 'new row violates check constraint\nDETAIL: '
            'Failing row contains (u1, no such table, …).')), FailureKind.CONSTRAINT),
        (wrapped(sqlalchemy.exc.DataError, postgres(
            psycopg.errors.InvalidTextRepresentation,
            'invalid input syntax for type numeric: "no such table"')), FailureKind.DATA),
        # Other statements the database refuses to run are no failure of the world.
        (wrapped(sqlalchemy.exc.ProgrammingError, postgres(psycopg.errors.SyntaxError)),
         FailureKind.UNKNOWN),
        # SQLite.
        (wrapped(sqlalchemy.exc.OperationalError, sqlite3.OperationalError(
            "database is locked")), FailureKind.TRANSIENT),
        (wrapped(sqlalchemy.exc.IntegrityError, sqlite3.IntegrityError("UNIQUE failed")),
         FailureKind.CONSTRAINT),
        # A server that takes no writes, or no more of them for now: a failover that left
        # connections on a standby, a database made read-only, a full log or disk, no memory
        # left, a cloud database's resource limits. (Before: unforeseen, so retried alone a
        # few times, then the events were dead-lettered.)
        (wrapped(sqlalchemy.exc.InternalError,
                 postgres(psycopg.errors.ReadOnlySqlTransaction)), FailureKind.TRANSIENT),
        *((wrapped(sqlalchemy.exc.ProgrammingError, mssql("42000", text, number)),
           FailureKind.TRANSIENT) for number, text in (
            (3906, 'Failed to update database "events" because the database is read-only.'),
            (9002, "The transaction log for database 'events' is full due to 'LOG_BACKUP'."),
            (1105, "Could not allocate space for object 'dbo.applied_events' in database "
                   "'events' because the 'PRIMARY' filegroup is full."),
            (701, "There is insufficient system memory in resource pool 'default' to run this "
                  "query."),
            (10928, "Resource ID : 1. The request limit for the database is 60 and has been "
                    "reached."),
            (10929, "Resource ID : 1. The min guarantee is 10, max limit is 60 and the "
                    "current usage for the database is 60."),
            (10936, "Resource ID : 1. The request limit for the elastic pool is 200 and has "
                    "been reached."),
            (40544, "The database 'events' has reached its size quota."),
            (8645, "A timeout occurred while waiting for memory resources to execute the "
                   "query."),
            *((number, "one of the errors Microsoft's clients retry") for number in (
                121, 1204, 4221, 40143, 40540, 41301, 41302, 41305, 41325, 41839, 42108,
                42109)),
        )),
        # Not the database.
        (ConnectionResetError(), FailureKind.TRANSIENT),
        (KeyError("x"), FailureKind.UNKNOWN),
    ],
    ids=lambda value: value.name if isinstance(value, FailureKind) else type(value).__name__,
)
def test_each_failure_is_classified(exc: BaseException, kind: FailureKind) -> None:
    assert classify(exc) is kind
    assert is_transient(exc) is (kind is FailureKind.TRANSIENT)


def test_a_number_in_the_text_of_a_message_is_not_a_native_error() -> None:
    # "(64)" of a column type, or a value echoed back, must not read as error 64 (broken pipe).
    orig = PyodbcError("22001", "[22001] [SQL Server]String would be truncated in nvarchar(64) "
                       "value '(1205)' (2628) (SQLExecDirectW)")
    assert classify(wrapped(sqlalchemy.exc.DBAPIError, orig)) is FailureKind.DATA


def test_an_invalidated_connection_is_transient_whatever_the_code() -> None:
    exc = wrapped(sqlalchemy.exc.DBAPIError, PyodbcError("42000", "syntax"))
    assert isinstance(exc, sqlalchemy.exc.DBAPIError)
    exc.connection_invalidated = True
    assert classify(exc) is FailureKind.TRANSIENT


def test_whatever_a_driver_raises_as_it_cleans_up_after_the_database_stalled_is_transient(
) -> None:
    """The task's time limit interrupts psycopg mid-exchange; its cleanup then fails with an
    error of its own (the classes below are psycopg's), raised while handling the stall."""
    def interrupted_then(cleanup: BaseException) -> BaseException:
        try:
            try:
                raise DatabaseUnresponsive("batch still running after 3 s")
            except DatabaseUnresponsive:
                raise cleanup  # noqa: B904 - chained implicitly, as the driver's is
        except BaseException as exc:
            return exc

    for cleanup in (psycopg.ProgrammingError("can't change 'autocommit' now"),
                    wrapped(sqlalchemy.exc.ProgrammingError,
                            psycopg.ProgrammingError("can't change 'autocommit' now"))):
        assert classify(interrupted_then(cleanup)) is FailureKind.TRANSIENT
    assert classify(psycopg.ProgrammingError("can't change 'autocommit' now")) \
        is FailureKind.UNKNOWN


def test_a_server_that_takes_no_writes_is_told_apart() -> None:
    """What makes the pool drop its connections (`eventpipe.database`): a standby, a read-only
    secondary; not a deadlock, nor a full log."""
    assert read_only(postgres(psycopg.errors.ReadOnlySqlTransaction))
    assert read_only(mssql("42000", 'Failed to update database "events" because the database '
                           "is read-only.", 3906))
    assert not read_only(mssql("40001", "Transaction was deadlocked", 1205))
    assert not read_only(mssql("42000", "The transaction log for database 'events' is full.",
                               9002))
    assert not read_only(postgres(psycopg.errors.DeadlockDetected))


def test_sqlstate_of_each_driver() -> None:
    assert sqlstate(postgres(psycopg.errors.DeadlockDetected)) == "40P01"
    assert sqlstate(mssql("40001", "deadlocked", 1205)) == "40001"
    assert sqlstate(sqlite3.OperationalError("database is locked")) is None


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql+psycopg://postgres:hunter2@db:5432/x", "postgresql+psycopg://postgres:***@db:5432/x"),
    # A review's finding: a password in the query was echoed by every error line.
    ("postgresql+psycopg://postgres@db:5432/x?password=Sup3r&sslmode=require",
     "postgresql+psycopg://postgres@db:5432/x?password=***&sslmode=require"),
    ("mssql+pyodbc:///?odbc_connect=DRIVER%3D%7BODBC+Driver+18%7D%3BSERVER%3Ddb%3BUID%3Dsa"
     "%3BPWD%3DSup3r%3BEncrypt%3Dyes",
     "mssql+pyodbc:///?odbc_connect=DRIVER={ODBC Driver 18};SERVER=db;UID=sa;PWD=***;"
     "Encrypt=yes"),
    ("redis://db:6379/12?Password=Sup3r", "redis://db:6379/12?Password=***"),
    # A second review's: an encoded `&` in the password, a braced ODBC value, first in line.
    ("postgresql+psycopg://postgres@db/x?password=Sup%26rSecret&sslmode=require",
     "postgresql+psycopg://postgres@db/x?password=***&sslmode=require"),
    ("mssql+pyodbc:///?odbc_connect=PWD%3D%7Bab%3Bsecret%7D%3BUID%3Dsa",
     "mssql+pyodbc:///?odbc_connect=PWD=***;UID=sa"),
    ("redis://:Sup3r@db:6379/0", "redis://:***@db:6379/0"),
    ("sqlite:///var/eventpipe.db", "sqlite:///var/eventpipe.db"),
])
def test_a_url_in_a_message_shows_no_password(url: str, shown: str) -> None:
    assert redacted(url) == shown
