"""Which failures are the world's and which are the event's: by SQLSTATE and native error
number on every supported driver, not by the driver's exception class alone (issue 9)."""

from __future__ import annotations

import dataclasses
import sqlite3
from types import SimpleNamespace

import psycopg
import pytest
import redis.exceptions
import sqlalchemy.exc
from confluent_kafka import KafkaError, KafkaException

from cli.errors import BAD_SETTING, SERVICE, explain, status_of
from eventpipe.database import redacted
from eventpipe.errors import (
    DatabaseUnresponsive,
    FailureKind,
    classify,
    is_transient,
    key_of_another_kind,
    privilege_missing,
    read_only,
    sqlstate,
)
from eventpipe.settings import Settings


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


class PostgresSaid(Exception):
    """An error as psycopg gives it from a server's answer: its SQLSTATE, and the function
    of the server's that raised it (`diag.source_function`)."""

    def __init__(self, sqlstate: str, source_function: str) -> None:
        super().__init__(f"{sqlstate} in {source_function}")
        self.sqlstate = sqlstate
        self.diag = SimpleNamespace(source_function=source_function)


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
        # No key for an upsert's ON CONFLICT: a restore that makes the keys last.
        (wrapped(sqlalchemy.exc.ProgrammingError,
                 postgres(psycopg.errors.InvalidColumnReference)), FailureKind.TRANSIENT),
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
        # A prepared statement a pooler between lost or mixed up (`eventpipe.database`).
        (wrapped(sqlalchemy.exc.ProgrammingError,
                 postgres(psycopg.errors.InvalidSqlStatementName)), FailureKind.TRANSIENT),
        (wrapped(sqlalchemy.exc.ProgrammingError,
                 postgres(psycopg.errors.DuplicatePreparedStatement)), FailureKind.TRANSIENT),
        # A migration changed what a prepared statement returns: run unprepared on the retry.
        # Told by where the server raised it, whatever the language of its message.
        (wrapped(sqlalchemy.exc.NotSupportedError,
                 PostgresSaid("0A000", "RevalidateCachedQuery")), FailureKind.TRANSIENT),
        (wrapped(sqlalchemy.exc.NotSupportedError,
                 PostgresSaid("0A000", "transformLockingClause")), FailureKind.UNKNOWN),
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


# -- a login without a privilege (review of the CLI, finding 1) ------------------------------


def sqlite_readonly() -> sqlite3.OperationalError:
    """What SQLite raises writing a file it opened read-only (SQLITE_READONLY), as a file the
    process may not write is opened."""
    conn = sqlite3.connect("file::memory:?mode=ro", uri=True)
    try:
        conn.execute("CREATE TABLE t (x INTEGER)")
    except sqlite3.OperationalError as exc:
        return exc
    finally:
        conn.close()
    raise AssertionError("SQLite wrote a read-only database")


PRIVILEGES_MISSING = [
    wrapped(sqlalchemy.exc.ProgrammingError, postgres(
        psycopg.errors.InsufficientPrivilege, "permission denied for table dead_letters")),
    wrapped(sqlalchemy.exc.ProgrammingError, postgres(
        psycopg.errors.InsufficientPrivilege, "permission denied for schema public\n"
        "LINE 2: CREATE TABLE alembic_version (")),
    wrapped(sqlalchemy.exc.ProgrammingError, mssql(
        "42000", "The INSERT permission was denied on the object 'entities', database "
        "'events', schema 'dbo'.", 229)),
    wrapped(sqlalchemy.exc.ProgrammingError, mssql(
        "42000", "CREATE TABLE permission denied in database 'events'.", 262)),
    wrapped(sqlalchemy.exc.ProgrammingError, mssql(
        "42000", "The specified schema name \"dbo\" either does not exist or you do not have "
        "permission to use it.", 2760)),
    wrapped(sqlalchemy.exc.DBAPIError, mssql(
        "42000", "VIEW SERVER STATE permission was denied on object 'server', database "
        "'master'.", 300)),
    wrapped(sqlalchemy.exc.OperationalError, sqlite_readonly()),
]


@pytest.mark.parametrize("exc", PRIVILEGES_MISSING, ids=lambda exc: str(exc.orig)[:40])
def test_a_privilege_missing_is_the_worlds_failure(exc: BaseException) -> None:
    """The grants are at fault whichever the events: the batch waits for an operator to grant
    it, and no event is dead-lettered for it. (Before: unforeseen, so each message was
    retried alone a few times, then dead-lettered.)"""
    assert privilege_missing(exc)
    assert classify(exc) is FailureKind.TRANSIENT


def test_a_refusal_of_the_events_is_no_privilege_missing() -> None:
    """A review's finding for the row-level security policy: PostgreSQL says its refusal
    of a row under the same SQLSTATE as a missing grant, but it is the row's values, hence
    the event's, at fault: taken for the world's, its batch would wait for ever."""
    for exc in (wrapped(sqlalchemy.exc.IntegrityError, postgres(psycopg.errors.UniqueViolation)),
                wrapped(sqlalchemy.exc.ProgrammingError, postgres(
                    psycopg.errors.InsufficientPrivilege,
                    'new row violates row-level security policy for table "orders"')),
                wrapped(sqlalchemy.exc.ProgrammingError, postgres(psycopg.errors.SyntaxError)),
                wrapped(sqlalchemy.exc.ProgrammingError, mssql(
                    "42000", "Incorrect syntax near 'MERGE'.", 102)),
                wrapped(sqlalchemy.exc.OperationalError, sqlite3.OperationalError(
                    "database is locked"))):
        assert not privilege_missing(exc)


SETTINGS = Settings(database_url="postgresql+psycopg://app:hunter2@db:5432/events",
                    redis_url="redis://127.0.0.1:6379/15", kafka_topic="events",
                    kafka_bootstrap_servers="kafka:9092")


@pytest.mark.parametrize(("exc", "line"), [
    (PRIVILEGES_MISSING[0],
     "the database login at DATABASE_URL=postgresql+psycopg://app:***@db:5432/events lacks a "
     "privilege: permission denied for table dead_letters; grant it, or run `eventpipe "
     "migrate` with the migration's login"),
    (PRIVILEGES_MISSING[1],
     "the database login at DATABASE_URL=postgresql+psycopg://app:***@db:5432/events lacks a "
     "privilege: permission denied for schema public; grant it, or run `eventpipe migrate` "
     "with the migration's login"),
    # The server's words, without the ODBC driver's brackets and the error's number.
    (PRIVILEGES_MISSING[2],
     "the database login at DATABASE_URL=postgresql+psycopg://app:***@db:5432/events lacks a "
     "privilege: The INSERT permission was denied on the object 'entities', database "
     "'events', schema 'dbo'.; grant it, or run `eventpipe migrate` with the migration's "
     "login"),
])
def test_a_privilege_missing_is_one_line_naming_the_login(exc: BaseException,
                                                          line: str) -> None:
    assert explain(exc, SETTINGS) == line
    assert status_of(line) == SERVICE


def test_a_sqlite_file_this_process_may_not_write_is_one_line() -> None:
    settings = Settings(database_url="sqlite:////srv/eventpipe.db")
    line = explain(PRIVILEGES_MISSING[-1], settings)
    assert line == ("the database at DATABASE_URL=sqlite:////srv/eventpipe.db is read-only to "
                    "this process: attempt to write a readonly database; open it read-write, "
                    "as a user that may write the file and its directory")
    assert status_of(line) == SERVICE


# -- what the review found said wrongly (finding 17) -------------------------------------------


def test_redis_that_refuses_the_login_is_not_said_not_to_answer() -> None:
    said = redis.exceptions.AuthenticationError(
        "invalid username-password pair or user is disabled.")
    named = dataclasses.replace(SETTINGS, redis_url="redis://user:pw@127.0.0.1:6379/15")
    assert explain(said, named) == (
        "Redis at REDIS_URL=redis://user:***@127.0.0.1:6379/15 refuses the credentials it "
        "names: invalid username-password pair or user is disabled.")
    asked = redis.exceptions.AuthenticationError("Authentication required.")
    assert explain(asked, SETTINGS) == (
        "Redis at REDIS_URL=redis://127.0.0.1:6379/15 asks for credentials it does not name: "
        "Authentication required.")


@pytest.mark.parametrize("exc", [
    KafkaException("topic 'events' not found"),  # as `eventpipe.verify` says it
    KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART,
                              "Broker: Unknown topic or partition")),
    KafkaException(KafkaError(KafkaError._UNKNOWN_TOPIC, "Local: Unknown topic")),
])
def test_a_topic_kafka_does_not_have_names_kafka_topic(exc: KafkaException) -> None:
    line = explain(exc, SETTINGS)
    assert line == ("bad setting: KAFKA_TOPIC=events: Kafka at "
                    "KAFKA_BOOTSTRAP_SERVERS=kafka:9092 has no such topic")
    assert status_of(line) == BAD_SETTING


def test_another_topic_not_found_is_not_said_to_be_kafka_topics() -> None:
    line = explain(KafkaException("topic 'other' not found"), SETTINGS)
    assert line == "Kafka at KAFKA_BOOTSTRAP_SERVERS=kafka:9092: topic 'other' not found"


def test_a_key_of_another_kind_is_told_by_what_redis_said_not_by_the_command() -> None:
    """A pipeline's error quotes its command, and a DLQ key, which an event chose, with it."""
    wrong = redis.exceptions.ResponseError(
        "Command # 1 (XLEN dlq) of pipeline caused error: WRONGTYPE Operation against a key "
        "holding the wrong kind of value")
    assert key_of_another_kind(wrong)
    chosen = redis.exceptions.ResponseError(
        "Command # 2 (HGET dlq:index WRONGTYPE-by-an-event) of pipeline caused error: ERR "
        "unknown command")
    assert not key_of_another_kind(chosen)
