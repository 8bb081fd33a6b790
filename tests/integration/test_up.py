"""`eventpipe up --demo`, the README's run command, as a newcomer runs it: from nothing to a
working pipeline whose API answers, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from sqlalchemy import create_engine

from eventpipe.migrations import upgrade
from eventpipe.tables import applied_events
from launcher.embedded import free_port
from tests.support.pipeline import BIN, wait_until
from tests.support.rabbitmq import rabbitmq_vhost
from tests.support.services import REDIS_URL


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue  # gone, or not ours to read
    return found


def test_up_says_in_one_line_that_its_run_directory_cannot_be_made(tmp_path: Path) -> None:
    """A review's finding: with a file named `var` where its logs go (or a read-only working
    directory), a traceback."""
    (tmp_path / "var").write_text("not a directory")
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update({name: str(free_port()) for name in ("WEB_PORT", "FLOWER_PORT",
                                                    "BRIDGE_METRICS_PORT", "WORKER_METRICS_PORT")})
    done = subprocess.run([str(BIN / "eventpipe"), "up"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={**env, "EVENTPIPE_ENV_FILE": "/nonexistent"})
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""  # before anything starts
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"eventpipe: bad setting: cannot create the directory "
                           f"{tmp_path / 'var' / 'run'} for the logs of `eventpipe up`: "), line
    assert line.endswith("run it from a writable directory"), line


def test_up_says_in_one_line_that_a_port_is_taken_and_starts_nothing(tmp_path: Path) -> None:
    """A review's finding: the line came between `starting the pipeline:` and `stopping…`,
    `stopped`."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update({name: str(free_port()) for name in ("WEB_PORT", "FLOWER_PORT",
                                                    "BRIDGE_METRICS_PORT", "WORKER_METRICS_PORT")})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env["FLOWER_PORT"] = str(taken.getsockname()[1])
        done = subprocess.run([str(BIN / "eventpipe"), "up"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60,
                              env={**env, "EVENTPIPE_ENV_FILE": "/nonexistent"})
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"eventpipe: bad setting: FLOWER_PORT={env['FLOWER_PORT']}"), line


@pytest.mark.parametrize("redis_kind", ["embedded", "running", "half", "rabbitmq"])
def test_up_runs_the_whole_pipeline_and_stops_cleanly(tmp_path: Path, redis_kind: str) -> None:
    with contextlib.ExitStack() as cleanup:
        _up_runs_the_whole_pipeline_and_stops_cleanly(tmp_path, redis_kind, cleanup)


def _up_runs_the_whole_pipeline_and_stops_cleanly(tmp_path: Path, redis_kind: str,
                                                  cleanup: contextlib.ExitStack) -> None:
    marker = f"/nonexistent/{uuid.uuid4().hex}"
    ports = {name: free_port() for name in ("WEB_PORT", "FLOWER_PORT", "BRIDGE_METRICS_PORT",
                                            "WORKER_METRICS_PORT")}
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update({name: str(port) for name, port in ports.items()})
    env.update(EVENTPIPE_ENV_FILE=marker, KAFKA_PARTITIONS="4")
    if redis_kind == "embedded":
        # None configured: a Redis of its own, even though the machine's answers at the
        # default URL (it may be another pipeline's).
        for name in ("REDIS_URL", "CELERY_BROKER_URL"):
            env.pop(name, None)
        assert redis.Redis.from_url("redis://127.0.0.1:6379/0").ping()
    elif redis_kind == "half":
        # The machine's Redis for the DLQ and the ledger; the broker's default URL is the
        # machine's too, but unset: a redis-server of its own stands in for it.
        env.pop("CELERY_BROKER_URL", None)
        env["REDIS_URL"] = f"{REDIS_URL}/11"
        redis.Redis.from_url(f"{REDIS_URL}/11").flushdb()
    elif redis_kind == "rabbitmq":
        # The Celery broker a RabbitMQ (the docs' other broker), Redis the machine's.
        env.update(REDIS_URL=f"{REDIS_URL}/11",
                   CELERY_BROKER_URL=cleanup.enter_context(rabbitmq_vhost()))
        redis.Redis.from_url(f"{REDIS_URL}/11").flushdb()
        # Holding a task an earlier run left for a topic the new embedded Kafka lacks.
        earlier = Celery(broker=env["CELERY_BROKER_URL"])
        earlier.conf.task_queues = {"events.p0": {"exchange": "events.p0",
                                                  "routing_key": "events.p0"}}
        earlier.send_task("apply_events", queue="events.p0")
        earlier.close()
    else:
        # The machine's Redis, holding a task an earlier run left queued for a topic that
        # the new embedded Kafka no longer has.
        env.update(REDIS_URL=f"{REDIS_URL}/11", CELERY_BROKER_URL=f"{REDIS_URL}/12")
        for database in (11, 12):
            redis.Redis.from_url(f"{REDIS_URL}/{database}").flushdb()
        broker = redis.Redis.from_url(f"{REDIS_URL}/12")
        broker.lpush("events.p0", b"{}")
        # And one kombu holds as delivered and not acknowledged (a worker killed, a retry it
        # held), which it would hand out again; another program's is left alone.
        for tag, queue in (("t-ours", "events.p1"), ("t-other", "other.queue")):
            broker.hset("unacked", tag, json.dumps([{"body": "{}"}, queue, queue]))
            broker.zadd("unacked_index", {tag: time.time()})
        # And a database an earlier run left, whose events the new embedded Kafka lacks.
        earlier = f"sqlite:///{tmp_path / 'var' / 'eventpipe.db'}"
        (tmp_path / "var").mkdir()
        upgrade(earlier)
        engine = create_engine(earlier)
        with engine.begin() as conn:
            conn.execute(applied_events.insert().values(
                event_id="e-earlier", event_type="UserCreated", outcome="applied",
                occurred_at=datetime.now(UTC), applied_at=datetime.now(UTC)))
        engine.dispose()
    output = (tmp_path / "up.out").open("w+")
    up = subprocess.Popen([str(BIN / "eventpipe"), "up", "--demo"], cwd=tmp_path, env=env,
                          stdout=output, stderr=subprocess.DEVNULL, text=True)
    try:
        def text() -> str:
            return (tmp_path / "up.out").read_text()

        wait_until(lambda: "running; Ctrl-C stops everything" in text() or up.poll() is not None,
                   240, "the pipeline up and the demo done")
        assert up.poll() is None, text()
        shown = text()
        assert "embedded Tansu" in shown
        earlier_events = "it holds events of earlier runs, which the new embedded Kafka does not"
        if redis_kind == "embedded":
            assert "embedded redis-server" in shown
            assert earlier_events not in shown
        elif redis_kind == "half":
            assert re.search(r"redis-server on \S+ for CELERY_BROKER_URL\n", shown), shown
        elif redis_kind == "rabbitmq":
            assert "dropped 1 task(s) an earlier run left" in shown
        else:
            assert "dropped 2 task(s) an earlier run left" in shown
            broker = redis.Redis.from_url(f"{REDIS_URL}/12")
            for key in ("unacked", "unacked_index"):  # the run's own may be there too
                held = set(broker.hkeys(key) if key == "unacked" else
                           broker.zrange(key, 0, -1))
                assert b"t-ours" not in held and b"t-other" in held
            assert earlier_events in shown
        user_url = re.search(r"a user to look at: (\S+)", shown)
        assert user_url is not None
        with urllib.request.urlopen(user_url.group(1), timeout=5) as response:
            user = json.loads(response.read())
        assert user["orders"] and user["userId"] in user_url.group(1)
        ready = f"http://127.0.0.1:{ports['WEB_PORT']}/ready"
        with urllib.request.urlopen(ready, timeout=5) as response:
            assert response.status == 200
        assert re.search(r"poison message\(s\) sent; [1-9]\d* in the dead-letter queue", shown)
        # A review's finding: the commands the demo points at, run in another shell, read
        # the defaults' Redis and Kafka, not the ones this run started.
        exports = re.search(r"^  export (.+)$", shown, re.MULTILINE)
        assert exports is not None, shown  # Kafka is the embedded one in every case
        reach = dict(pair.split("=", 1) for pair in shlex.split(exports.group(1)))
        assert "KAFKA_BOOTSTRAP_SERVERS" in reach
        assert ("REDIS_URL" in reach) == (redis_kind == "embedded"), reach
        elsewhere = tmp_path / "elsewhere"  # the embedded database found from anywhere
        elsewhere.mkdir()
        listed = subprocess.run([str(BIN / "eventpipe"), "dlq", "list"], cwd=elsewhere,
                                env={**env, **reach}, capture_output=True, text=True, timeout=60)
        depth = re.search(r"-- \d+ shown, (\d+) in the queue", listed.stderr)
        assert depth is not None and int(depth.group(1)) > 0, listed.stderr
        assert "not compared" not in listed.stderr, listed.stderr  # it found the database
        # The console, and a token made for the run that opens its dead-letter view.
        console = re.search(r"console\s+(\S+/console) \(DLQ token for this run: (\S+)\)",
                            shown)
        assert console is not None, shown
        with urllib.request.urlopen(console.group(1), timeout=5) as response:
            assert b"eventpipe console" in response.read()
        base = console.group(1).removesuffix("/console")
        entries = urllib.request.Request(f"{base}/dlq/entries", headers={
            "Authorization": f"Bearer {console.group(2)}"})
        with urllib.request.urlopen(entries, timeout=5) as response:
            assert json.loads(response.read())["depth"] > 0

        def status() -> dict[str, Any]:
            with urllib.request.urlopen(f"{base}/status", timeout=5) as response:
                found: dict[str, Any] = json.loads(response.read())
                return found

        # The worker processes may still be sharing out the partitions (a rebalance).
        wait_until(lambda: status()["problems"] == [], 30, "a status without problems")
        assert status()["bridges"] and len(status()["workers"]) >= 1
        assert len(_processes_with(marker)) >= 6  # brokers, bridge, workers, web, flower

        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=120) == 0
        deadline = time.monotonic() + 10
        while _processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_with(marker) == []
        assert "stopped" in text()
        # The API's server is production's: JSON lines only, a record per request.
        served = [json.loads(line) for line in
                  (tmp_path / "var" / "run" / "web.log").read_text().splitlines()]
        assert any(line.get("path") == "/ready" and line["status"] == 200 for line in served)
        # A review's finding: Flower's records said role "worker".
        flower = (tmp_path / "var" / "run" / "flower.log").read_text().splitlines()
        assert {json.loads(line)["role"] for line in flower if line.startswith("{")} \
            == {"flower"}
    finally:
        if up.poll() is None:
            up.kill()
        for pid in _processes_with(marker):
            os.kill(pid, signal.SIGKILL)


def _started_by(parent: int, word: str) -> list[int]:
    """The live processes `parent` started whose command line holds `word`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue  # gone, not a process, or not ours to read
        if stat[1] == str(parent) and stat[0] != "Z" \
                and any(word.encode() in part for part in command):
            found.append(int(entry.name))
    return found


def test_up_starts_again_what_dies_and_ends_when_its_kafka_does(tmp_path: Path) -> None:
    """A review's finding: a bridge killed under `eventpipe up` made it stop everything, the
    embedded Kafka with the events it held in memory; and its own redis-server or Tansu
    killed went unnoticed, the pipeline stalled and `up` still said it was running."""
    marker = f"/nonexistent/{uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PROMETHEUS_MULTIPROC_DIR", "REDIS_URL", "CELERY_BROKER_URL")}
    env.update({name: str(free_port()) for name in (
        "WEB_PORT", "FLOWER_PORT", "BRIDGE_METRICS_PORT", "WORKER_METRICS_PORT")})
    env.update(EVENTPIPE_ENV_FILE=marker, KAFKA_PARTITIONS="2")
    output = (tmp_path / "up.out").open("w+")
    up = subprocess.Popen([str(BIN / "eventpipe"), "up"], cwd=tmp_path, env=env,
                          stdout=output, stderr=subprocess.STDOUT, text=True)
    ready = f"http://127.0.0.1:{env['WEB_PORT']}/ready"

    def text() -> str:
        return (tmp_path / "up.out").read_text()

    def answers_ready() -> bool:
        try:
            with urllib.request.urlopen(ready, timeout=5) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    try:
        wait_until(lambda: "running; Ctrl-C stops everything" in text() or up.poll() is not None,
                   240, "the pipeline up")
        assert up.poll() is None, text()
        def killed_and_started_again(word: str, said: str) -> None:
            [before] = _started_by(up.pid, word)
            os.kill(before, signal.SIGKILL)
            wait_until(lambda: said in text() or up.poll() is not None, 60, f"{word} again")
            assert up.poll() is None, text()
            wait_until(lambda: any(pid != before for pid in _started_by(up.pid, word)), 60,
                       f"another {word}")
            wait_until(answers_ready, 60, "the API ready again")

        killed_and_started_again("bridge", "bridge exited with -9; started again")
        killed_and_started_again("redis-server", "the embedded redis-server exited with -9; "
                                                 "started again")
        [tansu] = _started_by(up.pid, "tansu")
        os.kill(tansu, signal.SIGKILL)
        assert up.wait(timeout=120) == 1
        assert "the embedded Kafka (Tansu) exited with -9" in text()
        deadline = time.monotonic() + 10
        while _processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_with(marker) == []
    finally:
        if up.poll() is None:
            up.kill()
        for pid in _processes_with(marker):
            os.kill(pid, signal.SIGKILL)


def test_up_refuses_a_directory_another_up_runs_in(tmp_path: Path) -> None:
    """A review's finding: a second `eventpipe up` in the directory of a first started a Kafka
    of its own and said nothing: both wrote the one SQLite read model (and its logs), and
    `verify` against either Kafka found hundreds of differences."""
    marker = f"/nonexistent/{uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(EVENTPIPE_ENV_FILE=marker, KAFKA_PARTITIONS="2")

    def ports() -> dict[str, str]:
        return {name: str(free_port()) for name in (
            "WEB_PORT", "FLOWER_PORT", "BRIDGE_METRICS_PORT", "WORKER_METRICS_PORT")}

    output = (tmp_path / "up.out").open("w+")
    first = subprocess.Popen([str(BIN / "eventpipe"), "up"], cwd=tmp_path, env={**env, **ports()},
                             stdout=output, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: "running; Ctrl-C stops everything" in (tmp_path / "up.out").read_text()
                   or first.poll() is not None, 240, "the first pipeline up")
        second = subprocess.run([str(BIN / "eventpipe"), "up"], cwd=tmp_path,
                                env={**env, **ports()}, capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip() == (
            f"eventpipe: bad setting: another `eventpipe up` (pid {first.pid}) runs in this "
            f"directory, with its database and logs in {tmp_path / 'var'}: stop it, or start "
            "this one from another directory")
        assert "starting" not in second.stdout
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=120) == 0
    finally:
        if first.poll() is None:
            first.kill()
        for pid in _processes_with(marker):
            os.kill(pid, signal.SIGKILL)
