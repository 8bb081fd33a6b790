"""Publishing to Kafka with delivery confirmation, at a bounded rate, timing each message."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from eventpipe import metrics
from eventpipe.progress import ProgressBar
from producer.stream import Planned


@dataclass(slots=True)
class Delivery:
    delivered: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # Per partition, the offset after the last delivered message: where a consumer that has
    # read everything sent stands (the broker's own "latest offset" answer is not trusted).
    ends: dict[int, int] = field(default_factory=dict)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def publish(
    producer: Producer, topic: str, messages: Iterable[Planned], *, total: int,
    rate: float | None = None, progress: bool = True,
) -> Delivery:
    """Send every message; `rate` in messages per second (None: as fast as possible)."""
    result = Delivery()
    started = time.monotonic()
    bar = ProgressBar("sending", total, "messages") if progress else None

    def acknowledged(sent_at: float) -> Any:
        def callback(error: KafkaError | None, message: Message) -> None:
            elapsed = time.monotonic() - sent_at
            if error is None:
                result.delivered += 1
                partition, offset = message.partition() or 0, message.offset() or 0
                result.ends[partition] = max(result.ends.get(partition, 0), offset + 1)
                result.latencies.append(elapsed)
                metrics.KAFKA_PRODUCE.observe(elapsed)
            else:
                result.failed += 1
                result.errors.append(str(error))
        return callback

    for index, message in enumerate(messages, start=1):
        if rate:
            # Pace against the schedule, not the previous send, so the rate holds on average.
            ahead = started + index / rate - time.monotonic()
            if ahead > 0:
                producer.poll(ahead)
        while True:
            try:
                producer.produce(topic, value=message.value, key=message.key,
                                 on_delivery=acknowledged(time.monotonic()))
                break
            except BufferError:
                producer.poll(0.1)  # the local queue is full: let deliveries drain
        producer.poll(0)
        if bar is not None:
            bar.update(index)
    producer.flush(60)
    if bar is not None:
        bar.close()
    return result
