"""Kafka clients configured one way for every role: producer, bridge consumer, admin."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    NewPartitions,
    NewTopic,
)

from eventpipe.effects import Position
from eventpipe.errors import TransientError
from eventpipe.logs import Repeats
from eventpipe.messages import RawMessage, read_headers
from eventpipe.settings import Settings, SettingsError

log = logging.getLogger(__name__)

REPEATS_HELD_S = 30.0
# What differs between two sayings of one failure: durations, librdkafka's own count.
_VARYING = re.compile(r"\d+(?:\.\d+)?\s?ms\b|\d+ identical error\(s\) suppressed")


class HoldBackRepeats(logging.Filter):
    """Lets each kind of message through once per `window_s`, saying how many alike it held
    back since: librdkafka says a failure again at each retry (a broker down: a connection
    refused some twenty times a second, two hundred at once while a metadata request
    waits). Messages alike differ only in a duration or librdkafka's count of repeats: the
    same failure of another broker is another kind."""

    def __init__(self, window_s: float = REPEATS_HELD_S,
                 clock: Callable[[], float] = time.monotonic, kinds: int = 1000) -> None:
        super().__init__()
        self.repeats = Repeats(window_s, clock, kinds)

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        held = self.repeats.let_through(_VARYING.sub("#", text))
        if held is None:
            return False
        if held:
            record.msg, record.args = f"{text} ({held} alike held back)", None
        return True


# librdkafka's own messages go through logging, as JSON lines like every other record,
# instead of raw lines on stderr, and each kind once per REPEATS_HELD_S.
_LIBRDKAFKA = logging.getLogger("librdkafka")
_LIBRDKAFKA.addFilter(HoldBackRepeats())


def client_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """What every client of ours shares: the brokers, and where librdkafka logs."""
    return {"bootstrap.servers": settings.kafka_bootstrap_servers, "logger": _LIBRDKAFKA,
            **overrides}


def reader_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """What every consumer of ours shares: only the messages of committed transactions
    (librdkafka's default, said here: an aborted transaction's events must never be applied,
    nor expected by `verify`), and answers up to KAFKA_RECEIVE_MAX_BYTES, which bounds what a
    record batch may decompress to as well (librdkafka's default, 100 MB, refuses valid zstd
    batches of repetitive events: their every message would be dead-lettered unread)."""
    return client_config(settings, **{"isolation.level": "read_committed",
                                       "receive.message.max.bytes":
                                           settings.kafka_receive_max_bytes,
                                       **overrides})


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    return {
        **client_config(settings),
        # A message counts as sent only once every in-sync replica has it.
        "acks": "all",
        # Whatever a reader of ours takes, a producer of ours sends back (a replay): Kafka's
        # own bound, the topic's max.message.bytes, judges, not librdkafka's default of 1 MB
        # below it (an event may be 1 MiB, with its key and headers besides).
        "message.max.bytes": min(settings.kafka_receive_max_bytes, 1_000_000_000),
        "linger.ms": 5,
        "compression.type": "none",
        **overrides,
    }


def consumer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    return {
        **reader_config(settings),
        "group.id": settings.kafka_group_id,
        "session.timeout.ms": settings.kafka_session_timeout_ms,
        "heartbeat.interval.ms": max(500, settings.kafka_session_timeout_ms // 3),
        # Offsets are committed by the bridge, and only past events that are done.
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "range",
        "statistics.interval.ms": 5000,
        "fetch.wait.max.ms": settings.kafka_fetch_wait_max_ms,
        **overrides,
    }


def make_producer(settings: Settings, **overrides: Any) -> Producer:
    return Producer(producer_config(settings, **overrides))


def unserved(settings: Settings, partitions: int) -> SettingsError:
    """The error of an events topic with more partitions than KAFKA_PARTITIONS: workers serve
    the queues of the configured ones only, so the others' events would never be applied."""
    count = settings.kafka_partitions
    return SettingsError(
        f"KAFKA_PARTITIONS={count}, but topic {settings.kafka_topic!r} has {partitions} "
        f"partitions: set KAFKA_PARTITIONS={partitions} (no worker serves the queues of "
        f"partitions {count} and above)")


def ensure_topic(settings: Settings, name: str | None = None, timeout_s: float = 15.0,
                 *, grow: bool = False) -> int:
    """Create the events topic (or `name`) with the configured partitions if it does not
    exist yet; with `grow`, add partitions to one that has fewer. The partitions it has then.
    An events topic with more partitions than configured is refused (`unserved`)."""
    topic = name or settings.kafka_topic
    admin = AdminClient(client_config(settings))
    existing = admin.list_topics(timeout=timeout_s).topics
    if topic in existing:
        have = len(existing[topic].partitions)
        if topic == settings.kafka_topic and have > settings.kafka_partitions:
            raise unserved(settings, have)
        if grow and have < settings.kafka_partitions:
            futures = admin.create_partitions([NewPartitions(topic, settings.kafka_partitions)],
                                              request_timeout=timeout_s)
            for future in futures.values():
                future.result(timeout=timeout_s)
            return settings.kafka_partitions
        return have
    futures = admin.create_topics(
        [NewTopic(topic, num_partitions=settings.kafka_partitions, replication_factor=-1)],
        request_timeout=timeout_s,
    )
    for future in futures.values():
        try:
            future.result(timeout=timeout_s)
        except Exception as exc:
            # Another process made it meanwhile (the bridge still checks it: `_check_topic`).
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    return settings.kafka_partitions


def broker_reachable(settings: Settings, timeout_s: float = 2.0) -> bool:
    """True when a broker answers a metadata request within `timeout_s`."""
    admin = AdminClient(client_config(
        settings, **{"socket.connection.setup.timeout.ms": int(timeout_s * 1000)}))
    try:
        admin.list_topics(timeout=timeout_s)
    except Exception:
        return False
    return True


# The id Kafka gives a topic it has no id for, and what a broker too old to describe topics
# says (before 2.8, they have none).
_NO_TOPIC_ID = "AAAAAAAAAAAAAAAAAAAAAA"
_NO_TOPIC_IDS = frozenset({KafkaError._UNSUPPORTED_FEATURE, KafkaError.UNSUPPORTED_VERSION})


def read_topic_id(admin: AdminClient, topic: str, timeout_s: float) -> str | None:
    """Kafka's id of `topic` as it is now: a topic deleted and made again under its name has
    a new one. "" when Kafka has no topic ids (before 2.8); None when it did not say, for
    whatever reason (no answer within `timeout_s`, the topic not there, a refusal: said in
    the log), and the caller asks again later."""
    try:
        found = admin.describe_topics(TopicCollection([topic]),
                                      request_timeout=timeout_s)[topic].result()
    except Exception as exc:  # whatever the client raises: a Kafka callback must not
        error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        if error is not None and error.code() in _NO_TOPIC_IDS:
            return ""
        log.warning("Kafka did not say which topic %s is: %s", topic, exc)
        return None
    named = str(found.topic_id) if found.topic_id is not None else ""
    return "" if named == _NO_TOPIC_ID else named


# What Kafka says of a message it no longer has.
_GONE = frozenset({KafkaError.OFFSET_OUT_OF_RANGE, KafkaError._AUTO_OFFSET_RESET,
                   KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_PARTITION,
                   KafkaError._UNKNOWN_TOPIC})
# What the Kafka client says reading from the end of a partition, or past it.
_PAST = frozenset({KafkaError._PARTITION_EOF, KafkaError.OFFSET_OUT_OF_RANGE,
                   KafkaError._AUTO_OFFSET_RESET})
# What the Kafka client says of a record batch it cannot decode (its compression or its
# records corrupt, as written by a faulty producer or broker): it hands none of the batch's
# messages over and fetches the batch again and again, each time with this error, which names
# the batch's first offset. Nothing past the batch is read until the reader seeks past it
# (`unreadable_end`).
# A batch of a format it does not know (its magic byte) it skips by itself, after the error:
# the same, or its offsets would be taken for ones that hold no message.
UNREADABLE = frozenset({KafkaError._BAD_COMPRESSION, KafkaError._BAD_MSG,
                        KafkaError.INVALID_MSG, KafkaError.INVALID_RECORD,
                        KafkaError._NOT_IMPLEMENTED})


def unreadable(error: KafkaError | None) -> bool:
    return error is not None and error.code() in UNREADABLE


def said(error: KafkaError) -> str:
    """The client's error in a line: its text, then its name; for a batch that does not
    decompress, the limit that may be the cause rather than the batch."""
    line = f"{error.str()} ({error.name()})"
    if error.code() == KafkaError._BAD_COMPRESSION:
        line += ("; a batch that decompresses to more than KAFKA_RECEIVE_MAX_BYTES is said so "
                 "too: raise it, then read these offsets again")
    return line


class Handed(NamedTuple):
    """What Kafka hands over first, read from an offset: a message at `offset`, or, when
    `why` says why, a record batch it cannot read, whose first offset is `offset`; and the
    partition's high watermark, as the fetch said it (None if it did not)."""

    offset: int
    why: str | None = None
    high: int | None = None


class MessageReader:
    """Reads single messages by position, without joining any group: the bytes of dead
    letters for the DLQ, and `eventpipe trace`. One consumer, reused for every read."""

    def __init__(self, settings: Settings, timeout_s: float = 5.0) -> None:
        self.timeout_s = timeout_s
        self.brokers = settings.kafka_bootstrap_servers
        self.consumer = Consumer(reader_config(settings, **{
            "group.id": f"{settings.kafka_group_id}.reader",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # One message is wanted at a time: answer at once rather than wait for more
            # (0.5 s per read otherwise, on some brokers, which makes rebuilding a large DLQ
            # crawl).
            "fetch.wait.max.ms": 10,
            # An offset Kafka no longer has is an error to read, not a jump to another one.
            "auto.offset.reset": "error",
            # The end of a partition said at once, not after a read's whole wait.
            "enable.partition.eof": True}))

    def fetch(self, position: Position) -> RawMessage | None:
        """The message at `position`; None when Kafka no longer has it (its
        retention passed, its topic is gone). A Kafka that does not answer is not one that
        lost the message: `TransientError`, and the caller tries again later."""
        if position.topic is None or position.partition is None or position.offset is None:
            return None
        self.consumer.assign([TopicPartition(position.topic, position.partition,
                                             position.offset)])
        try:
            record = self.consumer.poll(self.timeout_s)
        finally:
            # A partition left assigned is fetched on in the background for as long as the
            # consumer lives, into memory (up to librdkafka's 64 MB queue) and then once
            # every `fetch.wait.max.ms`: a worker's reader would keep its last partition
            # streaming from the broker after a single dead letter's bytes.
            self.consumer.unassign()
        if record is None:  # nothing there, or no answer: asking for the topic tells which
            try:
                self.consumer.list_topics(position.topic, timeout=self.timeout_s)
            except KafkaException as exc:
                raise TransientError(f"Kafka at KAFKA_BOOTSTRAP_SERVERS={self.brokers} did "
                                     f"not answer for {position.topic} "
                                     f"[{position.partition}] offset {position.offset}: "
                                     f"{exc}") from exc
            return None
        error = record.error()
        if error is not None and error.code() not in _GONE \
                and error.code() != KafkaError._PARTITION_EOF and not unreadable(error):
            raise TransientError(f"Kafka at KAFKA_BOOTSTRAP_SERVERS={self.brokers} could not "
                                 f"hand over {position.topic} "
                                 f"[{position.partition}] offset {position.offset}: {error}")
        if error is not None or record.offset() != position.offset:
            # Gone, past the end, compacted away (the next offset came instead), or in a
            # batch Kafka cannot hand over.
            return None
        key, value = record.key(), record.value()
        return RawMessage(key if isinstance(key, bytes) else None,
                       value if isinstance(value, bytes) else None, read_headers(record))

    def first_from(self, topic: str, partition: int, offset: int) -> Handed | None:
        """What Kafka hands over first reading the partition from `offset`; None at its end
        or past it. `TransientError` if it hands over nothing (which is also what Tansu says
        of an offset past the end: ask only below the high watermark a first read gave)."""
        where = TopicPartition(topic, partition, offset)
        self.consumer.assign([where])
        try:
            record = self.consumer.poll(self.timeout_s)
            _, high = self.consumer.get_watermark_offsets(where, cached=True)
        finally:
            self.consumer.unassign()
        error = None if record is None else record.error()
        if record is None or (error is not None and error.code() not in _PAST
                              and not unreadable(error)):
            raise TransientError(f"Kafka at KAFKA_BOOTSTRAP_SERVERS={self.brokers} handed "
                                 f"nothing over from {topic} [{partition}] offset {offset}: "
                                 f"{error or 'no answer'}")
        if error is not None and error.code() in _PAST:
            return None
        return Handed(record.offset() or 0, None if error is None else said(error),
                      high if high >= 0 else None)

    def close(self) -> None:
        self.consumer.close()


def unreadable_end(reader: MessageReader, topic: str, partition: int, batch: int,
                   inside: int) -> int | None:
    """The first offset past the record batch Kafka cannot hand over that begins at `batch`,
    if `inside` is one of its offsets (else None: the reading is past it already). Read from
    inside, the batch comes whole and fails again, naming its first offset; read from past
    it, the next message comes (or the partition's end). Doubling steps, then halving: a
    batch of n records costs about 2·log2(n) reads, none at or past the high watermark the
    reads give. `TransientError` if Kafka hands nothing over meanwhile."""
    high: int | None = None

    def within(offset: int) -> bool:
        nonlocal high
        if high is not None and offset >= high:
            return False
        handed = reader.first_from(topic, partition, offset)
        if handed is not None and handed.high is not None:
            high = handed.high
        return handed is not None and handed.why is not None and handed.offset == batch

    if inside != batch and not within(inside):
        return None
    known, step = inside, 1
    while within(inside + step):
        known, step = inside + step, step * 2
    past = inside + step if high is None else min(inside + step, max(high, known + 1))
    while past - known > 1:
        middle = (known + past) // 2
        if within(middle):
            known = middle
        else:
            past = middle
    return past
