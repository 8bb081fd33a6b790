"""Elastic workers (`tasks.pool`): `celery -A tasks worker` processes with no queue list share
the partitions by themselves, through a Kafka consumer group, and fail over in seconds.

Real processes on twelve partitions and a 20,000-event stream sent in four parts, while: three
workers split the partitions 4/4/4; one is SIGKILLed and its partitions move; a fourth joins
and takes a share; one is SIGSTOPped past the session timeout and resumed. A sampler reads the
status board every quarter second (what each worker process says it consumes, once a second);
it counts a process as consuming only while its word is fresh, since a frozen one says nothing.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from eventpipe.samples import Story
from eventpipe.status import WORKER, Board
from eventpipe.verify import render
from tests.support.pipeline import Pipeline, wait_until

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


@pytest.fixture
def pipeline(kafka_broker: str, tmp_path: Path) -> Iterator[Pipeline]:
    made = Pipeline(kafka_broker, tmp_path, partitions=PARTITIONS,
                    KAFKA_SESSION_TIMEOUT_MS=str(int(SESSION_TIMEOUT_S * 1000)),
                    BATCH_MAX_EVENTS="200")
    try:
        yield made
    finally:
        made.close()


def test_workers_share_the_partitions_and_fail_over_by_themselves(pipeline: Pipeline) -> None:
    story = Story(seed=14)
    parts = [[story.next() for _ in range(5000)] for _ in range(4)]
    board = Board(pipeline.redis, pipeline.settings.kafka_group_id)

    def pool_worker(name: str) -> subprocess.Popen[bytes]:
        return pipeline.start_celery_worker("--without-mingle", "--without-gossip",
                                            "--loglevel", "INFO", name=name)

    with Sampler(board) as sampler:
        sent = pipeline.send(parts[0])
        workers = [pool_worker(f"w{n}") for n in range(3)]
        pipeline.start_bridge()
        wait_until(lambda: sampler.shares() == [4, 4, 4], 60, "three workers with 4 each")
        covered_by = {p: names[0] for p, names in sampler.now().items()}
        assert len(set(covered_by.values())) == 3
        sampler.samples.clear()  # from here on, every partition is to be served

        # SIGKILL mid-stream: the group drops the member after the session timeout.
        sent += pipeline.send(parts[1])
        wait_until(lambda: pipeline.applied_count() > 6000, 120, "the second part flowing")
        killed = workers[0]
        killed.send_signal(signal.SIGKILL)
        wait_until(lambda: sampler.shares() == [6, 6], 60, "the two others with 6 each")

        # A fourth joins and takes a share.
        sent += pipeline.send(parts[2])
        workers.append(pool_worker("w3"))
        wait_until(lambda: sampler.shares() == [4, 4, 4], 60, "three workers with 4 each again")

        # SIGSTOP past the session timeout, then SIGCONT: the others took its partitions, and
        # it rejoins with a share of its own.
        sent += pipeline.send(parts[3])
        frozen = workers[1]
        frozen.send_signal(signal.SIGSTOP)
        wait_until(lambda: sampler.shares() == [6, 6], 60, "the others covering for it")
        time.sleep(1.0)  # a second more past the hand-over, frozen all along
        frozen.send_signal(signal.SIGCONT)
        wait_until(lambda: sampler.shares() == [4, 4, 4], 60, "the woken worker back in")

        ends = pipeline.end_offsets()
        assert sum(ends.values()) == sent
        wait_until(lambda: pipeline.committed_offsets() == ends, 180, "every event done")

    report = pipeline.verify()
    assert report.clean, render(report)
    uncovered = sampler.longest("none")
    doubled = sampler.longest("several")
    print(f"longest without a worker: {max(uncovered.values()):.1f} s; "
          f"longest with two: {max(doubled.values()):.1f} s")
    assert max(uncovered.values()) <= FAILOVER_BOUND_S, uncovered
    assert max(doubled.values()) <= HANDOVER_WINDOW_S, doubled
