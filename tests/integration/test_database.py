"""Engines as the pipeline configures them: waits and statements are bounded, and what the
bound raises is a failure the worker retries (issue 9: no statement or lock time limits)."""

from __future__ import annotations

import fcntl
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, Engine, create_engine, event, func, select, text
from sqlalchemy.engine import make_url

from eventpipe import upserts
from eventpipe.apply import apply_batch
from eventpipe.database import WAL_PAGES, make_engine
from eventpipe.effects import Fate
from eventpipe.errors import FailureKind, classify, sqlstate
from eventpipe.keysets import Keyed, rows_in
from eventpipe.samples import Story
from eventpipe.settings import Settings
from eventpipe.tables import applied_events, orders, payments, users
from tests.support.databases import postgres_database
from tests.support.factories import received
from tests.support.pipeline import wait_until
from tests.support.services import migrate

WHEN = datetime(2026, 11, 24, 10, 15, tzinfo=UTC)


@pytest.fixture
def bounded(database_url: str) -> Iterator[Engine]:
    engine = make_engine(Settings(database_url=database_url, database_lock_timeout_s=0.3,
                                  database_statement_timeout_s=1.0))
    yield engine
    engine.dispose()


def test_a_lock_held_too_long_is_a_transient_failure(bounded: Engine) -> None:
    with bounded.begin() as conn:
        conn.execute(text("DELETE FROM inventory WHERE sku = 'lock-probe'"))
        conn.execute(text("INSERT INTO inventory (sku, quantity, updated_at) "
                          "VALUES ('lock-probe', 1, CURRENT_TIMESTAMP)"))
    holder = bounded.connect()
    try:
        with holder.begin():
            holder.execute(text("UPDATE inventory SET quantity = 2 WHERE sku = 'lock-probe'"))
            with pytest.raises(Exception) as caught, bounded.begin() as waiter:
                waiter.execute(text("UPDATE inventory SET quantity = 3 WHERE sku = 'lock-probe'"))
            assert classify(caught.value) is FailureKind.TRANSIENT, caught.value
    finally:
        holder.close()


def test_a_statement_running_too_long_is_a_transient_failure(postgresql_url: str) -> None:
    engine = make_engine(Settings(database_url=postgresql_url, database_statement_timeout_s=0.2))
    try:
        with pytest.raises(Exception) as caught, engine.connect() as conn:
            conn.execute(text("SELECT pg_sleep(5)"))
        assert classify(caught.value) is FailureKind.TRANSIENT, caught.value
    finally:
        engine.dispose()


def test_postgresql_ends_a_transaction_its_worker_left_idle_and_gives_up_on_silence(
    postgresql_url: str,
) -> None:
    """A worker frozen in a transaction (or cut off with its process alive) must not hold its
    locks for good: the server ends the transaction once it idled five times a statement's
    limit. And the client gives up on a server that answers nothing within about a minute,
    not the kernel's quarter of an hour: keepalives and a TCP user timeout are set."""
    engine = make_engine(Settings(database_url=postgresql_url, database_statement_timeout_s=0.2))
    watcher = make_engine(Settings(database_url=postgresql_url))
    try:
        idle = engine.connect()
        idle.begin()
        pid = idle.execute(text("SELECT pg_backend_pid()")).scalar_one()

        def ended() -> bool:
            with watcher.connect() as conn:
                return not conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE pid "
                                             "= :pid"), {"pid": pid}).scalar_one()

        wait_until(ended, 30, "the server to end the idle transaction")
        idle.invalidate()
        with engine.connect() as conn:
            given = conn.connection.driver_connection.info.get_parameters()  # type: ignore[union-attr]
        assert (given["keepalives"], given["tcp_user_timeout"]) == ("1", "60000")
    finally:
        engine.dispose()
        watcher.dispose()


def test_sqlite_commits_are_durable_before_they_return(sqlite_url: str) -> None:
    engine = make_engine(Settings(database_url=sqlite_url))
    try:
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA synchronous")).scalar_one() == 2  # FULL
    finally:
        engine.dispose()


@pytest.mark.parametrize(("synced", "said"), [(True, ("2", "on")), (False, ("1", "off"))])
def test_commits_wait_on_the_disk_unless_told_not_to(database_url: str, synced: bool,
                                                     said: tuple[str, str]) -> None:
    """Only the bridge's positions are written without (`eventpipe.positions`)."""
    engine = make_engine(Settings(database_url=database_url), synced=synced)
    try:
        with engine.connect() as conn:
            sqlite = engine.dialect.name == "sqlite"
            found = conn.execute(text("PRAGMA synchronous" if sqlite
                                      else "SHOW synchronous_commit")).scalar_one()
            assert str(found) == said[0 if sqlite else 1]
    finally:
        engine.dispose()


def test_sqlite_copies_its_wal_into_the_database_in_large_steps(sqlite_url: str) -> None:
    engine = make_engine(Settings(database_url=sqlite_url))
    try:
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA wal_autocheckpoint")).scalar_one() == WAL_PAGES
    finally:
        engine.dispose()


def _turn_is_free(sqlite_url: str) -> bool:
    """Whether a writer could take its turn now (`eventpipe.sqlite_turns`), asked as one."""
    with open(f"{make_url(sqlite_url).database}-writer", "ab") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(probe, fcntl.LOCK_UN)
        return True


def test_a_sqlite_writer_holds_its_turn_for_its_transaction_only(sqlite_url: str) -> None:
    """Writers take turns at SQLite's write lock on a file lock, held from their BEGIN to
    their COMMIT or ROLLBACK; readers never take it."""
    writer = make_engine(Settings(database_url=sqlite_url))
    reader = make_engine(Settings(database_url=sqlite_url), writer=False)
    try:
        with writer.begin() as conn:
            conn.execute(text("DELETE FROM inventory WHERE sku = 'turn-probe'"))
            assert not _turn_is_free(sqlite_url)
        assert _turn_is_free(sqlite_url)
        with pytest.raises(ZeroDivisionError), writer.begin():
            assert not _turn_is_free(sqlite_url)
            1 / 0  # noqa: B018 - rolled back
        assert _turn_is_free(sqlite_url)
        with reader.connect() as conn:
            conn.execute(select(applied_events.c.event_id).limit(1)).all()
            assert _turn_is_free(sqlite_url)
    finally:
        writer.dispose()
        reader.dispose()


def test_a_sqlite_writer_that_dies_in_its_turn_holds_up_no_other(sqlite_url: str) -> None:
    """The kernel drops a dead process's turn with its open files: the next writer begins."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time\n"
        "from eventpipe.database import make_engine\n"
        "from eventpipe.settings import Settings\n"
        f"engine = make_engine(Settings(database_url={sqlite_url!r}))\n"
        "conn = engine.connect()\n"
        "conn.begin()\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert not _turn_is_free(sqlite_url)
    finally:
        holder.kill()
        holder.wait()
    engine = make_engine(Settings(database_url=sqlite_url, database_lock_timeout_s=5))
    try:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM inventory WHERE sku = 'turn-probe'"))
    finally:
        engine.dispose()


def test_postgresql_plans_each_lookup_for_the_table_as_it_is_now(postgresql_url: str) -> None:
    """psycopg prepares a statement run five times, and an `executemany`'s at once, and
    PostgreSQL may then keep a generic plan made while a table was small: key lookups of a
    fast-growing table (`= ANY(keys)`) stayed sequential scans, each slower than the last.
    Neither is kept prepared (only the writes that read no table are:
    `eventpipe.database.PREPARED`)."""
    engine = make_engine(Settings(database_url=postgresql_url))
    lookup = Keyed(select(applied_events.c.event_id), applied_events.c.event_id)
    try:
        with engine.connect() as conn:
            for _ in range(10):
                lookup.rows(conn, ["a", "b"])
            conn.exec_driver_sql("SELECT %s::text WHERE false", [("a",), ("b",)])
            prepared = conn.execute(text("SELECT count(*) FROM pg_prepared_statements"))
            assert prepared.scalar_one() == 0
    finally:
        engine.dispose()


def _users(user_ids: Iterable[str]) -> list[dict[str, object]]:
    return [{"user_id": user_id, "email": "e@example.com", "name": "n", "created_at": WHEN,
             "version_at": WHEN, "version_event_id": "e", "updated_at": WHEN}
            for user_id in user_ids]


def test_keysets_on_sqlite_keep_a_key_holding_a_nul_whole(sqlite_url: str) -> None:
    """SQLite's JSON ends a string at an escaped NUL: a key holding one must not select the
    row of the key it would be cut down to."""
    engine = make_engine(Settings(database_url=sqlite_url))
    try:
        with engine.connect() as conn:  # rolled back when it closes
            conn.execute(users.insert(), _users(("nul-a", "nul-a\x00b")))
            found = rows_in(conn, select(users.c.user_id), users.c.user_id,
                            ["nul-a\x00b", "nul-c"])
            assert [row.user_id for row in found] == ["nul-a\x00b"]
    finally:
        engine.dispose()


def test_a_keyed_statement_runs_as_built_whatever_its_keys(database_url: str) -> None:
    """Built anew for each set of keys, a statement cost SQLAlchemy its expression and cache
    key at every execution, more than a small lookup (docs/performance.md): every execution
    runs the one statement built for the database, the keys its parameter, as one value or
    a chunk's list."""
    engine = make_engine(Settings(database_url=database_url))
    dialect = engine.dialect.name
    keyed = Keyed(select(users.c.user_id), users.c.user_id)
    executed: list[Any] = []
    asked = [["a"], ["b", "c"], [f"k{number}" for number in range(1200)]]
    try:
        with engine.connect() as conn:  # rolled back when it closes
            conn.execute(users.insert(), _users(
                ["b", "k7", *(["nul-a\x00b"] if dialect == "sqlite" else [])]))
            event.listen(conn, "before_execute",
                         lambda _conn, statement, *_args: executed.append(statement))
            found = [[row.user_id for row in keyed.rows(conn, keys)] for keys in asked]
            if dialect == "sqlite":  # SQLite's JSON cuts a NUL short: those go as lists
                listed = ["nul-a\x00b", *(f"l{number}" for number in range(600))]
                assert [row.user_id for row in keyed.rows(conn, listed)] == ["nul-a\x00b"]
    finally:
        engine.dispose()
    assert found == [[], ["b"], ["k7"]]
    built = keyed.built(dialect, as_one=True)
    assert all(statement is built for statement in executed[:3])
    assert all(statement is keyed.built(dialect, as_one=False) for statement in executed[3:])
    assert len(executed) == (5 if dialect == "sqlite" else 3)  # 601 keys: two chunks


_BY_USER_ID = Keyed(select(users.c.user_id), users.c.user_id)  # one statement for every example


@given(st.lists(st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]),
                        max_size=20), min_size=1, max_size=12))
@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_keysets_select_exactly_their_keys(database_url: str, keys: list[str]) -> None:
    """The keys go as one parameter, an array in PostgreSQL's text form
    (`eventpipe.pg_arrays`), a JSON array on SQLite: the rows of exactly those keys are
    selected, whatever characters the keys hold."""
    engine = make_engine(Settings(database_url=database_url))
    try:
        with engine.connect() as conn:  # rolled back when it closes
            asked = [f"k{number}:{key}" for number, key in enumerate(sorted(set(keys)))]
            conn.execute(users.insert(), _users([*asked, "not-asked"]))
            found = _BY_USER_ID.rows(conn, asked)
            assert sorted(row.user_id for row in found) == sorted(asked)
    finally:
        engine.dispose()


def _defaults_to(url: str, setting: str) -> None:
    """Give the database's sessions `setting` by default (`ALTER DATABASE … SET`)."""
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f"ALTER DATABASE \"{make_url(url).database}\" SET {setting}"))
    finally:
        admin.dispose()


@pytest.mark.parametrize("setting", ["timezone TO 'Europe/Paris'", "datestyle TO 'SQL, DMY'"])
def test_postgresql_reads_times_at_the_calendar_s_edges_whatever_the_server_s_settings(
        setting: str) -> None:
    """Before: the session kept the server's zone, and psycopg gives times in it. In
    Europe/Paris a time stored as 9999-12-31T23:59:59Z (which the contract accepts) read as
    a year past 9999 and failed every read of its row: the API, `verify`, the reconciler.
    So did every time under a date style other than ISO (a hostile test's finding: psycopg
    reads no other), while `/ready` said ready."""
    with postgres_database() as url:
        migrate(url, "head")
        _defaults_to(url, setting)
        engine = make_engine(Settings(database_url=url))
        edge = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
        try:
            with engine.begin() as conn:
                conn.execute(users.insert(), [{**_users(["u-edge"])[0], "created_at": edge,
                                               "version_at": edge}])
            with engine.connect() as conn:
                row = conn.execute(select(users.c.created_at, users.c.version_at)).one()
            assert row == (edge, edge)
        finally:
            engine.dispose()


def test_postgresql_takes_any_text_whatever_the_database_s_client_encoding() -> None:
    """A hostile test's kin: a database whose sessions default to another client encoding
    (`ALTER DATABASE … SET client_encoding TO 'LATIN1'`) refused every name, email or id
    beyond it, as values the database cannot hold."""
    with postgres_database() as url:
        _defaults_to(url, "client_encoding TO 'LATIN1'")
        engine = make_engine(Settings(database_url=url))
        try:
            with engine.connect() as conn:
                assert conn.execute(text("SELECT :t"), {"t": "é 😀 中"}).scalar_one() == "é 😀 中"
        finally:
            engine.dispose()


@pytest.mark.parametrize(("statement_s", "lock_s", "said"), [
    # Before: the idle limit, five times the statement's, past PostgreSQL's bound (2**31 - 1
    # ms) refused every connection (an adversarial review's finding).
    (2_000_000.0, 20.0, ("2000000s", "20s", "2147483647ms")),
    # Before: a limit under half a millisecond was 0 ms, which is none at all.
    (60.0, 0.0004, ("1min", "1ms", "5min")), (60.0, 1e-10, ("1min", "1ms", "5min")),
    (0.0, 0.0, ("0", "0", "0")),
])
def test_postgresql_is_given_the_timeouts_as_it_can_take_them(
    postgresql_url: str, statement_s: float, lock_s: float, said: tuple[str, str, str],
) -> None:
    engine = make_engine(Settings(database_url=postgresql_url,
                                  database_statement_timeout_s=statement_s,
                                  database_lock_timeout_s=lock_s))
    try:
        with engine.connect() as conn:
            assert tuple(conn.execute(text(f"SHOW {name}")).scalar_one() for name in (
                "statement_timeout", "lock_timeout",
                "idle_in_transaction_session_timeout")) == said
    finally:
        engine.dispose()


@pytest.mark.parametrize(("statement_s", "lock_s", "said"), [
    (60.0, 20.0, (60, "SET LOCK_TIMEOUT 20000")),
    # Before: a statement limit under half a second was 0 s there, which is none at all.
    (0.3, 0.0004, (1, "SET LOCK_TIMEOUT 1")),
    (0.0, 0.0, (0, "SET LOCK_TIMEOUT -1")),
])
def test_sql_server_is_given_the_timeouts_as_it_can_take_them(
    statement_s: float, lock_s: float, said: tuple[int, str],
) -> None:
    engine = make_engine(Settings(
        database_url="mssql+pyodbc://sa:pw@127.0.0.1:1/x?driver=FreeTDS",
        database_statement_timeout_s=statement_s, database_lock_timeout_s=lock_s))
    executed: list[str] = []

    class Connection:  # pyodbc's, as the engine's connect listener sees it
        timeout = -1

        def cursor(self) -> Any:
            return SimpleNamespace(execute=executed.append, close=lambda: None)

    made = Connection()
    for listener in engine.pool.dispatch.connect:  # this project's, not the dialect's own
        if listener.__module__ == "eventpipe.database":
            listener(made, None)
    assert (made.timeout, executed) == (said[0], [said[1]])


def test_a_brief_engine_waits_on_postgresql_for_seconds_not_a_minute(postgresql_url: str) -> None:
    """The bridge's: its loop sends every partition's batches while the database is silent."""
    engine = make_engine(Settings(database_url=postgresql_url), brief=True)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "5s"
            driver = conn.connection.driver_connection
            assert driver is not None
            said = driver.info.get_parameters()  # libpq's own
            assert (said["connect_timeout"], said["tcp_user_timeout"]) == ("5", "5000")
    finally:
        engine.dispose()


def test_writes_refused_by_a_standby_are_retried_on_new_connections(postgresql_url: str) -> None:
    """A failover that left the pool's connections on the old primary, a standby now (or a
    DNS name not moved yet): each write there fails with "cannot execute INSERT in a read-only
    transaction", and each of those connections passes the pool's ping. The failure is the
    world's, and the pool makes new connections, which reach the new primary. (Before: an
    unforeseen error, so the events were retried alone a few times and then dead-lettered,
    while the pool kept its connections to the standby.)"""
    engine = make_engine(Settings(database_url=postgresql_url))
    standby = [True]  # where a new connection lands: the standby until the failover is over

    @event.listens_for(engine, "connect")
    def _land(dbapi_connection: Any, _record: Any) -> None:
        if standby[0]:
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            dbapi_connection.commit()

    write = users.delete().where(users.c.user_id == "standby-probe")
    try:
        with pytest.raises(Exception) as caught, engine.begin() as conn:
            conn.execute(write)
        assert classify(caught.value) is FailureKind.TRANSIENT, caught.value
        standby[0] = False  # the failover is over: the name now leads to the new primary
        with engine.begin() as conn:
            conn.execute(write)
    finally:
        engine.dispose()


def test_a_connection_whose_prepared_statements_the_server_lost_prepares_no_more(
        caplog: pytest.LogCaptureFixture) -> None:
    """A pooler between the pipeline and PostgreSQL that does not keep prepared statements
    (PgBouncer in transaction mode before 1.22) hands a statement prepared on one server
    connection to another, which does not know it. The batch fails as the world's failure
    and is retried; the connection prepares nothing more, so the retry is applied, and a
    warning says why. (Here the server forgets the connection's statements behind psycopg's
    back.)"""
    story = Story(seed=5)
    with _new_database() as engine:
        apply_batch(engine, received(*(story.next() for _ in range(20))))
        with engine.begin() as conn:
            assert _prepared_statements(conn) > 0
            conn.execute(text("DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; END $$"))
        batch = received(*(story.next() for _ in range(20)))
        with pytest.raises(Exception) as caught:
            apply_batch(engine, batch)
        assert classify(caught.value) is FailureKind.TRANSIENT, caught.value
        apply_batch(engine, batch)
        apply_batch(engine, received(*(story.next() for _ in range(20))))
        with engine.begin() as conn:
            prepared = _prepared_statements(conn)
            recorded = conn.execute(select(func.count()).select_from(applied_events)
                                    ).scalar_one()
    assert (prepared, recorded) == (0, 60)
    assert [record.message for record in caplog.records if "prepared" in record.message] == [
        "PostgreSQL could not run a prepared statement of this connection (SQLSTATE 26000: a "
        "connection pooler in transaction mode does not keep them); this connection prepares "
        "no more statements"]


def test_behind_a_pooler_that_mixes_up_clients_each_writes_its_own_rows() -> None:
    """A pooler in transaction mode that does not keep each client's prepared statements
    apart (PgBouncer before 1.22, or without max_prepared_statements) gives a client's
    transaction whichever server connection is free. Simulated: two server connections, and
    two clients' records of what they prepared (psycopg's), each put on the server connection
    its transaction runs on. A client's statements have names of their own, so what runs is
    its own statement or none: an order written where another client prepared a payment is
    refused as the world's failure, and written as an order on the retry. (Before: psycopg
    named both clients' first statements `_pg3_0`: the order's write ran the payment's
    statement, its row into payments, and the batch failed on the unforeseen result.)"""
    when = datetime.now(UTC)

    def write(server: Connection, client: Any, table: Any, row: dict[str, Any]) -> None:
        _driver(server)._prepared = client
        with server.begin():
            upserts.write_entities(server, {table: [row]}, [], when)

    with _new_database(connections=2) as engine, engine.connect() as first, \
            engine.connect() as second:
        # Each client's record, as its connection made it.
        clients = [_driver(connection)._prepared for connection in (first, second)]
        write(first, clients[0], orders, _order("o1", when))
        write(second, clients[1], payments, _payment("p1", when))
        with pytest.raises(Exception) as caught:
            write(second, clients[0], orders, _order("o2", when))
        assert classify(caught.value) is FailureKind.TRANSIENT, caught.value
        write(second, clients[0], orders, _order("o2", when))
        with first.begin():
            written = {table.name: set(first.execute(select(table.c[0])).scalars())
                       for table in (orders, payments)}
    assert written == {"orders": {"o1", "o2"}, "payments": {"p1"}}


def _driver(connection: Connection) -> Any:
    return connection.connection.driver_connection


def _order(order_id: str, when: datetime) -> dict[str, Any]:
    return {"order_id": order_id, "user_id": "u1", "total_amount": Decimal("9.99"),
            "currency": "EUR", "placed_at": when, "version_at": when,
            "version_event_id": f"ev-{order_id}", "updated_at": when}


def _payment(payment_id: str, when: datetime) -> dict[str, Any]:
    return {"payment_id": payment_id, "order_id": "o1", "amount": Decimal("9.99"),
            "currency": "EUR", "settled_at": when, "version_at": when,
            "version_event_id": f"ev-{payment_id}", "updated_at": when}


@pytest.mark.parametrize("setting", ["on", "off"])
def test_prepared_statements_can_be_turned_off(setting: str) -> None:
    """DATABASE_PREPARED_STATEMENTS=off (behind a pooler that does not keep them): nothing is
    prepared."""
    story = Story(seed=6)
    with _new_database(database_prepared_statements=setting) as engine:
        apply_batch(engine, received(*(story.next() for _ in range(20))))
        with engine.begin() as conn:
            prepared = _prepared_statements(conn)
    assert (prepared > 0) == (setting == "on")


@contextmanager
def _new_database(connections: int = 1, **settings: Any) -> Iterator[Engine]:
    """An engine on a database of its own, migrated, with that many connections (one: every
    batch takes the connection its prepared statements are on)."""
    with postgres_database() as url:
        migrate(url, "head")
        engine = make_engine(Settings(database_url=url, database_pool_size=connections,
                                      database_max_overflow=0, **settings))
        try:
            yield engine
        finally:
            engine.dispose()


def _prepared_statements(conn: Connection) -> int:
    return int(conn.execute(text("SELECT count(*) FROM pg_prepared_statements")).scalar_one())


def test_a_migration_that_changes_what_a_prepared_write_returns_is_retried(
        caplog: pytest.LogCaptureFixture) -> None:
    """A migration run while workers apply batches may change the type of a column a
    prepared write returns (the entity's key): PostgreSQL refuses the statement as prepared
    ("cached plan must not change result type"). That is the world's failure, not the
    events': the retry runs it unprepared, on a connection that prepares nothing more (a
    pooler keeping prepared statements would answer from its own again). (Before: an
    unforeseen error, so the batch's events were retried alone and could be
    dead-lettered.)"""
    story = Story(seed=7)
    with _new_database() as engine:
        apply_batch(engine, received(*(story.next() for _ in range(20))))
        migration = create_engine(engine.url)  # another process's connection
        try:
            with migration.begin() as conn:
                conn.execute(text("ALTER TABLE users ALTER COLUMN user_id TYPE varchar(300)"))
        finally:
            migration.dispose()
        batch = received(*(story.next() for _ in range(40)))
        with pytest.raises(Exception) as caught:
            apply_batch(engine, batch)
        assert classify(caught.value) is FailureKind.TRANSIENT, caught.value
        assert Fate.APPLIED in apply_batch(engine, batch).fates
        with engine.begin() as conn:
            prepared = _prepared_statements(conn)
    assert sqlstate(getattr(caught.value, "orig", None) or caught.value) == "0A000"
    assert prepared == 0
    assert [record.message for record in caplog.records if "prepared" in record.message] == [
        "PostgreSQL could not run a prepared statement of this connection (SQLSTATE 0A000: a "
        "migration changed what it returns); this connection prepares no more statements"]
