"""Alembic owns the schema: head matches the tables, base..head..base round-trips, and the
scripts travel in the wheel."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, select, text
from sqlalchemy.engine import make_url

from eventpipe import positions
from eventpipe.migrations import alembic_config
from eventpipe.tables import applied_events, kafka_positions, metadata
from launcher.embedded import free_port
from tests.support.databases import drop_database, postgres_database
from tests.unit.test_packaging import ROOT, TOP_LEVEL

TABLES = {"users", "orders", "order_items", "payments", "inventory", "applied_events"}


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrate.db'}"
        return
    with postgres_database("eventpipe_migrate") as url:
        yield url


def test_upgrade_matches_the_tables_and_downgrade_removes_them(empty_database: str) -> None:
    config = alembic_config(empty_database)
    command.upgrade(config, "head")
    engine = create_engine(empty_database)
    try:
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) >= TABLES
            differences = compare_metadata(MigrationContext.configure(conn), metadata)
            assert differences == []
        command.downgrade(config, "base")
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
        command.upgrade(config, "head")
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) >= TABLES
    finally:
        engine.dispose()


def test_eventpipe_migrate_works_from_an_installed_wheel(tmp_path: Path) -> None:
    """Built and installed apart from the checkout, the package migrates a database with the
    scripts it carries."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "alembic", *TOP_LEVEL):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", "dist", "."],
                   cwd=source, check=True)
    [wheel] = (source / "dist").glob("eventpipe-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    database = tmp_path / "installed.db"
    env = {**os.environ, "PYTHONPATH": str(site), "DATABASE_URL": f"sqlite:///{database}",
           "EVENTPIPE_ENV_FILE": "/nonexistent", "LOG_LEVEL": "WARNING"}
    run = subprocess.run(
        [sys.executable, "-c", "import sys, cli.main, eventpipe.migrations as m; "
         "print(m.scripts()); sys.exit(cli.main.main(['migrate']))"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == str(site / "eventpipe" / "alembic")
    engine = create_engine(f"sqlite:///{database}")
    try:
        with engine.connect() as conn:
            revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            assert revision == ScriptDirectory.from_config(alembic_config("sqlite://")) \
                .get_current_head()
            assert conn.execute(text("SELECT count(*) FROM applied_events")).scalar() == 0
    finally:
        engine.dispose()


def test_migrate_is_not_held_to_the_pipelines_statement_timeout(tmp_path: Path) -> None:
    """A migration may rebuild an index of a table of millions of rows: the time a batch's
    statement may take is not a migration's. (Before: cancelled at DATABASE_STATEMENT_TIMEOUT_S,
    the error naming the database as unusable.)"""
    with postgres_database("eventpipe_migrate") as url:
        done = subprocess.run(
            [str(Path(sys.executable).parent / "eventpipe"), "migrate"], cwd=tmp_path,
            env={**os.environ, "EVENTPIPE_ENV_FILE": "/nonexistent", "DATABASE_URL": url,
                 "DATABASE_STATEMENT_TIMEOUT_S": "0.001"},
            capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                assert set(inspect(conn).get_table_names()) >= TABLES
        finally:
            engine.dispose()


def test_a_database_made_with_positions_is_marked_so_and_one_with_fates_is_not(
        empty_database: str) -> None:
    """Migration 0005 marks a database that holds no fate yet: there, a partition with no
    position holds nothing (`eventpipe.positions.rewinds`). One upgraded with fates in it is
    not: its positions start with the bridge's first commits."""
    config = alembic_config(empty_database)
    command.upgrade(config, "head")
    engine = create_engine(empty_database)
    marked = select(kafka_positions.c.kafka_topic, kafka_positions.c.kafka_partition)
    try:
        with engine.begin() as conn:
            assert [tuple(row) for row in conn.execute(marked)] == [
                positions.MADE_WITH_POSITIONS]
        command.downgrade(config, "0004")
        with engine.begin() as conn:
            now = datetime.now(UTC)
            conn.execute(applied_events.insert().values(
                event_id="e-1", event_type="UserCreated", outcome="applied", occurred_at=now,
                applied_at=now))
        command.upgrade(config, "head")
        with engine.begin() as conn:
            assert conn.execute(marked).all() == []
    finally:
        engine.dispose()


EVENTPIPE = Path(sys.executable).parent / "eventpipe"


def test_migrate_says_in_one_line_that_var_cannot_be_made(tmp_path: Path) -> None:
    """A review's finding: with a file named `var` where the default SQLite database's
    directory goes (or a read-only working directory), a traceback."""
    (tmp_path / "var").write_text("not a directory")
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    done = subprocess.run([str(EVENTPIPE), "migrate"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={**env, "EVENTPIPE_ENV_FILE": "/nonexistent"})
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"eventpipe: bad setting: DATABASE_URL=sqlite:///var/eventpipe.db: "
                           f"cannot create the directory {tmp_path / 'var'}: "), line
    assert line.endswith("run from a writable directory or set DATABASE_URL"), line


def test_migrate_gives_up_on_a_postgresql_that_answers_nothing_as_soon_as_other_commands(
        tmp_path: Path) -> None:
    """A review's finding: creating the database if missing waited for psycopg's own timeout,
    130 s, where every other command gives up after DATABASE_URL's connect_timeout (10 s)."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # never accepts: never answers
        url = f"postgresql+psycopg://postgres@127.0.0.1:{silent.getsockname()[1]}/silent"
        started = time.monotonic()
        try:
            done = subprocess.run(
                [str(EVENTPIPE), "migrate"], cwd=tmp_path, capture_output=True, text=True,
                timeout=30, env={**os.environ, "EVENTPIPE_ENV_FILE": "/nonexistent",
                                 "DATABASE_URL": url})
        except subprocess.TimeoutExpired:
            pytest.fail("no answer within 30 s")
    assert time.monotonic() - started < 30
    assert done.returncode == 3, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"eventpipe: the database at DATABASE_URL={url} cannot be used: "), \
        line


def _migrate(url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EVENTPIPE), "migrate"], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "EVENTPIPE_ENV_FILE": "/nonexistent",
                                           "DATABASE_URL": url})


def _versions(url: str, *revisions: str) -> None:
    """The version table holds `revisions`, as a release that has them would leave it."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM alembic_version"))
            for revision in revisions:
                conn.execute(text("INSERT INTO alembic_version VALUES (:r)"), {"r": revision})
    finally:
        engine.dispose()


def test_migrate_on_a_database_a_newer_release_migrated_says_so_in_one_line(
        empty_database: str, tmp_path: Path) -> None:
    """A review's finding: an older release's migration run after a rollback gave Alembic's
    "Can't locate revision" with a traceback."""
    assert _migrate(empty_database, tmp_path).returncode == 0
    _versions(empty_database, "0099")
    done = _migrate(empty_database, tmp_path)
    assert done.returncode == 2, done.stderr
    head = ScriptDirectory.from_config(alembic_config(empty_database)).get_current_head()
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("eventpipe: the database at DATABASE_URL=") and line.endswith(
        f" is at revision 0099, newer than this release knows (its head is {head}): nothing "
        "to migrate; migrate it with the release that made it"), line


def test_migrate_says_alembics_refusal_in_one_line(empty_database: str, tmp_path: Path) -> None:
    assert _migrate(empty_database, tmp_path).returncode == 0
    head = ScriptDirectory.from_config(alembic_config(empty_database)).get_current_head()
    assert head is not None
    _versions(empty_database, head, "0003")  # two heads, one the other's ancestor
    done = _migrate(empty_database, tmp_path)
    assert done.returncode == 2, done.stderr
    # Before it, only Alembic's log records of its set-up (JSON lines: not a terminal).
    *logged, line = done.stderr.strip().splitlines()
    assert all(json.loads(record)["logger"].startswith("alembic.") for record in logged)
    assert line.startswith("eventpipe: the database at DATABASE_URL=") and line.endswith(
        f" cannot be migrated: Requested revision {head} overlaps with other requested "
        "revisions 0003"), line


def test_up_on_a_database_a_newer_release_migrated_says_so_in_one_line(tmp_path: Path) -> None:
    """As `eventpipe migrate` does (a review's finding: `eventpipe up` gave Alembic's traceback)."""
    url = f"sqlite:///{tmp_path / 'newer.db'}"
    assert _migrate(url, tmp_path).returncode == 0
    _versions(url, "0099")
    ports = {name: str(free_port()) for name in ("WEB_PORT", "FLOWER_PORT",
                                                  "BRIDGE_METRICS_PORT", "WORKER_METRICS_PORT")}
    done = subprocess.run([str(EVENTPIPE), "up"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **ports, "DATABASE_URL": url,
                                            "EVENTPIPE_ENV_FILE": "/nonexistent"})
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"eventpipe: bad setting: DATABASE_URL={url}: the database is at "
                           "revision 0099, newer than this release knows"), done.stderr
    assert "Traceback" not in done.stderr


def test_migrate_makes_a_database_named_by_libpqs_dbname_parameter(tmp_path: Path) -> None:
    """A review's finding: such a URL is taken as naming its database, as libpq reads it, but
    `migrate` looked only at its path, and failed where the path form makes the database."""
    with postgres_database("eventpipe_dbname") as made:
        name = make_url(made).database
    # Dropped again by the block: made anew by `migrate`, then dropped by hand.
    rendered = make_url(made)._replace(database=None).update_query_dict(
        {"dbname": str(name)}).render_as_string(hide_password=False)
    assert "?dbname=" in rendered and make_url(rendered).database is None
    try:
        done = _migrate(rendered, tmp_path)
        assert done.returncode == 0, done.stderr
        engine = create_engine(rendered)
        try:
            with engine.connect() as conn:
                assert conn.execute(text("SELECT current_database()")).scalar_one() == name
                assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar_one()
        finally:
            engine.dispose()
    finally:
        drop_database(made)
