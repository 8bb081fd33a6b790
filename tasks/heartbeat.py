"""The worker process's line on the status board (`eventpipe.status`).

Every second a daemon thread says which partition queues this process consumes (read from
Celery's consumer each time, so queues added or cancelled at run time show), how long ago it
applied a batch of each partition, and its events per second by type. A board Redis cannot
reach is skipped: the status is for operators, the events do not wait for it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

import redis

from eventpipe.queues import partition_of
from eventpipe.status import PUBLISH_EVERY_S, WORKER, Board

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, board: Board, name: str, queues: Callable[[], Iterable[str]],
                 rates: Callable[[], dict[str, float]], every_s: float = PUBLISH_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.board = board
        self.name = name
        self.queues = queues
        self.rates = rates
        self.every_s = every_s
        self.clock = clock
        self._served: dict[int, float] = {}  # partition → when its last batch ended
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def served(self, partition: int) -> None:
        self._served[partition] = self.clock()

    def said(self) -> dict[str, object]:
        now = self.clock()
        consumed = sorted(p for q in self.queues() if (p := partition_of(q)) is not None)
        return {"queues": consumed,
                "served": {str(p): round(now - at, 3) for p, at in sorted(self._served.items())},
                "rates": {kind: rate for kind, rate in self.rates().items() if rate}}

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def stop(self) -> None:
        """Leave the board at once: a stopped worker should not look alive for seconds."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)  # a publish under way would put the entry back
        try:
            self.board.leave(WORKER, self.name)
        except redis.RedisError as exc:
            log.debug("could not leave the status board: %s", exc)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.board.publish(WORKER, self.name, self.said())
            except redis.RedisError as exc:
                log.debug("status not published: %s", exc)
            except Exception:  # a bug here must not take the worker off the board for good
                log.exception("status not published")
            self._stop.wait(self.every_s)
