"""A worker's failure path with real parts: the database, Redis, and a process that dies.

Whatever goes wrong with one message, its neighbours apply, and it ends dead-lettered with
the reason — never stuck (issue 9, item 1), and a value the database refuses is dead-lettered
at once, not after minutes of retries (item 8).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
import uuid
from collections.abc import Collection, Iterator, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
import redis
from prometheus_client import REGISTRY
from sqlalchemy import Engine, select, text

import eventpipe.reconcile
import tasks.processing
from eventpipe import metrics
from eventpipe.apply import BatchResult, apply_batch
from eventpipe.database import make_engine
from eventpipe.dlq.letter import DeadLetter
from eventpipe.dlq.stream import DeadLetterStream
from eventpipe.effects import Received
from eventpipe.errors import TransientError, is_transient
from eventpipe.failures import SCHEMA_OUT_OF_STEP
from eventpipe.offset_ledger import Crashed, OffsetLedger, filed_under
from eventpipe.queues import TaskMessage
from eventpipe.samples import (
    encode,
    inventory_adjusted,
    order_placed,
    payment_settled,
    user_created,
)
from eventpipe.settings import Settings
from eventpipe.tables import applied_events, dead_letters, inventory
from tasks.processing import Processor
from tasks.reconciler import Reconciler
from tests.support.factories import at
from tests.support.pipeline import wait_until
from tests.support.services import REDIS_URL

TOPIC = "events"
POISON = "poison-event"


def messages(count: int, poison_at: int | None = None) -> list[TaskMessage]:
    made = []
    for offset in range(count):
        event_id = POISON if offset == poison_at else f"ev-{offset}"
        key, doc = inventory_adjusted("SKU-1", 1, occurred_at=at(offset), event_id=event_id)
        made.append(TaskMessage(offset, key.encode(), encode(doc)))
    return made


@pytest.fixture
def parts(engine: Engine, redis_client: redis.Redis) -> Iterator[tuple[Processor, OffsetLedger]]:
    group = f"test-{uuid.uuid4().hex}"
    ledger = OffsetLedger(redis_client, group)
    stream = DeadLetterStream(redis_client, f"{group}:dlq", 1000, 10**7)
    settings = Settings(database_url=str(engine.url), retry_max_attempts=3,
                        crash_max_attempts=2, redelivery_timeout_s=30)
    yield Processor(settings, engine, stream, ledger, worker="test:1"), ledger
    keys = list(redis_client.scan_iter(f"*{group}*"))
    if keys:
        redis_client.delete(*keys)


def applied_ids(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return {row[0] for row in conn.execute(select(applied_events.c.event_id))}


def letters(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(dead_letters)))


def ending_refused(monkeypatch: pytest.MonkeyPatch, ledger: OffsetLedger,
                   errors: list[Exception]) -> list[Exception]:
    """The ledger's script that ends a run raises `errors`, one a call, before it runs again."""
    script = ledger._finish

    def finish(*args: Any, **kwargs: Any) -> Any:
        if errors:
            raise errors.pop()
        return script(*args, **kwargs)

    monkeypatch.setattr(ledger, "_finish", finish)
    return errors


def failing_on_poison(error: Exception, poison: Collection[str] = (POISON,)) -> Any:
    real = apply_batch

    def apply(engine: Engine, batch: Sequence[Received], failures: Sequence[DeadLetter] = (),
              **kwargs: Any) -> BatchResult:
        if any(item.event.event_id in poison for item in batch):
            raise error
        return real(engine, batch, failures, **kwargs)

    return apply


def test_an_unforeseen_error_is_isolated_then_dead_lettered_and_its_neighbours_apply(
    engine: Engine, parts: tuple[Processor, OffsetLedger], monkeypatch: pytest.MonkeyPatch,
) -> None:
    processor, ledger = parts
    monkeypatch.setattr(tasks.processing, "apply_batch",
                        failing_on_poison(ValueError("a bug nobody foresaw")))
    report = processor.run(TOPIC, 0, messages(40, poison_at=17))
    assert applied_ids(engine) == {f"ev-{n}" for n in range(40) if n != 17}
    [later] = report.later  # the poison alone, to be tried again later
    assert [m.offset for m in later.messages] == [17] and not later.transient
    done, leased, _ = ledger.read(TOPIC, {0: 0})[0]
    assert done == set(range(40)) - {17} and leased == {17}
    # Its attempts run out: dead-lettered with the error and its traceback, offset done.
    for _ in range(2):
        report = processor.run(TOPIC, 0, report.later[0].messages)
    assert report.later == []
    [row] = letters(engine)
    assert (row.error_class, row.attempts, row.kafka_offset) == ("ValueError", 3, 17)
    assert "a bug nobody foresaw" in row.reason and "Traceback" in row.traceback
    assert ledger.read(TOPIC, {0: 0})[0][0] == set(range(40))


def test_what_fails_after_a_part_committed_is_no_failure_of_its_events(
    engine: Engine, parts: tuple[Processor, OffsetLedger], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The part committed, then its bookkeeping failed (the task's time limit came between the
    commit and the offsets marked done, say): its events have their fates, its offsets are
    done, and the rest of the run waits for a retry. (Before: the part was taken for failed; a
    message on its last attempt was dead-lettered though applied, and its dead letter stayed,
    for no later copy of it is ever applied.)"""
    processor, ledger = parts

    class TaskTimeLimitExceeded(Exception):
        """As `tasks.app` raises it: an error nobody foresaw."""

    limits = [TaskTimeLimitExceeded("batch still running after 300 s")] * 2
    observe_all = metrics.observe_all  # what a batch counts once it committed

    def interrupted(*args: Any, **kwargs: Any) -> None:
        if limits:
            raise limits.pop()
        observe_all(*args, **kwargs)

    monkeypatch.setattr(metrics, "observe_all", interrupted)
    [message] = messages(1)
    report = processor.run(TOPIC, 0, [replace(message, attempts=processor.policy.max_attempts - 1)])
    assert report.later == [] and report.fates == {"applied": 1}
    assert applied_ids(engine) == {"ev-0"} and letters(engine) == []
    # Split by a bad message, the first half applied, its bookkeeping cut short: the second
    # half waits, as after a failure of the world.
    monkeypatch.setattr(tasks.processing, "apply_batch",
                        failing_on_poison(ValueError("a bug nobody foresaw")))
    report = processor.run(TOPIC, 0, messages(5, poison_at=4)[1:])
    [later] = report.later
    assert later.transient and [m.offset for m in later.messages] == [3, 4]
    assert applied_ids(engine) == {"ev-0", "ev-1", "ev-2"} and letters(engine) == []
    done, leased, _ = ledger.read(TOPIC, {0: 0})[0]
    assert done == {0, 1, 2} and leased == {3, 4}


def test_a_table_not_there_is_waited_for_not_blamed_on_the_events(
    engine: Engine, parts: tuple[Processor, OffsetLedger],
) -> None:
    """A table the code writes is gone (dropped, or a worker deployed before `eventpipe
    migrate` ran): the batch waits for the world, as for a database that is down, and no
    event is dead-lettered for it. Once the table is back, the same messages apply."""
    processor, ledger = parts
    batch = messages(5)
    inventory.drop(engine)
    try:
        report = processor.run(TOPIC, 0, batch)
        for _ in range(3):  # however often it is tried
            [later] = report.later
            assert later.transient and SCHEMA_OUT_OF_STEP in later.reason, later.reason
            assert [m.offset for m in later.messages] == list(range(5))
            report = processor.run(TOPIC, 0, later.messages, retries=1)
        assert letters(engine) == [] and applied_ids(engine) == set()
        assert ledger.read(TOPIC, {0: 0})[0][:2] == (set(), set(range(5)))  # kept, not done
    finally:
        inventory.create(engine, checkfirst=True)
    report = processor.run(TOPIC, 0, report.later[0].messages, retries=2)
    assert report.later == [] and applied_ids(engine) == {f"ev-{n}" for n in range(5)}
    assert letters(engine) == []


def test_a_key_not_there_is_waited_for_not_blamed_on_the_events(
    engine: Engine, parts: tuple[Processor, OffsetLedger],
) -> None:
    """Before: a table without its key (a `pg_restore --clean` under running workers loads
    the rows first and the keys last; a key rebuilt by hand) dead-lettered every event of
    the batches meanwhile, after their retries, as the database refusing them (an
    adversarial probe's finding: 1,535 of 12,000 events). It is the schema out of step, as a
    table or column not there is."""
    processor, _ = parts
    batch = messages(5)
    with engine.begin() as conn:  # the table as a restore makes it before its key
        conn.execute(text("CREATE TABLE keyless AS SELECT * FROM applied_events"))
        conn.execute(text("DROP TABLE applied_events"))
        conn.execute(text("ALTER TABLE keyless RENAME TO applied_events"))
    try:
        report = processor.run(TOPIC, 0, batch)
        for attempt in range(processor.policy.max_attempts + 1):  # past the retry budget
            [later] = report.later
            assert later.transient and SCHEMA_OUT_OF_STEP in later.reason, later.reason
            report = processor.run(TOPIC, 0, later.messages, retries=attempt + 1)
        assert letters(engine) == []
    finally:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE applied_events"))
        applied_events.create(engine)
    report = processor.run(TOPIC, 0, report.later[0].messages, retries=2)
    assert report.later == [] and applied_ids(engine) == {f"ev-{n}" for n in range(5)}
    assert letters(engine) == []


def test_a_copy_of_a_given_up_event_that_applies_closes_its_dead_letter(
    engine: Engine, parts: tuple[Processor, OffsetLedger], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An event given up on its own (an unforeseen error here; a worker that died on it, a
    value the database refused) that applies when a copy of it comes again (sent again,
    read again from Kafka) has one fate: applied. The worker's reconciler resolves its dead
    letter, which leaves the DLQ. A letter whose event no copy applied stays, and so does one
    of a copy that failed after another had applied (a copy that kills its worker is one an
    operator must see)."""
    processor, _ = parts
    first = messages(3, poison_at=1)

    def copy(offset: int, event_id: str) -> TaskMessage:  # at its last attempt
        return TaskMessage(offset, first[1].key,
                           (first[1].value or b"").replace(POISON.encode(),
                                                           event_id.encode()),
                           attempts=2)

    processor.run(TOPIC, 2, [replace(copy(0, "early"), attempts=0)])
    monkeypatch.setattr(tasks.processing, "apply_batch", failing_on_poison(
        ValueError("a bug since fixed"), (POISON, "other-poison", "early")))
    report = processor.run(TOPIC, 0, first)
    for _ in range(2):
        report = processor.run(TOPIC, 0, report.later[0].messages)
    processor.run(TOPIC, 1, [copy(10, "other-poison")])
    processor.run(TOPIC, 2, [copy(1, "early")])
    assert [(row.state, row.error_class) for row in letters(engine)] == [("open", "ValueError")] * 3
    # No Kafka here: a stream rebuilt puts entries without their bytes.
    reconciler = Reconciler(engine, processor.stream, lambda: lambda position: None,
                            timedelta(hours=1), copies_every_s=0)
    reconciler.run_once()
    assert processor.stream.depth() == 3

    monkeypatch.setattr(tasks.processing, "apply_batch", apply_batch)
    processor.run(TOPIC, 0, [replace(first[1], offset=50)])  # the same event, sent again
    assert POISON in applied_ids(engine)
    reconciler.run_once()
    states = {row.event_id: row.state for row in letters(engine)}
    assert states == {POISON: "resolved", "other-poison": "open", "early": "open"}
    assert sorted(entry.letter.event_id or "" for entry in processor.stream.scan()) == [
        "early", "other-poison"]


def test_a_value_the_database_refuses_is_dead_lettered_at_once(
    engine: Engine, parts: tuple[Processor, OffsetLedger], monkeypatch: pytest.MonkeyPatch,
) -> None:
    processor, _ = parts
    refusing = {"postgresql": "SELECT 1 / 0",  # SQLSTATE 22012
                "sqlite": "SELECT zeroblob(2000000000)"}[engine.dialect.name]  # TOOBIG
    with engine.connect() as conn:  # a real DataError of this database
        try:
            conn.execute(text(refusing))
        except Exception as exc:
            refused = exc
        else:
            pytest.fail("the database accepted it")
    monkeypatch.setattr(tasks.processing, "apply_batch", failing_on_poison(refused))
    report = processor.run(TOPIC, 0, messages(10, poison_at=3))
    assert report.later == []
    [row] = letters(engine)
    assert row.kafka_offset == 3 and row.attempts == 1
    assert "the database refused the event" in row.reason
    assert len(applied_ids(engine)) == 9


def test_a_dead_letter_the_world_keeps_from_being_written_waits_with_its_message(
    engine: Engine, parts: tuple[Processor, OffsetLedger], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: a failure of the world while a message given up on was dead-lettered (the
    database gone at that moment) left the run: the task failed, with a traceback, and the
    message waited for the bridge to read it again. Now it waits as a batch whose database
    fails does, then ends dead-lettered."""
    processor, _ = parts
    real = apply_batch
    world = [TransientError("the database went away")]

    def refusing(engine: Engine, batch: Sequence[Received],
                 failures: Sequence[DeadLetter] = (), **kwargs: Any) -> BatchResult:
        if any(item.event.event_id == POISON for item in batch):
            raise ValueError("a bug nobody foresaw")
        if failures and world:
            raise world.pop()
        return real(engine, batch, failures, **kwargs)

    monkeypatch.setattr(tasks.processing, "apply_batch", refusing)
    sent = messages(10, poison_at=3)
    report = processor.run(TOPIC, 0, [replace(m, attempts=2) if m.offset == 3 else m
                                      for m in sent])
    [later] = report.later  # it, and what was not applied yet behind it
    assert later.transient and [m.offset for m in later.messages] == list(range(3, 10))
    assert letters(engine) == [] and applied_ids(engine) == {"ev-0", "ev-1", "ev-2"}
    report = processor.run(TOPIC, 0, later.messages, retries=1)
    assert report.later == [] and [row.kafka_offset for row in letters(engine)] == [3]
    assert len(applied_ids(engine)) == 9


def _a_refusal(engine: Engine) -> Exception:
    """An error the database raises for a value it refuses, as the driver raises it."""
    with engine.connect() as conn:
        try:
            conn.execute(text({"postgresql": "SELECT 1 / 0",
                               "sqlite": "SELECT zeroblob(2000000000)"}[engine.dialect.name]))
        except Exception as exc:
            return exc
    raise AssertionError("the database took what it should refuse")


def test_a_message_whose_dead_letter_the_database_refuses_still_ends_dead_lettered(
    engine: Engine, parts: tuple[Processor, OffsetLedger], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: the refusal of the dead letter itself (on SQL Server, an id of 64 characters
    beyond the Basic Multilingual Plane is 128 of NVARCHAR(64)'s units) left the run, the
    bridge read the message again, and the same happened for ever: the partition stuck."""
    processor, ledger = parts
    refused = _a_refusal(engine)
    real = apply_batch

    def refusing(engine: Engine, batch: Sequence[Received],
                 failures: Sequence[DeadLetter] = (), **kwargs: Any) -> BatchResult:
        if any(item.event.event_id == POISON for item in batch) or any(
                letter.event_id == POISON for letter in failures):
            raise refused
        return real(engine, batch, failures, **kwargs)

    monkeypatch.setattr(tasks.processing, "apply_batch", refusing)
    report = processor.run(TOPIC, 0, messages(10, poison_at=3))
    assert report.later == []
    [row] = letters(engine)
    assert (row.kafka_offset, row.event_id, row.state) == (3, None, "open")
    assert "its dead letter as first written was refused by the database" in row.reason
    assert len(applied_ids(engine)) == 9
    assert ledger.read(TOPIC, {0: 0})[0][0] == set(range(10))


def test_a_database_that_refuses_every_dead_letter_holds_the_rest_as_the_world_failing(
    engine: Engine, parts: tuple[Processor, OffsetLedger], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hostile test's finding: a `dead_letters` table that refuses every row (a column
    added by hand, a trigger) refused the letter stripped of the message's identity too. The
    run ended in an unforeseen error; the bridge took the batch for lost and read it again
    every minute, saying events were lost on the way. Now the message, and the rest of its
    batch, wait as for a database that fails, said in the retry's line, and end
    dead-lettered once the table takes letters again."""
    processor, _ = parts
    refused = _a_refusal(engine)
    real = apply_batch
    table_fixed = False

    def refusing(engine: Engine, batch: Sequence[Received],
                 failures: Sequence[DeadLetter] = (), **kwargs: Any) -> BatchResult:
        if any(item.event.event_id == POISON for item in batch) or (
                failures and not table_fixed):
            raise refused
        return real(engine, batch, failures, **kwargs)

    monkeypatch.setattr(tasks.processing, "apply_batch", refusing)
    report = processor.run(TOPIC, 0, messages(10, poison_at=3))
    [later] = report.later
    assert later.transient and [m.offset for m in later.messages] == list(range(3, 10))
    assert "the database refuses dead letters" in later.reason
    assert letters(engine) == [] and applied_ids(engine) == {"ev-0", "ev-1", "ev-2"}
    table_fixed = True
    report = processor.run(TOPIC, 0, later.messages, retries=1)
    assert report.later == [] and [row.kafka_offset for row in letters(engine)] == [3]
    assert len(applied_ids(engine)) == 9


def _die_on_poison(database_url: str, group: str, batch: list[list[Any]]) -> None:
    """A worker process that dies (like a segfault or the OOM killer) on the poison."""
    settings = Settings(database_url=database_url, crash_max_attempts=2)
    client = redis.Redis.from_url(REDIS_URL)
    processor = Processor(settings, make_engine(settings),
                          DeadLetterStream(client, f"{group}:dlq", 1000, 10**7),
                          OffsetLedger(client, group), worker=f"test:{os.getpid()}")
    real = apply_batch

    def apply(engine: Engine, batch: Sequence[Received], *args: Any, **kwargs: Any) -> Any:
        if any(item.event.event_id == POISON for item in batch):
            os._exit(9)
        return real(engine, batch, *args, **kwargs)

    tasks.processing.__dict__["apply_batch"] = apply  # in this child process only
    processor.run(TOPIC, 0, [TaskMessage.from_wire(m) for m in batch])


def test_a_message_that_kills_its_worker_is_isolated_then_dead_lettered(
    engine: Engine, parts: tuple[Processor, OffsetLedger], database_url: str,
) -> None:
    _, ledger = parts
    group = ledger.base.split(":", 1)[1]
    batch = [m.to_wire() for m in messages(12, poison_at=5)]
    context = multiprocessing.get_context("spawn")
    exits = []
    for _ in range(4):  # each delivery of the batch, as the bridge re-reads it
        worker = context.Process(target=_die_on_poison, args=(database_url, group, batch))
        worker.start()
        worker.join(60)
        exits.append(worker.exitcode)
        if worker.exitcode == 0:
            break
    # Died on the whole batch, then on the poison alone; then gave up on it and finished.
    assert exits == [9, 9, 0]
    assert applied_ids(engine) == {f"ev-{n}" for n in range(12) if n != 5}
    [row] = letters(engine)
    assert row.error_class == "WorkerCrashed" and row.kafka_offset == 5
    assert ledger.read(TOPIC, {0: 0})[0][0] == set(range(12))


def test_leases_are_judged_by_the_redis_clock(parts: tuple[Processor, OffsetLedger]) -> None:
    """Issue 9, item 5: no worker clock is involved, so none can be wrong."""
    _, ledger = parts
    ledger.lease(TOPIC, 1, [7, 8], ttl_s=60)
    ledger.lease(TOPIC, 1, [9], ttl_s=0.2)
    assert ledger.read(TOPIC, {1: 0})[1][:2] == (set(), {7, 8, 9})
    ledger.settle(TOPIC, 1, [7], {})
    deadline = time.monotonic() + 5
    while ledger.read(TOPIC, {1: 0})[1][1] != {8} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ledger.read(TOPIC, {1: 0})[1][:2] == ({7}, {8})


def test_a_renewal_extends_a_lease_never_shortens_one_nor_makes_one(
    parts: tuple[Processor, OffsetLedger],
) -> None:
    _, ledger = parts
    ledger.lease(TOPIC, 1, [7, 8], ttl_s=0.2)  # a run's
    ledger.lease(TOPIC, 1, [9], ttl_s=60)  # a message waiting to retry, past the run
    ledger.extend(TOPIC, 1, [7, 8], ttl_s=60)
    ledger.extend(TOPIC, 1, [9], ttl_s=0.2)
    ledger.settle(TOPIC, 1, [5], {5: 60})
    ledger.settle(TOPIC, 1, [5], {})  # done: its lease goes
    ledger.extend(TOPIC, 1, [5], ttl_s=60)  # a renewal late for it does not bring it back
    ledger.extend(TOPIC, 1, [20], ttl_s=60)  # nor makes one that never was
    time.sleep(0.4)  # past the short leases: what is leased now is what the renewal kept
    assert ledger.read(TOPIC, {1: 0})[1][:2] == ({5}, {7, 8, 9})


def test_marks_of_workers_that_record_no_ranges_are_told_apart(
        redis_client: redis.Redis) -> None:
    """A worker of a version before the ranges of offsets in the database marks its offsets
    done under `done-ranges` alone: the bridge takes them for done, unchecked. A worker of
    this version marks both, which bridges of either version read."""
    ledger = OffsetLedger(redis_client, f"group-{uuid.uuid4().hex}")
    before = f"{ledger.base}:done-ranges:{TOPIC}:0"
    try:
        redis_client.zadd(before, {"1-2": 2})  # as the script of a version before writes it
        ledger.settle(TOPIC, 0, [3, 4], {})
        ledger.settle(TOPIC, 0, [5], {}, recorded=False)  # a worker with no database
        assert ledger.read(TOPIC, {0: 0})[0] == ({1, 2, 3, 4, 5}, set(), {1, 2, 5})
        ledger.finish(TOPIC, 0, [1, 6], run="r")  # 1 again, now recorded too
        assert ledger.read(TOPIC, {0: 0})[0] == ({1, 2, 3, 4, 5, 6}, set(), {2, 5})
        ledger.trim(TOPIC, {0: 5})
        assert ledger.read(TOPIC, {0: 0})[0] == ({5, 6}, set(), {5})
        assert redis_client.zrange(before, 0, -1) == [b"5-5", b"6-6"]  # read by those bridges
    finally:
        ledger.forget(TOPIC, [0])
    assert not list(redis_client.scan_iter(f"{ledger.base}:*:{TOPIC}:0"))


def test_offset_marks_belong_to_one_consumer_group(redis_client: redis.Redis) -> None:
    """Issue 9, item 12: two pipelines on one Redis and one topic do not share marks."""
    mine = OffsetLedger(redis_client, f"group-a-{uuid.uuid4().hex}")
    theirs = OffsetLedger(redis_client, f"group-b-{uuid.uuid4().hex}")
    mine.settle(TOPIC, 0, [1, 2, 3], {})
    assert theirs.read(TOPIC, {0: 0})[0][:2] == (set(), set())
    assert mine.read(TOPIC, {0: 0})[0][:2] == ({1, 2, 3}, set())
    mine.forget(TOPIC, [0])
    theirs.forget(TOPIC, [0])


def test_the_ledger_keeps_a_member_per_range_of_offsets_not_per_offset(
    redis_client: redis.Redis,
) -> None:
    """A batch's marks cost Redis a member per range of its offsets: one for a whole batch
    done. What the bridge reads is unchanged: offsets done, and offsets held and not done."""
    group = f"ranges-{uuid.uuid4().hex}"
    ledger = OffsetLedger(redis_client, group)
    ledger.begin(TOPIC, 0, list(range(100, 600)), 30, run="r1")
    ledger.finish(TOPIC, 0, [*range(100, 300), *range(301, 600)], run="r1")
    ledger.lease(TOPIC, 0, [300], 30)  # waits to be tried again
    ledger.begin(TOPIC, 0, list(range(600, 1100)), 30, run="r2")
    ledger.finish(TOPIC, 0, range(600, 1100), run="r2")

    def members(kind: str) -> int:
        return int(redis_client.zcard(f"eventpipe:{group}:{kind}:{TOPIC}:0"))

    assert (members("done-ranges"), members("lease-ranges")) == (3, 2)
    done, leased, _ = ledger.read(TOPIC, {0: 100})[0]
    assert done == set(range(100, 1100)) - {300} and leased == {300}
    ledger.trim(TOPIC, {0: 300})  # ranges wholly below the committed offset go
    assert members("done-ranges") == 2
    assert ledger.read(TOPIC, {0: 300})[0][:2] == (set(range(301, 1100)), {300})
    # Renewals too go as ranges, one per run of offsets with the same time to live.
    ledger.settle(TOPIC, 0, [], {1100: 30, 1101: 30, 1102: 30, 1104: 60})
    assert members("lease-ranges") == 4
    assert ledger.read(TOPIC, {0: 1100})[0][:2] == (set(), {1100, 1101, 1102, 1104})
    ledger.forget(TOPIC, [0])


def test_forgetting_a_partition_drops_the_marks_of_earlier_ledgers_too(
    redis_client: redis.Redis,
) -> None:
    """Done marks of the ledger of one member per offset, left by an earlier version, must
    not outlive a partition forgotten here (a recreated topic): rolled back, that version
    would read them as done in the new topic and commit past its events."""
    group = f"legacy-{uuid.uuid4().hex}"
    ledger = OffsetLedger(redis_client, group)
    legacy = [f"eventpipe:{group}:{kind}:{TOPIC}:0" for kind in ("done", "lease")]
    for key in legacy:
        redis_client.zadd(key, {"100": 100})
    ledger.settle(TOPIC, 0, [5])
    ledger.forget(TOPIC, [0])
    assert not redis_client.exists(*legacy)
    assert ledger.read(TOPIC, {0: 0})[0][:2] == (set(), set())


def test_forgetting_a_partition_forgets_it_under_every_id_of_its_topic(
    redis_client: redis.Redis,
) -> None:
    """A review's finding: forgetting cleared only the ledger of the topic's current id.
    Marks under the name alone (a bridge or worker before ids, a bridge Kafka gave no id) or
    under an earlier topic's id stayed, for a bridge rolled back or given no id to read as
    done in the new topic. Another group's ledger, whatever its name, is left alone."""
    group = f"g-{uuid.uuid4().hex}"
    ledger = OffsetLedger(redis_client, group)
    other = OffsetLedger(redis_client, f"{group}:replay")
    names = [TOPIC, filed_under(TOPIC, "earlier"), filed_under(TOPIC, "now")]
    ledger.forget(filed_under(TOPIC, "earlier"), [])  # as the earlier topic's bridge did
    for name in names:
        for partition in (0, 1):
            ledger.settle(name, partition, [5])
        other.settle(name, 0, [5])
    ledger.forget(filed_under(TOPIC, "now"), [0])
    assert [ledger.read(name, {0: 0, 1: 0}) for name in names] == [
        {0: (set(), set(), set()), 1: ({5}, set(), set())}] * 3
    assert [other.read(name, {0: 0}) for name in names] == [{0: ({5}, set(), set())}] * 3


def test_a_long_isolation_keeps_the_bridge_informed(
    engine: Engine, parts: tuple[Processor, OffsetLedger], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A split cascade that outlives the redelivery timeout: each part that commits is marked
    done at once, and the rest stays leased, so the bridge never reads the batch again while
    it is still being applied (nor restarts it before the poison and takes that for a crash)."""
    processor, ledger = parts
    processor.lease_s = 1.0
    seen: list[tuple[set[int], set[int]]] = []
    real = apply_batch

    def slow_on_poison(engine: Engine, batch: Sequence[Received],
                       failures: Sequence[DeadLetter] = (), **kwargs: Any) -> BatchResult:
        if any(item.event.event_id == POISON for item in batch):
            seen.append(ledger.read(TOPIC, {0: 0})[0][:2])
            time.sleep(0.4)  # the database takes its time to fail
            raise ValueError("a bug nobody foresaw")
        return real(engine, batch, failures, **kwargs)

    monkeypatch.setattr(tasks.processing, "apply_batch", slow_on_poison)
    processor.run(TOPIC, 0, messages(40, poison_at=17))
    done, leased = seen[-1]  # as the poison is tried alone, well past the first lease
    assert len(seen) == 6
    assert done == set(range(17))
    assert leased == set(range(17, 40))


def test_a_batch_that_takes_longer_than_a_lease_stays_leased_while_it_runs(
    engine: Engine, parts: tuple[Processor, OffsetLedger], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One part, a slow database: its offsets stay leased for the whole transaction, so the
    bridge does not take the batch for lost and send it again while it is being applied; a
    process that dies stops renewing, and the lease lapses as before."""
    processor, ledger = parts
    processor.lease_s = 0.6
    seen: list[set[int]] = []
    real = apply_batch

    def slow(engine: Engine, batch: Sequence[Received], failures: Sequence[DeadLetter] = (),
             **kwargs: Any) -> BatchResult:
        until = time.monotonic() + 4 * processor.lease_s  # the database takes its time
        while time.monotonic() < until:
            seen.append(ledger.read(TOPIC, {0: 0})[0][1])
            time.sleep(0.05)
        return real(engine, batch, failures, **kwargs)

    monkeypatch.setattr(tasks.processing, "apply_batch", slow)
    report = processor.run(TOPIC, 0, messages(10))
    assert report.later == [] and len(seen) > 40
    assert [leased for leased in seen if leased != set(range(10))] == []
    assert ledger.read(TOPIC, {0: 0})[0][:2] == (set(range(10)), set())


def test_a_failure_of_the_world_while_isolating_is_not_taken_for_a_crash(
    engine: Engine, parts: tuple[Processor, OffsetLedger], monkeypatch: pytest.MonkeyPatch,
) -> None:
    processor, ledger = parts
    batch = messages(12)
    ledger.begin(TOPIC, 0, [m.offset for m in batch], ttl_s=30, run="dead")  # then it died
    real = apply_batch
    outages = [TransientError("the database is unreachable")]

    def down_once_at_3(engine: Engine, batch: Sequence[Received],
                       failures: Sequence[DeadLetter] = (), **kwargs: Any) -> BatchResult:
        if outages and any(item.position.offset == 3 for item in batch):
            raise outages.pop()
        return real(engine, batch, failures, **kwargs)

    monkeypatch.setattr(tasks.processing, "apply_batch", down_once_at_3)
    [later] = processor.run(TOPIC, 0, batch).later
    assert later.transient and [m.offset for m in later.messages] == list(range(3, 12))
    # The world is back: the rest applies, and nothing is dead-lettered as a crash.
    report = processor.run(TOPIC, 0, later.messages, retries=1)
    assert report.later == [] and letters(engine) == []
    assert applied_ids(engine) == {f"ev-{n}" for n in range(12)}
    assert ledger.read(TOPIC, {0: 0})[0][:2] == (set(range(12)), set())


@pytest.mark.parametrize("died_before", [0, 1])
def test_a_begin_whose_reply_is_lost_is_asked_again_and_counts_no_death(
    engine: Engine, parts: tuple[Processor, OffsetLedger], monkeypatch: pytest.MonkeyPatch,
    died_before: int,
) -> None:
    """Redis ran the script, then the connection dropped before its reply. Failing the task
    left the run's record behind, which the next attempt counted as a death: three such
    blips on one range, and good events were dead-lettered as crashes. Asked again, the
    script knows its own run and says again what it found."""
    processor, ledger = parts
    batch = messages(4)
    if died_before:
        ledger.begin(TOPIC, 0, [m.offset for m in batch], ttl_s=30, run="dead")
    script = ledger._begin
    lost = [redis.ConnectionError("Connection reset by peer")]

    def begin(*args: Any, **kwargs: Any) -> Any:
        found = script(*args, **kwargs)
        if lost:
            raise lost.pop()  # it ran; its answer never came
        return found

    monkeypatch.setattr(ledger, "_begin", begin)
    report = processor.run(TOPIC, 0, batch)
    assert lost == [] and report.later == [] and letters(engine) == []
    assert applied_ids(engine) == {f"ev-{n}" for n in range(4)}
    # What the first answer would have said: a death before, or none.
    crashed = ledger.begin(TOPIC, 0, [m.offset for m in messages(4)], ttl_s=30, run="next")
    assert crashed is None
    ledger.finish(TOPIC, 0, run="next")


def test_a_run_the_ledger_could_not_end_is_no_death(
    engine: Engine, parts: tuple[Processor, OffsetLedger], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ledger stopped answering before a run could end its record, narrowed or not. The
    batch was retried whole and its next run counted the record as a death: three such
    outages on one range, and good events were dead-lettered as crashes. Now the process,
    alive, ends the run once the ledger answers, and a retry that comes first forgives it;
    a run that died under a retry that forgives another is still counted."""
    processor, ledger = parts
    offsets = list(range(10))
    assert ledger.begin(TOPIC, 0, offsets, ttl_s=30, run="cut-off") is None
    ledger.narrow(TOPIC, 0, 3, 3, 0, run="cut-off")  # isolating one message when cut off
    assert ledger.begin(TOPIC, 0, offsets, ttl_s=30, run="retry", forgive="cut-off") is None
    # The retry's process dies; a redelivery of it carries the same header.
    assert ledger.begin(TOPIC, 0, offsets, ttl_s=30, run="again",
                        forgive="cut-off") == Crashed(0, 9, 1)
    # Cut off while isolating that death's messages: forgiven, its run keeps what it found.
    ledger.narrow(TOPIC, 0, 5, 5, 1, run="again")
    assert ledger.begin(TOPIC, 0, offsets, ttl_s=30, run="then",
                        forgive="again") == Crashed(5, 5, 1)
    ledger.finish(TOPIC, 0, run="then")

    # Blips are retried three times.
    ending_refused(monkeypatch, ledger,
                   [redis.ConnectionError("Connection closed by server.")] * 4)
    batch = messages(4)
    with pytest.raises(redis.ConnectionError):
        processor.run(TOPIC, 0, batch)
    assert processor.unended  # what the batch's retry forgives
    # Once the ledger answers, the keeper ends the run: the next one finds no death.
    wait_until(lambda: not processor.ledger.client.hlen(ledger._key("runs", TOPIC, 0)), 10,
               "the run ended by the keeper")
    assert ledger.begin(TOPIC, 0, [m.offset for m in batch], ttl_s=30, run="next") is None
    ledger.finish(TOPIC, 0, run="next")


@pytest.mark.parametrize("refusal", [
    redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
    redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
], ids=["a replica after a failover", "at its memory bound"])
def test_a_ledger_that_refuses_writes_is_no_death_either(
    engine: Engine, parts: tuple[Processor, OffsetLedger], monkeypatch: pytest.MonkeyPatch,
    refusal: redis.RedisError,
) -> None:
    """Redis answers, and refuses the write that ends the run: a failover left the client on a
    replica, or Redis is at its memory bound. (Before: only a ledger that did not answer was
    the world's failure; this one escaped the task, whose retries were dropped, and the run's
    record stayed, to pass for a death of the batch's next attempt.)"""
    processor, ledger = parts
    ending_refused(monkeypatch, ledger, [refusal])
    batch = messages(4)
    with pytest.raises(type(refusal)):
        processor.run(TOPIC, 0, batch)
    assert processor.unended  # what the batch's retry forgives
    assert is_transient(refusal)
    wait_until(lambda: not processor.ledger.client.hlen(ledger._key("runs", TOPIC, 0)), 10,
               "the run ended by the keeper")
    assert ledger.begin(TOPIC, 0, [m.offset for m in batch], ttl_s=30, run="next") is None
    ledger.finish(TOPIC, 0, run="next")


def test_done_marks_survive_a_redis_hiccup_at_the_end(
    engine: Engine, parts: tuple[Processor, OffsetLedger], monkeypatch: pytest.MonkeyPatch,
) -> None:
    processor, ledger = parts
    hiccups = ending_refused(monkeypatch, ledger,
                             [redis.ConnectionError("Connection reset by peer")])
    processor.run(TOPIC, 0, messages(5))
    assert hiccups == []
    assert ledger.read(TOPIC, {0: 0})[0][:2] == (set(range(5)), set())


def test_a_message_waiting_to_retry_stays_leased_while_its_run_goes_on(
    engine: Engine, parts: tuple[Processor, OffsetLedger], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Parts after it are marked done as they commit; were its lease to lapse meanwhile, the
    bridge would see it overtaken and read the partition again from it."""
    processor, ledger = parts
    processor.lease_s = 1.0
    processor.policy = replace(processor.policy, backoff_base_s=0.2, backoff_max_s=0.2)
    seen: list[set[int]] = []
    real = apply_batch

    def slow_after_the_poison(engine: Engine, batch: Sequence[Received],
                              failures: Sequence[DeadLetter] = (), **kwargs: Any) -> BatchResult:
        if any(item.event.event_id == POISON for item in batch):
            raise ValueError("a bug nobody foresaw")
        if batch[0].event.event_id != "ev-0":  # a part after the poison
            seen.append(ledger.read(TOPIC, {0: 0})[0][1])
            time.sleep(0.5)  # the rest of the run takes longer than the retry's lease
        return real(engine, batch, failures, **kwargs)

    monkeypatch.setattr(tasks.processing, "apply_batch", slow_after_the_poison)
    [later] = processor.run(TOPIC, 0, messages(40, poison_at=1)).later
    assert [m.offset for m in later.messages] == [1]
    assert len(seen) == 4 and all(1 in leased for leased in seen)
    assert 1 in ledger.read(TOPIC, {0: 0})[0][1]


@pytest.mark.parametrize("transient", [False, True])
def test_a_retry_stays_leased_past_its_time_while_its_worker_lives(
    engine: Engine, parts: tuple[Processor, OffsetLedger], monkeypatch: pytest.MonkeyPatch,
    transient: bool,
) -> None:
    """A retry runs at its time after the batch its worker is applying then, which may take
    up to TASK_TIME_LIMIT_S, while the batches after it are done. Were its lease to lapse
    before it runs, the bridge would see it overtaken and read the partition again, the
    retry still to come. Its worker renews the lease that long; then it lapses (another
    process may have taken the retry), as it does at once if the worker dies."""
    processor, ledger = parts
    processor.lease_s = 0.3
    processor.settings = replace(processor.settings, task_time_limit_s=1.0)
    error = TransientError("the database is unreachable") if transient else ValueError("a bug")
    monkeypatch.setattr(tasks.processing, "apply_batch", failing_on_poison(error))
    started = time.monotonic()
    [later] = processor.run(TOPIC, 0, messages(3, poison_at=0)).later
    renewed_until = started + later.delay_s + processor.settings.task_time_limit_s
    while time.monotonic() < renewed_until - 0.1:
        assert 0 in ledger.read(TOPIC, {0: 0})[0][1], time.monotonic() - started
        time.sleep(0.05)
    wait_until(lambda: 0 not in ledger.read(TOPIC, {0: 0})[0][1], 5, "the lease to lapse")
    assert time.monotonic() - started > later.delay_s + processor.lease_s * 2


def test_a_failed_progress_mark_is_not_taken_for_a_failure_of_the_part(
    engine: Engine, parts: tuple[Processor, OffsetLedger], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Marking a committed part done mid-run may fail (Redis failing over): the part stays
    committed, its marks are made at the end, and nothing is applied or dead-lettered again."""
    processor, ledger = parts
    monkeypatch.setattr(tasks.processing, "apply_batch",
                        failing_on_poison(ValueError("a bug nobody foresaw")))
    settle = ledger.settle
    failovers = [redis.ReadOnlyError("You can't write against a read only replica.")]

    def flaky_settle(*args: Any, **kwargs: Any) -> None:
        if failovers:
            raise failovers.pop()
        settle(*args, **kwargs)

    monkeypatch.setattr(ledger, "settle", flaky_settle)
    report = processor.run(TOPIC, 0, messages(20, poison_at=7))
    assert failovers == []
    assert [m.offset for later in report.later for m in later.messages] == [7]
    assert letters(engine) == [] and report.fates["duplicate"] == 0
    assert applied_ids(engine) == {f"ev-{n}" for n in range(20) if n != 7}
    assert ledger.read(TOPIC, {0: 0})[0][:2] == (set(range(20)) - {7}, {7})


def test_deaths_found_at_the_start_are_kept_when_an_error_ends_the_run(
    engine: Engine, parts: tuple[Processor, OffsetLedger], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An error is not a death, but the deaths this run found are still owed: the next
    attempt at the messages not yet tried counts them again, no more and no fewer."""
    processor, ledger = parts
    batch = messages(12)
    ledger.begin(TOPIC, 0, [m.offset for m in batch], ttl_s=30, run="dead")  # then it died
    narrow = ledger.narrow

    def redis_gone_at_5(topic: str, partition: int, first: int, *args: Any,
                        **kwargs: Any) -> None:
        if first == 5:
            raise redis.ConnectionError("Connection reset by peer")
        narrow(topic, partition, first, *args, **kwargs)

    monkeypatch.setattr(ledger, "narrow", redis_gone_at_5)
    with pytest.raises(redis.ConnectionError):
        processor.run(TOPIC, 0, batch)
    assert ledger.read(TOPIC, {0: 0})[0][0] == set(range(5))
    monkeypatch.undo()
    processor.run(TOPIC, 0, messages(20)[12:])  # the partition goes on meanwhile
    assert ledger.begin(TOPIC, 0, list(range(5, 12)), ttl_s=30, run="next") == Crashed(
        0, 11, 1)


def test_deaths_outlive_the_batches_applied_before_their_messages_come_back(
    engine: Engine, parts: tuple[Processor, OffsetLedger],
) -> None:
    """A worker died on a batch; the batches queued behind it are applied (by the restarted
    worker) before the bridge reads the dead one again: the death still counts then, or a
    message that kills its worker would be tried forever on a partition with traffic."""
    processor, ledger = parts
    batch = messages(30)
    ledger.begin(TOPIC, 0, [m.offset for m in batch[:12]], ttl_s=30, run="dead")  # it died
    processor.run(TOPIC, 0, batch[12:20])
    processor.run(TOPIC, 0, batch[20:])
    assert ledger.begin(TOPIC, 0, list(range(12)), ttl_s=30, run="again") == Crashed(0, 11, 1)


def test_a_run_record_whose_count_is_no_number_counts_no_death(
    parts: tuple[Processor, OffsetLedger],
) -> None:
    """Before: a record of the runs whose count was not a number (a hand edit) failed every
    batch of its partition with a Lua error, a traceback each, for the record's 24 h (a
    review's finding)."""
    processor, ledger = parts
    runs = ledger._key("runs", TOPIC, 0)
    ledger.client.hset(runs, mapping={"0 99 edited": "abc", "0 99 dead": "1"})
    assert ledger.begin(TOPIC, 0, list(range(5, 12)), ttl_s=30, run="next") == Crashed(0, 99, 2)
    ledger.client.hset(runs, "5 11 next", "abc")  # as if this run's own record was edited
    assert ledger.begin(TOPIC, 0, list(range(5, 12)), ttl_s=30, run="next") is None
    processor.run(TOPIC, 0, messages(20))
    assert ledger.read(TOPIC, {0: 0})[0][0] == set(range(20))


def test_a_dead_letter_is_said_by_its_event_id_and_counted_once_when_it_enters_the_dlq(
    engine: Engine, parts: tuple[Processor, OffsetLedger], caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: a copy of a parked event was logged `dead-lettered` and counted as a DLQ entry
    though it was neither, a copy of a dead-lettered message was counted again, and a
    rejection the reconciler opened (CurrencyMismatch) was neither said by its eventId nor
    counted."""
    processor, _ = parts
    reconciler = Reconciler(engine, processor.stream, lambda: lambda position: None,
                            timedelta(hours=1), min_gap_s=0, copies_every_s=0)
    made = [user_created("u-1"), order_placed("o-1", "u-1", currency="EUR"),
            payment_settled("pay-1", "o-1", "10.00", currency="USD"),
            order_placed("o-2", "u-missing")]
    sent = [TaskMessage(offset, key.encode(), encode(doc))
            for offset, (key, doc) in enumerate(made)] + [TaskMessage(4, b"k", b"{broken")]

    def entries() -> float:
        return sum(REGISTRY.get_sample_value("dlq_entries_total", {"event_type": kind}) or 0
                   for kind in ("PaymentSettled", "OrderPlaced", "unknown"))

    def said(message: str) -> list[Any]:
        return [record for record in caplog.records if record.getMessage().startswith(message)]

    before = entries()
    with caplog.at_level(logging.INFO):
        processor.run(TOPIC, 0, sent)
        reconciler.run_once()
        assert entries() - before == 2  # the broken message, the payment in another currency
        [mismatch] = [r for r in said("dead-lettered: ") if r.__dict__["eventId"]]
        assert mismatch.__dict__["errorClass"] == "CurrencyMismatch"
        assert mismatch.__dict__["eventId"] == made[2][1]["eventId"]
        [parked] = said("held until its parent arrives")
        assert parked.__dict__["eventId"] == made[3][1]["eventId"]
        caplog.clear()
        # Copies of the parked order and of the broken message, in a later batch.
        processor.run(TOPIC, 0, [replace(sent[3], offset=5), replace(sent[4], offset=6)])
        reconciler.run_once()
    assert entries() - before == 2
    assert not said("dead-lettered")
    assert sorted(r.__dict__["state"] for r in said("dead letter seen again")) == [
        "open", "waiting"]


def test_a_round_s_dead_letters_are_said_as_it_commits_whatever_the_next_does(
    engine: Engine, parts: tuple[Processor, OffsetLedger], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: the letters of a reconciler's rounds were said (logged, counted) once every
    round had run: a later round that failed took the committed rounds' lines and counts
    with it."""
    processor, _ = parts
    made = [user_created("u-9"), order_placed("o-9", "u-9", currency="EUR"),
            payment_settled("pay-9", "o-9", "10.00", currency="USD"),
            payment_settled("pay-10", "o-9", "10.00", currency="GBP")]
    for offset, (key, doc) in enumerate(made):  # a batch, and a queue row, each
        processor.run(TOPIC, 0, [TaskMessage(offset, key.encode(), encode(doc))])
    monkeypatch.setattr(eventpipe.reconcile, "QUEUE_ROWS", 1)  # a round per queue row
    real, rounds = eventpipe.reconcile.run_round, []

    def failing_last(*args: Any, **kwargs: Any) -> Any:
        rounds.append(1)
        if len(rounds) == len(made):
            raise TransientError("the database went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(eventpipe.reconcile, "run_round", failing_last)
    said: list[DeadLetter] = []
    with pytest.raises(TransientError):
        eventpipe.reconcile.reconcile(engine, lambda: at(0), timedelta(hours=1),
                                      said=said.extend)
    # Both payments are found by an earlier round (the order's), which committed.
    assert {letter.event_id for letter in said if letter.entered} == {
        doc["eventId"] for _, doc in made[2:]}
