"""How `eventpipe` ends when its output cannot be written (a pipe its reader closed, standard
output closed), and the arguments and settings it refuses before doing anything: one line
and a distinct exit status, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.support.pipeline import BIN
from tests.support.services import REDIS_URL, migrate

# A shell's status for a process that SIGPIPE ended: 128 + 13.
SIGPIPE_STATUS = 141


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def environment(tmp_path: Path, **env: str) -> dict[str, str]:
    return {**os.environ, "EVENTPIPE_ENV_FILE": "/nonexistent",
            "DATABASE_URL": f"sqlite:///{tmp_path / 'never-migrated.db'}",
            "REDIS_URL": REDIS_URL, "DLQ_STREAM": f"pipes-{uuid.uuid4().hex[:8]}:dlq", **env}


def eventpipe(tmp_path: Path, *args: str | bytes, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "eventpipe"), *args], env=environment(tmp_path, **env),
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)


def into_a_closed_pipe(tmp_path: Path, *args: str, **env: str) -> tuple[int, str]:
    """Run with standard output a pipe whose reader has gone (`| head` after its line): the
    exit status and what was said on stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([str(BIN / "eventpipe"), *args], env=environment(tmp_path, **env),
                              cwd=tmp_path, stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write_end)
    return done.returncode, done.stderr


@pytest.fixture
def migrated_sqlite(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'eventpipe.db'}"
    migrate(url)
    return url


def test_output_into_a_pipe_its_reader_closed_ends_quietly_with_sigpipes_status(
        tmp_path: Path, migrated_sqlite: str) -> None:
    status, said = into_a_closed_pipe(tmp_path, "trace", "e-1", "--no-kafka",
                                      DATABASE_URL=migrated_sqlite)
    assert (status, said) == (SIGPIPE_STATUS, "")


def test_generate_into_a_pipe_its_reader_closed_ends_quietly(
        tmp_path: Path, kafka_broker: str) -> None:
    status, said = into_a_closed_pipe(
        tmp_path, "produce", "generate", "--count", "50", "--seed", "1",
        KAFKA_BOOTSTRAP_SERVERS=kafka_broker, KAFKA_TOPIC=f"pipes-{uuid.uuid4().hex[:8]}",
        KAFKA_PARTITIONS="2")
    assert (status, said) == (SIGPIPE_STATUS, "")


@pytest.mark.parametrize("args", [["status"], ["dlq", "list"]])
def test_a_command_with_standard_output_closed_says_so_and_does_nothing(
        tmp_path: Path, args: list[str]) -> None:
    done = subprocess.run(["bash", "-c", 'exec "$@" >&-', "bash", str(BIN / "eventpipe"),
                           *args], env=environment(tmp_path), cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (2, "eventpipe: standard output is closed\n")


@pytest.mark.parametrize(("url", "says"), [
    # libpq would take the database named after the login. (Nothing listens on port 1: were
    # the URL taken, no server's database would get the tables.)
    ("postgresql+psycopg://postgres@127.0.0.1:1/",
     "eventpipe: bad setting: DATABASE_URL names no database: name it after the host"),
    ("postgresql+psycopg://postgres:s3cret@127.0.0.1:1",
     "eventpipe: bad setting: DATABASE_URL names no database: name it after the host"),
    ("sqlite:///:memory:", "eventpipe: bad setting: DATABASE_URL=sqlite:///:memory: is a "
                           "database in memory, gone when the process ends"),
    ("sqlite://", "eventpipe: bad setting: DATABASE_URL=sqlite:// is a database in memory"),
])
def test_migrate_refuses_a_database_url_that_names_no_lasting_database(
        tmp_path: Path, url: str, says: str) -> None:
    done = eventpipe(tmp_path, "migrate", DATABASE_URL=url)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(says), done.stderr
    assert "s3cret" not in done.stderr


@pytest.mark.parametrize(("args", "says"), [
    ([b"trace", b"\xff\xfe"], "argument event_id: not UTF-8 text"),
    ([b"dlq", b"list", b"--event-type", b"\xff"], "argument --event-type: not UTF-8 text"),
    (["dlq", "list", "--since", "notatime"],
     "argument --since: 'notatime' is not an ISO-8601 time such as 2026-01-31T12:00:00Z"),
    (["dlq", "list", "--event-type", ""], "argument --event-type: empty: name a value"),
    (["dlq", "list", "--error-class", ""], "argument --error-class: empty: name a value"),
    (["dlq", "replay", "--event-type", ""], "argument --event-type: empty: name a value"),
])
def test_arguments_no_command_can_use_are_refused_by_the_parser(
        tmp_path: Path, args: list[str | bytes], says: str) -> None:
    done = eventpipe(tmp_path, *args)
    assert done.returncode == 2, done.stderr
    assert says in done.stderr.splitlines()[-1], done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("args", "says"), [
    (["--partitions", "0", "--processes", "2"],
     "eventpipe worker: --processes 2: more than the 1 partition(s) given to serve"),
    (["--processes", "5"],
     "eventpipe worker: --processes 5: more than the topic's 4 partition(s) (KAFKA_PARTITIONS)"),
])
def test_worker_refuses_more_processes_than_partitions_they_would_serve(
        tmp_path: Path, args: list[str], says: str) -> None:
    # Its own metrics port, should a process start after all.
    done = eventpipe(tmp_path, "worker", *args, KAFKA_PARTITIONS="4",
                     WORKER_METRICS_PORT=str(free_port()))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(says), done.stderr

