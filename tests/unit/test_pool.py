"""The worker pool's bookkeeping (`tasks.pool`): the assignment becomes Celery's queues on
Celery's own thread, whatever order late changes run in; a revocation returns only once
Celery let go; a process that cannot follow its assignment stops; a leaving member cancels
nothing (Celery has stopped already). Kafka and Celery are stood in for; the real thing runs
in tests/integration/test_pool.py."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from confluent_kafka import TopicPartition

import tasks.pool
from eventpipe.settings import Settings
from tasks.pool import IDLE_FETCH_WAIT_MS, CeleryQueues, PoolMember, pool_group


class CeleryThread:
    """A consumer whose `call_soon` callbacks run on a thread of their own, after the batch in
    progress (`busy_s`)."""

    def __init__(self, busy_s: float = 0.0) -> None:
        self.busy_s = busy_s
        self.task_consumer = SimpleNamespace(queues=[])
        self.changed_on: set[str] = set()
        self._todo: queue.Queue[Callable[[], None]] = queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    @property
    def consumed(self) -> list[str]:
        return sorted(q.name for q in self.task_consumer.queues)

    def call_soon(self, callback: Callable[[], None]) -> None:
        self._todo.put(callback)

    def add_task_queue(self, name: str) -> None:
        self.changed_on.add(threading.current_thread().name)
        self.task_consumer.queues.append(SimpleNamespace(name=name))

    def cancel_task_queue(self, name: str) -> None:
        self.changed_on.add(threading.current_thread().name)
        self.task_consumer.queues[:] = [q for q in self.task_consumer.queues if q.name != name]

    def _run(self) -> None:
        threading.current_thread().name = "celery"
        while True:
            callback = self._todo.get()
            time.sleep(self.busy_s)
            callback()


class Stuck:
    """A Celery thread held by a batch that never ends."""

    def call_soon(self, _callback: Callable[[], None]) -> None:
        pass


def tps(*partitions: int) -> list[TopicPartition]:
    return [TopicPartition("events.workers", p) for p in partitions]


def test_queues_change_on_celerys_thread_after_the_batch_in_progress() -> None:
    celery = CeleryThread(busy_s=0.3)
    queues = CeleryQueues(celery, timeout_s=5)
    started = time.monotonic()
    assert queues.want(["events.p1", "events.p4"])
    assert queues.want(["events.p4"])
    assert time.monotonic() - started >= 0.6  # each waited for the batch ahead of it
    assert celery.consumed == ["events.p4"] and celery.changed_on == {"celery"}


def test_late_changes_end_on_the_latest_wish_whatever_their_order() -> None:
    celery = CeleryThread()
    queues = CeleryQueues(celery, timeout_s=5)
    pending: list[Callable[[], None]] = []
    celery.call_soon = pending.append  # type: ignore[method-assign,assignment]  # held up
    for wish in (["events.p3"], [], ["events.p7"]):
        threading.Thread(target=queues.want, args=(wish,), daemon=True).start()
    while len(pending) < 3:
        time.sleep(0.01)
    for callback in reversed(pending):  # the hub runs them in any order
        callback()
    assert celery.consumed == ["events.p7"]


def test_queues_changed_by_hand_are_made_the_pools_again_at_the_next_watch() -> None:
    """A review's finding: a queue cancelled by hand (`celery control cancel_consumer`) on the
    process the pool gives its partition to waited for good; one added by hand
    (`add_consumer`) had two consumers."""
    celery = CeleryThread()
    queues = CeleryQueues(celery, timeout_s=5)
    assert queues.want(["events.p1", "events.p4"])
    def by_hand() -> None:
        celery.cancel_task_queue("events.p1")
        celery.add_task_queue("events.p9")

    celery.call_soon(by_hand)
    assert queues.answers().wait(5)
    assert celery.consumed == ["events.p1", "events.p4"]


def test_a_member_fetches_its_empty_topic_with_a_long_wait_whatever_the_bridges() -> None:
    member = PoolMember(Settings(kafka_fetch_wait_max_ms=5), CeleryQueues(Stuck(), 1), "w:1",
                        on_stuck=lambda _reason: None)
    config = member.consumer_config()
    assert config["fetch.wait.max.ms"] == IDLE_FETCH_WAIT_MS > 5
    assert config["group.id"] == pool_group(Settings()) != Settings().kafka_group_id


def test_a_member_follows_its_assignment_and_lets_go_only_of_its_own() -> None:
    celery = CeleryThread()
    stopped: list[str] = []  # not the process's exit: a slow machine must fail the test only
    member = PoolMember(Settings(), CeleryQueues(celery, timeout_s=5), "w:1",
                        on_stuck=stopped.append)
    member._on_assign(None, tps(0, 3, 6))  # type: ignore[arg-type]
    assert celery.consumed == ["events.p0", "events.p3", "events.p6"]
    member._on_revoke(None, tps(3, 9))  # type: ignore[arg-type]  # 9 was never ours
    assert member.owned == {0, 6} and celery.consumed == ["events.p0", "events.p6"]
    member._on_lost(None, tps(0))  # type: ignore[arg-type]
    assert member.owned == {6} and celery.consumed == ["events.p6"] and stopped == []


def test_a_process_that_cannot_let_go_stops_rather_than_keep_consuming() -> None:
    stopped: list[str] = []
    member = PoolMember(Settings(), CeleryQueues(Stuck(), timeout_s=0.2), "w:1",
                        on_stuck=stopped.append)
    member.owned = {2}
    member._on_revoke(None, tps(2))  # type: ignore[arg-type]
    assert stopped == ["Celery did not let go of partitions [2] within 0 s"]


def test_a_leaving_member_cancels_nothing_celery_already_stopped() -> None:
    celery = CeleryThread()
    stopped: list[str] = []
    member = PoolMember(Settings(), CeleryQueues(celery, timeout_s=5), "w:1",
                        on_stuck=stopped.append)
    member._on_assign(None, tps(1, 2))  # type: ignore[arg-type]
    member._leaving = True
    started = time.monotonic()
    member._on_revoke(None, tps(1, 2))  # type: ignore[arg-type]
    assert member.owned == set() and time.monotonic() - started < 0.2
    assert celery.consumed == ["events.p1", "events.p2"] and stopped == []  # untouched


def test_retries_held_for_queues_let_go_go_back_due_last_first() -> None:
    """Celery holds a countdown's task in memory until due; after a hand-over it must run at
    the queue's new consumer, not here. Each goes back in front of the queue, so the last one
    back, the one due first, is taken first. Real Redis: tests/integration/test_pool_handover.py."""
    from celery.worker import state as worker_state

    from tasks.pool import hand_back

    class Held:
        def __init__(self, queue_name: str, due_in_s: int) -> None:
            self.id = f"task-{queue_name}-{due_in_s}"
            self.delivery_info = {"routing_key": queue_name}
            self.eta = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=due_in_s)
            self._eta_timer_entry = object()

    cancelled: list[object] = []
    requeued: list[Held] = []
    consumer = SimpleNamespace(timer=SimpleNamespace(cancel=cancelled.append),
                               qos=SimpleNamespace(decrement_eventually=lambda: None))
    soon, late, kept = Held("events.p3", 5), Held("events.p3", 9), Held("events.p4", 1)
    for request in (soon, late, kept):
        worker_state.scheduled_requests.add(request)
    try:
        assert hand_back(consumer, {"events.p4"}, requeue=requeued.append) == 2
        assert requeued == [late, soon]
        assert cancelled == [late._eta_timer_entry, soon._eta_timer_entry]
        assert list(worker_state.scheduled_requests) == [kept]
    finally:
        worker_state.scheduled_requests.discard(kept)


class _Request:
    """A task Celery holds, as `requeue_request` sees it."""

    def __init__(self, channel: object) -> None:
        self.message = SimpleNamespace(channel=channel)
        self.acknowledged = False
        self.calls: list[tuple[str, object]] = []

    def reject(self, requeue: bool = False) -> None:
        self.calls.append(("reject", requeue))
        self.acknowledged = True

    def send_event(self, kind: str, **fields: object) -> None:
        self.calls.append((kind, fields))


def test_a_held_task_goes_back_through_celerys_reject_on_other_brokers() -> None:
    from tasks.pool import requeue_request

    request = _Request(channel=object())  # e.g. py-amqp's: RabbitMQ requeues in place
    requeue_request(request)
    assert request.calls == [("reject", True)]


def test_a_held_task_goes_back_in_front_on_redis_and_says_so_as_a_reject_would(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from kombu.transport.redis import Channel as RedisChannel

    import tasks.pool

    requeued: list[object] = []
    monkeypatch.setattr(tasks.pool, "requeue_next", requeued.append)
    request = _Request(channel=object.__new__(RedisChannel))
    tasks.pool.requeue_request(request)
    assert requeued == [request.message]
    assert request.acknowledged  # Celery must not acknowledge it any more
    assert request.calls == [("task-rejected", {"requeue": True})]  # Flower sees it go back


def test_a_change_the_broker_fails_is_asked_again_until_it_holds() -> None:
    """Before: a hand-over that met a broker blip gave up at once and waited out the whole
    timeout (TASK_TIME_LIMIT_S + 30 s): the queues let go had no consumer meanwhile, and the
    process then stopped itself."""
    celery = CeleryThread()
    blips = [ConnectionError("Redis blinked")] * 2
    real = celery.add_task_queue

    def add_after_blips(name: str) -> None:
        if blips:
            raise blips.pop()
        real(name)

    celery.add_task_queue = add_after_blips  # type: ignore[method-assign]
    queues = CeleryQueues(celery, timeout_s=10)
    started = time.monotonic()
    assert queues.want(["events.p2"])
    assert time.monotonic() - started < 5 and not blips
    assert celery.consumed == ["events.p2"]


class Idle:
    """The member's consumer of its coordination topic, where nothing ever comes."""

    def poll(self, timeout: float) -> None:
        time.sleep(min(timeout, 0.01))


@pytest.mark.parametrize("broker_answers", [True, False])
def test_a_celery_thread_silent_while_its_broker_is_away_is_waited_for(
        broker_answers: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: Celery's thread, reconnecting to a broker that was away for longer than the
    watch allows, was taken for stuck: every pool process stopped, saying so, and restarted
    to meet the same broker."""
    monkeypatch.setattr(tasks.pool, "WATCH_EVERY_S", 0.0)
    stopped: list[str] = []
    member = PoolMember(Settings(), CeleryQueues(Stuck(), timeout_s=1), "w:1",
                        on_stuck=stopped.append, broker_answers=lambda: broker_answers)
    member.stuck_after_s = 0.05
    serving = threading.Thread(target=member._serve, args=(Idle(),), daemon=True)
    serving.start()
    time.sleep(0.5)
    member._stop.set()
    serving.join(5)
    assert bool(stopped) is broker_answers
    assert all(said.startswith("Celery's thread has not answered") for said in stopped)
