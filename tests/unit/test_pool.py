"""The worker pool's bookkeeping (`tasks.pool`): assignments become Celery queues on Celery's
own thread, a revocation returns only once Celery let go, and a leaving member cancels nothing
(Celery has stopped already). Kafka and Celery are stood in for; the real thing runs in
tests/integration/test_pool.py."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from confluent_kafka import TopicPartition

from eventpipe.settings import Settings
from tasks.pool import CeleryQueues, PoolMember


class CeleryThread:
    """A consumer whose `call_soon` callbacks run on a thread of their own, after the batch in
    progress (`busy_s`)."""

    def __init__(self, busy_s: float = 0.0) -> None:
        self.busy_s = busy_s
        self.consumed: list[str] = []
        self.changed_on: set[str] = set()
        self._todo: queue.Queue[Callable[[], None]] = queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    def call_soon(self, callback: Callable[[], None]) -> None:
        self._todo.put(callback)

    def add_task_queue(self, name: str) -> None:
        self.changed_on.add(threading.current_thread().name)
        self.consumed.append(name)

    def cancel_task_queue(self, name: str) -> None:
        self.changed_on.add(threading.current_thread().name)
        self.consumed.remove(name)

    def _run(self) -> None:
        threading.current_thread().name = "celery"
        while True:
            callback = self._todo.get()
            time.sleep(self.busy_s)
            callback()


def tps(*partitions: int) -> list[TopicPartition]:
    return [TopicPartition("events.workers", p) for p in partitions]


def test_queues_change_on_celerys_thread_after_the_batch_in_progress() -> None:
    celery = CeleryThread(busy_s=0.3)
    queues = CeleryQueues(celery, timeout_s=5)
    started = time.monotonic()
    assert queues.add(["events.p1", "events.p4"])
    assert queues.cancel(["events.p1"])
    assert time.monotonic() - started >= 0.6  # each waited for the batch ahead of it
    assert celery.consumed == ["events.p4"] and celery.changed_on == {"celery"}


def test_a_change_celery_never_makes_is_reported() -> None:
    class Stuck:
        def call_soon(self, _callback: Callable[[], None]) -> None:
            pass  # a batch that never ends

    assert CeleryQueues(Stuck(), timeout_s=0.2).cancel(["events.p0"]) is False


def test_a_member_follows_its_assignment_and_lets_go_only_of_its_own() -> None:
    celery = CeleryThread()
    member = PoolMember(Settings(), CeleryQueues(celery, timeout_s=5), "w:1")
    member._on_assign(None, tps(0, 3, 6))  # type: ignore[arg-type]
    assert sorted(celery.consumed) == ["events.p0", "events.p3", "events.p6"]
    member._on_revoke(None, tps(3, 9))  # type: ignore[arg-type]  # 9 was never ours
    assert member.owned == {0, 6} and sorted(celery.consumed) == ["events.p0", "events.p6"]
    member._on_lost(None, tps(0))  # type: ignore[arg-type]
    assert member.owned == {6} and celery.consumed == ["events.p6"]


def test_a_leaving_member_cancels_nothing_celery_already_stopped() -> None:
    celery = CeleryThread()
    member = PoolMember(Settings(), CeleryQueues(celery, timeout_s=0.2), "w:1")
    member._on_assign(None, tps(1, 2))  # type: ignore[arg-type]
    member._leaving = True
    started = time.monotonic()
    member._on_revoke(None, tps(1, 2))  # type: ignore[arg-type]
    assert member.owned == set() and time.monotonic() - started < 0.2
    assert sorted(celery.consumed) == ["events.p1", "events.p2"]  # untouched
