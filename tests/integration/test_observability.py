"""After a run with real components: each process's metrics moved as they should, one event's
life can be followed through the JSON logs of the bridge and a worker by its id, the status
(`GET /status`, `eventpipe status`) shows every partition, process and dead letter, and Flower
sees the tasks once it asks for their events."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from confluent_kafka import TopicPartition
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from bridge.service import Bridge
from eventpipe.queues import make_celery
from eventpipe.samples import Document, Story, user_created
from eventpipe.status import FORGET_S, STALE_S, WORKER, Board
from launcher.embedded import free_port
from tests.support.broker import commit_offset, settings_for
from tests.support.http import serving
from tests.support.pipeline import BIN, Pipeline, wait_until
from web import create_app

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(value for (sample, sample_labels), value in samples.items()
               if sample == name and labels.items() <= dict(sample_labels).items())


@pytest.fixture
def observed(kafka_broker: str, tmp_path: Path) -> Iterator[tuple[Pipeline, int, int, int]]:
    bridge_port, worker_port = free_port(), free_port()
    pipeline = Pipeline(kafka_broker, tmp_path, LOG_LEVEL="DEBUG",
                        BRIDGE_METRICS_PORT=str(bridge_port),
                        WORKER_METRICS_PORT=str(worker_port))
    story = Story(seed=5)
    messages = [story.next() for _ in range(400)]
    poison: list[tuple[str | bytes | None, bytes | Document]] = [
        (b"p1", b"{broken"), user_created("u-bad", email="nope")]
    sent = pipeline.send([*messages, *poison])
    pipeline.start_worker_host("0-3", processes=2)
    pipeline.start_bridge()
    ends = pipeline.end_offsets()
    wait_until(lambda: pipeline.committed_offsets() == ends, 120, "the stream drained")
    try:
        yield pipeline, bridge_port, worker_port, sent
    finally:
        pipeline.close()


def test_every_process_exports_the_metrics_that_moved(
    observed: tuple[Pipeline, int, int, int],
) -> None:
    pipeline, bridge_port, worker_port, sent = observed
    applied = pipeline.applied_count()
    worker = scrape(worker_port)
    # Two worker processes, one endpoint: the counts add up across processes.
    done = sum(total(worker, "events_processed_total", status=s)
               for s in ("applied", "duplicate", "stale"))
    assert done == applied
    assert total(worker, "dlq_entries_total") == 2
    assert total(worker, "events_processed_total", status="dead_lettered") == 2
    assert total(worker, "event_end_to_end_latency_seconds_count") == total(
        worker, "events_processed_total", status="applied")
    assert total(worker, "db_operation_duration_seconds_count", operation="apply_batch") > 0
    assert total(worker, "event_retries_total") == total(
        worker, "events_processed_total", status="retried")

    def rates_published() -> bool:
        rates = {dict(labels).get("event_type") for (name, labels), _ in scrape(worker_port).items()
                 if name == "events_processed_per_second"}
        return rates >= {"UserCreated", "OrderPlaced", "PaymentSettled", "InventoryAdjusted"}

    # The rate gauge is recomputed every second by each worker process.
    wait_until(rates_published, 10, "a processing rate for every event type")

    def lag_is_zero() -> bool:
        bridge = scrape(bridge_port)
        lags = [v for (name, _), v in bridge.items() if name == "kafka_consumer_lag"]
        return len(lags) == pipeline.partitions and not any(lags)

    # librdkafka reports statistics every few seconds: the lag settles to 0 once drained.
    wait_until(lag_is_zero, 30, "consumer lag back to 0 on every partition")
    bridge = scrape(bridge_port)
    assert total(bridge, "kafka_consume_duration_seconds_count") > 0
    assert total(bridge, "bridge_in_flight_events") == 0
    assert total(bridge, "bridge_paused_partitions") == 0
    depths = {dict(labels)["queue"]: v for (name, labels), v in bridge.items()
              if name == "celery_queue_depth"}
    assert depths == {f"events.p{p}": 0.0 for p in range(4)}
    assert applied + 2 <= sent  # duplicates aside, every message was applied or dead-lettered


def test_logs_are_json_and_follow_an_event_by_its_id(
    observed: tuple[Pipeline, int, int, int],
) -> None:
    pipeline = observed[0]
    lines: dict[str, list[dict[str, object]]] = {}
    for role in ("bridge", "worker-host"):
        path = pipeline.log_dir / f"{pipeline.name}-{role}.log"
        records = [json.loads(raw) for raw in path.read_text().splitlines() if raw.strip()]
        assert records, f"no log lines from the {role}"
        lines[role] = records
    applied_ids = {r["eventId"] for r in lines["worker-host"] if r.get("msg") == "event applied"}
    received_ids = {r["eventId"] for r in lines["bridge"] if r.get("msg") == "event received"}
    common = applied_ids & received_ids
    assert common, "no event id appears in both the bridge's and a worker's lines"
    one = next(iter(common))
    worker_record = next(r for r in lines["worker-host"] if r.get("eventId") == one)
    assert {"eventType", "partition", "offset"} <= worker_record.keys()
    dead = [r for r in lines["worker-host"] if str(r.get("msg", "")).startswith("dead-lettered")]
    assert len(dead) == 2 and all(r["level"] == "WARNING" for r in dead)


def test_flower_sees_the_tasks_once_it_asks_for_their_events(
    observed: tuple[Pipeline, int, int, int],
) -> None:
    """Task events cost the workers a third of Celery's work per task, so they are sent only
    once a monitor asks, as Flower does every few seconds while it runs."""
    pipeline = observed[0]
    app = make_celery(pipeline.settings)
    seen: list[dict[str, Any]] = []
    connection = app.connection_for_read()
    receiver = app.events.Receiver(connection, handlers={"*": seen.append})

    def kinds() -> set[str]:
        return {str(event["type"]) for event in list(seen)}

    listener = threading.Thread(target=receiver.capture, kwargs={"limit": None}, daemon=True)
    listener.start()
    try:
        # Worker heartbeats come every 2 s: once one is seen, the listener hears everything.
        wait_until(lambda: "worker-heartbeat" in kinds(), 15, "a worker heartbeat")
        story = Story(seed=9)
        pipeline.send([story.next() for _ in range(20)])
        ends = pipeline.end_offsets()
        wait_until(lambda: pipeline.committed_offsets() == ends, 60, "the new events applied")
        assert not {kind for kind in kinds() if kind.startswith("task-")}
        app.control.enable_events()  # what Flower sends
        pipeline.send([story.next() for _ in range(20)])
        wait_until(lambda: "task-succeeded" in kinds(), 30, "a task-succeeded event")
        # Where the messages are, never what they say (`eventpipe.queues.task_summary`).
        received = [str(event["args"]) for event in list(seen)
                    if event["type"] == "task-received"]
        assert received and all(args.startswith(f"{pipeline.name} p") and "offset" in args
                                for args in received)
    finally:
        app.control.disable_events()
        receiver.should_stop = True  # seen within a second
        listener.join(timeout=10)
        connection.close()


def _status(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/status", timeout=10) as response:
        found: dict[str, Any] = json.load(response)
        return found


def test_the_status_shows_every_partition_process_and_dead_letter(
    observed: tuple[Pipeline, int, int, int],
) -> None:
    pipeline = observed[0]
    ends = pipeline.end_offsets()
    app = create_app(pipeline.settings)
    with serving(app) as url:
        # librdkafka reports high watermarks every few seconds; processes report every second.
        wait_until(lambda: all(p["lag"] == 0 and p["lastBatchBy"]
                               for p in _status(url)["partitions"]), 30, "a settled status")
        status = _status(url)
        assert status["problems"] == []
        assert [(p["partition"], p["committed"], p["highWatermark"], p["inFlight"], p["queued"],
                 p["paused"]) for p in status["partitions"]] == [
            (p, ends[p], ends[p], 0, 0, False) for p in range(4)]
        [bridge] = status["bridges"]
        assert bridge["partitions"] == [0, 1, 2, 3]
        assert all(p["bridge"] == bridge["name"] for p in status["partitions"])
        # Two worker processes share the four partitions: each queue has exactly one.
        workers = {w["name"]: w["partitions"] for w in status["workers"]}
        assert len(workers) == 2
        assert sorted(p for queues in workers.values() for p in queues) == [0, 1, 2, 3]
        assert all(p["workers"] == [name] for p in status["partitions"]
                   for name, queues in workers.items() if p["partition"] in queues)
        assert status["dlq"] == {"open": 2, "inStream": 2,
                                 "byErrorClass": {"InvalidEvent": 2},
                                 "byEventType": {"UserCreated": 1, "unknown": 1}}

        command = subprocess.run([str(BIN / "eventpipe"), "status"], env=pipeline.env,
                                 capture_output=True, text=True, timeout=60)
        assert command.returncode == 0, command.stderr
        printed = json.loads(command.stdout)  # not a terminal: the JSON of GET /status
        assert printed.keys() == status.keys()
        assert printed["partitions"] == [{**p, "lastBatchAgoS": q["lastBatchAgoS"]}
                                         for p, q in zip(status["partitions"],
                                                         printed["partitions"], strict=True)]

        # A worker process killed leaves the board as its supervisor sees it die, not once
        # its entry is STALE_S old: meanwhile its partitions looked consumed by two.
        [host] = [process for process in pipeline.processes if "worker" in str(process.args)]
        victim = int(Path(f"/proc/{host.pid}/task/{host.pid}/children").read_text().split()[0])
        name = next(name for name in workers if name.endswith(f":{victim}"))
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: name not in {w["name"] for w in _status(url)["workers"]},
                   STALE_S / 2, "the killed process gone from the status")

        # A worker host stopped for good leaves the board at once: the problem is named.
        for process in pipeline.processes:
            if "worker" in str(process.args):
                pipeline.stop(process)
        wait_until(lambda: not _status(url)["workers"], 10, "the workers gone from the status")
        assert "no worker is running: no event is applied" in _status(url)["problems"]
        stopped = subprocess.run([str(BIN / "eventpipe"), "status"], env=pipeline.env,
                                 capture_output=True, text=True, timeout=60)
        assert stopped.returncode == 1
    app.extensions["eventpipe"].close()


def test_the_board_ages_entries_by_the_redis_clock_and_forgets_the_silent(
    redis_client: redis.Redis,
) -> None:
    board = Board(redis_client, f"test-{uuid.uuid4().hex}")
    try:
        board.publish(WORKER, "live:1", {"queues": [0]})
        seconds, _ = redis_client.time()
        # Entries as processes that went silent long ago would have left them.
        redis_client.hset(board.key, mapping={
            "worker silent:2": f"{seconds - STALE_S - 1} {{}}",
            "worker gone:3": f"{seconds - FORGET_S - 1} {{}}"})
        [member] = board.members()
        assert (member.role, member.name, member.said) == (
            WORKER, "live:1", {"queues": [0], "served": {}, "rates": {}})
        assert 0 <= member.age_s < 1
        assert set(redis_client.hkeys(board.key)) == {b"worker live:1", b"worker silent:2"}
        # Entries that are not text at all (another program's, a hand edit): not ours, and
        # gone, where they broke every reading of the board until deleted by hand.
        redis_client.hset(board.key, mapping={b"worker h:\xff": b"1 {}",
                                              b"bridge h:1": b"1 {\xff}",
                                              b"bridge deep:2": f"{seconds} {'[' * 100_000}",
                                              b"worker forever:3": b"inf {}"})
        # A partition that is a digit to Python and no number to `int` is not one either.
        redis_client.hset(board.key, "bridge odd:4", f"{seconds} " + json.dumps(
            {"partitions": {"\u00b2": {"committed": 1}, "0": {"committed": 2}}}))
        assert [member.name for member in board.members()] == ["odd:4", "live:1"]  # by role
        [odd] = [member for member in board.members() if member.name == "odd:4"]
        assert odd.said["partitions"] == {"0": {"committed": 2}}
        redis_client.hdel(board.key, "bridge odd:4")
        assert set(redis_client.hkeys(board.key)) == {b"worker live:1", b"worker silent:2"}
        board.leave(WORKER, "live:1")
        assert board.members() == []
    finally:
        redis_client.delete(board.key)


@contextmanager
def assigned_bridge(kafka_broker: str, topic: str, committed: int) -> Iterator[Bridge]:
    """A bridge of a new group given both partitions of `topic`, the first committed at
    `committed`, the second never."""
    settings = settings_for(kafka_broker, topic, partitions=2)
    settings = dataclasses.replace(settings, kafka_group_id=f"group-{uuid.uuid4().hex}")
    commit_offset(kafka_broker, settings.kafka_group_id, topic, 0, committed)
    bridge = Bridge(settings)
    try:
        bridge._on_assign(bridge.consumer, [TopicPartition(topic, p) for p in range(2)])
        yield bridge
    finally:
        bridge.consumer.close()


def test_a_bridge_exports_the_committed_offset_of_a_partition_as_it_is_assigned(
        kafka_broker: str, kafka_topic: Any) -> None:
    """Before: only after the bridge's own first commit. A partition whose oldest event is
    stuck commits nothing, so after a restart or a move it had no series and the alert on a
    partition that does not commit could never fire."""
    topic = kafka_topic(partitions=2)
    with assigned_bridge(kafka_broker, topic, 5):
        assert REGISTRY.get_sample_value("bridge_committed_offset",
                                         {"topic": topic, "partition": "0"}) == 5
        # Never committed: no offset to show.
        assert REGISTRY.get_sample_value("bridge_committed_offset",
                                         {"topic": topic, "partition": "1"}) is None


def test_a_partition_never_committed_shows_the_whole_log_as_its_lag(
        kafka_broker: str, kafka_topic: Any) -> None:
    """Before: no lag at all until the group's first commit, so a partition whose first
    event was stuck was invisible to the lag and commit alerts. The group stands at the
    log's start (where it reads from): the lag is the log."""
    topic = kafka_topic(partitions=2)
    with assigned_bridge(kafka_broker, topic, 25) as bridge:
        # librdkafka's statistics: the log of partition 1 starts at 10 (retention took the
        # rest) and ends at 40.
        window = {"lo_offset": 10, "hi_offset": 40}
        bridge._on_stats(json.dumps({"topics": {topic: {"partitions": {
            "0": window, "1": window, "-1": {"lo_offset": -1, "hi_offset": -1}}}}}))
        lag = {p: REGISTRY.get_sample_value("kafka_consumer_lag",
                                            {"topic": topic, "partition": p}) for p in "01"}
        assert lag == {"0": 15, "1": 30}
