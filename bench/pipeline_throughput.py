"""The whole pipeline on one stream, against its peers: Kafka (Tansu) → bridge → Celery workers
(`eventpipe worker`, 2 processes) → the database, with the ledger and DLQ in Redis.

- shipped: the settings as they ship (batches of up to 500, no batch wait);
- naive:   one event per task (`BATCH_MAX_EVENTS=1`), the design batching replaced;
- ceiling: the rows the stream leaves, written with no pipeline around them (`bench.ceiling`);
- no database: workers that only mark messages done (`bench.noop_worker`): what the bridge,
  Celery and Redis carry on their own.

The stream: a story of users, orders, payments and stock moves with 10 % duplicates and 5 %
of events held back 2–50 messages (so children arrive before their parents), 12 partitions.
It is produced before the pipeline starts; the clock runs from the first offset committed
until every offset is, so the consumer-group join is not counted. The commit interval is
0.2 s (shipped: 1 s) so the clock follows the work closely.

Latency: a steady 1,000 events/s with `occurredAt` set as each is produced, `occurredAt` →
applied (`applied_events.applied_at`), after a warm-up, where that time went (the bridge's
and the workers' log line of each batch, at the shipped `LOG_LEVEL`), and the cores each
kind of process kept busy meanwhile; and first the broker's own: the same events produced →
consumed by a consumer configured as the bridge's, and the broker's CPU early and late in
that run. The latency run is repeated with fewer partitions (`FEWER_PARTITIONS`): at light
traffic a worker process serves its partition queues one batch at a time, so how many it
serves sets the wait. Peak RSS: each process's high-water mark (`VmHWM`) at the end of the
shipped run. CPU: each kind of process's CPU time over the shipped run, per message (`bench.cpu`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer
from sqlalchemy import select

from bench import ceiling, cpu
from bridge.service import READ_WAIT_S, read_ready
from eventpipe.database import make_engine
from eventpipe.kafka import consumer_config, ensure_topic
from eventpipe.migrations import upgrade
from eventpipe.queues import queue_name
from eventpipe.samples import Story, encode, iso
from eventpipe.settings import Settings
from eventpipe.tables import applied_events
from producer.stream import plan_stream
from tests.support.broker import running_kafka
from tests.support.databases import drop_database, new_database
from tests.support.pipeline import Pipeline, wait_until

PARTITIONS = 12
PROCESSES = 2
# The shipped settings the test pipeline shortens, back to their defaults.
SHIPPED: dict[str, Any] = {name: str(value) for name, value in (
    ("BATCH_MAX_EVENTS", 500), ("BATCH_MAX_WAIT_MS", 0),
    ("REDELIVERY_TIMEOUT_S", 60), ("RETRY_BACKOFF_BASE_S", 0.5), ("COMMIT_INTERVAL_S", 0.2))}


@dataclass(frozen=True, slots=True)
class Run:
    rate: float
    seconds: float
    rss: dict[str, int]  # process → peak RSS in bytes
    cpu: dict[str, float]  # role → microseconds of CPU per event (`bench.cpu`)


def _stream(count: int) -> list[tuple[bytes | None, bytes]]:
    plan = plan_stream(count, duplicates=0.10, out_of_order=0.05, seed=1)
    return [(message.key, message.value) for message in plan.messages]


def _throughput(bootstrap: str, database_url: str | None, messages: list[tuple[bytes | None,
                bytes]], *, noop: bool = False, **settings: Any) -> Run:
    """`noop`: workers that only mark messages done (`bench.noop_worker`), no database."""
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = Pipeline(bootstrap, Path(tmp), partitions=PARTITIONS,
                            database_url=database_url, **{**SHIPPED, **settings})
        try:
            pipeline.send(messages)
            ends = pipeline.end_offsets()
            host = _noop_workers(pipeline) if noop else pipeline.start_worker_host(
                f"0-{PARTITIONS - 1}", processes=PROCESSES)
            bridge = pipeline.start_bridge()
            wait_until(lambda: any(pipeline.committed_offsets().values()), 120,
                       "the first offset committed", interval_s=0.02)
            marks = cpu.roles(pipeline.redis_server.port)
            started, before = time.monotonic(), cpu.reading(marks)
            wait_until(lambda: pipeline.committed_offsets() == ends, 1800, "the stream drained",
                       interval_s=0.1)
            seconds = time.monotonic() - started
            used = cpu.per_event(before, cpu.reading(marks), len(messages))
            rss = {"bridge": _peak_rss(bridge.pid)}
            for number, pid in enumerate(_children(host.pid), start=1):
                rss[f"worker {number}"] = _peak_rss(pid)
            rss["worker host"] = _peak_rss(host.pid)
            return Run(len(messages) / seconds, seconds, rss, used)
        finally:
            pipeline.close()


def _noop_workers(pipeline: Pipeline) -> subprocess.Popen[bytes]:
    """PROCESSES no-op workers, each serving every other partition; the first is returned."""
    first = None
    for number in range(PROCESSES):
        queues = ",".join(queue_name(p) for p in range(number, PARTITIONS, PROCESSES))
        process = pipeline.spawn(f"noop-{number}", [
            sys.executable, "-m", "celery", "-A", "bench.noop_worker", "worker", "--pool", "solo",
            "--queues", queues, "--without-mingle", "--without-gossip", "--loglevel", "WARNING"])
        first = first or process
    assert first is not None
    return first


RATE = 1000  # events a second, in the latency runs
FEWER_PARTITIONS = (4, 6)  # the latency run again with these, 2 and 3 queues a process
WARM_UP_S = 5.0  # sent before the measured stretch of a latency run
MEASURED_S = 15.0  # as long as the runs of earlier rounds, to compare with them
STRETCH_S = 5.0  # the broker's CPU is told over the first and the last stretch this long


@dataclass(frozen=True, slots=True)
class Latency:
    seconds: list[float]  # `occurredAt` → applied, per event produced after the warm-up
    stages: dict[str, list[float]]  # where those seconds went (`_stages`), per event
    batches: int  # the batches that applied them (one `applied_at` per batch and worker)
    span_s: float  # from the first of those batches to the last
    cores: dict[str, float]  # role → cores it kept busy while the events were measured


@dataclass(frozen=True, slots=True)
class Floor:
    seconds: list[float]  # produced → consumed, per message produced after the warm-up
    broker_first: float  # cores the broker kept busy in the measured stretch's first seconds
    broker_last: float  # and in its last


def _stamped(story: Story) -> Callable[[], tuple[str, bytes]]:
    """The latency runs' messages: the story's next event, `occurredAt` set as it is made."""
    def make() -> tuple[str, bytes]:
        key, document = story.next()
        document["occurredAt"] = iso(datetime.now(UTC))
        return key, encode(document)
    return make


def _latency(bootstrap: str, database_url: str | None, partitions: int = PARTITIONS) -> Latency:
    """`occurredAt` → applied of the events produced after the warm-up, the batches that
    carried them, and what kept the cores busy meanwhile: at light traffic, what a batch
    costs whatever its size is most of the wait."""
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = Pipeline(bootstrap, Path(tmp), partitions=partitions,
                            database_url=database_url, **SHIPPED)
        try:
            pipeline.start_worker_host(f"0-{partitions - 1}", processes=PROCESSES)
            pipeline.start_bridge()
            story = Story(seed=3)
            # Wait for the group to form: one event through.
            pipeline.send([story.next()])
            wait_until(lambda: pipeline.applied_count() > 0, 120, "the first event applied")
            measured_from = datetime.now(UTC) + timedelta(seconds=WARM_UP_S)
            # The benchmark's own process produces the events: its share is counted apart.
            marks = {**cpu.roles(pipeline.redis_server.port), "the producer": ("-m bench ",)}
            with cpu.Sampler(marks) as sampler:
                started = time.monotonic()
                sent = _send_steadily(pipeline.producer, pipeline.name, RATE,
                                      WARM_UP_S + MEASURED_S, _stamped(story))
                cores = sampler.shares(started + WARM_UP_S, time.monotonic())
            wait_until(lambda: pipeline.applied_count() >= sent + 1, 120, "every event applied")
            with pipeline.engine.connect() as conn:
                rows = conn.execute(select(applied_events.c.occurred_at,
                                           applied_events.c.applied_at, applied_events.c.worker,
                                           applied_events.c.kafka_partition,
                                           applied_events.c.kafka_offset)
                                    .where(applied_events.c.occurred_at >= measured_from)).all()
            applied = [row.applied_at for row in rows]
            return Latency([(row.applied_at - row.occurred_at).total_seconds() for row in rows],
                           _stages(rows, _logged(pipeline.log_of("bridge"), "batch sent"),
                                   _logged(pipeline.log_of("worker-host"), "batch done")),
                           len({(row.applied_at, row.worker) for row in rows}),
                           (max(applied) - min(applied)).total_seconds(), cores)
        finally:
            pipeline.close()


def _logged(path: Path, message: str) -> dict[tuple[int, int], float]:
    """(partition, offset) → when the last JSON log line `message` naming that offset's batch
    (`partition`, `offsetFirst`, `offsetLast`) was written: the bridge's `batch sent`, the
    workers' `batch done`."""
    when: dict[tuple[int, int], float] = {}
    for line in path.read_text(errors="replace").splitlines():
        if f'"{message}"' not in line:
            continue
        try:
            record = json.loads(line)
            at = datetime.fromisoformat(record["ts"]).timestamp()
            offsets = range(record["offsetFirst"], record["offsetLast"] + 1)
            partition = record["partition"]
        except (ValueError, KeyError, TypeError):
            continue  # another process's output cut into the line
        when.update(((partition, offset), at) for offset in offsets)
    return when


def _stages(rows: Any, sent: dict[tuple[int, int], float],
            done: dict[tuple[int, int], float]) -> dict[str, list[float]]:
    """Where each event's latency went, from its `applied_events` row and the log lines of
    its batch: until the bridge sent the batch (the broker, and the bridge holding it while the
    partition's last task waited in its queue), until its transaction began (the queue, Celery,
    parsing), until the worker said it done (the transaction, its commit, the offset ledger).
    The log's clock counts milliseconds, and the bridge writes its line once the task is
    queued, so a worker that takes it at once may begin a little before."""
    stages: dict[str, list[float]] = {"to the bridge's send": [], "in the queue": [],
                                      "in the transaction": []}
    for row in rows:
        position = (row.kafka_partition, row.kafka_offset)
        if position not in sent or position not in done:
            continue
        occurred, began = row.occurred_at.timestamp(), row.applied_at.timestamp()
        stages["to the bridge's send"].append(sent[position] - occurred)
        stages["in the queue"].append(began - sent[position])
        stages["in the transaction"].append(done[position] - began)
    return stages


def _send_steadily(producer: Producer, topic: str, rate: int, seconds: float,
                   make: Callable[[], tuple[str | None, bytes]]) -> int:
    """`rate` messages a second for `seconds`, each made as it is sent; how many were sent."""
    started, sent = time.monotonic(), 0
    while (elapsed := time.monotonic() - started) < seconds:
        while sent < elapsed * rate:
            key, value = make()
            producer.produce(topic, key=key, value=value)
            sent += 1
        producer.poll(0)
        time.sleep(0.001)
    producer.flush(30)
    return sent


def _broker_latency(bootstrap: str) -> Floor:
    """The latency run's messages, at its rate and for as long, produced → consumed by a
    consumer configured, and reading, as the bridge's: the floor the broker sets under the
    pipeline's latency, and the broker's CPU early and late in the run (Tansu's fetches cost
    more as a topic grows)."""
    topic = f"floor-{uuid.uuid4().hex[:8]}"
    # From the environment, as the pipeline's bridge reads its settings: a fetch wait set
    # there (`KAFKA_FETCH_WAIT_MAX_MS`) is the one both are measured at.
    settings = dataclasses.replace(Settings.from_env(os.environ), kafka_bootstrap_servers=bootstrap,
                                   kafka_topic=topic, kafka_partitions=PARTITIONS,
                                   kafka_group_id=topic, kafka_session_timeout_ms=6000)
    ensure_topic(settings)
    consumer = Consumer(consumer_config(settings))
    consumer.subscribe([topic])
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})
    seen: list[tuple[datetime, float]] = []  # (occurredAt, latency in seconds)
    stop = threading.Event()

    def consume() -> None:
        while not stop.is_set():
            for message in read_ready(consumer, 500, READ_WAIT_S):
                if message.error() is None:
                    received = datetime.now(UTC)
                    sent_at = datetime.fromisoformat(json.loads(message.value() or b"")
                                                     ["occurredAt"])
                    seen.append((sent_at, (received - sent_at).total_seconds()))

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    make = _stamped(Story(seed=3))
    try:
        # The group forms on the first message through.
        producer.produce(topic, value=make()[1])
        producer.flush(30)
        wait_until(lambda: bool(seen), 120, "the first message consumed")
        measured_from = datetime.now(UTC) + timedelta(seconds=WARM_UP_S)
        with cpu.Sampler({"Kafka": cpu.BROKER}) as sampler:
            started = time.monotonic() + WARM_UP_S
            sent = _send_steadily(producer, topic, RATE, WARM_UP_S + MEASURED_S, make)
            ended = time.monotonic()
        wait_until(lambda: len(seen) >= sent + 1, 60, "every message consumed")
    finally:
        stop.set()
        reader.join()
        consumer.close()
    return Floor([latency for sent_at, latency in seen if sent_at >= measured_from],
                 sampler.shares(started, started + STRETCH_S).get("Kafka", 0.0),
                 sampler.shares(ended - STRETCH_S, ended).get("Kafka", 0.0))


def _ceiling(database_url: str, messages: list[tuple[bytes | None, bytes]]) -> float:
    upgrade(database_url)
    engine = make_engine(Settings(database_url=database_url))
    try:
        return len(messages) / ceiling.write(engine, ceiling.final_rows(messages))
    finally:
        engine.dispose()


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _database(kind: str, tmp: str, name: str) -> str:
    return new_database("eventpipe_bench") if kind == "postgresql" else \
        f"sqlite:///{tmp}/{name}.db"


def run(count: int = 48_000, naive_count: int = 3_000) -> None:
    messages = _stream(count)
    with running_kafka() as bootstrap, tempfile.TemporaryDirectory() as tmp:
        floor = _broker_latency(bootstrap)
        print(f"the broker alone, the latency runs' events at {RATE:,}/s produced → consumed "
              f"as the bridge consumes ({len(floor.seconds):,} messages after a "
              f"{WARM_UP_S:.0f} s warm-up): {_spread([v * 1000 for v in floor.seconds])}; "
              f"the broker kept {floor.broker_first:.0%} of a core busy in the first "
              f"{STRETCH_S:.0f} s of them, {floor.broker_last:.0%} in the last")
        fewer = {partitions: f"latency{partitions}" for partitions in FEWER_PARTITIONS}
        for kind in ("postgresql", "sqlite"):
            print(f"this machine's speed before the {kind} runs: a reference loop took "
                  f"{cpu.reference_seconds():.2f} s of CPU (again at the end)")
            urls = {name: _database(kind, tmp, name)
                    for name in ("shipped", "naive", "ceiling", "latency", *fewer.values())}
            try:
                shipped = _throughput(bootstrap, urls["shipped"], messages)
                bare = _throughput(bootstrap, urls["naive"], messages, noop=True) \
                    if kind == "postgresql" else None
                naive = _throughput(bootstrap, urls["naive"], messages[:naive_count],
                                    BATCH_MAX_EVENTS="1")
                top = _ceiling(urls["ceiling"], messages)
                latency = _latency(bootstrap, urls["latency"])
                by_partitions = {partitions: _latency(bootstrap, urls[name], partitions)
                                 for partitions, name in fewer.items()}
            finally:
                if kind == "postgresql":
                    for url in urls.values():
                        drop_database(url)
            _report(kind, count, naive_count, shipped, naive, top, latency, bare)
            _report_partitions({**by_partitions, PARTITIONS: latency})
    print(f"this machine's speed at the end: the reference loop took "
          f"{cpu.reference_seconds():.2f} s of CPU")


def _report(kind: str, count: int, naive_count: int, shipped: Run, naive: Run, top: float,
            latency: Latency, bare: Run | None) -> None:
    ms = [value * 1000 for value in latency.seconds]
    print(f"pipeline on {kind} ({PARTITIONS} partitions, {PROCESSES} worker processes):")
    print(f"  shipped  {shipped.rate:9,.0f} events/s  ({count:,} messages in "
          f"{shipped.seconds:.1f} s)")
    print(f"  naive    {naive.rate:9,.0f} events/s  (one event per task, {naive_count:,} "
          f"messages)")
    print(f"  ceiling  {top:9,.0f} events/s  (the same rows, no pipeline)")
    if bare is not None:
        print(f"  no database {bare.rate:6,.0f} events/s  (workers that only mark messages "
              "done: the bridge, Celery and Redis)")
    print(f"  shipped/naive {shipped.rate / naive.rate:5.1f}×   "
          f"shipped/ceiling {shipped.rate / top:6.1%}")
    print(f"  latency at 1,000 events/s, occurredAt → applied ({len(ms):,} events): "
          f"{_spread(ms)}; in {latency.batches:,} batches, "
          f"{latency.batches / max(latency.span_s, 1e-9):,.0f} a second of "
          f"{len(ms) / max(latency.batches, 1):.1f} events on average")
    parts = "; ".join(f"{stage} p50 {statistics.median(seconds) * 1000:.0f}, p99 "
                      f"{_percentile(seconds, 0.99) * 1000:.0f}"
                      for stage, seconds in latency.stages.items() if seconds)
    if parts:
        print(f"  where it went, ms: {parts}")
    busy = ", ".join(f"{role} {share:.0%}" for role, share in
                     sorted(latency.cores.items(), key=lambda item: -item[1]) if share >= 0.005)
    print(f"  cores kept busy meanwhile (of {os.cpu_count() or 1}): {busy}; "
          f"{sum(latency.cores.values()):.0%} of one in all")
    print("  peak RSS: " + ", ".join(f"{name} {size / 2**20:.0f} MiB"
                                     for name, size in shipped.rss.items()))
    total, cores = sum(shipped.cpu.values()), os.cpu_count() or 1
    if total:
        roles = ", ".join(f"{role} {micros:.0f} µs" for role, micros in shipped.cpu.items()
                          if micros >= 0.5)
        print(f"  CPU per message, shipped: {roles}; {total:.0f} µs in all: {cores} cores "
              f"carry at most {cores * 1e6 / total:,.0f} messages/s at this cost")


def _report_partitions(runs: dict[int, Latency]) -> None:
    """The latency run's p50 / p99 by the partition queues each worker process serves."""
    each = "; ".join(
        f"{partitions // PROCESSES} ({partitions} partitions"
        f"{', shipped' if partitions == PARTITIONS else ''}) "
        f"{statistics.median(run.seconds) * 1000:.0f} / "
        f"{_percentile(run.seconds, 0.99) * 1000:.0f} ms"
        for partitions, run in sorted(runs.items()))
    print(f"  latency by the partition queues each of the {PROCESSES} worker processes serves, "
          f"p50 / p99: {each}")


def _spread(ms: list[float]) -> str:
    return (f"p50 {statistics.median(ms):.0f} ms, p99 {_percentile(ms, 0.99):.0f} ms, "
            f"max {max(ms):.0f} ms")
