"""Every Prometheus metric of the pipeline, defined once; each process exports what it moves.

Worker hosts run several processes: with `PROMETHEUS_MULTIPROC_DIR` set (as `eventpipe
worker` does), prometheus_client aggregates them, and gauges say how (`livesum`, `max`).
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Sequence

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from eventpipe.events import EventType
from eventpipe.ports import unusable

_EVENT_TYPES = frozenset(t.value for t in EventType)


def event_type_label(name: str | None) -> str:
    """The `event_type` label for a message: one of the contract's types, else "unknown",
    so that poison cannot create label values without bound."""
    return name if name in _EVENT_TYPES else "unknown"


class FewValues:
    """A label whose values come from outside (what another program writes into the Celery
    broker): the first `limit` distinct ones, at most 100 characters each, as they are; the
    rest "(other)", which no Kafka topic is called, so that no input creates series without
    bound."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._named: set[str] = set()

    def of(self, value: object) -> str:
        name = str(value)[:100]
        if name in self._named or len(self._named) < self.limit:
            self._named.add(name)
            return name
        return "(other)"


def observe_all(histogram: Histogram, values: Sequence[float]) -> None:
    """`histogram.observe(value)` for each of `values` (a labelled histogram), with one write
    per bucket touched and one to the sum, where `observe` makes two writes a value: in a
    worker host's shared-memory files each is a lock and a page write, and a batch observes
    its events' latency. It takes the buckets from the histogram's own fields (`_upper_bounds`,
    `_buckets`, `_sum`); `tests/unit/test_metrics.py` holds it to `observe`."""
    if not values:
        return
    bounds: list[float] = histogram._upper_bounds
    # `observe` adds to the first bucket whose bound is at least the value.
    for index, count in Tally(bisect_left(bounds, value) for value in values).items():
        histogram._buckets[index].inc(count)
    histogram._sum.inc(sum(values))


_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# A batch's transaction may run up to TASK_TIME_LIMIT_S (300 s): a database that stalls for
# minutes must show as minutes, not as "over 10 s".
_DB_BUCKETS = (*_LATENCY_BUCKETS, 30, 60, 300)
_E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

EVENTS_PROCESSED = Counter(
    "events_processed", "Events by final status of one processing attempt "
    "(applied, duplicate, stale; id_reused and dead_lettered: into the DLQ)",
    ["event_type", "status"],
)
EVENTS_PER_SECOND = Gauge(
    "events_processed_per_second", "Events processed per second over the last 10 s",
    ["event_type"], multiprocess_mode="livesum",
)
DLQ_ENTRIES = Counter("dlq_entries", "Entries added to the dead-letter queue", ["event_type"])
# "mostrecent": the last process to look at the DLQ knows its depth best.
DLQ_DEPTH = Gauge("dlq_depth", "Entries in the dead-letter queue now",
                  multiprocess_mode="mostrecent")
DLQ_MAX_ENTRIES = Gauge("dlq_max_entries", "The dead-letter queue's bound (DLQ_MAX_ENTRIES)",
                        multiprocess_mode="max")
# The other bound: large messages (a poison of deep nesting, a traceback each) fill the bytes
# long before the entries.
DLQ_BYTES = Gauge("dlq_bytes", "Bytes the dead-letter queue's entries hold now",
                  multiprocess_mode="mostrecent")
DLQ_MAX_BYTES = Gauge("dlq_max_bytes", "The dead-letter queue's bound in bytes (DLQ_MAX_BYTES)",
                      multiprocess_mode="max")
DB_OPERATION = Histogram(
    "db_operation_duration_seconds", "Duration of database operations", ["operation"],
    buckets=_DB_BUCKETS,
)
KAFKA_PRODUCE = Histogram(
    "kafka_produce_duration_seconds", "From produce() to the broker's acknowledgement",
    buckets=_LATENCY_BUCKETS,
)
KAFKA_CONSUME = Histogram(
    "kafka_consume_duration_seconds", "Duration of one consumer poll that returned messages",
    buckets=_LATENCY_BUCKETS,
)
CONSUMER_LAG = Gauge(
    "kafka_consumer_lag", "High watermark minus the committed offset, per partition",
    ["topic", "partition"], multiprocess_mode="max",
)
COMMITTED_OFFSET = Gauge(
    "bridge_committed_offset", "The offset the bridge last committed, per partition (an alert "
    "watches it move)", ["topic", "partition"], multiprocess_mode="max",
)
QUEUE_DEPTH = Gauge(
    "celery_queue_depth", "Messages waiting in each partition's Celery queue", ["queue"],
    multiprocess_mode="max",
)
IN_FLIGHT = Gauge(
    "bridge_in_flight_events", "Events handed to Celery and not yet done, per partition",
    ["partition"], multiprocess_mode="livesum",
)
PAUSED = Gauge(
    "bridge_paused_partitions",
    "Partitions paused: for backpressure, or until their ledger holds no marks of an earlier topic",
    multiprocess_mode="livesum",
)
REDELIVERIES = Counter(
    "bridge_redeliveries", "Times a partition was re-read from its committed offset", ["partition"]
)
LOST_TO_RETENTION = Counter(
    "bridge_events_lost_to_retention", "Events Kafka deleted (the topic's retention) before the "
    "bridge read them, per partition: never applied", ["topic", "partition"],
)
DATABASE_REWINDS = Counter(
    "bridge_events_read_again_for_the_database", "Messages the bridge went back for because "
    "the database held less than it took for done: as a partition was assigned or taken again, "
    "the database's position behind Kafka's committed offset (restored from a backup, left "
    "behind by a failover, emptied); as the bridge recorded a position, offsets done since "
    "the last one missing from the database (a failover or a restore while it ran); per "
    "partition. Those Kafka no longer has are counted lost to retention too",
    ["topic", "partition"],
)
RETRIES = Counter(
    "event_retries", "Events scheduled for another try, by reason: transient (their whole "
    "batch met a failure of the world), error (an unforeseen error)",
    ["event_type", "reason"],
)
FOREIGN_TASKS = Counter(
    "foreign_tasks", "Tasks of another topic than KAFKA_TOPIC, or another consumer group than "
    "KAFKA_GROUP_ID, taken off this pipeline's queues "
    "and not applied: another pipeline shares the Celery broker; and tasks that are no "
    "bridge's batch (items on a queue that are no task a bridge wrote: an empty topic); "
    "past the first 10 topics a process meets, \"(other)\"",
    ["topic"],
)
FOREIGN_TOPICS = FewValues(10)  # FOREIGN_TASKS' topic label
POOL_PARTITIONS = Gauge(
    "worker_pool_partitions", "Partition queues the worker pool gave this worker host's "
    "processes", multiprocess_mode="livesum",
)
POOL_REBALANCES = Counter(
    "worker_pool_rebalances", "Partitions the worker pool gave a process (assigned) or took "
    "back (revoked; lost: the group had already moved them)", ["kind"],
)
END_TO_END = Histogram(
    "event_end_to_end_latency_seconds", "From the event's occurredAt to its effect committed",
    ["event_type"], buckets=_E2E_BUCKETS,
)


class RateMeter:
    """Keeps `events_processed_per_second` at the rate of the last `window_s` seconds.

    Counts go into one-second buckets; a daemon thread recomputes the gauge every second,
    so the rate falls back to zero when traffic stops instead of keeping its last value.
    """

    def __init__(self, gauge: Gauge = EVENTS_PER_SECOND, window_s: int = 10) -> None:
        self.gauge = gauge
        self.window_s = window_s
        self._buckets: dict[str, dict[int, int]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, label: str, count: int = 1, now: float | None = None) -> None:
        second = int(time.time() if now is None else now)
        with self._lock:
            by_second = self._buckets.setdefault(label, {})
            by_second[second] = by_second.get(second, 0) + count
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="rate-meter",
                                                daemon=True)
                self._thread.start()

    def rates(self, now: float | None = None) -> dict[str, float]:
        """Events per second per label over the last full `window_s` seconds."""
        current = int(time.time() if now is None else now)
        oldest = current - self.window_s
        with self._lock:
            result = {}
            for label, by_second in self._buckets.items():
                for second in [s for s in by_second if s < oldest]:
                    del by_second[second]
                counted = sum(n for s, n in by_second.items() if s < current)
                result[label] = counted / self.window_s
            return result

    def _run(self) -> None:
        while True:
            for label, rate in self.rates().items():
                self.gauge.labels(label).set(rate)
            time.sleep(1)


RATE = RateMeter()


def serve(port: int, setting: str, host: str, registry: CollectorRegistry = REGISTRY) -> None:
    """Serve /metrics on `host`:`port` (0: any free one; `host` is METRICS_HOST's); a port
    another process holds, or an address not this machine's, is a bad setting, named, rather
    than a traceback."""
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise unusable(setting, port, exc, any_port=True, host=host,
                       host_setting="METRICS_HOST") from None
