"""The worker's background loop: reconcile the rules that span keys, keep the DLQ stream in step.

One daemon thread per worker process runs `eventpipe.reconcile.reconcile`, resolves the dead
letters of events given up on their own that a copy has since applied (every
`COPIES_EVERY_S`, across the processes), rebuilds the DLQ stream if Redis lost it, puts
back entries it lost otherwise, and runs the DLQ projection,
after batches (`poke`) and at least every second, so parking deadlines pass and a projection
that failed is retried while no traffic comes. Every worker process runs one, but rounds start
at most once per `MIN_GAP_S` across all of them (a Redis turn key, as the DLQ check takes): a
round takes the keys of all the batches of that time together, so its fixed cost (some twenty
statements) is paid once for them rather than for every small batch, and the work per key
shrinks as load grows. The reconciler's database lock still lets one round run at a time
(without Redis every process may try, and the others skip). Dead letters of held events thus
follow their batch by about a second and a half at most (a round skipped for the gap waits for
the next batch or the interval).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import redis
from sqlalchemy import Engine

from eventpipe.database import reading
from eventpipe.dlq import records
from eventpipe.dlq.projection import HEAL_EVERY_S, Fetch, heal, project, repair_if_lost
from eventpipe.dlq.stream import DeadLetterStream
from eventpipe.failures import describe
from eventpipe.reconcile import reconcile
from tasks import letters_said

log = logging.getLogger(__name__)

INTERVAL_S = 1.0
MIN_GAP_S = 0.5
COPIES_EVERY_S = 5.0


def _utc_now() -> datetime:
    return datetime.now(UTC)


@contextlib.contextmanager
def _carry_on(step: str) -> Iterator[None]:
    """Log a step's failure and go on to the next."""
    try:
        yield
    except Exception as exc:
        log.warning("%s failed: %s", step, describe(exc))


class Reconciler:
    def __init__(self, engine: Engine, stream: DeadLetterStream, fetch: Callable[[], Fetch],
                 park_timeout: timedelta, interval_s: float = INTERVAL_S,
                 min_gap_s: float = MIN_GAP_S, heal_every_s: float = HEAL_EVERY_S,
                 copies_every_s: float = COPIES_EVERY_S,
                 before_round: Callable[[], None] = lambda: None) -> None:
        """`before_round`: called as each round begins (what the worker checks first)."""
        self.engine = engine
        self.stream = stream
        self.fetch = fetch
        self.park_timeout = park_timeout
        self.interval_s = interval_s
        self.min_gap_s = min_gap_s
        self.heal_every_s = heal_every_s
        self.copies_every_s = copies_every_s
        self.before_round = before_round
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def run_once(self) -> None:
        self.before_round()
        if self._my_turn():
            # On its own too: a round that fails each time must not keep the stream's steps
            # below from running (new dead letters projected, a stream Redis lost rebuilt).
            with _carry_on("reconciler round"):
                reconcile(self.engine, _utc_now, self.park_timeout, said=letters_said.say)
        self._resolve_recorded_copies()
        fetch = self.fetch()
        # Each step on its own: Redis at its memory bound refuses the rebuild's marker and
        # new entries, not the removals of entries that left the DLQ, which free memory.
        with _carry_on("DLQ stream rebuild"):
            repair_if_lost(self.engine, self.stream, fetch)
        with _carry_on("DLQ stream check"):
            heal(self.engine, self.stream, self.heal_every_s)
        project(self.engine, self.stream, fetch)

    def _resolve_recorded_copies(self) -> None:
        """Resolve the dead letters of events given up on their own that a copy has since
        applied (`records.given_up_then_recorded`), every `copies_every_s` across the
        processes; the projection that follows takes them out of the stream."""
        try:
            if self.copies_every_s > 0 and not self.stream.take_turn("copies",
                                                                     self.copies_every_s):
                return
        except redis.RedisError:
            pass  # each process looks then; the row locks keep them apart
        with reading(self.engine) as conn:
            if not records.given_up_then_recorded(conn):
                return
        with self.engine.begin() as conn:
            now = _utc_now()
            found = records.load(conn, records.given_up_then_recorded(conn), lock=True)
            # Asked again under the rows' locks: one a replay claimed, or an operator purged,
            # since the first answer is left as it is now.
            still = set(records.given_up_then_recorded(conn))
            resolved = records.resolve(conn, [letter for key, letter in found.items()
                                              if key in still], now)
        if resolved:
            log.info("dead letters resolved: a copy of their event had its fate since",
                     extra={"deadLettersChanged": len(resolved),
                            "dlqKeys": [letter.dlq_key for letter in resolved][:20]})

    def _my_turn(self) -> bool:
        if self.min_gap_s <= 0:
            return True
        try:
            return self.stream.take_turn("reconcile", self.min_gap_s)
        except redis.RedisError:
            return True  # the database lock alone keeps rounds apart

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            try:
                self.run_once()
            except Exception as exc:  # the database or Redis is away: next time
                # One line, naming `eventpipe migrate` where the schema is behind or missing.
                log.warning("reconciler round failed: %s", describe(exc))
            time.sleep(self.min_gap_s)
