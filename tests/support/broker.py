"""A real Kafka-protocol broker for integration tests: embedded Tansu, fresh topics, and
producing and consuming with confirmation. A broker that cannot start fails the test.

Tansu facts these helpers rely on: a consumer-group join takes about half of
`session.timeout.ms`, so consumers here use 6 s (a ~3 s join); its ListOffsets "latest" answer
is wrong, so an end offset is read from delivery reports or a fetched high watermark instead.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import pytest
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition
from confluent_kafka.admin import AdminClient
from sqlalchemy import create_engine

from eventpipe import positions
from eventpipe.effects import Position
from eventpipe.kafka import consumer_config, ensure_topic, make_producer, read_topic_id
from eventpipe.migrations import upgrade
from eventpipe.settings import Settings
from launcher.embedded import EmbeddedServiceError, start_kafka

Headers = Sequence[tuple[str, bytes | None]]
Record = tuple[bytes | None, bytes | None, Headers]
"""(key, value, headers) of one message to produce."""

SESSION_TIMEOUT_MS = 6000


class TopicFactory(Protocol):
    def __call__(self, partitions: int = 12) -> str: ...


@contextmanager
def running_kafka(log_path: Path | None = None) -> Iterator[str]:
    """An embedded Tansu for the duration of the block; yields its bootstrap address."""
    try:
        broker = start_kafka(log_path=log_path)
    except EmbeddedServiceError as exc:
        pytest.fail(f"the embedded Kafka broker (Tansu) did not start: {exc}", pytrace=False)
    with broker:
        yield broker.bootstrap


@cache
def bridges_database() -> str:
    """A migrated SQLite database, made once per test process, for the bridges a test makes
    in its own process: they record their positions in it (`eventpipe.positions`)."""
    directory = Path(tempfile.mkdtemp(prefix="eventpipe-bridges-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    url = f"sqlite:///{directory / 'positions.db'}"
    upgrade(url)
    return url


def settings_for(bootstrap: str, topic: str = "events", partitions: int = 12) -> Settings:
    return Settings(kafka_bootstrap_servers=bootstrap, kafka_topic=topic,
                    kafka_partitions=partitions, kafka_session_timeout_ms=SESSION_TIMEOUT_MS,
                    database_url=bridges_database())


def create_topic(bootstrap: str, partitions: int = 12, prefix: str = "test") -> str:
    """Create a topic no other test uses, with `partitions` partitions; return its name."""
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    ensure_topic(settings_for(bootstrap, name, partitions))
    return name


def produce(bootstrap: str, topic: str, records: Iterable[Record],
            timeout_s: float = 15.0, **overrides: Any) -> list[Position]:
    """Send `records` in order and wait until the broker has confirmed every one.

    Returns where each landed, in the order given. Any delivery error raises.
    """
    producer = make_producer(settings_for(bootstrap, topic), **overrides)
    reports: list[tuple[KafkaError | None, Message]] = []
    for key, value, headers in records:
        producer.produce(topic, value=value, key=key, headers=list(headers),
                         on_delivery=lambda err, msg: reports.append((err, msg)))
    left = producer.flush(timeout_s)
    if left:
        raise AssertionError(f"{left} messages to {topic} not confirmed within {timeout_s} s")
    failed = [(err, msg.partition()) for err, msg in reports if err is not None]
    if failed:
        raise AssertionError(f"delivery to {topic} failed: {failed}")
    return [Position(msg.topic(), msg.partition(), msg.offset()) for _, msg in reports]


def commit_offset(bootstrap: str, group_id: str, topic: str, partition: int,
                  offset: int, database_url: str | None = None) -> None:
    """Commit `offset` for the group, as a member that has since left would have: recorded
    first in the database a bridge of these settings records its positions in, under the
    topic's id (`eventpipe.positions`)."""
    engine = create_engine(database_url or bridges_database())
    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        topic_id = read_topic_id(admin, topic, 10.0)
        assert topic_id is not None, f"Kafka did not say which topic {topic} is"
        positions.save(engine, topic, topic_id, {partition: offset}, datetime.now(UTC))
    finally:
        engine.dispose()
    committer = Consumer({"bootstrap.servers": bootstrap, "group.id": group_id})
    try:
        committer.commit(offsets=[TopicPartition(topic, partition, offset)], asynchronous=False)
    finally:
        committer.close()


def make_consumer(bootstrap: str, group_id: str, **overrides: Any) -> Consumer:
    """A consumer configured like the bridge's (manual commits, earliest, 6 s session)."""
    return Consumer(consumer_config(settings_for(bootstrap), **{"group.id": group_id,
                                                                **overrides}))


def consume(consumer: Consumer, count: int, timeout_s: float = 30.0) -> list[Message]:
    """Poll until `count` messages arrived (including the group join); an error raises."""
    messages: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while len(messages) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"got {len(messages)} of {count} messages in {timeout_s} s")
        message = consumer.poll(0.2)
        if message is None:
            continue
        if message.error() is not None:
            raise AssertionError(f"consumer error: {message.error()}")
        messages.append(message)
    return messages
