"""`eventpipe verify` against a real topic and database: clean when they agree, and every kind
of disagreement named with the positions of its messages."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from sqlalchemy import Engine, delete, insert, select, update

from eventpipe.apply import apply_batch
from eventpipe.database import make_engine
from eventpipe.dlq.letter import INVALID_EVENT, DeadLetter, event_key, message_key
from eventpipe.dlq.projection import project
from eventpipe.dlq.stream import DeadLetterStream
from eventpipe.effects import Received
from eventpipe.events import parse_event
from eventpipe.kafka import MessageReader, read_topic_id
from eventpipe.reconcile import reconcile
from eventpipe.samples import Story, encode, inventory_adjusted, order_placed, user_created
from eventpipe.settings import Settings
from eventpipe.tables import (
    applied_events,
    dead_letters,
    kafka_positions,
    reconcile_queue,
    users,
)
from eventpipe.times import utc_iso
from eventpipe.upserts import queue_keys
from eventpipe.verify import Report, committed_offsets, render, verify
from tests.support.broker import TopicFactory, produce
from tests.support.factories import T0, at
from tests.support.pipeline import BIN, Pipeline, drained, wait_until
from tests.support.services import REDIS_URL


@pytest.fixture
def world(engine: Engine, kafka_broker: str, kafka_topic: TopicFactory,
          redis_client: redis.Redis) -> Iterator[tuple[Settings, DeadLetterStream]]:
    topic = kafka_topic(partitions=2)
    settings = Settings(database_url=str(engine.url), kafka_bootstrap_servers=kafka_broker,
                        kafka_topic=topic, kafka_group_id=f"verify-{uuid.uuid4().hex}")
    stream = DeadLetterStream(redis_client, f"{topic}:dlq", 100, 10**7)
    yield settings, stream
    redis_client.delete(stream.stream, stream.index, stream.totals)


def run_pipeline_by_hand(engine: Engine, settings: Settings, stream: DeadLetterStream,
                         records: list[tuple[bytes, bytes]]) -> None:
    """What the bridge and a worker do, in this process: apply, dead-letter, commit."""
    positions = produce(settings.kafka_bootstrap_servers, settings.kafka_topic,
                        [(key, value, []) for key, value in records])
    received, failures, ends = [], [], {}  # type: ignore[var-annotated]
    for (key, value), position in zip(records, positions, strict=True):
        partition, offset = position.partition or 0, position.offset or 0
        ends[partition] = max(ends.get(partition, 0), offset + 1)
        try:
            received.append(Received.of(parse_event(value, key), position))
        except Exception as exc:
            failures.append(DeadLetter(dlq_key=message_key(key, value), error_class=INVALID_EVENT,
                                       reason=str(exc), first_failure_at=T0, last_failure_at=T0,
                                       worker="test", position=position))
    apply_batch(engine, received, failures)
    reconcile(engine, lambda: datetime.now(UTC), timedelta(hours=1))
    reader = MessageReader(settings)
    try:
        project(engine, stream, reader.fetch)
    finally:
        reader.close()
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers,
                         "group.id": settings.kafka_group_id, "enable.auto.commit": False})
    consumer.commit(offsets=[TopicPartition(settings.kafka_topic, p, o)
                             for p, o in ends.items()], asynchronous=False)
    consumer.close()


def stream_of_events() -> list[tuple[bytes, bytes]]:
    messages = [user_created("u1", occurred_at=at(0), event_id="e-u1"),
                order_placed("o1", "u1", occurred_at=at(1), event_id="e-o1"),
                user_created("u2", email="u1@example.com", occurred_at=at(2), event_id="e-u2"),
                inventory_adjusted("SKU-1", 4, occurred_at=at(3), event_id="e-s1")]
    return [(key.encode(), encode(doc)) for key, doc in messages] + [(b"junk", b"{not json")]


def edit_email_taken(engine: Engine, **values: str) -> str:
    """Edit in SQL the dead letter of u2, whose email belongs to u1 (`EmailTaken`); its key."""
    key, value = stream_of_events()[2]
    taken = event_key(parse_event(value, key).fingerprint)
    with engine.begin() as conn:
        conn.execute(update(dead_letters).where(dead_letters.c.dlq_key == taken).values(**values))
    return taken


def test_verify_is_clean_when_the_database_holds_what_the_topic_says(
    engine: Engine, world: tuple[Settings, DeadLetterStream],
) -> None:
    settings, stream = world
    run_pipeline_by_hand(engine, settings, stream, stream_of_events())
    report = verify(settings, engine, stream)
    assert report.clean, render(report)
    assert (report.messages, report.events, report.dead_lettered) == (5, 4, 2)
    assert "clean" in render(report)


def test_dead_letters_a_full_dlq_keeps_in_sql_are_no_difference(
    engine: Engine, world: tuple[Settings, DeadLetterStream], redis_client: redis.Redis,
) -> None:
    """A review's finding: with the DLQ stream at its bound, the letters waiting in SQL (as
    they should: nothing is dropped) were each a difference, `missing: run eventpipe dlq
    restore`, which a full stream refuses. They are counted as waiting; an entry Redis lost
    is still a difference."""
    settings, _ = world
    bounded = DeadLetterStream(redis_client, f"{settings.kafka_topic}:dlq", 1, 10**7)
    junk = [(b"junk", b"{not json %d" % n) for n in range(3)]
    run_pipeline_by_hand(engine, settings, bounded, stream_of_events()[:1] + junk)
    assert bounded.depth() == 1
    report = verify(settings, engine, bounded)
    assert report.clean, render(report)
    assert report.waiting_to_be_shown == 2
    assert "2 open dead letter(s) wait in SQL to be shown" in render(report)
    [shown] = bounded.keys()
    bounded.remove(shown)  # lost by Redis: SQL says it was shown
    assert [d.what for d in verify(settings, engine, bounded).differences] == [
        f"DLQ stream entry {shown}"]
    redis_client.delete(bounded.refusal)  # no refusal for REFUSAL_KEPT_S: kept out, not full
    assert len(verify(settings, engine, bounded).differences) == 3


def test_a_held_event_a_replay_or_purge_took_out_of_the_dlq_that_applied_since_is_no_difference(
    engine: Engine, world: tuple[Settings, DeadLetterStream],
) -> None:
    """A review's finding: an EmailTaken letter an operator purged, whose user applied once
    the email's owner moved to another address: verify called the letter a difference for
    ever, though the read model is right. The letter keeps its history; verify counts it."""
    settings, stream = world
    run_pipeline_by_hand(engine, settings, stream, stream_of_events())
    taken = edit_email_taken(engine, state="purged")
    stream.remove(taken)
    moved = user_created("u1", email="elsewhere@example.com", occurred_at=at(9), event_id="e-u1b")
    run_pipeline_by_hand(engine, settings, stream, [(moved[0].encode(), encode(moved[1]))])
    with engine.connect() as conn:
        assert conn.execute(select(users.c.email).where(users.c.user_id == "u2")).scalar_one() \
            == "u1@example.com"
    report = verify(settings, engine, stream)
    assert report.clean, render(report)
    assert report.closed_since_cleared == 1


def test_a_dead_letter_of_another_class_than_the_topic_says_is_a_difference(
    engine: Engine, world: tuple[Settings, DeadLetterStream],
) -> None:
    """A review's finding: verify looked only at whether each expected dead letter was
    there, so one of the wrong class (a rule between keys gone wrong) passed as clean."""
    settings, stream = world
    run_pipeline_by_hand(engine, settings, stream, stream_of_events())
    taken = edit_email_taken(engine, error_class="MissingParent", reason="bogus")
    report = verify(settings, engine, stream)
    assert [(d.what, d.found) for d in report.differences] == [
        (f"dead letter {taken}", "MissingParent: bogus")]
    edit_email_taken(engine, state="replaying")  # still in the DLQ while a replay runs
    assert f"dead letter {taken}" in [d.what for d in verify(settings, engine, stream).differences]
    # One an operator took out keeps the class it had then (the review of the check).
    edit_email_taken(engine, state="purged")
    stream.remove(taken)
    assert verify(settings, engine, stream).clean


def test_verify_names_every_difference_with_its_positions(
    engine: Engine, world: tuple[Settings, DeadLetterStream],
) -> None:
    settings, stream = world
    run_pipeline_by_hand(engine, settings, stream, stream_of_events())
    with engine.begin() as conn:
        conn.execute(update(users).where(users.c.user_id == "u1").values(name="Mallory"))
        conn.execute(delete(applied_events).where(applied_events.c.event_id == "e-s1"))
        conn.execute(delete(dead_letters).where(dead_letters.c.error_class == "EmailTaken"))
    stream.remove(message_key(b"junk", b"{not json"))
    report = verify(settings, engine, stream)
    key, value = stream_of_events()[2]
    taken = event_key(parse_event(value, key).fingerprint)  # u2's email belongs to u1
    junk = message_key(b"junk", b"{not json")
    assert {d.what: (d.expected, d.found) for d in report.differences} == {
        # Values as an operator reads them, not Python's reprs (`datetime.datetime(…)`).
        "user u1": (f"(u1@example.com, Ada Lovelace, {utc_iso(at(0))})",
                    f"(u1@example.com, Mallory, {utc_iso(at(0))})"),
        "fate of event e-s1": ("recorded", "no record"),
        f"dead letter {taken}": (
            "EmailTaken: email 'u1@example.com' belongs to user 'u1', whose claim "
            f"({utc_iso(at(0))}, e-u1) is earlier than this one ({utc_iso(at(2))}, e-u2)",
            "not dead-lettered"),
        f"DLQ stream entry {taken}": ("absent (not open in SQL)", "shown"),
        f"DLQ stream entry {junk}": ("shown (it is open in SQL)",
                                     "missing: run `eventpipe dlq restore`"),
    }
    positions = {d.what: d.positions for d in report.differences}
    assert positions["user u1"] and positions["fate of event e-s1"]
    assert positions[f"dead letter {taken}"]
    assert not report.clean and "5 difference(s)" in render(report)


def test_verify_with_a_group_that_committed_nothing_says_so_in_one_line(
    engine: Engine, world: tuple[Settings, DeadLetterStream], tmp_path: Path,
) -> None:
    """A review's finding: a KAFKA_GROUP_ID of another pipeline, or a typo, read the topic up
    to nothing and reported every row of the database as a difference."""
    settings, stream = world
    run_pipeline_by_hand(engine, settings, stream, stream_of_events())
    wrong = f"{settings.kafka_group_id}-typo"
    env = {**os.environ, "EVENTPIPE_ENV_FILE": "/nonexistent",
           "DATABASE_URL": engine.url.render_as_string(hide_password=False),
           "REDIS_URL": REDIS_URL, "DLQ_STREAM": stream.stream,
           "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
           "KAFKA_TOPIC": settings.kafka_topic, "KAFKA_PARTITIONS": "2"}
    done = subprocess.run([str(BIN / "eventpipe"), "verify"], env={**env, "KAFKA_GROUP_ID": wrong},
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr == (f"eventpipe: consumer group KAFKA_GROUP_ID={wrong} has committed no "
                           f"offset of topic '{settings.kafka_topic}': is it the bridges' "
                           "group?\n")
    # The bridges' group: verified, clean.
    done = subprocess.run([str(BIN / "eventpipe"), "verify"],
                          env={**env, "KAFKA_GROUP_ID": settings.kafka_group_id},
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "clean: the database holds exactly what the topic says" in done.stdout


def record_positions(engine: Engine, settings: Settings, offsets: dict[int, int]) -> None:
    """Write the database's positions by hand, as a bridge records them before it commits."""
    topic_id = read_topic_id(AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers}),
                             settings.kafka_topic, 10.0)
    assert topic_id is not None
    with engine.begin() as conn:
        conn.execute(delete(kafka_positions).where(
            kafka_positions.c.kafka_topic == settings.kafka_topic))
        conn.execute(insert(kafka_positions), [
            {"kafka_topic": settings.kafka_topic, "kafka_partition": partition,
             "topic_id": topic_id, "next_offset": offset, "committed_at": T0}
            for partition, offset in offsets.items()])


def commit(settings: Settings, offsets: dict[int, int]) -> None:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers,
                         "group.id": settings.kafka_group_id, "enable.auto.commit": False})
    consumer.commit(offsets=[TopicPartition(settings.kafka_topic, p, o)
                             for p, o in offsets.items()], asynchronous=False)
    consumer.close()


def test_a_loss_is_found_against_what_the_database_records_as_done(
    engine: Engine, world: tuple[Settings, DeadLetterStream],
) -> None:
    """Verify folds what the database records as done (its positions), no longer Kafka's
    committed offsets: a position past a message the database holds no fate of is a loss,
    and so is a committed offset in Kafka past the database's position."""
    settings, stream = world
    run_pipeline_by_hand(engine, settings, stream, stream_of_events())
    applied = committed_offsets(settings)
    key, doc = inventory_adjusted("SKU-9", 3, occurred_at=at(9), event_id="e-lost")
    [lost] = produce(settings.kafka_bootstrap_servers, settings.kafka_topic,
                     [(key.encode(), encode(doc), [])])
    partition, offset = lost.partition or 0, lost.offset or 0
    past = {**applied, partition: offset + 1}

    # The database's position says the message is done; it holds nothing of it.
    record_positions(engine, settings, past)
    report = verify(settings, engine, stream)
    assert {d.what: (d.expected, d.found) for d in report.differences} == {
        "inventory SKU-9": (f"(3, {utc_iso(at(9))})", "nothing"),
        "fate of event e-lost": ("recorded", "no record")}
    assert [d.positions for d in report.differences][1] == ((partition, offset),)
    assert "below the database's positions (" in render(report)

    # Kafka's committed offset is past the database's position.
    record_positions(engine, settings, {**applied, partition: offset})
    commit(settings, past)
    report = verify(settings, engine, stream)
    assert [(d.what, d.found, d.positions) for d in report.differences] == [
        (f"partition {partition}", f"Kafka's committed offset {offset + 1} is past what the "
         f"database holds as done ({offset})", ((partition, offset),))]
    assert report.messages == 5 and report.committed == past

    # The database recorded its fate after all: nothing is lost.
    received = Received.of(parse_event(encode(doc), key.encode()), lost)
    apply_batch(engine, [received], [])
    record_positions(engine, settings, past)
    report = verify(settings, engine, stream)
    assert report.clean and report.messages == 6, render(report)


def test_dead_letters_the_reconciler_has_yet_to_decide_are_counted_not_compared(
    engine: Engine, world: tuple[Settings, DeadLetterStream],
) -> None:
    """The reconciler writes a held event's dead letter after its batch commits: in a snapshot
    taken in between, the entities whose keys wait in its queue may lack theirs, or still
    have one. Those are counted; with the queue empty, compared."""
    settings, stream = world
    run_pipeline_by_hand(engine, settings, stream, stream_of_events())
    taken = edit_email_taken(engine, state="open")  # u2's, whose email belongs to u1
    with engine.begin() as conn:
        conn.execute(delete(dead_letters).where(dead_letters.c.dlq_key == taken))
        # u1 written again: a round evaluates the other claimants of its email, u2.
        queue_keys(conn, {"users": ["u1"]}, T0)
    stream.remove(taken)
    report = verify(settings, engine, stream)
    assert report.clean and report.awaiting_reconciler == 1, render(report)
    assert "1 dead letter(s) of entities whose keys wait in the reconciler's queue" \
        in render(report)
    with engine.begin() as conn:
        conn.execute(delete(reconcile_queue))
    report = verify(settings, engine, stream)
    assert [(d.what, d.found) for d in report.differences] == [
        (f"dead letter {taken}", "not dead-lettered")]
    assert report.awaiting_reconciler == 0


class SteadyTraffic(threading.Thread):
    """A story sent at `per_second` until stopped, or for `seconds` at most, children before
    parents (each chunk of 60 reversed), with a malformed message every 150 events and a user
    claiming a taken email every 500; `sent` counts the messages Kafka was handed so far."""

    def __init__(self, pipeline: Pipeline, seconds: float, per_second: int) -> None:
        super().__init__(daemon=True)
        self.topic, self.seconds, self.per_second = pipeline.name, seconds, per_second
        self.producer = Producer({"bootstrap.servers": pipeline.settings.kafka_bootstrap_servers,
                                  "linger.ms": 5})
        self.sent = 0
        self.stop = threading.Event()

    def run(self) -> None:
        story, chunk, owner, events = Story(seed=17), [], "", 0
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline and not self.stop.is_set():
            tick = time.monotonic()
            for _ in range(self.per_second // 20):
                key, doc = story.next()
                events += 1
                if not owner and doc["eventType"] == "UserCreated":
                    owner = doc["data"]["email"]
                chunk.append((key.encode(), encode(doc)))
                if events % 150 == 0:
                    chunk.append((b"junk", b"{not json %d" % events))
                if owner and events % 500 == 0:
                    clash = user_created(f"clash-{events}", email=owner)
                    chunk.append((clash[0].encode(), encode(clash[1])))
                if len(chunk) >= 60:
                    self._send(chunk)
                    chunk = []
            time.sleep(max(0.0, 0.05 - (time.monotonic() - tick)))
        self._send(chunk)
        assert self.producer.flush(30) == 0

    def _send(self, chunk: list[tuple[bytes, bytes]]) -> None:
        for key, value in reversed(chunk):
            self.producer.produce(self.topic, key=key, value=value)
            self.producer.poll(0)
            self.sent += 1


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_verify_is_clean_while_events_are_applied(
    make_pipeline: Any, tmp_path: Path, backend: str,
) -> None:
    """The adversarial tester's finding: `eventpipe verify` run while events were applied
    (400/s) found hundreds of differences, users, orders and payments "expected nothing" and
    stock levels apart. It folded the topic below Kafka's committed offsets and compared with
    a database already past them, and still changing as it read. Now it reads the database in
    one snapshot and folds exactly what that snapshot records as done."""
    url = f"sqlite:///{tmp_path / 'eventpipe.db'}" if backend == "sqlite" else None
    pipeline: Pipeline = make_pipeline(database_url=url, PARK_TIMEOUT_S="2")
    pipeline.start_worker()
    pipeline.start_bridge()
    # Until the last verify ends, however slow the machine: stopped below.
    traffic = SteadyTraffic(pipeline, 180, 400)
    traffic.start()
    engine = make_engine(pipeline.settings, writer=False, create=False)
    reports: list[Report] = []
    try:
        wait_until(lambda: pipeline.applied_count() > 0, 30, "the workers to apply events")
        for _ in range(3):
            time.sleep(2)
            reports.append(verify(pipeline.settings, engine, pipeline.dlq))
            assert traffic.is_alive(), "the traffic ended before verify did: not under it"
    finally:
        traffic.stop.set()
        traffic.join(60)
        engine.dispose()
    assert [len(report.differences) for report in reports] == [0, 0, 0], \
        "\n".join(render(report, 20) for report in reports)
    assert 0 < reports[0].messages < reports[1].messages < reports[2].messages
    drained(pipeline, traffic.sent)
    idle = pipeline.verify()
    assert idle.clean, render(idle)
