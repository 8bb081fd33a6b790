"""What an operator sees when the services answer but refuse: a database login short of a
privilege, Redis refusing the credentials, a setting naming what the service does not have.
One line naming the setting to fix, and a distinct exit status, never a traceback."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from cli.errors import explain
from eventpipe.dlq.stream import DeadLetterStream
from eventpipe.errors import KEY_OF_ANOTHER_KIND
from eventpipe.settings import Settings
from tests.support.databases import postgres_database
from tests.support.pipeline import BIN
from tests.support.services import REDIS_URL, migrate, require_postgres

# The one Redis database these tests use, and keys of their own in it.
REDIS_DB = f"{REDIS_URL}/15"
PREFIX = "eventpipe_test_priv"


def eventpipe(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "EVENTPIPE_ENV_FILE": "/nonexistent",
                   "DATABASE_URL": f"sqlite:///{tmp_path / 'never-migrated.db'}",
                   "REDIS_URL": REDIS_DB, "CELERY_BROKER_URL": REDIS_DB,
                   "DLQ_STREAM": f"{PREFIX}:{uuid.uuid4().hex}:dlq",
                   "KAFKA_GROUP_ID": f"{PREFIX}-{uuid.uuid4().hex}", **env}
    return subprocess.run([str(BIN / "eventpipe"), *args], env=environment, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


def said(done: subprocess.CompletedProcess[str]) -> list[str]:
    """What a command said on stderr, but for the JSON log lines of its own logging."""
    return [line for line in done.stderr.strip().splitlines() if not line.startswith("{")]


@pytest.fixture(scope="module")
def weak_role() -> Iterator[str]:
    """A plain LOGIN role: PostgreSQL 15 gives it no CREATE on `public`, nor any grant on the
    tables the migration made."""
    name = f"{PREFIX}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(require_postgres(), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE ROLE "{name}" LOGIN'))
        yield name
        with admin.connect() as conn:
            conn.execute(text(f'DROP ROLE "{name}"'))
    finally:
        admin.dispose()


def as_role(url: str, role: str, password: str = "s3cret") -> str:
    """`url` with another login; the server trusts it, and the password must stay out of
    every line all the same."""
    return make_url(url).set(username=role, password=password).render_as_string(
        hide_password=False)


@pytest.fixture(scope="module")
def migrated(weak_role: str) -> Iterator[str]:
    """A database the migration's login made, on which `weak_role` may connect and see the
    schema, but holds no grant on a table (the app's login, before anyone granted it)."""
    with postgres_database(PREFIX) as url:
        migrate(url)
        engine = create_engine(url)
        try:
            with engine.begin() as conn:
                conn.execute(text(f'GRANT USAGE ON SCHEMA public TO "{weak_role}"'))
        finally:
            engine.dispose()
        yield url


@pytest.mark.parametrize(("args", "table"), [
    (["migrate"], "alembic_version"),
    (["status"], "dead_letters"),
    (["trace", "e-1", "--no-kafka"], "applied_events"),
    (["dlq", "purge", "--all", "--yes"], "dead_letters"),
])
def test_a_login_without_a_grant_on_the_tables_is_one_line(
        tmp_path: Path, weak_role: str, migrated: str, args: list[str], table: str) -> None:
    url = as_role(migrated, weak_role)
    done = eventpipe(tmp_path, *args, DATABASE_URL=url)
    assert done.returncode == 3, done.stderr
    assert said(done)[-1] == (
        f"eventpipe: the database login at DATABASE_URL={url.replace('s3cret', '***')} lacks "
        f"a privilege: permission denied for table {table}; grant it, or run `eventpipe "
        "migrate` with the migration's login")
    assert "Traceback" not in done.stderr and "s3cret" not in done.stderr


def test_migrate_with_a_login_that_may_not_create_the_schema_is_one_line(
        tmp_path: Path, weak_role: str) -> None:
    with postgres_database(PREFIX) as empty:
        url = as_role(empty, weak_role)
        done = eventpipe(tmp_path, "migrate", DATABASE_URL=url)
    assert done.returncode == 3, done.stderr
    assert said(done) == [
        f"eventpipe: the database login at DATABASE_URL={url.replace('s3cret', '***')} lacks "
        "a privilege: permission denied for schema public; grant it, or run `eventpipe "
        "migrate` with the migration's login"]


def test_migrate_with_a_login_that_may_not_create_the_database_is_one_line(
        tmp_path: Path, weak_role: str) -> None:
    """`eventpipe migrate` makes the database DATABASE_URL names when it is missing."""
    missing = make_url(require_postgres()).set(database=f"{PREFIX}_{uuid.uuid4().hex[:10]}")
    url = as_role(missing.render_as_string(hide_password=False), weak_role)
    done = eventpipe(tmp_path, "migrate", DATABASE_URL=url)
    assert done.returncode == 3, done.stderr
    assert said(done) == [
        f"eventpipe: the database login at DATABASE_URL={url.replace('s3cret', '***')} lacks "
        "a privilege: permission denied to create database; grant it, or run `eventpipe "
        "migrate` with the migration's login"]


def test_a_sqlite_database_this_process_may_not_write_is_one_line(tmp_path: Path) -> None:
    """Opened read-only, as a file the user may not write is: SQLITE_READONLY."""
    conn = sqlite3.connect(tmp_path / "ro.db")
    conn.execute("CREATE TABLE another_programs (x INTEGER)")
    conn.commit()
    conn.close()
    url = f"sqlite:///file:{tmp_path / 'ro.db'}?mode=ro&uri=true"
    done = eventpipe(tmp_path, "migrate", DATABASE_URL=url)
    assert done.returncode == 3, done.stderr
    [line] = said(done)
    assert line.startswith("eventpipe: the database at DATABASE_URL=sqlite:///")
    assert line.endswith(" is read-only to this process: attempt to write a readonly "
                         "database; open it read-write, as a user that may write the file and "
                         "its directory")


def test_redis_that_refuses_the_credentials_says_so(tmp_path: Path) -> None:
    """It answered: not "does not answer"."""
    url = "redis://nosuchuser:s3cret@127.0.0.1:6379/15"
    done = eventpipe(tmp_path, "dlq", "list", REDIS_URL=url)
    assert done.returncode == 3, done.stderr
    assert said(done) == [
        "eventpipe: Redis at REDIS_URL=redis://nosuchuser:***@127.0.0.1:6379/15 refuses the "
        "credentials it names: invalid username-password pair or user is disabled."]


def test_verify_names_kafka_topic_for_a_topic_kafka_does_not_have(
        tmp_path: Path, kafka_broker: str) -> None:
    topic = f"{PREFIX}-none-{uuid.uuid4().hex[:10]}"
    done = eventpipe(tmp_path, "verify", KAFKA_BOOTSTRAP_SERVERS=kafka_broker,
                     KAFKA_TOPIC=topic, KAFKA_PARTITIONS="2")
    assert done.returncode == 2, done.stderr
    assert said(done) == [
        f"eventpipe: bad setting: KAFKA_TOPIC={topic}: Kafka at "
        f"KAFKA_BOOTSTRAP_SERVERS={kafka_broker} has no such topic"]


def test_status_names_a_broker_database_the_redis_server_does_not_have(tmp_path: Path) -> None:
    """As the other commands say it, not as a broker that does not answer; the URL, which
    `GET /status` would show anyone, stays out."""
    database = tmp_path / "eventpipe.db"
    migrate(f"sqlite:///{database}")
    done = eventpipe(tmp_path, "status", "--json", DATABASE_URL=f"sqlite:///{database}",
                     CELERY_BROKER_URL="redis://:s3cret@127.0.0.1:6379/99")
    assert "Traceback" not in done.stderr
    problems = json.loads(done.stdout)["problems"]
    assert problems[0] == (
        "CELERY_BROKER_URL: the Redis server there has no database 99 (a server has 16, 0 to "
        "15, unless its `databases` setting says more): queue depths are the bridge's last "
        "measure")
    assert "s3cret" not in done.stdout


def test_the_dlq_stream_of_another_kind_is_one_line_once_read(tmp_path: Path) -> None:
    """As `eventpipe verify` says it, as the other commands do: it reads the stream itself
    first (before, only its index, and reported differences instead)."""
    key = f"{PREFIX}:{uuid.uuid4().hex}:dlq"
    client = redis.Redis.from_url(REDIS_DB)
    client.set(key, "another program's value")
    try:
        settings = Settings(redis_url=REDIS_DB, dlq_stream=key, kafka_group_id="g")
        stream = DeadLetterStream(client, key, settings.dlq_max_entries,
                                  settings.dlq_max_bytes)
        with pytest.raises(redis.ResponseError) as raised:
            stream.sizes()
        assert explain(raised.value, settings) == (
            f"{KEY_OF_ANOTHER_KIND} (DLQ_STREAM={key}, KAFKA_GROUP_ID=g at REDIS_URL={REDIS_DB})")
    finally:
        client.delete(key)
        client.close()
