"""What an operator sees when a command meets a service it cannot use or a bad setting: one
line naming the setting or the command that fixes it, and a distinct exit status."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from confluent_kafka import TopicPartition

from bridge.service import Bridge
from cli.errors import explain
from eventpipe import positions
from eventpipe.errors import KEY_OF_ANOTHER_KIND, TransientError
from launcher.embedded import start_redis
from tests.support.broker import (
    TopicFactory,
    bridges_database,
    commit_offset,
    consume,
    produce,
    settings_for,
)
from tests.support.pipeline import BIN, ROOT, wait_until
from tests.support.services import REDIS_URL, migrate

# Nothing listens on port 1 of the loopback: connections are refused at once.
NOWHERE = "127.0.0.1:1"


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
        # The password stays out of the line.
        (["dlq", "list"], {"REDIS_URL": "redis://:s3cret@127.0.0.1:{port}/0"}, 3,
         "eventpipe: Redis does not answer at REDIS_URL=redis://:***@127.0.0.1:{port}/0"),
        (["dlq", "replay", "1-0", "--all"], {}, 2, "name entry ids, or a filter or --all, "
                                                   "not both"),
        (["dlq", "purge", "1-0", "--event-type", "UserCreated"], {}, 2, "not both"),
        # A review's finding: 2, where `dlq show` of an id not there is 1.
        (["dlq", "purge", "1-0", "--yes"], {"DLQ_STREAM": "test:dlq:none"}, 1,
         "no dead letter 1-0"),
        # Refused before the range is made, which would take gigabytes.
        (["worker", "--partitions", "0-1000000000"], {"KAFKA_PARTITIONS": "12"}, 2,
         "partition 1000000000 does not exist: the topic has 12"),
        (["web"], {"WEB_HOST": "192.0.2.1"}, 2,
         "eventpipe: bad setting: WEB_HOST=192.0.2.1: "),
        # Run from another directory than the pipeline's: not made empty here.
        (["trace", "e-1", "--no-kafka"], {}, 2,
         "never-migrated.db does not exist: run this where the pipeline runs, or `eventpipe "
         "migrate` to make it"),
        # The bridge records its positions there (`eventpipe.positions`).
        (["bridge"], {}, 2,
         "never-migrated.db does not exist: run this where the pipeline runs, or `eventpipe "
         "migrate` to make it"),
        (["status"], {"DATABASE_URL": "sqlite:///var/eventpipe.db"}, 2,
         "var/eventpipe.db does not exist (a relative path is read from the working "
         "directory): run this where the pipeline runs"),
        (["trace", "e-1", "--no-kafka"],
         {"DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:{port}/x"}, 3,
         "eventpipe: the database at DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:"
         "{port}/x cannot be used"),
        # An option of the URL the driver cannot read: a traceback of 123 lines.
        (["trace", "e-1", "--no-kafka"],
         {"DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:{port}/x?connect_timeout=a"},
         3, "eventpipe: the database at DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:"
            "{port}/x?connect_timeout=a cannot be used: bad value for connect_timeout"),
        # A traceback at every command, `migrate` too; and one at each command reading Redis.
        (["migrate"], {"REDIS_URL": "redis://:p[ss@127.0.0.1:{port}/0"}, 2,
         "eventpipe: bad setting: REDIS_URL: not a URL"),
        (["dlq", "list"], {"REDIS_URL": "redis://127.0.0.1:{port}/0?socket_timeout=abc"}, 2,
         "eventpipe: bad setting: REDIS_URL: Invalid value for 'socket_timeout'"),
        (["dlq", "list"], {"LOG_LEVEL": "verbose"}, 2,
         "eventpipe: bad setting: LOG_LEVEL='verbose': use one of DEBUG, INFO, WARNING, ERROR"),
        (["status"], {"REDIS_URL": "redis://127.0.0.1:{port}/0",
                      "DATABASE_URL": "sqlite:///empty.db"}, 3,
         "eventpipe: Redis does not answer at REDIS_URL=redis://127.0.0.1:{port}/0"),
        (["status"], {"DATABASE_URL": "sqlite:///empty.db"}, 3,
         "has no schema yet: run `eventpipe migrate`"),
        (["status"], {"LOG_FORMAT": "pretty"}, 2,
         "eventpipe: bad setting: LOG_FORMAT='pretty': use one of auto, json, text"),
        (["dlq", "list"], {"DATABASE_URL": "garbage"}, 2, "DATABASE_URL: not a SQLAlchemy URL"),
        (["bridge"], {"CELERY_BROKER_URL": "foo://127.0.0.1/0"}, 2,
         "eventpipe: bad setting: CELERY_BROKER_URL: 'foo' is not a transport Celery knows"),
        (["dlq", "list"], {"KAFKA_PARTITIONS": "0"}, 2, "KAFKA_PARTITIONS=0: must be at least 1"),
        # `up` would wait 90 s for an API at port 0, then say it is not ready.
        (["up"], {"WEB_PORT": "0"}, 2, "eventpipe: bad setting: WEB_PORT=0: `eventpipe up` "
                                       "needs a port it can name"),
        # A driver the URL names that is not installed: a Python module, an ODBC library.
        (["status"], {"DATABASE_URL": "postgresql+psycopg2://postgres@127.0.0.1/x"}, 2,
         "eventpipe: bad setting: DATABASE_URL: the driver 'psycopg2' cannot be loaded"),
        (["status"], {"DATABASE_URL": "mssql+pyodbc://sa:pw@127.0.0.1:{port}/x?driver=ODBC+"
                                      "Driver+18+for+SQL+Server"}, 3,
         "eventpipe: the database at DATABASE_URL=mssql+pyodbc://sa:***@127.0.0.1:{port}/x"),
        (["worker", "--partitions", "0-99"], {"KAFKA_PARTITIONS": "12"}, 2,
         "partition 99 does not exist: the topic has 12"),
        # librdkafka's own complaints go through logging (here: nothing at WARNING), not as
        # hundreds of raw lines.
        (["produce", "generate", "--count", "1"],
         {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:{port}", "LOG_LEVEL": "ERROR"}, 3,
         "eventpipe: Kafka at KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{port}: "),
        # A database the server does not have: Redis says so as the client selects it.
        (["dlq", "list"], {"REDIS_URL": f"{REDIS_URL}/99"}, 2,
         f"eventpipe: bad setting: REDIS_URL={REDIS_URL}/99: the Redis server there has no "
         "database 99"),
        (["status"], {"REDIS_URL": f"{REDIS_URL}/99", "DATABASE_URL": "sqlite:///empty.db"}, 2,
         f"eventpipe: bad setting: REDIS_URL={REDIS_URL}/99: the Redis server there has no "
         "database 99"),
        # A file that is not SQLite's (or is damaged): read, never written.
        *[(command, {"DATABASE_URL": "sqlite:///notdb.db",
                     "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:{port}"}, 3,
           "eventpipe: the database at DATABASE_URL=sqlite:///notdb.db is not a SQLite "
           "database, or is damaged: file is not a database")
          for command in (["status"], ["trace", "e-1", "--no-kafka"])],
        # Beyond what librdkafka takes; and one it refuses with another of its settings.
        (["bridge"], {"KAFKA_SESSION_TIMEOUT_MS": "99999999"}, 2,
         "eventpipe: bad setting: KAFKA_SESSION_TIMEOUT_MS=99999999: must be between 1 and "
         "3600000"),
        (["bridge"], {"KAFKA_SESSION_TIMEOUT_MS": "400000", "BRIDGE_METRICS_PORT": "{port}",
                      "KAFKA_BOOTSTRAP_SERVERS": NOWHERE, "DATABASE_URL": "sqlite:///empty.db"},
         2, "eventpipe: bad setting: KAFKA_SESSION_TIMEOUT_MS=400000: Kafka's client refuses "
            "it: Failed to create consumer: `max.poll.interval.ms`must be >= "
            "`session.timeout.ms`"),
    ],
)
def test_one_line_naming_what_to_fix(tmp_path: Path, args: list[str], env: dict[str, str],
                                     status: int, says: str) -> None:
    port = str(free_port())
    (tmp_path / "empty.db").touch()
    (tmp_path / "notdb.db").write_bytes(b"garbage, not SQLite")
    done = eventpipe(tmp_path, *args, **{k: v.replace("{port}", port) for k, v in env.items()})
    assert done.returncode == status, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says.replace("{port}", port) in lines[0], done.stderr
    assert not (tmp_path / "never-migrated.db").exists()  # no command made it empty
    assert (tmp_path / "notdb.db").read_bytes() == b"garbage, not SQLite"


def test_kafka_away_is_one_line_with_no_line_of_the_kafka_client_before_it(
    tmp_path: Path, sqlite_url: str,
) -> None:
    """A review's finding: `verify` (as `trace`) wrote a line of librdkafka's, then its own."""
    port = free_port()
    done = eventpipe(tmp_path, "verify", DATABASE_URL=sqlite_url, REDIS_URL=f"{REDIS_URL}/0",
                     KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{port}")
    assert done.returncode == 3, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"eventpipe: Kafka at KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{port}: ")


@pytest.mark.parametrize("args", [["dlq", "list"], ["dlq", "show", "1-0"],
                                  ["dlq", "purge", "--all", "--yes"]])
def test_a_dlq_key_another_program_holds_is_named_in_one_line(
    tmp_path: Path, redis_client: redis.Redis, args: list[str]
) -> None:
    stream = f"test:dlq:{uuid.uuid4().hex}"
    redis_client.set(stream, "another program's value")
    (tmp_path / "empty.db").touch()
    try:
        done = eventpipe(tmp_path, *args, DLQ_STREAM=stream, KAFKA_GROUP_ID="eventpipe",
                         REDIS_URL=f"{REDIS_URL}/0", DATABASE_URL="sqlite:///empty.db")
    finally:
        held = redis_client.get(stream)
        redis_client.delete(stream)
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"eventpipe: {KEY_OF_ANOTHER_KIND} (DLQ_STREAM={stream}, KAFKA_GROUP_ID=eventpipe at "
        f"REDIS_URL={REDIS_URL}/0)"]
    assert held == b"another program's value"


@pytest.mark.parametrize(("refusal", "says"), [
    ("maxmemory", "it is at its memory bound (maxmemory) and evicts nothing: free memory, or "
                  "raise the bound"),
    ("MISCONF", "it cannot save its snapshot to disk (MISCONF): see its log"),
])
def test_a_redis_that_refuses_writes_is_named_in_one_line(
        tmp_path: Path, kafka_broker: str, refusal: str, says: str) -> None:
    """A review's finding: a Redis at its memory bound with a policy that evicts nothing, or
    one that failed to save its snapshot, gave a traceback (a ResponseError of redis-py)."""
    database = f"sqlite:///{tmp_path / 'migrated.db'}"
    migrate(database)
    with start_redis() as server, redis.Redis.from_url(server.url) as client:
        if refusal == "maxmemory":
            client.config_set("maxmemory-policy", "noeviction")
            client.config_set("maxmemory", 1)
        else:  # its directory gone, a snapshot fails, and it takes no write until one saves
            assert server.scratch_dir is not None
            shutil.rmtree(server.scratch_dir)
            client.config_set("save", "3600 1")
            client.bgsave()
            wait_until(lambda: client.info("persistence")["rdb_last_bgsave_status"] == "err",
                       10, "the snapshot failed")
        done = eventpipe(tmp_path, "dlq", "restore", REDIS_URL=f"{server.url}/0",
                         DATABASE_URL=database, KAFKA_BOOTSTRAP_SERVERS=kafka_broker)
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"eventpipe: Redis at REDIS_URL={server.url}/0 refuses writes: {says}"]


def test_verify_names_a_file_that_is_not_a_sqlite_database_in_one_line(
        tmp_path: Path, kafka_broker: str, kafka_topic: TopicFactory) -> None:
    """As `status` and `trace` do: `verify` reads the topic first, then the database."""
    (tmp_path / "notdb.db").write_bytes(b"garbage, not SQLite")
    done = eventpipe(tmp_path, "verify", DATABASE_URL="sqlite:///notdb.db",
                     KAFKA_BOOTSTRAP_SERVERS=kafka_broker, KAFKA_TOPIC=kafka_topic(partitions=2),
                     KAFKA_PARTITIONS="2", KAFKA_GROUP_ID=f"group-{uuid.uuid4().hex}")
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip().splitlines() == [
        "eventpipe: the database at DATABASE_URL=sqlite:///notdb.db is not a SQLite database, "
        "or is damaged: file is not a database"]
    assert (tmp_path / "notdb.db").read_bytes() == b"garbage, not SQLite"


def test_up_names_a_redis_database_the_server_does_not_have(tmp_path: Path) -> None:
    """Not "no Redis answers": it answered, that it has no such database."""
    free = {name: str(free_port()) for name in (
        "WEB_PORT", "FLOWER_PORT", "BRIDGE_METRICS_PORT", "WORKER_METRICS_PORT")}
    done = eventpipe(tmp_path, "up", KAFKA_PARTITIONS="2", REDIS_URL=f"{REDIS_URL}/99", **free)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"eventpipe: bad setting: REDIS_URL={REDIS_URL}/99: the Redis server there has no "
        "database 99 (a server has 16, 0 to 15, unless its `databases` setting says more)")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("env", "says"), [
    ({"REDIS_URL": "redis://127.0.0.1:{port}/0"},
     "eventpipe: no Redis answers at REDIS_URL=redis://127.0.0.1:{port}/0; start it, or unset "
     "REDIS_URL to run an embedded one"),
    # Met once the brokers are up: said as every command says it, not as `up`'s own failure.
    ({"DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:{port}/x"},
     "eventpipe: the database at DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:{port}/x "
     "cannot be used: "),
])
def test_up_names_the_service_that_does_not_answer_in_one_line(
    tmp_path: Path, env: dict[str, str], says: str
) -> None:
    port = str(free_port())
    free = {name: str(free_port()) for name in (
        "WEB_PORT", "FLOWER_PORT", "BRIDGE_METRICS_PORT", "WORKER_METRICS_PORT")}
    done = eventpipe(tmp_path, "up", KAFKA_PARTITIONS="2", **free,
                     **{k: v.replace("{port}", port) for k, v in env.items()})
    assert done.returncode == 3, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(says.replace("{port}", port)), done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("command", "setting", "hint"), [
    (["bridge"], "BRIDGE_METRICS_PORT", " (0: any)"),
    (["worker", "--partitions", "0-1"], "WORKER_METRICS_PORT", " (0: any)"),
    (["web"], "WEB_PORT", ""),
    # Before anything starts: not "web exited with 1; see var/run/web.log".
    (["up"], "WEB_PORT", ""),
    (["up"], "FLOWER_PORT", ""),
    (["up"], "BRIDGE_METRICS_PORT", ""),
    (["up"], "WORKER_METRICS_PORT", ""),
])
def test_a_port_another_process_holds_is_named_in_one_line(
    tmp_path: Path, command: list[str], setting: str, hint: str
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        free = {name: str(free_port()) for name in (
            "WEB_PORT", "FLOWER_PORT", "BRIDGE_METRICS_PORT", "WORKER_METRICS_PORT")}
        done = eventpipe(tmp_path, *command, **{**free, setting: str(port),
                                                "KAFKA_PARTITIONS": "2"})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"eventpipe: bad setting: {setting}={port}: ")
    assert lines[0].endswith(f"another process listens there; set {setting} to a free port"
                             f"{hint}")


@pytest.mark.parametrize(("start", "env", "setting"), [
    (["flower", "--port={port}"], {}, "--port"),  # as docker-compose.yml starts it
    (["flower"], {"FLOWER_PORT": "{port}"}, "FLOWER_PORT"),  # Flower reads FLOWER_ settings
])
def test_flower_on_a_port_another_process_holds_says_so_in_one_line(
    tmp_path: Path, start: list[str], env: dict[str, str], setting: str
) -> None:
    """A hostile test's finding: Flower, started as Celery's users start it, ended in 35
    lines of tornado's traceback."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        environment = {**os.environ, "EVENTPIPE_ENV_FILE": "/nonexistent",
                       "DATABASE_URL": f"sqlite:///{tmp_path / 'never-migrated.db'}",
                       **{name: value.replace("{port}", port) for name, value in env.items()}}
        done = subprocess.run([str(BIN / "celery"), "-A", "tasks", "--quiet",
                               *(arg.replace("{port}", port) for arg in start),
                               "--address=127.0.0.1"], env=environment, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"celery -A tasks flower: bad setting: {setting}={port}: ")
    assert lines[0].endswith(f"another process listens there; set {setting} to a free port")


def test_a_worker_host_that_stops_leaves_no_metrics_files_behind(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with socket.create_server(("127.0.0.1", 0)) as taken:  # so it stops at once
        done = eventpipe(tmp_path, "worker", "--partitions", "0-1", KAFKA_PARTITIONS="2",
                         WORKER_METRICS_PORT=str(taken.getsockname()[1]), TMPDIR=str(scratch))
    assert done.returncode == 2, done.stderr
    assert list(scratch.iterdir()) == []


def test_a_command_beside_a_metrics_server_writes_nothing_into_its_directory(
        tmp_path: Path) -> None:
    """Before: with PROMETHEUS_MULTIPROC_DIR set (a shell in the API's container), every
    command wrote its samples there, which the API's /metrics then counted for ever; where
    the directory was not made yet, every command failed with a traceback, `--help` too."""
    metrics = tmp_path / "metrics"
    for _ in range(2):
        done = eventpipe(tmp_path, "--version", PROMETHEUS_MULTIPROC_DIR=str(metrics))
        assert done.returncode == 0 and done.stderr == "", done.stderr
        metrics.mkdir(exist_ok=True)
    assert list(metrics.iterdir()) == []


def test_a_redis_that_takes_connections_and_answers_nothing_is_named_within_seconds(
        tmp_path: Path) -> None:
    """A review's finding: a tool waited 30 s on each Redis command, twice, before it said
    Redis does not answer: `eventpipe status`, which health checks run, took a minute."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # never accepts: nothing answers
        port = silent.getsockname()[1]
        started = time.monotonic()
        done = eventpipe(tmp_path, "dlq", "list", REDIS_URL=f"redis://127.0.0.1:{port}/0")
        elapsed = time.monotonic() - started
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip() == "eventpipe: Redis does not answer at REDIS_URL=redis://" \
        f"127.0.0.1:{port}/0: Timeout reading from 127.0.0.1:{port}"
    assert elapsed < 15


@pytest.mark.parametrize(("args", "says"), [
    (["worker", "--processes", "0"], "argument --processes: 0: must be at least 1"),
    (["produce", "generate", "--count", "-5"], "argument --count: -5: must be at least 1"),
    (["produce", "generate", "--count", "1000000001"],
     "argument --count: 1000000001: must be at most 1,000,000,000"),
    (["produce", "generate", "--rate", "0"], "argument --rate: 0: must be a number above 0"),
    (["produce", "generate", "--rate", "nan"],
     "argument --rate: nan: must be a number above 0"),
    (["produce", "generate", "--poison", "1.5"], "argument --poison: 1.5: must be from 0 to 1"),
    (["dlq", "list", "--limit", "0"], "argument --limit: 0: must be at least 1"),
    (["verify", "--limit", "-1"], "argument --limit: -1: must be at least 0"),
    # A malformed cursor is the operator's to fix, not a Redis error.
    (["dlq", "list", "--after", "bogus"],
     "argument --after: 'bogus' is not a stream entry id such as 1764000000000-0"),
    (["dlq", "show", "abc"], "argument entry_id: 'abc' is not a stream entry id such as "
                             "1764000000000-0"),
    (["dlq", "replay", "1-0", "abc"], "argument entry_ids: 'abc' is not a stream entry id "
                                      "such as 1764000000000-0"),
    (["dlq", "purge", "x"], "argument entry_ids: 'x' is not a stream entry id such as "
                            "1764000000000-0"),
    # "not yet consumed by the pipeline, or never sent", and exit 1: no event has such an id.
    (["trace", ""], "argument event_id: empty: name an event id"),
    (["trace", "x" * 65], "argument event_id: no event id: it must be at most 64 characters "
                          "(UTF-16 code units)"),
    # Listed all before, where the API answers 422.
    (["dlq", "list", "--since", "0001-01-01T00:00:00+14:00"],
     "argument --since: '0001-01-01T00:00:00+14:00' is not a time in UTC: it leaves the "
     "calendar there"),
    (["dlq", "replay", "--until", "9999-12-31T23:00:00-05:00"],
     "argument --until: '9999-12-31T23:00:00-05:00' is not a time in UTC: it leaves the "
     "calendar there"),
])
def test_a_value_no_command_can_use_is_a_usage_error(tmp_path: Path, args: list[str],
                                                     says: str) -> None:
    done = eventpipe(tmp_path, *args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith(says)


@pytest.mark.parametrize(("command", "redis_down"), [
    (["bridge"], True), (["produce", "generate", "--count", "1"], True), (["up"], False)])
def test_a_topic_with_partitions_no_worker_serves_is_refused_naming_the_setting(
        tmp_path: Path, kafka_broker: str, kafka_topic: TopicFactory, command: list[str],
        redis_down: bool) -> None:
    """A topic created or grown with more partitions than KAFKA_PARTITIONS: their queues
    would fill with tasks no worker takes. The bridge refuses it before it joins its group,
    as does every command that makes sure the topic exists."""
    topic = kafka_topic(partitions=4)
    # Nothing may be written before the refusal: no Redis answers there (`up` probes it).
    redis = {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
             "CELERY_BROKER_URL": f"redis://127.0.0.1:{free_port()}/1"} if redis_down else {}
    # The bridge records its positions in a database that must be there (`up` makes one).
    database = {"DATABASE_URL": bridges_database()} if command == ["bridge"] else {}
    done = eventpipe(tmp_path, *command, KAFKA_BOOTSTRAP_SERVERS=kafka_broker,
                     KAFKA_TOPIC=topic, KAFKA_PARTITIONS="2",
                     KAFKA_GROUP_ID=f"group-{uuid.uuid4().hex}",
                     BRIDGE_METRICS_PORT=str(free_port()), LOG_LEVEL="WARNING", **redis,
                     **database)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [
        f"eventpipe: bad setting: KAFKA_PARTITIONS=2, but topic '{topic}' has 4 partitions: "
        "set KAFKA_PARTITIONS=4 (no worker serves the queues of partitions 2 and above)"], \
        done.stderr


def test_a_running_bridge_handed_partitions_beyond_the_setting_reads_none_of_them_and_stops(
        kafka_broker: str, kafka_topic: TopicFactory) -> None:
    """The topic grown under a running bridge (the start's check passed): the group hands it
    partitions no worker serves. It keeps them unread and stops, naming the topic's count.
    The broker here cannot grow a topic, so the bridge starts on the larger one as if it had
    been smaller at its start."""
    topic = kafka_topic(partitions=4)
    bridge = Bridge(settings_for(kafka_broker, topic, partitions=2))
    try:
        bridge._on_assign(bridge.consumer, [TopicPartition(topic, p) for p in range(4)])
        assert bridge.stopping
        assert set(bridge.partitions) == {0, 1}
        assert str(bridge.must_stop) == (
            f"KAFKA_PARTITIONS=2, but topic '{topic}' has 4 partitions: set KAFKA_PARTITIONS=4 "
            "(no worker serves the queues of partitions 2 and above)")
    finally:
        bridge.consumer.close()


def test_a_running_bridge_whose_topic_was_made_again_commits_nothing_more_and_stops(
        kafka_broker: str, kafka_topic: TopicFactory) -> None:
    """The topic deleted and made again under its name while the bridge read it: what the
    bridge knows of its partitions is of the earlier topic. Kafka's new id for it, read as
    the group hands out the partitions again, makes the bridge drop them and stop, saying
    why. The broker here cannot delete a topic: the bridge is told it read another id
    before."""
    topic = kafka_topic(partitions=2)
    bridge = Bridge(settings_for(kafka_broker, topic, partitions=2))
    try:
        assigned = [TopicPartition(topic, p) for p in range(2)]
        bridge._on_assign(bridge.consumer, assigned)
        now = bridge.topic_id
        assert now and all(progress.vouched for progress in bridge.partitions.values())
        bridge.topic_id = "AAAAAAAAAAAAAAAAAAAAAB"
        bridge._on_assign(bridge.consumer, assigned)
        assert bridge.stopping
        assert bridge.partitions == {}  # nothing left to commit
        assert isinstance(bridge.must_stop, TransientError)  # one line, and exit status 3
        assert str(bridge.must_stop) == (
            f"topic {topic} was deleted and made again while the bridge read it (Kafka's id "
            f"AAAAAAAAAAAAAAAAAAAAAB, now {now}): the bridge stops and commits nothing more; "
            "start it again to read the new topic")
        assert explain(bridge.must_stop, bridge.settings) == str(bridge.must_stop)
    finally:
        bridge.consumer.close()


def test_a_bridge_commits_nothing_of_a_topic_made_again_under_it(
        kafka_broker: str, kafka_topic: TopicFactory) -> None:
    """A review's finding: the topic's id was read only as partitions were handed out, so a
    bridge whose topic was deleted and made again went on committing the offsets it had read
    of the earlier one (periodically, and as the partitions were revoked), skipping the new
    topic's first events. A commit is preceded by Kafka's word on the id (at most 5 s old,
    asked again for a last commit)."""
    topic = kafka_topic(partitions=1)
    settings = dataclasses.replace(settings_for(kafka_broker, topic, partitions=1),
                                   kafka_group_id=f"group-{uuid.uuid4().hex}")
    bridge = Bridge(settings)
    try:
        bridge._on_assign(bridge.consumer, [TopicPartition(topic, 0)])
        progress = bridge.partitions[0]
        progress.dispatched([0, 1, 2], bridge.clock())
        with bridge.engine.begin() as conn:  # as the workers record what they applied
            positions.record_done(conn, positions.Done(topic, bridge.topic_id or "", 0, [0, 1, 2]))
        progress.observe({0, 1, 2}, set(), bridge.clock())
        bridge._commit({0: progress}, bridge.clock(), final=True)
        assert progress.committed == 3  # the same topic: committed
        progress.dispatched([3], bridge.clock())
        progress.observe({3}, set(), bridge.clock())
        bridge.topic_id = "AAAAAAAAAAAAAAAAAAAAAB"  # as if read of the topic before
        bridge._commit({0: progress}, bridge.clock(), final=True)
        assert bridge.stopping and bridge.partitions == {}
        [answer] = bridge.consumer.committed([TopicPartition(topic, 0)], timeout=10)
        assert answer.offset == 3
    finally:
        bridge.consumer.close()


@pytest.mark.parametrize(("named", "first"), [("", 7), ("AAAAAAAAAAAAAAAAAAAAAB", 0)])
def test_an_offset_committed_to_an_earlier_topic_of_the_name_is_not_trusted(
        kafka_broker: str, kafka_topic: TopicFactory, named: str, first: int) -> None:
    """A review's finding: a bridge that had not yet seen its topic made again could commit
    the earlier topic's offset to the new one (between two looks at the id), and the next
    owner started there, past events never read. Commits name the topic's id; one naming
    another is taken for none: the partition is read from its start, which is committed in
    its place. (The broker here keeps no commit metadata: the bridge is told what Kafka
    would say.)"""
    topic = kafka_topic(partitions=1)
    produce(kafka_broker, topic, [(b"k", b"{}", ()) for _ in range(10)])
    settings = dataclasses.replace(settings_for(kafka_broker, topic, partitions=1),
                                   kafka_group_id=f"group-{uuid.uuid4().hex}")
    commit_offset(kafka_broker, settings.kafka_group_id, topic, 0, 7)
    bridge = Bridge(settings)
    read = bridge._committed

    def committed(*args: Any, **kwargs: Any) -> dict[int, tuple[int, str]] | None:
        found = read(*args, **kwargs)
        return found and {p: (offset, named) for p, (offset, _) in found.items()}

    bridge._committed = committed  # type: ignore[method-assign]
    try:
        bridge._on_assign(bridge.consumer, [TopicPartition(topic, 0)])

        def vouched() -> bool:  # at a later sync if the client was not fetching it yet
            bridge._next_vouch = 0.0
            bridge._sync(bridge.clock(), redeliver=False)
            return bridge.partitions[0].vouched

        wait_until(vouched, 30, "the partition vouched for")
        assert bridge.partitions[0].committed == first
        [message] = consume(bridge.consumer, 1)
        assert message.offset() == first
        [now] = bridge.consumer.committed([TopicPartition(topic, 0)], timeout=10)
        assert now.offset == first
    finally:
        bridge.consumer.close()


def test_a_bridge_given_a_topic_id_where_kafka_gave_none_stops(
        kafka_broker: str, kafka_topic: TopicFactory) -> None:
    """A review's finding: a bridge that first read no id of its topic (a broker before topic
    ids) kept reading it so once Kafka gave one, its commits naming none: a topic made again
    then went unseen. It stops, to be started again under the id."""
    topic = kafka_topic(partitions=1)
    bridge = Bridge(settings_for(kafka_broker, topic, partitions=1))
    try:
        bridge.topic_id = ""  # as a broker without topic ids said
        bridge._on_assign(bridge.consumer, [TopicPartition(topic, 0)])
        assert bridge.stopping and bridge.partitions == {}
        assert str(bridge.must_stop).startswith(f"Kafka gives topic {topic} an id now (")
    finally:
        bridge.consumer.close()


@pytest.mark.parametrize(("command", "env", "says"), [
    (["gunicorn", "-c", "web/gunicorn_conf.py", "--check-config", "web.wsgi:app"],
     {"KAFKA_PARTITIONS": "abc"}, "gunicorn: bad setting: KAFKA_PARTITIONS='abc'"),
    (["celery", "-A", "tasks", "inspect", "ping"], {"KAFKA_PARTITIONS": "abc"},
     "celery: bad setting: KAFKA_PARTITIONS='abc'"),
    # By its module name the configuration is loaded after prometheus_client: too late to
    # choose its multiprocess mode.
    (["gunicorn", "--config", "python:web.gunicorn_conf", "--check-config", "web.wsgi:app"],
     {"DATABASE_URL": "sqlite://"}, "needs PROMETHEUS_MULTIPROC_DIR set"),
    # Not made empty, and then served: the API of another directory than the pipeline's.
    (["gunicorn", "-c", "web/gunicorn_conf.py", "--check-config", "web.wsgi:app"],
     {"DATABASE_URL": "sqlite:////nonexistent/eventpipe.db"},
     "gunicorn: bad setting: DATABASE_URL=sqlite:////nonexistent/eventpipe.db names no database"),
])
def test_the_servers_started_without_eventpipe_say_a_bad_setting_in_one_line(
        command: list[str], env: dict[str, str], says: str) -> None:
    environment = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    done = subprocess.run([str(BIN / command[0]), *command[1:]], cwd=ROOT, capture_output=True,
                          text=True, timeout=60,
                          env={**environment, "EVENTPIPE_ENV_FILE": "/nonexistent", **env})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], done.stderr
