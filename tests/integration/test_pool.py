"""Elastic workers (`tasks.pool`): `celery -A tasks worker` processes with no queue list share
the partitions by themselves, through a Kafka consumer group, and fail over in seconds.

Real processes on twelve partitions and a 20,000-event stream sent in four parts, while: three
workers split the partitions 4/4/4; one is SIGKILLed and its partitions move; a fourth joins
and takes a share; one is SIGSTOPped past the session timeout and resumed. A sampler reads the
status board every quarter second (what each worker process says it consumes, once a second);
it counts a process as consuming only while its word is fresh, since a frozen one says nothing.

Order: within a partition, every batch (the events one worker applied in one transaction,
`applied_events` by worker and `applied_at`) is applied after those of lower offsets, except
a batch that waited for a retry (the workers log its offsets) and, on the partitions of a
killed or frozen worker, from the signal until everything sent before it is done: its batch
in progress is re-read after later ones, or finished on waking. Orderly hand-overs (workers
joining, the woken one taking a share again) keep the order.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text

from eventpipe.samples import Story
from eventpipe.status import WORKER, Board
from eventpipe.tables import applied_events
from eventpipe.verify import render
from tests.support.pipeline import Pipeline, wait_until
from tests.support.rabbitmq import rabbitmq_vhost

PARTITIONS = 12
SESSION_TIMEOUT_S = 6.0
FRESH_S = 2.5  # a worker's word older than this: it is frozen or gone
# A partition waits at most for the session timeout, the rebalance and a heartbeat.
FAILOVER_BOUND_S = SESSION_TIMEOUT_S + 12.0
# A frozen worker that wakes up consumes its old queues until its next poll hears it was
# dropped; nothing else may make two workers consume one partition.
HANDOVER_WINDOW_S = 3.0


class Sampler:
    """What the board says, four times a second: per partition, the fresh workers consuming."""

    def __init__(self, board: Board) -> None:
        self.board = board
        self.samples: list[tuple[float, dict[int, list[str]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def now(self) -> dict[int, list[str]]:
        consuming: dict[int, list[str]] = {p: [] for p in range(PARTITIONS)}
        for member in self.board.members():
            if member.role == WORKER and member.age_s <= FRESH_S:
                for partition in member.said.get("queues", []):
                    consuming[partition].append(member.name)
        return consuming

    def shares(self) -> list[int]:
        counts: dict[str, int] = {}
        for names in self.now().values():
            for name in names:
                counts[name] = counts.get(name, 0) + 1
        return sorted(counts.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.now()))
            self._stop.wait(0.25)

    def longest(self, bad: str) -> dict[int, float]:
        """Per partition, the longest stretch of samples where it had no consumer
        (`bad`="none") or more than one ("several")."""
        worst: dict[int, float] = dict.fromkeys(range(PARTITIONS), 0.0)
        since: dict[int, float | None] = dict.fromkeys(range(PARTITIONS))
        for at, consuming in self.samples:
            for partition, names in consuming.items():
                wrong = not names if bad == "none" else len(names) > 1
                start = since[partition]
                if wrong and start is None:
                    since[partition] = at
                elif not wrong and start is not None:
                    worst[partition] = max(worst[partition], at - start)
                    since[partition] = None
        end = self.samples[-1][0]
        for partition, start in since.items():
            if start is not None:
                worst[partition] = max(worst[partition], end - start)
        return worst


@dataclass(frozen=True, slots=True)
class Batch:
    """The events of one partition one worker applied in one transaction."""

    partition: int
    applied_at: datetime
    worker: str
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class Window:
    """Where a partition's batches may be applied out of order, and why."""

    partitions: frozenset[int]
    start: datetime
    end: datetime
    why: str

    def covers(self, batch: Batch) -> bool:
        return batch.partition in self.partitions and self.start <= batch.applied_at <= self.end


def applied_batches(engine: Engine) -> list[Batch]:
    """Every transaction's share of each partition, in the order they were applied."""
    t = applied_events.c
    query = (select(t.kafka_partition, t.applied_at, t.worker, func.min(t.kafka_offset),
                    func.max(t.kafka_offset))
             .group_by(t.kafka_partition, t.applied_at, t.worker).order_by(t.applied_at))
    with engine.connect() as conn:
        return [Batch(*row) for row in conn.execute(query)]


def out_of_order(batches: Iterable[Batch]) -> list[Batch]:
    """Batches applied after a batch of a later offset of their partition."""
    highest: dict[int, int] = {}
    late = []
    for batch in batches:
        if batch.first < highest.get(batch.partition, -1):
            late.append(batch)
        highest[batch.partition] = max(highest.get(batch.partition, -1), batch.last)
    return late


def logged(path: Path, start: str) -> list[dict[str, Any]]:
    """The records a process logged (JSON lines) whose message starts with `start`."""
    records = (json.loads(line) for line in path.read_text(errors="replace").splitlines()
               if line.startswith("{"))
    return [record for record in records if str(record.get("msg", "")).startswith(start)]


def retried(logs: Iterable[Path]) -> dict[int, list[tuple[int, int]]]:
    """Per partition, the offset ranges the workers logged as waiting for a retry."""
    ranges: dict[int, list[tuple[int, int]]] = {}
    for path in logs:
        for record in logged(path, "batch retried"):
            ranges.setdefault(record["partition"], []).append(
                (record["offsetFirst"], record["offsetLast"]))
        for record in logged(path, "event failed, retrying it alone"):
            ranges.setdefault(record["partition"], []).append((record["offset"],) * 2)
    return ranges


def unexplained(late: list[Batch], windows: list[Window],
                retries: dict[int, list[tuple[int, int]]]) -> list[Batch]:
    return [batch for batch in late
            if not any(window.covers(batch) for window in windows)
            and not any(first <= batch.last and batch.first <= last
                        for first, last in retries.get(batch.partition, []))]


def check_the_run(pipeline: Pipeline, sampler: Sampler, windows: list[Window]) -> None:
    """The read model is right; no partition went without a worker past the failover bound
    nor had two past the hand-over window; every batch applied after a later one of its
    partition waited for a retry or was in a window."""
    report = pipeline.verify()
    assert report.clean, render(report)
    uncovered = sampler.longest("none")
    doubled = sampler.longest("several")
    late = out_of_order(applied_batches(pipeline.engine))
    print(f"longest without a worker: {max(uncovered.values()):.1f} s; "
          f"longest with two: {max(doubled.values()):.1f} s; "
          f"batches applied after a later one: {len(late)}")
    assert max(uncovered.values()) <= FAILOVER_BOUND_S, uncovered
    assert max(doubled.values()) <= HANDOVER_WINDOW_S, doubled
    logs = sorted(pipeline.log_dir.glob(f"{pipeline.name}-w*.log"))
    assert unexplained(late, windows, retried(logs)) == [], windows


def pool_worker(pipeline: Pipeline, name: str) -> subprocess.Popen[bytes]:
    """A worker as Celery users start one: no queue list, so it joins the pool."""
    return pipeline.start_celery_worker("--without-mingle", "--without-gossip",
                                        "--loglevel", "INFO", name=name)


@contextmanager
def twelve_partitions(kafka_broker: str, tmp_path: Path,
                      celery_broker_url: str | None = None) -> Iterator[Pipeline]:
    made = Pipeline(kafka_broker, tmp_path, partitions=PARTITIONS,
                    celery_broker_url=celery_broker_url,
                    KAFKA_SESSION_TIMEOUT_MS=str(int(SESSION_TIMEOUT_S * 1000)),
                    BATCH_MAX_EVENTS="200")
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def pipeline(kafka_broker: str, tmp_path: Path) -> Iterator[Pipeline]:
    with twelve_partitions(kafka_broker, tmp_path) as made:
        yield made


def test_workers_share_the_partitions_and_fail_over_by_themselves(pipeline: Pipeline) -> None:
    story = Story(seed=14)
    parts = [[story.next() for _ in range(5000)] for _ in range(4)]
    board = Board(pipeline.redis, pipeline.settings.kafka_group_id)

    with Sampler(board) as sampler:
        sent = pipeline.send(parts[0])
        workers = [pool_worker(pipeline, f"w{n}") for n in range(3)]
        pipeline.start_bridge()
        wait_until(lambda: sampler.shares() == [4, 4, 4], 60, "three workers with 4 each")
        covered_by = {p: names[0] for p, names in sampler.now().items()}
        assert len(set(covered_by.values())) == 3
        sampler.samples.clear()  # from here on, every partition is to be served

        # SIGKILL mid-stream: the group drops the member after the session timeout.
        sent += pipeline.send(parts[1])
        wait_until(lambda: pipeline.applied_count() > 6000, 120, "the second part flowing")
        windows = [killed(sampler, workers[0], then=[6, 6])]
        # Its batch in progress is re-read once its lease lapses; the window closes when all
        # sent so far is done, so that the next hand-over is judged on its own.
        ends = pipeline.end_offsets()
        wait_until(lambda: pipeline.committed_offsets() == ends, 120, "the first half done")
        windows[-1] = closed(windows[-1])

        # A fourth joins and takes a share.
        sent += pipeline.send(parts[2])
        workers.append(pool_worker(pipeline, "w3"))
        wait_until(lambda: sampler.shares() == [4, 4, 4], 60, "three workers with 4 each again")

        # SIGSTOP past the session timeout, then SIGCONT: the others took its partitions, and
        # it rejoins with a share of its own.
        sent += pipeline.send(parts[3])
        frozen = workers[1]
        windows.append(started(sampler, frozen, "frozen"))
        frozen.send_signal(signal.SIGSTOP)
        wait_until(lambda: sampler.shares() == [6, 6], 60, "the others covering for it")
        time.sleep(1.0)  # a second more past the hand-over, frozen all along
        frozen.send_signal(signal.SIGCONT)
        wait_until(lambda: sampler.shares() == [4, 4, 4], 60, "the woken worker back in")

        ends = pipeline.end_offsets()
        assert sum(ends.values()) == sent
        wait_until(lambda: pipeline.committed_offsets() == ends, 180, "every event done")
        windows[-1] = closed(windows[-1])

    check_the_run(pipeline, sampler, windows)


def started(sampler: Sampler, worker: subprocess.Popen[bytes], why: str) -> Window:
    """A window opening now on the partitions `worker` consumes; closed by `closed`."""
    name = f":{worker.pid}"
    mine = frozenset(p for p, names in sampler.now().items()
                     if any(n.endswith(name) for n in names))
    assert mine, f"the {why} worker consumed nothing"
    now = datetime.now(UTC)
    return Window(mine, now, now, why)


def killed(sampler: Sampler, worker: subprocess.Popen[bytes], then: list[int]) -> Window:
    """SIGKILL `worker` and wait until the group dropped it (after the session timeout) and
    the others hold shares `then`. A window on its partitions, opened as it was killed."""
    window = started(sampler, worker, "killed")
    worker.send_signal(signal.SIGKILL)
    wait_until(lambda: sampler.shares() == then, 60, f"the others with {then}")
    return window


def closed(window: Window) -> Window:
    return Window(window.partitions, window.start, datetime.now(UTC), window.why)


# A retry waits 15–30 s (the upper half of the backoff): longer than a worker takes to join and
# the group to hand a partition over, so the retry is still held when its queue moves.
RETRY_S = 30.0


@pytest.fixture
def two_partitions(kafka_broker: str, tmp_path: Path) -> Iterator[Pipeline]:
    made = Pipeline(kafka_broker, tmp_path, partitions=2,
                    KAFKA_SESSION_TIMEOUT_MS=str(int(SESSION_TIMEOUT_S * 1000)),
                    DATABASE_LOCK_TIMEOUT_S="0.5",
                    RETRY_BACKOFF_BASE_S=str(RETRY_S), RETRY_BACKOFF_MAX_S=str(RETRY_S),
                    # A part sent at once leaves as one batch per partition.
                    BATCH_MAX_WAIT_MS="1000")
    try:
        yield made
    finally:
        made.close()


def test_a_retry_held_when_its_queue_moves_is_applied_by_the_new_owner_in_order(
        two_partitions: Pipeline) -> None:
    """One worker holds both partitions; their first batches cannot claim their events (the
    test locks the table) and wait for a retry, which Celery holds in the worker's memory.
    A second worker joins and takes one partition: that retry goes back to its queue and the
    new owner applies it when due, the other retry stays; the events sent next are applied
    by each partition's owner, in order. (Celery does not hold a queue back behind a task
    waiting for its countdown, so while a retry waits, later batches of its partition may
    pass it, hand-over or not: the guards make that harmless.)"""
    pipeline = two_partitions
    story = Story(seed=15)
    board = Board(pipeline.redis, pipeline.settings.kafka_group_id)

    def member(name: str) -> tuple[str, Path]:
        process = pool_worker(pipeline, name)
        return f"{socket.gethostname()}:{process.pid}", pipeline.log_dir / (
            f"{pipeline.name}-{name}.log")

    def consumed() -> dict[str, list[int]]:
        return {member.name: sorted(member.said.get("queues", []))
                for member in board.members() if member.role == WORKER and member.age_s < 2.5}

    first, first_log = member("w1")
    pipeline.start_bridge()
    wait_until(lambda: consumed() == {first: [0, 1]}, 60, "one worker with both partitions")
    with pipeline.engine.connect() as lock:
        lock.execute(text("LOCK TABLE applied_events IN EXCLUSIVE MODE"))
        sent = pipeline.send([story.next() for _ in range(40)])
        wait_until(lambda: {r["partition"] for r in logged(first_log, "batch retried")}
                   == {0, 1}, 30, "a retry held for each partition")
        lock.rollback()
    second, _ = member("w2")
    wait_until(lambda: sorted(map(len, consumed().values())) == [1, 1], 60, "one each")
    (moved,) = consumed()[second]
    wait_until(lambda: bool(logged(first_log, "retries handed back")), 30,
               "the retry handed back")
    first_part = pipeline.end_offsets()
    wait_until(lambda: pipeline.committed_offsets() == first_part, RETRY_S + 30,
               "both retries done")
    sent += pipeline.send([story.next() for _ in range(40)])
    ends = pipeline.end_offsets()
    assert sum(ends.values()) == sent
    wait_until(lambda: pipeline.committed_offsets() == ends, 60, "every event done")

    report = pipeline.verify()
    assert report.clean, render(report)
    # One retry per partition, of its whole first part; the moved one's handed back.
    assert retried([first_log]) == {p: [(0, end - 1)] for p, end in first_part.items()}
    assert [r["tasks"] for r in logged(first_log, "retries handed back")] == [1]
    batches = applied_batches(pipeline.engine)
    assert {b.worker for b in batches if b.partition == moved} == {second}
    assert {b.worker for b in batches if b.partition != moved} == {first}
    assert out_of_order(batches) == []


@pytest.fixture
def on_rabbitmq(kafka_broker: str, tmp_path: Path) -> Iterator[Pipeline]:
    with rabbitmq_vhost() as broker_url, twelve_partitions(
            kafka_broker, tmp_path, celery_broker_url=broker_url) as made:
        yield made


def test_the_pool_shares_and_hands_over_the_same_with_rabbitmq_as_the_celery_broker(
        on_rabbitmq: Pipeline) -> None:
    """The same pool when Celery's broker is RabbitMQ: what a member holds of a queue it lets
    go goes back through Celery's reject, which RabbitMQ puts back in its place. While events
    arrive steadily, two workers share the partitions, a third joins (an orderly hand-over
    under traffic: order holds), one is SIGKILLed (the others take its partitions), and one
    is stopped with SIGTERM (it finishes its batch and leaves: the last takes every
    partition, order holding)."""
    pipeline = on_rabbitmq
    story = Story(seed=16)
    board = Board(pipeline.redis, pipeline.settings.kafka_group_id)

    with Sampler(board) as sampler:
        workers = [pool_worker(pipeline, f"w{n}") for n in range(2)]
        pipeline.start_bridge()
        wait_until(lambda: sampler.shares() == [6, 6], 60, "two workers with 6 each")
        sampler.samples.clear()

        stop = threading.Event()
        with ThreadPoolExecutor(1) as sending:  # 1,000 events/s until the hand-overs are done
            sent = sending.submit(send_steadily, pipeline, story, 1000, stop, tail=2000)
            try:
                wait_until(lambda: pipeline.applied_count() > 2000, 60, "events flowing")
                workers.append(pool_worker(pipeline, "w2"))
                wait_until(lambda: sampler.shares() == [4, 4, 4], 60, "three with 4 each")
                before_the_kill = pipeline.end_offsets()
                windows = [killed(sampler, workers[0], then=[6, 6])]
                # Closed once all sent before the kill is done (its batch in progress re-read
                # when its lease lapses), so that the SIGTERM is judged on its own.
                wait_until(lambda: caught_up(pipeline, before_the_kill), 120,
                           "what was sent before the kill done")
                windows[-1] = closed(windows[-1])
                workers[1].send_signal(signal.SIGTERM)
                assert workers[1].wait(60) == 0
                wait_until(lambda: sampler.shares() == [12], 60, "the last one with all 12")
            finally:
                stop.set()
            total = sent.result(120)

        ends = pipeline.end_offsets()
        assert sum(ends.values()) == total
        wait_until(lambda: pipeline.committed_offsets() == ends, 180, "every event done")

    check_the_run(pipeline, sampler, windows)
    logs = pipeline.log_dir.glob(f"{pipeline.name}-w*.log")
    assert all(logged(path, "Connected to amqp://") for path in logs)  # RabbitMQ indeed
    # The bridge reads RabbitMQ's queue depths: tasks waiting for a hand-over, or behind a
    # backlog, are not taken for lost; only the killed worker's batch in progress is.
    bridge_log = pipeline.log_dir / f"{pipeline.name}-bridge.log"
    reread = {r["partition"] for r in logged(bridge_log, "events lost on the way")}
    assert reread <= windows[0].partitions


def send_steadily(pipeline: Pipeline, story: Story, per_s: int, stop: threading.Event,
                  tail: int) -> int:
    """Produce about `per_s` events a second, a tenth of a second's worth at a time, until
    `stop` is set and `tail` more are sent. How many in all."""
    sent = 0
    left: int | None = None  # of the tail, once stopped
    started = time.monotonic()
    while left is None or left > 0:
        if left is None and stop.is_set():
            left = tail
        chunk = per_s // 10 if left is None else min(per_s // 10, left)
        sent += pipeline.send([story.next() for _ in range(chunk)])
        if left is not None:
            left -= chunk
        time.sleep(max(0.0, started + sent / per_s - time.monotonic()))
    return sent


def caught_up(pipeline: Pipeline, ends: dict[int, int]) -> bool:
    committed = pipeline.committed_offsets()
    return all(committed.get(partition, 0) >= end for partition, end in ends.items())
