"""End to end, with real parts: Kafka (Tansu), the bridge and Celery worker processes, Redis,
PostgreSQL. In every scenario the database must end equal to the state computed from the
events sent, every poison message must be in the DLQ exactly once, and every offset must be
committed — nothing lost, nothing applied twice.
"""

from __future__ import annotations

import base64
import json
import random
import signal
import subprocess
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from eventpipe.progress import DeliveryLedger
from eventpipe.samples import (
    Document,
    Story,
    order_placed,
    payment_settled,
    user_created,
)
from tests.integration.pipeline import (
    BIN,
    Pipeline,
    describe,
    drop_database,
    new_database,
    wait_until,
)
from tests.model import expected_state, stored_state
from tests.tcp_proxy import TcpProxy

Message = tuple[str, Document]


@pytest.fixture
def make_pipeline(kafka_broker: str, tmp_path: Path) -> Iterator[Any]:
    made: list[Pipeline] = []

    def make(**overrides: Any) -> Pipeline:
        pipeline = Pipeline(kafka_broker, tmp_path, **overrides)
        made.append(pipeline)
        return pipeline

    yield make
    for pipeline in made:
        pipeline.close()


def stream(count: int, seed: int) -> list[Message]:
    story = Story(seed=seed)
    return [story.next() for _ in range(count)]


def drained(pipeline: Pipeline, sent: int, timeout_s: float = 120) -> None:
    """Wait until every partition's committed offset is past its last message."""
    ends = pipeline.end_offsets()
    assert sum(ends.values()) == sent
    wait_until(lambda: pipeline.committed_offsets() == ends, timeout_s,
               f"all {sent} messages done and committed")


def assert_state(pipeline: Pipeline, documents: list[Document]) -> None:
    assert stored_state(pipeline.engine) == expected_state(documents)


def test_every_event_type_with_disorder_duplicates_stale_and_poison(make_pipeline: Any) -> None:
    pipeline: Pipeline = make_pipeline(RETRY_MAX_ATTEMPTS="8")
    rng = random.Random(5)
    messages = stream(800, seed=21)
    # Children before parents: the first 300 events arrive in reverse.
    ordered = list(reversed(messages[:300])) + messages[300:]
    # Duplicates: 80 events sent again, later.
    duplicates = rng.sample(messages, 80)
    # Stale versions: older edits of users, sent after the newer ones.
    users = [m for m in messages if m[1]["eventType"] == "UserCreated"][:20]
    stale = []
    for key, doc in users:
        when = doc["occurredAt"]
        older = user_created(key, email=doc["data"]["email"], name="Stale Name",
                             occurred_at=datetime.fromisoformat(when) - timedelta(minutes=5))
        stale.append(older)
    # Poison: each must end in the DLQ exactly once, with the reason.
    owner = users[0][1]
    order_key, order = next(m for m in messages if m[1]["eventType"] == "OrderPlaced")
    wrong_currency = "USD" if order["data"]["currency"] != "USD" else "EUR"
    invalid = user_created("u-invalid", email="not-an-email")
    clash = user_created("u-clash", email=owner["data"]["email"])
    mismatch = payment_settled("pay-mismatch", order_key, "1.00", currency=wrong_currency)
    orphan = order_placed("order-orphan", "user-that-never-exists")
    poison: list[tuple[str | bytes | None, bytes | Document]] = [
        (b"junk-1", b"{this is not json"),
        (b"junk-2", b"\xff\xfe\x00binary"),
        ("k", {"eventId": "bad-type", "eventType": "OrderShipped", "schemaVersion": 1,
               "occurredAt": "2026-11-24T10:00:00Z", "data": {}}),
        invalid, clash, mismatch, orphan,
    ]
    sent = pipeline.send([*ordered, *duplicates, *stale, *poison])
    pipeline.start_worker(name="worker-a", partitions=[0, 1])
    pipeline.start_worker(name="worker-b", partitions=[2, 3])
    pipeline.start_bridge()
    drained(pipeline, sent)

    assert_state(pipeline, [doc for _, doc in messages + stale])
    entries = pipeline.dead_letters()
    assert describe(entries) == sorted([
        ("InvalidEvent", "{this is not json"),
        ("InvalidEvent", "\ufffd\ufffd\x00binary"),
        ("InvalidEvent", "bad-type"),
        ("InvalidEvent", invalid[1]["eventId"]),
        ("RejectedEvent", clash[1]["eventId"]),
        ("RejectedEvent", mismatch[1]["eventId"]),
        ("MissingParent", orphan[1]["eventId"]),
    ])
    by_class = {e.error_class: e for e in entries}
    malformed = next(e for e in entries if e.value == b"{this is not json")
    assert malformed.key == b"junk-1" and malformed.topic == pipeline.name
    assert malformed.partition is not None and malformed.offset is not None
    assert "malformed JSON" in malformed.error_message and "Traceback" in malformed.traceback
    assert malformed.attempts == 1 and malformed.worker
    assert by_class["MissingParent"].attempts == 8
    assert by_class["MissingParent"].first_failure_at < by_class["MissingParent"].last_failure_at
    assert "already belongs to user" in by_class["RejectedEvent"].error_message \
        or "differs from order currency" in by_class["RejectedEvent"].error_message

    applied_id = users[1][1]["eventId"]
    traced = eventpipe(pipeline, "trace", applied_id)
    assert f"{pipeline.name} partition" in traced and "applied " in traced
    assert f'"eventId": "{applied_id}"' in traced  # the message, fetched back from Kafka
    traced = eventpipe(pipeline, "trace", clash[1]["eventId"])
    assert "dead-lettered" in traced and "RejectedEvent: email" in traced


def test_worker_killed_mid_batch_loses_nothing(make_pipeline: Any) -> None:
    # Small batches: many tasks, so the kill lands while plenty of work is still queued.
    pipeline: Pipeline = make_pipeline(BATCH_MAX_EVENTS="20")
    messages = stream(4000, seed=31)
    sent = pipeline.send(messages)
    worker = pipeline.start_worker(name="doomed")
    pipeline.start_bridge()
    wait_until(lambda: pipeline.applied_count() > 400, 60, "some events applied")
    assert pipeline.stop(worker, signal.SIGKILL) == -signal.SIGKILL
    assert pipeline.applied_count() < len(messages)
    pipeline.start_worker(name="replacement")
    drained(pipeline, sent)
    assert_state(pipeline, [doc for _, doc in messages])
    assert pipeline.dead_letters() == []


def test_bridge_stopped_and_killed_loses_nothing(make_pipeline: Any) -> None:
    pipeline: Pipeline = make_pipeline()
    messages = stream(3000, seed=41)
    pipeline.start_worker()
    bridge = pipeline.start_bridge(name="bridge-1")
    sent = pipeline.send(messages[:1500])
    wait_until(lambda: pipeline.applied_count() > 100, 60, "some events applied")
    assert pipeline.stop(bridge, signal.SIGTERM) == 0  # graceful: drains, commits, exits 0
    bridge = pipeline.start_bridge(name="bridge-2")
    sent += pipeline.send(messages[1500:])
    wait_until(lambda: pipeline.applied_count() > 1600, 60, "the second bridge at work")
    pipeline.stop(bridge, signal.SIGKILL)
    pipeline.start_bridge(name="bridge-3")
    drained(pipeline, sent)
    assert_state(pipeline, [doc for _, doc in messages])
    assert pipeline.dead_letters() == []


def test_celery_broker_flushed_mid_stream_loses_nothing(make_pipeline: Any) -> None:
    pipeline: Pipeline = make_pipeline()
    messages = stream(2000, seed=51)
    worker = pipeline.start_worker(name="first")
    pipeline.start_bridge()
    sent = pipeline.send(messages[:500])
    wait_until(lambda: pipeline.applied_count() > 0, 60, "some events applied")
    pipeline.stop(worker)
    sent += pipeline.send(messages[500:])

    def queued() -> int:
        return sum(int(pipeline.broker.llen(f"events.p{p}")) for p in range(4))

    wait_until(lambda: queued() > 0, 30, "tasks queued in the Celery broker")
    pipeline.broker.flushdb()  # every queued task is gone
    pipeline.start_worker(name="second")
    drained(pipeline, sent)
    assert_state(pipeline, [doc for _, doc in messages])
    assert pipeline.dead_letters() == []


def test_database_unreachable_for_a_while_loses_nothing(make_pipeline: Any) -> None:
    direct = new_database()
    url = make_url(direct)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    try:
        proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(False)
        pipeline: Pipeline = make_pipeline(database_url=proxied)
        messages = stream(2000, seed=61)
        pipeline.start_worker()
        pipeline.start_bridge()
        sent = pipeline.send(messages[:1000])
        wait_until(lambda: pipeline.applied_count() > 0, 60, "some events applied")
        proxy.cut()
        sent += pipeline.send(messages[1000:])
        outage_log = pipeline.log_dir / f"{pipeline.name}-worker.log"
        wait_until(lambda: "transient failure" in outage_log.read_text(), 30,
                   "the worker to meet the outage")
        proxy.restore()
        drained(pipeline, sent)
        assert_state(pipeline, [doc for _, doc in messages])
        assert pipeline.dead_letters() == []  # a failure of the world is never dead-lettered
    finally:
        proxy.close()
        drop_database(direct)



def test_replay_applies_what_can_now_apply_and_returns_the_rest_with_history(
    make_pipeline: Any,
) -> None:
    pipeline: Pipeline = make_pipeline(RETRY_MAX_ATTEMPTS="3")
    orphan = order_placed("order-late", "user-late")
    sent = pipeline.send([orphan, (b"bad", b"not json at all")])
    pipeline.start_worker()
    pipeline.start_bridge()
    drained(pipeline, sent)
    assert describe(pipeline.dead_letters()) == sorted([
        ("MissingParent", orphan[1]["eventId"]), ("InvalidEvent", "not json at all")])

    parent = user_created("user-late")
    sent += pipeline.send([parent])
    drained(pipeline, sent)
    listed = eventpipe(pipeline, "dlq", "list")
    assert listed.count("\n") == 2 and "MissingParent" in listed
    assert "would replay" in eventpipe(pipeline, "dlq", "replay", "--all", "--dry-run")
    assert len(pipeline.dead_letters()) == 2
    eventpipe(pipeline, "dlq", "replay", "--all")
    drained(pipeline, sent + 2)

    assert_state(pipeline, [parent[1], orphan[1]])
    [back] = pipeline.dead_letters()
    assert back.error_class == "InvalidEvent" and back.value == b"not json at all"
    assert len(back.history) == 1 and back.history[0].replayed_at is not None
    assert back.history[0].error_class == "InvalidEvent"
    shown = eventpipe(pipeline, "dlq", "show", back.entry_id or "")
    assert '"replayedAt"' in shown
    eventpipe(pipeline, "dlq", "purge", "--all")
    assert pipeline.dead_letters() == []


def eventpipe(pipeline: Pipeline, *args: str) -> str:
    """Run the operator's command line against the pipeline."""
    done = subprocess.run([str(BIN / "eventpipe"), *args], env=pipeline.env, check=True,
                          capture_output=True, text=True, timeout=60)
    return done.stdout


def test_backpressure_pauses_partitions_and_bounds_queued_work(make_pipeline: Any) -> None:
    pipeline: Pipeline = make_pipeline(MAX_IN_FLIGHT_PER_PARTITION="150",
                                       REDELIVERY_TIMEOUT_S="30")
    messages = stream(3000, seed=71)
    sent = pipeline.send(messages)
    pipeline.start_bridge()  # no worker yet: nothing gets done
    log = pipeline.log_dir / f"{pipeline.name}-bridge.log"

    def paused() -> set[int]:
        return {json.loads(line)["partition"] for line in log.read_text().splitlines()
                if '"partition paused"' in line}

    wait_until(lambda: paused() == {0, 1, 2, 3}, 60, "every partition paused")
    queued = sum(_events_queued(pipeline, p) for p in range(4))
    # At most the bound plus one batch per partition was handed on.
    assert queued <= 4 * (150 + 100)
    assert queued < len(messages)
    pipeline.start_worker()
    drained(pipeline, sent)
    assert_state(pipeline, [doc for _, doc in messages])


def test_rebalance_between_two_bridges_loses_nothing(make_pipeline: Any) -> None:
    pipeline: Pipeline = make_pipeline()
    messages = stream(3000, seed=81)
    pipeline.start_worker()
    first = pipeline.start_bridge(name="bridge-a")
    sent = pipeline.send(messages[:1000])
    wait_until(lambda: pipeline.applied_count() > 0, 60, "the first bridge at work")
    second = pipeline.start_bridge(name="bridge-b")  # joins: partitions are shared
    sent += pipeline.send(messages[1000:2000])
    second_log = pipeline.log_dir / f"{pipeline.name}-bridge-b.log"
    wait_until(lambda: "partitions assigned" in second_log.read_text(), 60,
               "the second bridge to get partitions")
    assert pipeline.stop(first, signal.SIGTERM) == 0  # leaves: all go to the second
    sent += pipeline.send(messages[2000:])
    drained(pipeline, sent)
    assert_state(pipeline, [doc for _, doc in messages])
    assert second.poll() is None


def _events_queued(pipeline: Pipeline, partition: int) -> int:
    total = 0
    for raw in pipeline.broker.lrange(f"events.p{partition}", 0, -1):
        body = json.loads(base64.b64decode(json.loads(raw)["body"]))
        total += len(body[0][2])  # args: topic, partition, messages
    return total


def test_redis_unreachable_for_a_while_loses_nothing(make_pipeline: Any) -> None:
    pipeline: Pipeline = make_pipeline(redis_proxy=True)
    assert pipeline.redis_proxy is not None
    messages = stream(2000, seed=91)
    pipeline.start_worker()
    pipeline.start_bridge()
    sent = pipeline.send(messages[:1000])
    wait_until(lambda: pipeline.applied_count() > 0, 60, "some events applied")
    # The Celery broker, the ledger and the DLQ all go away at once.
    pipeline.redis_proxy.cut()
    sent += pipeline.send(messages[1000:])
    bridge_log = pipeline.log_dir / f"{pipeline.name}-bridge.log"
    wait_until(lambda: "unreachable" in bridge_log.read_text()
               or "could not send batch" in bridge_log.read_text(), 30,
               "the bridge to meet the outage")
    pipeline.redis_proxy.restore()
    drained(pipeline, sent)
    assert_state(pipeline, [doc for _, doc in messages])
    assert pipeline.dead_letters() == []


def test_two_workers_on_the_same_partitions_still_apply_exactly_once(
    make_pipeline: Any,
) -> None:
    pipeline: Pipeline = make_pipeline()
    messages = stream(2000, seed=101)
    duplicates = messages[::7]
    sent = pipeline.send([*messages, *duplicates])
    pipeline.start_worker(name="twin-a")  # both serve every partition: a mistake
    pipeline.start_worker(name="twin-b")
    pipeline.start_bridge()
    drained(pipeline, sent)
    assert_state(pipeline, [doc for _, doc in messages])
    assert pipeline.dead_letters() == []
    assert pipeline.applied_count() == len(messages)  # the ledger: once per event id
    logs = "".join((pipeline.log_dir / f"{pipeline.name}-{name}.log").read_text()
                   for name in ("twin-a", "twin-b"))
    assert "two workers serve this partition" in logs


def test_ledger_marks_from_a_previous_topic_are_not_trusted(make_pipeline: Any) -> None:
    pipeline: Pipeline = make_pipeline()
    messages = stream(800, seed=111)
    sent = pipeline.send(messages)
    # Done marks left by an earlier topic of the same name (recreated from offset 0), as
    # after `eventpipe up` restarts its in-memory Kafka against a Redis that kept its data.
    ledger = DeliveryLedger(pipeline.redis)
    for partition in range(pipeline.partitions):
        ledger.settle(pipeline.name, partition, range(1000), {})
    pipeline.start_bridge()
    wait_until(lambda: sum(_events_queued(pipeline, p) for p in range(4)) == len(messages), 60,
               "every message handed to Celery")
    # Lose every task: only a bridge that did not take the old marks for these messages
    # still knows they are not done, and sends them again.
    pipeline.broker.flushdb()
    pipeline.start_worker()
    drained(pipeline, sent)
    assert_state(pipeline, [doc for _, doc in messages])
