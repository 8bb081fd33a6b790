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
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from sqlalchemy import text
from sqlalchemy.engine import make_url

from bridge.service import Bridge
from eventpipe.dlq import actions
from eventpipe.effects import Position
from eventpipe.kafka import MessageReader, read_topic_id
from eventpipe.messages import RawMessage
from eventpipe.offset_ledger import OffsetLedger, filed_under
from eventpipe.queues import (
    APPLY_TASK,
    GROUP_HEADER,
    TOPIC_ID_HEADER,
    TaskMessage,
    make_celery,
    queue_name,
    send_batch,
)
from eventpipe.samples import (
    Document,
    encode,
    inventory_adjusted,
    order_placed,
    payment_settled,
    user_created,
)
from eventpipe.verify import render
from launcher.embedded import start_redis
from tests.support.databases import drop_database, new_database, postgres_database
from tests.support.model import expected_state, stored_state
from tests.support.pipeline import (
    BIN,
    Message,
    Pipeline,
    assert_state,
    describe,
    drained,
    stream,
    wait_until,
)
from tests.support.raw_kafka import produce_batch, undecodable_batch
from tests.support.tcp_proxy import TcpProxy
from web.resources.dlq.schemas import DeadLetterSchema


def test_every_event_type_with_disorder_duplicates_stale_and_poison(make_pipeline: Any) -> None:
    pipeline: Pipeline = make_pipeline(PARK_TIMEOUT_S="3")
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
    # Far in the future of its Kafka timestamp: it would freeze its entity (issue 9, item 6).
    future = user_created("u-future", occurred_at=datetime.now(UTC) + timedelta(days=3))
    poison: list[tuple[str | bytes | None, bytes | Document]] = [
        (b"junk-1", b"{this is not json"),
        (b"junk-2", b"\xff\xfe\x00binary"),
        ("k", {"eventId": "bad-type", "eventType": "OrderShipped", "schemaVersion": 1,
               "occurredAt": "2026-11-24T10:00:00Z", "data": {}}),
        invalid, clash, mismatch, orphan, future,
    ]
    sent = pipeline.send([*ordered, *duplicates, *stale, *poison])
    # A producer cannot forge a dead letter's history any more (issue 9, item 7).
    pipeline.producer.produce(pipeline.name, key=b"forged", value=b"{forged",
                              headers=[("eventpipe-dlq-history", b'[{"attempts": "lots"}]')])
    assert pipeline.producer.flush(30) == 0
    sent += 1
    pipeline.start_worker(name="worker-a", partitions=[0, 1])
    pipeline.start_worker(name="worker-b", partitions=[2, 3])
    pipeline.start_bridge()
    drained(pipeline, sent)

    assert_state(pipeline, [doc for _, doc in messages + stale])
    # The orphan waits for its parent, and enters the DLQ when its parking time is over.
    wait_until(lambda: len(pipeline.dead_letters()) == 9, 60, "every poison in the DLQ")
    entries = pipeline.dead_letters()
    assert describe(entries) == sorted([
        ("InvalidEvent", "{forged"),
        ("InvalidEvent", future[1]["eventId"]),
        ("InvalidEvent", "{this is not json"),
        ("InvalidEvent", "\ufffd\ufffd\x00binary"),
        ("InvalidEvent", "bad-type"),
        ("InvalidEvent", invalid[1]["eventId"]),
        ("EmailTaken", clash[1]["eventId"]),
        ("CurrencyMismatch", mismatch[1]["eventId"]),
        ("MissingParent", orphan[1]["eventId"]),
    ])
    by_class = {e.letter.error_class: e for e in entries}
    malformed = next(e for e in entries if e.value == b"{this is not json")
    assert malformed.key == b"junk-1" and malformed.letter.position.topic == pipeline.name
    assert malformed.letter.position.offset is not None
    assert "malformed JSON" in malformed.letter.reason
    assert "Traceback" in (malformed.letter.traceback or "")
    assert malformed.letter.attempts == 1 and malformed.letter.worker
    assert "user 'user-that-never-exists' not found" in by_class["MissingParent"].letter.reason
    assert f"belongs to user {owner['data']['userId']!r}" in by_class["EmailTaken"].letter.reason
    assert "in the future" in next(e for e in entries if e.letter.event_id ==
                                   future[1]["eventId"]).letter.reason
    forged = next(e for e in entries if e.value == b"{forged")
    assert forged.letter.history == ()
    assert '"history": []' in eventpipe(pipeline, "dlq", "show", forged.entry_id or "")
    # Held events came back with their bytes: the reconciler read them from Kafka.
    assert by_class["EmailTaken"].value == encode(clash[1])

    applied_id = users[1][1]["eventId"]
    traced = eventpipe(pipeline, "trace", applied_id)
    assert f"{pipeline.name} partition" in traced and "applied " in traced
    assert f'"eventId": "{applied_id}"' in traced  # the message, fetched back from Kafka
    traced = eventpipe(pipeline, "trace", clash[1]["eventId"])
    assert "open      EmailTaken: email" in traced and "in the DLQ" in traced


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


def test_a_bare_celery_worker_serves_every_partition_in_order(make_pipeline: Any) -> None:
    """`celery -A tasks worker`, nothing more: every partition's queue, the solo pool. A pool
    that would run a partition's batches side by side is refused in one line."""
    pipeline: Pipeline = make_pipeline()
    # A review's finding: with no concurrency asked, Celery gave the threads pool one thread
    # a core, side by side on one partition.
    # And `-P processes`, Celery's other name of prefork, was a prefork pool of as many.
    for pool, name in (("threads", "thread"), ("processes", "prefork")):
        refused = pipeline.start_celery_worker("--pool", pool, name=pool)
        assert refused.wait(timeout=60) == 2
        said = (pipeline.log_dir / f"{pipeline.name}-{pool}.log").read_text().splitlines()
        assert said[-1].startswith(f"celery -A tasks worker: the {name} pool runs batches "
                                   "elsewhere"), said
    # A review's finding: `-P prefork -c 4` ran the solo pool, its banner saying 4.
    refused = pipeline.start_celery_worker("--pool", "prefork", "--concurrency", "4",
                                           name="prefork")
    assert refused.wait(timeout=60) == 2
    said = (pipeline.log_dir / f"{pipeline.name}-prefork.log").read_text().strip().splitlines()
    assert said[-1].startswith("celery -A tasks worker: the solo pool runs one batch at a time")
    messages = stream(1500, seed=33)
    sent = pipeline.send(messages)
    pipeline.start_celery_worker()
    pipeline.start_bridge()
    drained(pipeline, sent)
    assert_state(pipeline, [doc for _, doc in messages])


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


@contextmanager
def _broker_of_its_own(make_pipeline: Any) -> Iterator[tuple[Pipeline, redis.Redis]]:
    """A pipeline whose Celery broker is a Redis apart from its offset ledger's, to be filled
    to its memory bound alone; and a client of that broker."""
    server = start_redis()
    try:
        pipeline: Pipeline = make_pipeline(celery_broker_url=f"{server.url}/1")
        yield pipeline, redis.Redis.from_url(f"{server.url}/1")
    finally:
        server.stop()


def _filled(broker: redis.Redis) -> None:
    """The broker at its memory bound, evicting nothing (as the pipeline's keys need): no
    write taken from here on."""
    broker.config_set("maxmemory-policy", "noeviction")
    broker.config_set("maxmemory", 1)


def _freed_and_drained(pipeline: Pipeline, broker: redis.Redis, worker: subprocess.Popen[bytes],
                       sent: int, messages: list[Message]) -> None:
    assert worker.poll() is None, pipeline.log_of("worker").read_text()[-3000:]
    assert "the Celery broker (CELERY_BROKER_URL) takes no writes: it is at its memory bound " \
           "(maxmemory)" in pipeline.log_of("worker").read_text()
    broker.config_set("maxmemory", 0)
    drained(pipeline, sent)
    assert_state(pipeline, [doc for _, doc in messages])
    assert worker.poll() is None


def test_a_celery_broker_at_its_memory_bound_stops_no_worker(make_pipeline: Any) -> None:
    """Before: a worker taking tasks while the Celery broker's Redis was at its memory bound
    died at once, kombu's record of the delivery refused and its lock for handing tasks back
    too, unrecoverable; a bare `celery -A tasks worker` stayed down (an adversarial probe's
    finding). Now the tasks run with no record of their delivery, said in one line, and the
    worker goes on."""
    with _broker_of_its_own(make_pipeline) as (pipeline, broker):
        messages = stream(400, seed=131)
        worker = pipeline.start_worker()
        wait_until(lambda: " ready." in pipeline.log_of("worker").read_text(), 60,
                   "the worker ready")
        # Its tasks queued while it is stopped (but for the one its waiting BRPOP takes).
        worker.send_signal(signal.SIGSTOP)
        sent = pipeline.send(messages)
        pipeline.start_bridge()

        def queued() -> int:
            return sum(int(broker.llen(queue_name(p))) for p in range(pipeline.partitions))

        wait_until(lambda: queued() >= pipeline.partitions - 1, 60, "the tasks queued")
        _filled(broker)
        worker.send_signal(signal.SIGCONT)
        wait_until(lambda: queued() == 0 and pipeline.applied_count() > 0, 60,
                   "the queued tasks taken and applied")
        _freed_and_drained(pipeline, broker, worker, sent, messages)


def test_a_task_whose_broker_fills_up_while_it_runs_ends_and_its_worker_goes_on(
    make_pipeline: Any,
) -> None:
    """Before: a task taken, with its record, before the Celery broker's Redis reached its
    memory bound, and done after, could not be acknowledged (Redis refuses every command of a
    transaction then, the removal of the record too), and its worker died (an adversarial
    review's finding)."""
    with _broker_of_its_own(make_pipeline) as (pipeline, broker):
        messages = stream(400, seed=137)
        worker = pipeline.start_worker()
        with pipeline.engine.connect() as holder:  # the worker's batch waits on this lock
            holder.begin()
            holder.execute(text("LOCK TABLE applied_events IN ACCESS EXCLUSIVE MODE"))
            sent = pipeline.send(messages)
            pipeline.start_bridge()
            wait_until(lambda: broker.hlen("unacked") > 0, 60, "a task taken, and recorded")
            _filled(broker)
            holder.rollback()
        wait_until(lambda: pipeline.applied_count() > 0, 60, "its events applied")
        wait_until(lambda: "takes no writes" in pipeline.log_of("worker").read_text(), 30,
                   "the refusal said")
        _freed_and_drained(pipeline, broker, worker, sent, messages)


@pytest.mark.parametrize("same_topic", [False, True],
                         ids=["another topic", "the same topic, another consumer group"])
def test_a_pipeline_given_anothers_celery_broker_neither_applies_nor_loses_its_events(
    make_pipeline: Any, same_topic: bool,
) -> None:
    """Two pipelines given one Celery broker by mistake: their queues bear the same names, so
    one's worker takes the other's tasks. It must not write them into its own database, and
    it says why in one line; the pipeline that sent them reads them again from Kafka, as
    after a flushed queue, and applies every one with its own worker. Before: two pipelines
    of one topic name (two Kafka clusters, `events` on both) applied each other's events,
    since a task named only its topic."""
    ours: Pipeline = make_pipeline()
    theirs: Pipeline = make_pipeline(celery_broker_url=ours.settings.celery_broker_url)
    messages = stream(300, seed=53)
    our_worker = ours.start_worker(KAFKA_TOPIC=theirs.name if same_topic else ours.name)
    theirs.start_bridge()
    sent = theirs.send(messages)
    worker_log = ours.log_of("worker")
    wait_until(lambda: "another pipeline uses the same Celery broker" in worker_log.read_text(),
               60, "their tasks taken by our worker")
    ours.stop(our_worker)
    assert ours.applied_count() == 0
    said = [line for line in worker_log.read_text().splitlines() if "another pipeline" in line]
    assert len(said) == 1, said  # once a minute, not once a task
    assert f"a task of topic '{theirs.name}' (consumer group '{theirs.name}-bridge') came on " \
           "queue events.p" in said[0]
    theirs.start_worker()
    drained(theirs, sent)
    assert_state(theirs, [doc for _, doc in messages])


@contextmanager
def behind_a_proxy(make_pipeline: Any, **overrides: str) -> Iterator[tuple[Pipeline, TcpProxy]]:
    """A pipeline on a database of its own reached through a proxy a test can break."""
    direct = new_database()
    url = make_url(direct)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    try:
        proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(False)
        yield make_pipeline(database_url=proxied, **overrides), proxy
    finally:
        proxy.close()
        drop_database(direct)


def through_an_outage(pipeline: Pipeline, messages: list[Message], first: int,
                      begin: Callable[[], None], met: Callable[[str], bool], what: str,
                      timeout_s: float, end: Callable[[], None]) -> None:
    """The first `first` messages flowing, then an outage (`begin`) while the rest are sent;
    once the worker's log shows it `met` the outage, it ends (`end`). Every message ends as
    if nothing had happened, and none is dead-lettered: a failure of the world never is."""
    pipeline.start_worker()
    pipeline.start_bridge()
    sent = pipeline.send(messages[:first])
    wait_until(lambda: pipeline.applied_count() > 0, 60, "some events applied")
    begin()
    sent += pipeline.send(messages[first:])
    worker_log = pipeline.log_of("worker")
    wait_until(lambda: met(worker_log.read_text()), timeout_s, what)
    end()
    drained(pipeline, sent)
    assert_state(pipeline, [doc for _, doc in messages])
    assert pipeline.dead_letters() == []


def test_database_unreachable_for_a_while_loses_nothing(make_pipeline: Any) -> None:
    with behind_a_proxy(make_pipeline) as (pipeline, proxy):
        through_an_outage(pipeline, stream(2000, seed=61), 1000, proxy.cut,
                          lambda log: "batch retried in" in log,
                          "the worker to meet the outage", 30, proxy.restore)


def test_a_database_that_answers_nothing_for_a_while_loses_nothing(make_pipeline: Any) -> None:
    """Packets dropped, no reset: each batch waits on the database until its time limit.
    That is the world failing, not the events: retried, never dead-lettered, however many
    attempts the outage lasts."""
    with behind_a_proxy(make_pipeline, TASK_TIME_LIMIT_S="3", RETRY_MAX_ATTEMPTS="2",
                        RETRY_BACKOFF_BASE_S="0.2", RETRY_BACKOFF_MAX_S="0.5") as (
            pipeline, proxy):
        through_an_outage(pipeline, stream(1500, seed=62), 500, proxy.freeze,
                          lambda log: log.count("still running after 3 s") >= 4,
                          "the time limit to end four attempts", 90, proxy.thaw)


def test_a_child_waits_for_its_parent_and_a_replay_that_fails_again_keeps_its_history(
    make_pipeline: Any,
) -> None:
    pipeline: Pipeline = make_pipeline()
    orphan = order_placed("order-late", "user-late")
    sent = pipeline.send([orphan, (b"bad", b"not json at all")])
    pipeline.start_worker()
    pipeline.start_bridge()
    drained(pipeline, sent)
    # The orphan is parked (not a failure yet): only the malformed message is in the DLQ.
    assert describe(pipeline.dead_letters()) == [("InvalidEvent", "not json at all")]

    parent = user_created("user-late")
    sent += pipeline.send([parent])
    drained(pipeline, sent)
    assert_state(pipeline, [parent[1], orphan[1]])  # no replay needed: it came by itself

    listed = eventpipe(pipeline, "dlq", "list")
    assert listed.count("\n") == 1 and "InvalidEvent" in listed
    assert "would replay" in eventpipe(pipeline, "dlq", "replay", "--all", "--dry-run")
    assert len(pipeline.dead_letters()) == 1
    eventpipe(pipeline, "dlq", "replay", "--all")
    drained(pipeline, sent + 1)
    wait_until(lambda: len(pipeline.dead_letters()) == 1, 30, "the replay to fail again")
    [back] = pipeline.dead_letters()
    assert back.letter.error_class == "InvalidEvent" and back.value == b"not json at all"
    assert [(e.error_class, e.ended) for e in back.letter.history] == [
        ("InvalidEvent", "replayed")]
    shown = eventpipe(pipeline, "dlq", "show", back.entry_id or "")
    assert '"ended": "replayed"' in shown
    # Everything, from a script: refused without --yes (there is no terminal to ask).
    refused = subprocess.run([str(BIN / "eventpipe"), "dlq", "purge", "--all"], env=pipeline.env,
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert refused.returncode == 1 and "--yes" in refused.stderr
    assert len(pipeline.dead_letters()) == 1
    eventpipe(pipeline, "dlq", "purge", "--all", "--yes")
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

    def paused_for() -> dict[int, str | None]:
        # Exit 1: no worker runs, a problem it names.
        shown = subprocess.run([str(BIN / "eventpipe"), "status", "--json"], env=pipeline.env,
                               capture_output=True, text=True, timeout=60)
        return {p["partition"]: p["pausedFor"] for p in json.loads(shown.stdout)["partitions"]}

    wait_until(lambda: paused_for() == dict.fromkeys(range(4), "backpressure"), 30,
               "the status saying why")
    queued = sum(_events_queued(pipeline, p) for p in range(4))
    # At most the bound plus one batch per partition was handed on.
    assert queued <= 4 * (150 + 100)
    assert queued < len(messages)
    pipeline.start_worker()
    drained(pipeline, sent)
    assert_state(pipeline, [doc for _, doc in messages])


def test_a_partition_waiting_for_a_worker_gets_one_batch_not_a_task_per_poll(
        make_pipeline: Any) -> None:
    """While a partition's last task waits in its queue, what the next polls bring joins one
    batch: many small tasks would cost per-task work the workers do not have time for."""
    pipeline: Pipeline = make_pipeline(LOG_LEVEL="DEBUG")
    bridge_log = pipeline.log_dir / f"{pipeline.name}-bridge.log"

    def logged(message: str) -> list[dict[str, Any]]:
        lines = bridge_log.read_text().splitlines() if bridge_log.exists() else []
        return [record for line in lines if line.startswith("{")
                and (record := json.loads(line))["msg"] == message]

    def read(count: int) -> Callable[[], bool]:
        return lambda: len(logged("event received")) == count

    # One key: every message goes to one partition.
    groups = [[inventory_adjusted("SKU-0001", 1) for _ in range(n)] for n in (1, 10, 10, 10)]
    pipeline.start_bridge()
    received = 0
    for group in groups:
        received += pipeline.send(group)
        # Each group arrives in polls of its own, the first leaves on its own.
        wait_until(read(received), 60, f"the bridge to read {received} messages")
        wait_until(lambda: len(logged("batch sent")) == 1, 60, "the first batch sent")
    sent = logged("batch sent")
    assert [record["events"] for record in sent] == [1]  # the rest waits behind it
    pipeline.start_worker()
    wait_until(lambda: pipeline.applied_count() == received, 60, "every message applied")
    assert [record["events"] for record in logged("batch sent")] == [1, 30]


def test_a_stalled_worker_does_not_make_the_bridge_pile_up_copies(make_pipeline: Any) -> None:
    """Issue 9, item 4: a worker stopped for several redelivery periods; what waits in the
    Celery queues stays within the in-flight bound (plus one batch per partition)."""
    pipeline: Pipeline = make_pipeline(MAX_IN_FLIGHT_PER_PARTITION="100",
                                       REDELIVERY_TIMEOUT_S="2", BATCH_MAX_EVENTS="50")
    messages = stream(3000, seed=77)
    sent = pipeline.send(messages)
    worker = pipeline.start_worker()
    pipeline.start_bridge()
    wait_until(lambda: pipeline.applied_count() > 0, 60, "some events applied")
    worker.send_signal(signal.SIGSTOP)
    peak = 0
    try:
        stopped_until = time.monotonic() + 5 * 2  # five redelivery periods
        while time.monotonic() < stopped_until:  # sampling what is queued, not waiting on it
            peak = max(peak, sum(_events_queued(pipeline, p) for p in range(4)))
            time.sleep(0.2)
    finally:
        worker.send_signal(signal.SIGCONT)
    assert 0 < peak <= 4 * (100 + 50)
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


def test_partitions_paused_then_given_back_by_a_rebalance_are_read_again(
    make_pipeline: Any,
) -> None:
    """The Kafka client keeps a partition paused across a rebalance that gives it back to
    the same bridge: one paused for backpressure (no worker yet) must be read again once its
    work is done, however many rebalances passed meanwhile."""
    pipeline: Pipeline = make_pipeline(MAX_IN_FLIGHT_PER_PARTITION="20")
    messages = stream(400, seed=83)
    sent = pipeline.send(messages)
    first = pipeline.start_bridge(name="bridge-a")
    first_log = pipeline.log_of("bridge-a")

    def said(log: Path, what: str) -> int:
        return log.read_text().count(f'"msg":"{what}"') if log.exists() else 0

    wait_until(lambda: said(first_log, "partition paused") == 4, 60, "every partition paused")
    second = pipeline.start_bridge(name="bridge-b")  # joins, then leaves: all go back to A
    wait_until(lambda: said(pipeline.log_of("bridge-b"), "partitions assigned") > 0, 60,
               "the second bridge to get partitions")
    assert pipeline.stop(second, signal.SIGTERM) == 0
    wait_until(lambda: said(first_log, "partitions assigned") >= 3, 60,
               "the first bridge to get them all back")
    pipeline.start_worker()
    drained(pipeline, sent)
    assert_state(pipeline, [doc for _, doc in messages])
    assert first.poll() is None


def _events_queued(pipeline: Pipeline, partition: int) -> int:
    total = 0
    for raw in pipeline.broker.lrange(f"events.p{partition}", 0, -1):
        body = msgpack.unpackb(base64.b64decode(json.loads(raw)["body"]))
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
    assert pipeline.applied_count() == len(messages)  # recorded once per event id


def _filed(pipeline: Pipeline) -> str:
    """The name the offset ledger keeps the pipeline's topic under."""
    admin = AdminClient({"bootstrap.servers": pipeline.settings.kafka_bootstrap_servers})
    found = read_topic_id(admin, pipeline.name, 10)
    assert found  # Tansu gives topics ids
    return filed_under(pipeline.name, found)


def _marks_of_an_earlier_topic(pipeline: Pipeline, ledger: OffsetLedger) -> None:
    """Done marks the ledger holds of the topic's partitions though the group never committed
    them: an earlier topic of the same name where Kafka gives no topic ids (recreated from
    offset 0), or a bridge that died before its first commit."""
    for partition in range(pipeline.partitions):
        ledger.settle(_filed(pipeline), partition, range(1000), {})


def test_ledger_marks_from_a_previous_topic_are_not_trusted(make_pipeline: Any) -> None:
    pipeline: Pipeline = make_pipeline()
    messages = stream(800, seed=111)
    sent = pipeline.send(messages)
    _marks_of_an_earlier_topic(pipeline, OffsetLedger(pipeline.redis,
                                                      pipeline.settings.kafka_group_id))
    pipeline.start_bridge()
    # With no worker taking the first task of a partition, the bridge keeps what follows in
    # its next batch until that batch is full: all but less than a batch per partition waits
    # in Celery.
    held = pipeline.partitions * (pipeline.settings.batch_max_events - 1)
    wait_until(lambda: sum(_events_queued(pipeline, p) for p in range(4)) >= len(messages) - held,
               60, "the messages handed to Celery")
    # Lose every task: only a bridge that did not take the old marks for these messages
    # still knows they are not done, and sends them again.
    pipeline.broker.flushdb()
    pipeline.start_worker()
    drained(pipeline, sent)
    assert_state(pipeline, [doc for _, doc in messages])


def test_a_task_of_an_earlier_topic_of_the_same_name_marks_nothing_of_the_new_one(
        make_pipeline: Any) -> None:
    """Before: the offset ledger was filed under the topic's name alone. A task of a topic
    deleted and made again under that name, run after the bridge had cleared the ledger of
    the new topic's partitions (a retry's countdown, an unacknowledged task handed out again
    after kombu's visibility timeout), marked the new topic's offsets done: the bridge
    committed past events no worker had applied, and they were never applied. Now the ledger
    is filed under Kafka's id of the topic, which each task carries. The bridge's own tasks
    come again only after REDELIVERY_TIMEOUT_S, long after the earlier topic's have run."""
    pipeline: Pipeline = make_pipeline(REDELIVERY_TIMEOUT_S="30")
    messages = stream(200, seed=117)
    sent = pipeline.send(messages)
    pipeline.start_bridge()
    wait_until(lambda: all(_events_queued(pipeline, p) for p in range(pipeline.partitions)), 60,
               "a task queued for every partition")
    # Those tasks are lost; the earlier topic's come instead, one partition's from a bridge
    # that sent no topic id, another's from a bridge that read an id of its own.
    pipeline.broker.flushdb()
    celery = make_celery(pipeline.settings, main="earlier-topic")
    for partition in range(pipeline.partitions):
        earlier = [TaskMessage(offset, b"earlier", b"an earlier topic's message")
                   for offset in range(100)]
        send_batch(celery, pipeline.name, partition, earlier,
                   group=pipeline.settings.kafka_group_id,
                   topic_id="" if partition % 2 else "AAAAAAAAAAAAAAAAAAAAAB")
    pipeline.start_worker()
    wait_until(lambda: pipeline.dead_letters() != []
               and not any(_events_queued(pipeline, p) for p in range(pipeline.partitions)),
               60, "the earlier topic's tasks applied")
    drained(pipeline, sent)
    assert stored_state(pipeline.engine) == expected_state([doc for _, doc in messages])


def test_a_record_of_kombus_that_kombu_cannot_read_stops_no_worker(make_pipeline: Any) -> None:
    """Before: one entry of kombu's record of unacknowledged tasks that was not one it wrote
    (`HSET unacked tag garbage` in the Celery broker's database) stopped every worker a few
    seconds after its start, at each start: kombu hands such tasks back and failed on it
    (a review's finding)."""
    pipeline: Pipeline = make_pipeline()
    pipeline.broker.hset("unacked", mapping={"tag-garbage": "not json", "tag-short": "[1, 2]"})
    pipeline.broker.zadd("unacked_index", {"tag-garbage": 1, "tag-short": 1})
    messages = stream(100, seed=121)
    sent = pipeline.send(messages)
    pipeline.start_worker()
    pipeline.start_bridge()
    drained(pipeline, sent)
    assert stored_state(pipeline.engine) == expected_state([doc for _, doc in messages])
    assert not pipeline.broker.hexists("unacked", "tag-garbage")
    assert "no task kombu wrote" in pipeline.log_of("worker").read_text()


def _running_with(pipeline: Pipeline, first: list[Message]) -> int:
    """A worker and a bridge started, and `first` sent and done: how many were sent."""
    pipeline.start_worker()
    pipeline.start_bridge()
    sent = pipeline.send(first)
    drained(pipeline, sent)
    return sent


def test_a_ledger_key_of_another_kind_keeps_back_its_own_partition_only(
        make_pipeline: Any) -> None:
    """Before: one key of the offset ledger holding a value of another kind (a hand edit:
    `SET …:lease-ranges:…:2 oops`) failed the script that reads every partition's marks, and
    no partition committed anything more, while the log said only that the ledger did not
    answer (a review's finding)."""
    pipeline: Pipeline = make_pipeline()
    messages = stream(400, seed=123)
    sent = _running_with(pipeline, messages[:100])
    ledger = OffsetLedger(pipeline.redis, pipeline.settings.kafka_group_id)
    broken = ledger._key("lease-ranges", _filed(pipeline), 2)
    pipeline.redis.set(broken, "oops")
    sent += pipeline.send(messages[100:])
    ends = pipeline.end_offsets()
    wait_until(lambda: all(pipeline.committed_offsets().get(p) == ends[p]
                           for p in ends if p != 2), 120, "every other partition committed")
    assert "hold a value of another kind" in pipeline.log_of("bridge").read_text()
    pipeline.redis.delete(broken)
    drained(pipeline, sent)
    assert stored_state(pipeline.engine) == expected_state([doc for _, doc in messages])


def test_a_task_no_bridge_sent_is_refused_and_the_bridge_goes_on(make_pipeline: Any) -> None:
    """Before: a task sent by hand with a negative offset was applied, and the mark it left
    in the offset ledger ("-1000000--1000000") stopped the bridge with a traceback, at each
    start (a review's finding)."""
    pipeline: Pipeline = make_pipeline()
    messages = stream(200, seed=119)
    sent = _running_with(pipeline, messages[:100])
    celery = make_celery(pipeline.settings, main="by-hand")
    headers = {GROUP_HEADER: pipeline.settings.kafka_group_id,
               TOPIC_ID_HEADER: _filed(pipeline).partition("@")[2]}
    for partition, wire in ((0, [[-1_000_000, b"k", b"{}", None, 0]]), ("0", []), (0, []),
                            (0, [[5, "k", b"{}", None, 0]]), (0, "messages")):
        celery.send_task(APPLY_TASK, args=[pipeline.name, partition, wire],
                         queue=queue_name(0), headers=headers)
    # A review's finding: a task naming no consumer group was taken for an older bridge's,
    # and its tombstone at an offset it made up dead-lettered (`celery call`, msgpack).
    celery.send_task(APPLY_TASK, args=[pipeline.name, 0, [[10, None, None, None, 0]]],
                     queue=queue_name(0))
    wait_until(lambda: pipeline.broker.llen(queue_name(0)) == 0, 60, "the tasks taken")
    sent += pipeline.send(messages[100:])
    drained(pipeline, sent)
    assert stored_state(pipeline.engine) == expected_state([doc for _, doc in messages])
    assert pipeline.dead_letters() == []
    assert "is no bridge's batch" in pipeline.log_of("worker").read_text()


def test_a_revoked_retry_is_read_again_once_its_lease_lapses(make_pipeline: Any) -> None:
    """Before: revoking a batch that waited to retry (`celery control revoke`, Flower) made
    Celery drop the retry, which keeps the task's id, while its worker renewed the lease for
    the retry's wait and TASK_TIME_LIMIT_S: its partition stood still for 300 s, not
    REDELIVERY_TIMEOUT_S (a review's finding)."""
    pipeline: Pipeline = make_pipeline(DATABASE_LOCK_TIMEOUT_S="0.5", RETRY_BACKOFF_BASE_S="2",
                                       RETRY_BACKOFF_MAX_S="2")
    messages = stream(300, seed=127)
    sent = _running_with(pipeline, messages[:100])
    log = pipeline.log_of("worker")
    with pipeline.engine.begin() as conn:  # every batch waits on the lock, then retries
        conn.exec_driver_sql("LOCK TABLE applied_events IN ACCESS EXCLUSIVE MODE")
        sent += pipeline.send(messages[100:])
        def retried() -> list[str]:
            return [json.loads(line)["taskId"] for line in log.read_text().splitlines()
                    if '"batch retried in' in line]

        wait_until(lambda: bool(retried()), 60, "a batch retried")
        make_celery(pipeline.settings, main="operator").control.revoke(retried())
        wait_until(lambda: "Tasks flagged as revoked" in log.read_text(), 60, "revoked")
    drained(pipeline, sent, timeout_s=90)  # TASK_TIME_LIMIT_S is 300
    assert stored_state(pipeline.engine) == expected_state([doc for _, doc in messages])
    assert "batch revoked, not applied" in log.read_text()


def test_a_pool_workers_queue_cancelled_by_hand_is_consumed_again(make_pipeline: Any) -> None:
    """Before: `celery control cancel_consumer events.p0` (or Flower's button) on the worker
    the pool gave partition 0 left it unconsumed for good: the pool still gave it to that
    worker, so no other took it (a review's finding)."""
    pipeline: Pipeline = make_pipeline()
    messages = stream(400, seed=131)
    sent = pipeline.send(messages[:100])
    worker = pipeline.start_celery_worker()
    pipeline.start_bridge()
    drained(pipeline, sent)
    replies = make_celery(pipeline.settings, main="operator").control.cancel_consumer(
        queue_name(0), reply=True, timeout=10)
    assert replies and all("no longer consuming" in str(r) for r in replies), replies
    sent += pipeline.send(messages[100:])
    drained(pipeline, sent, timeout_s=60)
    assert stored_state(pipeline.engine) == expected_state([doc for _, doc in messages])
    assert "the partition queues this worker consumes were changed by hand" in \
        pipeline.log_dir.joinpath(f"{pipeline.name}-celery.log").read_text()
    assert worker.poll() is None


def _a_bridges_task(pipeline: Pipeline) -> dict[str, Any]:
    """A task as a bridge sends it, as the Celery broker holds it (kombu's envelope)."""
    celery = make_celery(pipeline.settings, main="by-hand")
    send_batch(celery, pipeline.name, 0, [TaskMessage(0, b"k", b"{}")],
               group=pipeline.settings.kafka_group_id, topic_id="t")
    item = pipeline.broker.rpop(queue_name(0))
    assert isinstance(item, bytes)
    return dict(json.loads(item))


def _edited(task: dict[str, Any], headers: dict[str, Any] | None = None,
            fields: dict[str, Any] | None = None) -> bytes:
    edited = {**task, "headers": {**task["headers"], **(headers or {})}, **(fields or {})}
    return json.dumps({name: value for name, value in edited.items()
                       if value is not None}).encode()


def test_what_no_bridge_wrote_in_a_partition_queue_stops_no_worker(make_pipeline: Any) -> None:
    """Before: an item pushed onto a partition's queue by another program or a hand edit
    (`LPUSH events.p0 oops`), or a bridge's task with a field edited (no task id, a time limit
    of one number, a body of another shape), stopped the worker that popped it, with every
    partition it served, or kept it taking the item again for ever; a queue key of another
    kind (`SET events.p1 oops`) stopped it at each start, as kombu's record of delivered
    tasks of another kind did, at each start or as the worker ran (reviews' findings)."""
    pipeline: Pipeline = make_pipeline()
    pipeline.broker.set("unacked", "at start")
    pipeline.broker.set("_kombu.binding.events.p2", "at start")
    task = _a_bridges_task(pipeline)
    messages = stream(300, seed=127)
    sent = _running_with(pipeline, messages[:100])
    properties = {**task["properties"], "body_encoding": "rot13"}
    garbage = [b"oops", b"\xff\xfe", b"[1, 2]", b"{}", b'{"properties": []}',
               _edited(task, fields={"body": "!!not base64"}),
               _edited(task, fields={"properties": properties}),
               _edited(task, headers={"id": None}), _edited(task, headers={"timelimit": 5}),
               _edited(task, headers={"task": ["x"]}), _edited(task, headers={"shadow": [1]}),
               _edited(task, fields={"body": base64.b64encode(msgpack.packb([1])).decode()}),
               _edited(task, fields={"body": ""}), _edited(task, fields={"content-type": [1]}),
               _edited(task, fields={"content-type": "application/json",
                                     "body": base64.b64encode(b"[[], {}, {}]").decode()})]
    for item in garbage:
        pipeline.broker.lpush(queue_name(0), item)
    wait_until(lambda: pipeline.broker.llen(queue_name(0)) == 0, 60, "the items taken")
    sent += pipeline.send(messages[100:200])
    drained(pipeline, sent)
    pipeline.broker.set(queue_name(1), "oops")
    pipeline.broker.set("unacked", "as it runs")
    sent += pipeline.send(messages[200:])
    drained(pipeline, sent)
    assert stored_state(pipeline.engine) == expected_state([doc for _, doc in messages])
    assert [process.poll() for process in pipeline.processes] == [None, None]
    log = pipeline.log_of("worker").read_text()
    assert "no message a bridge wrote" in log
    assert "events.p1 held a value of another kind" in log
    assert "Unrecoverable error" not in log and "Connection to broker lost" not in log
    aside = {key: sorted(str(pipeline.broker.get(found))
                         for found in pipeline.broker.keys(f"{key}.set-aside.*"))
             for key in (queue_name(1), "unacked", "_kombu.binding.events.p2")}
    assert aside == {queue_name(1): ["b'oops'"], "unacked": ["b'as it runs'", "b'at start'"],
                     "_kombu.binding.events.p2": ["b'at start'"]}


def test_a_worker_on_a_database_never_migrated_takes_no_partition_from_the_pool(
        make_pipeline: Any, tmp_path: Path) -> None:
    """Before: a worker given a DATABASE_URL whose database was never migrated (a fresh
    database), does not exist (a typo) or is a SQLite file not there (made empty, then) joined
    the worker pool, took a share of the partitions, and held their events, failing each
    batch, while the workers on the right database idled (reviews' findings)."""
    pipeline: Pipeline = make_pipeline()
    no_file = tmp_path / "none.db"
    with postgres_database() as empty:
        wrong = {"empty": empty, "missing": f"{empty}_missing", "no-file": f"sqlite:///{no_file}"}
        options = ("--without-mingle", "--without-gossip", "--loglevel", "INFO")
        pipeline.start_celery_worker(*options, name="right")
        waiting = [pipeline.spawn(name, [sys.executable, "-m", "celery", "-A", "tasks",
                                         "worker", *options], DATABASE_URL=url)
                   for name, url in wrong.items()]
        pipeline.start_bridge()
        said = {name: pipeline.log_of(name).read_text for name in wrong}
        wait_until(lambda: all("consumes nothing until then" in log() or " ready." in log()
                               for log in said.values()), 60, "the wrong workers waiting, or ready")
        waiting[0].send_signal(signal.SIGHUP)  # a reload meanwhile ends none (a review's)
        messages = stream(200, seed=129)
        drained(pipeline, pipeline.send(messages))
        assert stored_state(pipeline.engine) == expected_state([doc for _, doc in messages])
        assert [worker.poll() for worker in waiting] == [None, None, None]
        assert not any(" ready." in log() for log in said.values())
        assert "run `eventpipe migrate`" in said["empty"]()
        assert "does not exist" in said["missing"]() and not no_file.exists()
        assert "names no database here" in said["no-file"]()


def test_verify_reads_a_topic_a_transactional_producer_wrote_to_its_end(
        make_pipeline: Any) -> None:
    """Before: `eventpipe verify` on a topic whose partitions end in a transaction's marker
    (Java's exactly-once producers, Kafka Streams, Flink) waited for a message at the marker's
    offset, and failed after 10 s blaming Kafka; the bridge commits past markers (a review's
    finding)."""
    pipeline: Pipeline = make_pipeline(partitions=1)
    producer = Producer({"bootstrap.servers": pipeline.settings.kafka_bootstrap_servers,
                         "transactional.id": f"tx-{pipeline.name}"})
    producer.init_transactions(30)
    messages = stream(6, seed=131)
    for pair in (messages[:3], messages[3:]):
        producer.begin_transaction()
        for key, doc in pair:
            producer.produce(pipeline.name, key=key, value=encode(doc), partition=0)
        producer.commit_transaction(30)  # a marker after each three: offsets 3 and 7
    pipeline.start_worker()
    pipeline.start_bridge()
    wait_until(lambda: pipeline.committed_offsets().get(0) == 8, 60, "committed past the marker")
    report = pipeline.verify()
    assert report.clean and report.messages == 6, render(report)


def test_a_zstd_batch_that_decompresses_past_a_hundred_megabytes_is_read(
        make_pipeline: Any) -> None:
    """Before: a valid zstd record batch of repetitive events (another client's, a large
    `batch.size`) that decompresses to more than librdkafka's default answer size (100 MB)
    was taken for a corrupt one: its every event was dead-lettered, without its bytes, and
    none applied (a review's finding)."""
    pipeline: Pipeline = make_pipeline(partitions=1)
    producer = Producer({"bootstrap.servers": pipeline.settings.kafka_bootstrap_servers,
                         "compression.type": "zstd", "linger.ms": 2000,
                         "batch.size": 1_000_000_000, "batch.num.messages": 1_000_000,
                         "message.max.bytes": 1_000_000_000,
                         "queue.buffering.max.kbytes": 1_000_000})
    events = [inventory_adjusted(f"SKU-{n % 7}", 1) for n in range(130)]
    for key, doc in events:  # unknown fields are the contract's to allow
        producer.produce(pipeline.name, key=key, value=encode({**doc, "note": "a" * 900_000}),
                         partition=0)
    assert producer.flush(60) == 0
    pipeline.start_worker()
    pipeline.start_bridge()
    drained(pipeline, len(events))
    assert pipeline.dead_letters() == []
    assert stored_state(pipeline.engine) == expected_state([doc for _, doc in events])


def test_a_tombstone_and_headers_leave_the_dlq_as_they_came(make_pipeline: Any) -> None:
    """Before: a null value (a tombstone) was dead-lettered as an empty value, shown as one
    and replayed as one, and a dead-lettered message's Kafka headers were dropped: a replay
    gave other consumers of the topic another message."""
    pipeline: Pipeline = make_pipeline()
    headers = (("traceparent", b"00-4bf92f35-01"), ("empty", None), ("traceparent", b"\xff"))
    sent = [RawMessage(b"k-tombstone", None, headers), RawMessage(b"k-empty", b""),
            RawMessage(b"k-bad", b"{bad", headers)]
    for message in sent:
        pipeline.producer.produce(pipeline.name, key=message.key, value=message.value,
                                  headers=list(message.headers) or None, partition=0)
    assert pipeline.producer.flush(15) == 0
    pipeline.start_worker()
    pipeline.start_bridge()
    drained(pipeline, len(sent))
    wait_until(lambda: len(pipeline.dead_letters()) == len(sent), 60, "the dead letters")
    entries = sorted(pipeline.dead_letters(), key=lambda entry: entry.letter.position.offset or 0)
    assert [entry.raw for entry in entries] == sent
    assert [entry.tombstone for entry in entries] == [True, False, False]
    shown = DeadLetterSchema().dump(entries[0])
    assert (shown["tombstone"], shown["value"], shown["headers"]) == (True, {"text": ""}, [
        {"name": "traceparent", "value": {"text": "00-4bf92f35-01"}},
        {"name": "empty", "value": None},
        {"name": "traceparent", "value": {"base64": "/w=="}}])
    result = actions.replay(pipeline.engine, pipeline.dlq, entries,
                            actions.Publisher(pipeline.settings))
    assert result.replayed == len(sent)
    reader = MessageReader(pipeline.settings)
    try:
        copies = [reader.fetch(Position(pipeline.name, 0, offset))
                  for offset in range(len(sent), 2 * len(sent))]
    finally:
        reader.close()
    assert copies == sent


class _ForgetRefused(OffsetLedger):
    """The offset ledger of a Redis that refuses to forget partitions until `allowed`, as
    one still loading its append-only file refuses commands while a new bridge is given its
    partitions."""

    allowed = False
    refused = 0

    def forget(self, topic: str, partitions: Iterable[int]) -> None:
        if not self.allowed:
            self.refused += 1
            raise redis.BusyLoadingError("Redis is loading the dataset in memory")
        super().forget(topic, partitions)


def test_ledger_marks_of_a_previous_topic_are_not_trusted_until_they_are_cleared(
        make_pipeline: Any) -> None:
    """Before: a bridge that could not clear the marks an earlier topic of the same name left
    (Redis not answering as partitions were assigned) went on, took them for its own events'
    and committed past events no worker had applied. Now it reads nothing of those
    partitions until the marks are gone (the bridge's own marks would go with them)."""
    pipeline: Pipeline = make_pipeline()
    messages = stream(200, seed=113)
    sent = pipeline.send(messages)
    ledger = _ForgetRefused(pipeline.redis, pipeline.settings.kafka_group_id)
    _marks_of_an_earlier_topic(pipeline, ledger)
    bridge = Bridge(pipeline.settings, ledger=ledger)
    running = threading.Thread(target=bridge.run, name="bridge", daemon=True)
    running.start()
    try:
        wait_until(lambda: ledger.refused >= 3 or bool(pipeline.committed_offsets()), 60,
                   "the bridge asking again to clear the ledger")
        assert pipeline.committed_offsets() == {}
        assert sum(_events_queued(pipeline, p) for p in range(pipeline.partitions)) == 0
        ledger.allowed = True
        pipeline.start_worker()
        drained(pipeline, sent)
    finally:
        bridge.stopping = True
        running.join(timeout=30)
    assert_state(pipeline, [doc for _, doc in messages])


@contextmanager
def a_batch_held_by_the_database(pipeline: Pipeline) -> Iterator[subprocess.Popen[bytes]]:
    """A worker and a bridge started while a lock holds the stock table: the worker, once
    its batch waits on the lock (a database gone slow); the lock goes as the block ends."""
    holder = pipeline.engine.connect()
    try:
        holder.exec_driver_sql("BEGIN")
        holder.exec_driver_sql("LOCK TABLE inventory IN EXCLUSIVE MODE")
        worker = pipeline.start_worker(name="worker")
        pipeline.start_bridge()

        def waiting_on_the_lock() -> bool:
            # Asked on a connection of its own: a transaction sees one snapshot of the view.
            with pipeline.engine.connect() as conn:
                return bool(conn.exec_driver_sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database()").scalar_one())

        wait_until(waiting_on_the_lock, 60, "the batch waiting on the database")
        yield worker
    finally:
        holder.rollback()
        holder.close()


def test_a_worker_stopped_mid_batch_ends_it_in_time_and_counts_no_death(
        make_pipeline: Any) -> None:
    """Before: a stopped worker waited for its batch however long it took (up to
    TASK_TIME_LIMIT_S on a slow database), so its supervisor or Docker killed it first, and
    the kill counted as a death of the batch's messages: three such stops on one range
    dead-lettered good events as WorkerCrashed. Now the batch ends within
    SHUTDOWN_DRAIN_TIMEOUT_S, as a failure of the world, and is applied by the next
    worker."""
    pipeline: Pipeline = make_pipeline(SHUTDOWN_DRAIN_TIMEOUT_S="1",
                                       DATABASE_LOCK_TIMEOUT_S="120")
    documents = [inventory_adjusted("SKU-HELD", 3)]
    sent = pipeline.send(documents)
    with a_batch_held_by_the_database(pipeline) as worker:
        started = time.monotonic()
        assert pipeline.stop(worker, signal.SIGTERM, timeout_s=20) == 0
        assert time.monotonic() - started < 15
        runs = [key for key in pipeline.redis.scan_iter("*:runs:*")
                if pipeline.redis.hlen(key)]
        assert runs == []  # the run ended: no death for its messages
    pipeline.start_worker(name="next")
    drained(pipeline, sent)
    assert_state(pipeline, [doc for _, doc in documents])
    assert pipeline.dead_letters() == []


def test_a_ledger_that_stops_answering_mid_batch_is_a_retry_not_a_failed_task(
        make_pipeline: Any) -> None:
    """Before: the offset ledger's error left the task: Celery logged it as a task that
    raised, with its traceback, the batch's planned retries were dropped, and its events
    waited for their leases to lapse before the bridge read them again. Now the batch is
    retried whole, with its backoff, as one whose database failed is."""
    pipeline: Pipeline = make_pipeline(redis_proxy=True, DATABASE_LOCK_TIMEOUT_S="120")
    assert pipeline.redis_proxy is not None
    # Only the ledger and the DLQ are cut: the Celery broker stays reachable.
    pipeline.env["CELERY_BROKER_URL"] = f"{pipeline.redis_server.url}/1"
    documents = [inventory_adjusted("SKU-LEDGER", 2)]
    sent = pipeline.send(documents)
    with a_batch_held_by_the_database(pipeline) as worker:
        pipeline.redis_proxy.cut()
    worker_log = pipeline.log_of("worker")
    wait_until(lambda: "the offset ledger does not answer" in worker_log.read_text(), 60,
               "the batch retried for the ledger")
    pipeline.redis_proxy.restore()
    drained(pipeline, sent)
    assert worker.poll() is None
    assert "raised unexpected" not in worker_log.read_text()
    assert_state(pipeline, [doc for _, doc in documents])
    assert pipeline.dead_letters() == []


def test_a_record_batch_kafka_cannot_hand_over_is_dead_lettered_and_the_reading_goes_on(
        make_pipeline: Any) -> None:
    """A review's finding: a record batch the Kafka client cannot decode (a faulty producer
    or broker wrote it; the broker takes one whose gzip payload is not gzip) was fetched
    again forever. Its partition stalled behind it with no dead letter and no word in the
    status, and `eventpipe verify` looped. Each of its offsets is now dead-lettered
    (`UnreadableMessage`), the reading goes on past it, and verify is clean."""
    pipeline: Pipeline = make_pipeline(partitions=2)
    bootstrap = pipeline.settings.kafka_bootstrap_servers

    def stock(sku: str, partition: int) -> None:
        key, document = inventory_adjusted(sku, 2)
        pipeline.producer.produce(pipeline.name, key=key, value=encode(document),
                                  partition=partition)
        assert pipeline.producer.flush(15) == 0

    stock("SKU-A", 0)
    stock("SKU-B", 0)
    first = produce_batch(bootstrap, pipeline.name, 0, undecodable_batch(3))
    stock("SKU-A", 0)
    stock("SKU-C", 1)
    pipeline.start_worker()
    pipeline.start_bridge()
    wait_until(lambda: pipeline.committed_offsets() == {0: first + 4, 1: 1}, 60,
               "the partition read and committed past the batch")
    wait_until(lambda: len(pipeline.dead_letters()) == 3, 60, "the batch's dead letters")
    letters = sorted((entry.letter for entry in pipeline.dead_letters()),
                     key=lambda letter: letter.position.offset or 0)
    assert [(letter.error_class, letter.position.offset) for letter in letters] == [
        ("UnreadableMessage", offset) for offset in range(first, first + 3)]
    assert all(f"offsets from {first} to {first + 2}) cannot be read" in letter.reason
               for letter in letters)
    assert pipeline.applied_count() == 4
    report = pipeline.verify()
    assert report.clean, render(report)
    assert report.dead_lettered == 3
