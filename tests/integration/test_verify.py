"""`eventpipe verify` against a real topic and database: clean when they agree, and every kind
of disagreement named with the positions of its messages."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, TopicPartition
from sqlalchemy import Engine, delete, select, update

from eventpipe.apply import apply_batch
from eventpipe.dlq.letter import INVALID_EVENT, DeadLetter, event_key, message_key
from eventpipe.dlq.projection import project
from eventpipe.dlq.stream import DeadLetterStream
from eventpipe.effects import Received
from eventpipe.events import parse_event
from eventpipe.kafka import MessageReader
from eventpipe.reconcile import reconcile
from eventpipe.samples import encode, inventory_adjusted, order_placed, user_created
from eventpipe.settings import Settings
from eventpipe.tables import applied_events, dead_letters, users
from eventpipe.times import utc_iso
from eventpipe.verify import render, verify
from tests.support.broker import TopicFactory, produce
from tests.support.factories import T0, at
from tests.support.pipeline import BIN
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
