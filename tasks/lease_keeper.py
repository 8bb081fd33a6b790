"""Keeps the offsets a worker process holds leased for as long as it holds them.

A worker leases a batch's offsets for `REDELIVERY_TIMEOUT_S` as its run begins, and the
messages it sets aside to retry for their wait and as long again. Neither is enough on its own:
- a batch applied in one part writes nothing more to the offset ledger until it ends, and on
  a slow database its transaction may outlive the lease (it may run up to
  `TASK_TIME_LIMIT_S`);
- a retry runs at its time after the batch its worker is applying then, while the batches
  after it are done.
Lapsed, either lease makes the bridge take the messages for lost, read them again from Kafka
and queue copies while the first are still in hand. So a daemon thread renews every lease
the process holds, every third of it: the running batch's until its run ends (or its time
limit passes: its worker is stuck then), a retry's until a run takes it up or its time and a
batch's have passed (another process may have taken it). A renewal only ever extends a lease
that is there (`OffsetLedger.extend`). A process that dies or is stopped renews nothing, and
its leases lapse as they always did: the bridge reads the messages again soon.

It also ends, once the ledger answers again, the runs whose end it did not answer
(`finish_later`): their records would otherwise pass for processes that died on them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from eventpipe.offset_ledger import OffsetLedger

log = logging.getLogger(__name__)

FINISH_AGAIN_S = 1.0  # how soon the end of a run the ledger did not answer is tried again
FINISH_FOR_S = 900.0  # and for how long: past it, the run's batch was surely taken up again


@dataclass(frozen=True, eq=False, slots=True)
class _Held:
    topic: str
    partition: int
    offsets: Sequence[int]
    ttl_s: float
    until: float  # when to stop renewing (monotonic), released or not


@dataclass(frozen=True, eq=False, slots=True)
class _Unfinished:
    topic: str
    partition: int
    done: Sequence[int]
    run: str
    until: float  # when to give up (monotonic)


class LeaseKeeper:
    def __init__(self, ledger: OffsetLedger, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.ledger = ledger
        self.clock = clock
        self._running: _Held | None = None
        self._waiting: list[_Held] = []
        self._unfinished: list[_Unfinished] = []
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, topic: str, partition: int, offsets: Sequence[int], ttl_s: float,
             for_s: float) -> None:
        """A run begins with `offsets`, just leased for `ttl_s`: renew them until `release`,
        for `for_s` at most (its time limit: a run past it is stuck, and so is its worker).
        The retries it takes up are its own now."""
        with self._lock:
            self._stop_renewing(topic, partition, offsets)
            self._running = _Held(topic, partition, offsets, ttl_s, self.clock() + for_s)
        self._wake()

    def release(self) -> None:
        """The run ended: its offsets are done, or set aside (`set_aside`)."""
        with self._lock:
            self._running = None

    def set_aside(self, topic: str, partition: int, offsets: Sequence[int], ttl_s: float,
                  for_s: float) -> None:
        """Messages sent to retry, just leased for their wait and `ttl_s`: renew them for
        `for_s`, unless a run takes them up first."""
        with self._lock:
            self._waiting.append(_Held(topic, partition, offsets, ttl_s, self.clock() + for_s))
        self._wake()

    def drop(self, topic: str, partition: int, offsets: Sequence[int]) -> None:
        """Messages set aside to retry that no run will take up (their task was revoked):
        renew them no more."""
        with self._lock:
            self._stop_renewing(topic, partition, offsets)

    def _stop_renewing(self, topic: str, partition: int, offsets: Sequence[int]) -> None:
        """The retries waiting with any of these offsets (under the lock)."""
        taken = set(offsets)
        self._waiting = [held for held in self._waiting if not (
            (held.topic, held.partition) == (topic, partition)
            and taken.intersection(held.offsets))]

    def finish_later(self, topic: str, partition: int, done: Sequence[int], run: str) -> None:
        """End `run` (`OffsetLedger.finish`: its record goes, its `done` offsets are marked)
        once the ledger answers again. Deaths it owed are not written back: ended late, they
        could land on a range another run has taken up since, and count against it."""
        with self._lock:
            self._unfinished.append(_Unfinished(topic, partition, done, run,
                                                self.clock() + FINISH_FOR_S))
        self._wake()

    def _finish_runs(self) -> None:
        with self._lock:
            now = self.clock()
            unfinished = [run for run in self._unfinished if run.until > now]
            self._unfinished = []
        for index, run in enumerate(unfinished):
            try:
                self.ledger.finish(run.topic, run.partition, run.done, run=run.run)
            except Exception as exc:  # tried again a second later, until its time is over
                log.warning("the end of a run not recorded yet: %s", exc, extra={
                    "topic": run.topic, "partition": run.partition})
                with self._lock:
                    self._unfinished[:0] = unfinished[index:]
                return

    def _wake(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            # Made in the process that holds the leases: a thread is not inherited by a fork.
            self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
            self._thread.start()
        self._changed.set()

    def _holds(self) -> list[_Held]:
        with self._lock:
            now = self.clock()
            self._waiting = [held for held in self._waiting if held.until > now]
            running = [self._running] if self._running and self._running.until > now else []
            return [*running, *self._waiting]

    def _run(self) -> None:
        renewed = self.clock()
        while True:
            if self._unfinished:
                self._finish_runs()
            holds = self._holds()
            if not holds:
                self._changed.wait(FINISH_AGAIN_S if self._unfinished else None)
                self._changed.clear()
                renewed = self.clock()  # what is held now was just leased
                continue
            due = renewed + min(held.ttl_s for held in holds) / 3 - self.clock()
            if due > 0:
                # A change may bring a shorter lease.
                self._changed.wait(min(due, FINISH_AGAIN_S) if self._unfinished else due)
                self._changed.clear()
                continue
            renewed = self.clock()
            for held in holds:
                try:
                    self.ledger.extend(held.topic, held.partition, held.offsets, held.ttl_s)
                except redis.RedisError as exc:  # tried again a third of a lease later
                    log.warning("lease not renewed: %s", exc, extra={
                        "topic": held.topic, "partition": held.partition})
