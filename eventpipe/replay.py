"""Replaying dead letters to Kafka, for the API and the CLI: one entry, or all that match.

Each entry's original key and value go back to its topic with its failure history in the
`HISTORY_HEADER`; `DeadLetterQueue.replay` deletes the entries only once Kafka acknowledged
them all, and raises a transient error when it did not.
"""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import KafkaError, Message

from eventpipe import metrics
from eventpipe.dlq import HISTORY_HEADER, DeadLetter, DeadLetterQueue, Filter
from eventpipe.kafka import make_producer
from eventpipe.settings import Settings

FLUSH_TIMEOUT_S = 10.0
CHUNK = 500


class Publisher:
    """A producer for one request that counts as undelivered what Kafka did not acknowledge.

    A message that failed (timed out, refused) is no longer queued, so `producer.flush()`'s
    count alone would report it delivered: the delivery reports are counted too. What is
    still queued when the wait ends is dropped rather than sent later behind the caller's
    back; its entry stays in the DLQ to be replayed again.
    """

    def __init__(self, settings: Settings, timeout_s: float | None = None) -> None:
        self.settings = settings
        self.timeout_s = FLUSH_TIMEOUT_S if timeout_s is None else timeout_s
        self.producer = make_producer(
            settings, **{"message.timeout.ms": int(self.timeout_s * 1000)})
        self.failed = 0

    def publish(self, entry: DeadLetter, history: bytes) -> None:
        sent_at = time.monotonic()

        def report(error: KafkaError | None, _message: Message) -> None:
            if error is not None:
                self.failed += 1
            else:
                metrics.KAFKA_PRODUCE.observe(time.monotonic() - sent_at)

        self.producer.produce(entry.topic or self.settings.kafka_topic, value=entry.value,
                              key=entry.key, headers=[(HISTORY_HEADER, history)],
                              on_delivery=report)

    def flush(self) -> int:
        """Wait for Kafka; how many messages since the last flush it did not acknowledge."""
        remaining: int = self.producer.flush(self.timeout_s)
        if remaining:
            self.producer.purge()
            self.producer.flush(0)  # serve the purged messages' reports
        undelivered = max(remaining, self.failed)
        self.failed = 0
        return undelivered


def replay_one(queue: DeadLetterQueue, entry: DeadLetter, publisher: Publisher) -> int:
    return queue.replay([entry], publisher.publish, publisher.flush)


def replay_matching(queue: DeadLetterQueue, where: Filter, publisher: Publisher,
                    chunk: int | None = None) -> int:
    """Replay what matches `where` and was in the DLQ when the replay began, in chunks.

    A replayed message that fails again comes back as a new entry at the stream's end; the
    upper bound keeps this call from replaying it again and again.
    """
    chunk = CHUNK if chunk is None else chunk
    newest = _newest_id(queue)
    replayed = 0
    after: str | None = None
    while newest is not None:
        page = queue.page(where, after, chunk)
        batch = [entry for entry in page if _key(entry) <= newest]
        if batch:
            replayed += queue.replay(batch, publisher.publish, publisher.flush)
        if len(batch) < chunk:
            return replayed
        after = batch[-1].entry_id
    return replayed


def _newest_id(queue: DeadLetterQueue) -> tuple[int, int] | None:
    found: Any = queue.client.xrevrange(queue.stream, count=1)
    if not found:
        return None
    raw = found[0][0]
    return _parse(raw.decode() if isinstance(raw, bytes) else raw)


def _key(entry: DeadLetter) -> tuple[int, int]:
    assert entry.entry_id is not None
    return _parse(entry.entry_id)


def _parse(entry_id: str) -> tuple[int, int]:
    millis, _, sequence = entry_id.partition("-")
    return int(millis), int(sequence or 0)
