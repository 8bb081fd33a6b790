"""Keeps the offsets of the batch a worker process is applying leased for as long as it runs.

`Processor.run` leases a batch's offsets for `REDELIVERY_TIMEOUT_S` as it begins, and a batch
applied in one part writes nothing more to the offset ledger until it ends. On a slow database
its transaction may outlive the lease (it may run up to `TASK_TIME_LIMIT_S`): the bridge would
then take the batch for lost, read it again from Kafka and queue a copy while the first is
still being applied. A daemon thread renews the lease every third of it while the run lasts.
It only ever extends a lease (`OffsetLedger.extend`), so a message set aside to retry later,
leased past the batch, keeps its own. A process that dies or is stopped renews nothing, and
its lease lapses as before: the bridge reads the batch again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from eventpipe.offset_ledger import OffsetLedger

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False, slots=True)
class _Held:
    topic: str
    partition: int
    offsets: Sequence[int]
    ttl_s: float


class LeaseKeeper:
    def __init__(self, ledger: OffsetLedger) -> None:
        self.ledger = ledger
        self._held: _Held | None = None
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, topic: str, partition: int, offsets: Sequence[int], ttl_s: float) -> None:
        """Renew the lease of `offsets`, just written for `ttl_s`, until `release`."""
        with self._lock:
            self._held = _Held(topic, partition, offsets, ttl_s)
        if self._thread is None or not self._thread.is_alive():
            # Made in the process that holds leases: a thread is not inherited across a fork.
            self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
            self._thread.start()
        self._changed.set()

    def release(self) -> None:
        with self._lock:
            self._held = None
        self._changed.set()

    def _run(self) -> None:
        while True:
            self._changed.wait()
            self._changed.clear()
            with self._lock:
                held = self._held
            # A third of the lease after it was written, then every third while it is held.
            while held is not None and not self._changed.wait(held.ttl_s / 3):
                try:
                    self.ledger.extend(held.topic, held.partition, held.offsets, held.ttl_s)
                except redis.RedisError as exc:  # tried again a third of the lease later
                    log.warning("lease of a running batch not renewed: %s", exc, extra={
                        "topic": held.topic, "partition": held.partition})
