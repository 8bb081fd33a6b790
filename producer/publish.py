"""Publishing to Kafka with delivery confirmation, at a bounded rate, timing each message."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from eventpipe import metrics
from eventpipe.progress import ProgressBar
from producer.stream import Planned

# Latencies kept for the percentiles: all of them up to this many, then a uniform sample of
# this size (reservoir sampling), so a run of any length fits in memory.
LATENCIES_KEPT = 100_000
FLUSH_TIMEOUT_S = 60.0


@dataclass(slots=True)
class Delivery:
    delivered: int = 0
    failed: int = 0
    # Still unacknowledged when the final flush gave up: neither delivered nor refused.
    unconfirmed: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)  # each distinct error, how often
    # Per partition, the offset after the last delivered message: where a consumer that has
    # read everything sent stands (the broker's own "latest offset" answer is not trusted).
    ends: dict[int, int] = field(default_factory=dict)
    _sampler: random.Random = field(default_factory=lambda: random.Random(0))

    def timed(self, latency: float) -> None:
        if len(self.latencies) < LATENCIES_KEPT:
            self.latencies.append(latency)
        elif (slot := self._sampler.randrange(self.delivered)) < LATENCIES_KEPT:
            self.latencies[slot] = latency

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
                result.timed(elapsed)
                metrics.KAFKA_PRODUCE.observe(elapsed)
            else:
                result.failed += 1
                result.errors[str(error)] += 1
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
    result.unconfirmed = producer.flush(FLUSH_TIMEOUT_S)
    if bar is not None:
        bar.close()
    return result
