"""A real Celery worker on a thread of the test process, for tests that must act between two
steps of its event loop: hold the loop as a long batch would, look at its consumer.

It runs the project's Celery settings (`eventpipe.queues.make_celery`: late acks, prefetch 1),
the solo pool and the workers' Redis transport (`tasks.transport`), against the Redis server
the test gives it; only its tasks are the test's. A worker process would do the same; only a
thread lets a test stand between Redis answering a BRPOP and the worker reading that answer.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from celery.worker import state as worker_state

from eventpipe.queues import make_celery
from eventpipe.settings import Settings
from tasks import transport

READY_S = 30.0


class ThreadWorker:
    def __init__(self, broker_url: str, queues: list[str],
                 brpop_timeout_s: float | None = None) -> None:
        self.app: Celery = make_celery(Settings(celery_broker_url=broker_url), main="thread")
        self.app.conf.broker_transport = f"{transport.__name__}:Transport"  # as a worker reads
        if brpop_timeout_s is not None:
            # kombu's Redis transport takes `polling_interval` as BRPOP's timeout.
            self.app.conf.broker_transport_options = {
                **self.app.conf.broker_transport_options, "polling_interval": brpop_timeout_s}
        self.queues = queues
        self.consumer: Any = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ThreadWorker:
        """Start consuming `queues`; return once the consumer is ready. Register the tasks
        first."""
        controller = self.app.WorkController(
            hostname=f"thread-{uuid.uuid4().hex[:6]}@test", pool="solo", concurrency=1,
            queues=self.queues, without_heartbeat=True, without_mingle=True,
            without_gossip=True, ready_callback=self._on_ready)

        def run() -> None:
            # The solo pool decodes a task's arguments as the thread's current app accepts.
            self.app.set_current()
            controller.start()

        self._thread = threading.Thread(target=run, name="celery", daemon=True)
        self._thread.start()
        assert self._ready.wait(READY_S), "the Celery worker thread did not get ready"
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        # What Celery's own embedded test worker does: its loop checks this on every turn.
        worker_state.should_terminate = 0
        try:
            self._thread.join(READY_S)
        finally:
            worker_state.should_terminate = None
        assert not self._thread.is_alive(), "the Celery worker thread did not stop"

    def _on_ready(self, consumer: Any) -> None:
        self.consumer = consumer
        self._ready.set()

    @contextmanager
    def held(self) -> Iterator[None]:
        """Celery's thread is busy for the duration of the block, as during a long batch: it
        reads nothing from Redis, runs no timer and no queue change."""
        entered, release = threading.Event(), threading.Event()

        def hold() -> None:
            entered.set()
            release.wait(READY_S)

        self.consumer.call_soon(hold)
        assert entered.wait(READY_S), "Celery's thread did not come to the hold"
        try:
            yield
        finally:
            release.set()
