"""What an operator sees when a command meets a service it cannot use or a bad setting: one
line naming the setting or the command that fixes it, and a distinct exit status."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support.pipeline import BIN


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def eventpipe(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "EVENTPIPE_ENV_FILE": "/nonexistent",
                   "DATABASE_URL": f"sqlite:///{tmp_path / 'never-migrated.db'}", **env}
    return subprocess.run([str(BIN / "eventpipe"), *args], env=environment, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "env", "status", "says"),
    [
        (["dlq", "list"], {"REDIS_URL": "redis://127.0.0.1:{port}/0"}, 3,
         "eventpipe: Redis does not answer at REDIS_URL=redis://127.0.0.1:{port}/0"),
        (["trace", "e-1", "--no-kafka"], {}, 3, "has no schema yet: run `eventpipe migrate`"),
        (["trace", "e-1", "--no-kafka"],
         {"DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:{port}/x"}, 3,
         "eventpipe: the database at DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:"
         "{port}/x cannot be used"),
        (["dlq", "list"], {"LOG_LEVEL": "verbose"}, 2,
         "eventpipe: bad setting: LOG_LEVEL='verbose': use one of DEBUG, INFO, WARNING, ERROR"),
        (["status"], {"REDIS_URL": "redis://127.0.0.1:{port}/0"}, 3,
         "eventpipe: Redis does not answer at REDIS_URL=redis://127.0.0.1:{port}/0"),
        (["status"], {}, 3, "has no schema yet: run `eventpipe migrate`"),
        (["status"], {"LOG_FORMAT": "pretty"}, 2,
         "eventpipe: bad setting: LOG_FORMAT='pretty': use one of auto, json, text"),
        (["dlq", "list"], {"DATABASE_URL": "garbage"}, 2, "DATABASE_URL='garbage'"),
        (["dlq", "list"], {"KAFKA_PARTITIONS": "0"}, 2, "KAFKA_PARTITIONS=0: must be at least 1"),
        (["worker", "--partitions", "0-99"], {"KAFKA_PARTITIONS": "12"}, 2,
         "partition 99 does not exist: the topic has 12"),
        # librdkafka's own complaints go through logging (here: nothing at WARNING), not as
        # hundreds of raw lines.
        (["produce", "generate", "--count", "1"],
         {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:{port}", "LOG_LEVEL": "ERROR"}, 3,
         "eventpipe: Kafka at KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{port}: "),
    ],
)
def test_one_line_naming_what_to_fix(tmp_path: Path, args: list[str], env: dict[str, str],
                                     status: int, says: str) -> None:
    port = str(free_port())
    done = eventpipe(tmp_path, *args, **{k: v.replace("{port}", port) for k, v in env.items()})
    assert done.returncode == status, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says.replace("{port}", port) in lines[0], done.stderr
