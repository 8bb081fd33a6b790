"""Events per second through the whole pipeline: Kafka (Tansu) → bridge → Celery workers
(`eventpipe worker`, 2 processes) → PostgreSQL, with the ledger and DLQ in Redis.

The stream is produced first; the clock runs from the first applied event until every
offset is committed, so the consumer-group join is not counted.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from eventpipe.samples import Story
from tests.support.broker import running_kafka
from tests.support.pipeline import Pipeline, wait_until


def _measure(bootstrap: str, count: int, batch: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = Pipeline(bootstrap, Path(tmp), partitions=12,
                            BATCH_MAX_EVENTS=str(batch), MAX_IN_FLIGHT_PER_PARTITION="5000",
                            REDELIVERY_TIMEOUT_S="60", LOG_LEVEL="WARNING")
        try:
            story = Story(seed=batch)
            pipeline.send(story.next() for _ in range(count))
            ends = pipeline.end_offsets()
            pipeline.start_worker_host("0-11", processes=2)
            pipeline.start_bridge()
            wait_until(lambda: pipeline.applied_count() > 0, 60, "the first event applied",
                       interval_s=0.05)
            started = time.monotonic()
            wait_until(lambda: pipeline.committed_offsets() == ends, 600, "the stream drained",
                       interval_s=0.1)
            return count / (time.monotonic() - started)
        finally:
            pipeline.close()


def run() -> None:
    with running_kafka() as bootstrap:
        for count, batch in ((3_000, 1), (20_000, 100), (20_000, 500)):
            rate = _measure(bootstrap, count, batch)
            print(f"pipeline: batch {batch:4d}: {rate:8,.0f} events/s end to end "
                  f"({count:,} events, 12 partitions, 2 worker processes, PostgreSQL)")
