"""A partition's queue handed over by a worker (`tasks.pool.CeleryQueues`) keeps its order.

A real Celery worker (the project's settings, solo pool, kombu's Redis transport) on a Redis
server of its own, run on a thread so that the test can stand where the order was lost: between
Redis answering a BRPOP sent before the queue was cancelled and the worker reading the answer.
Holding the worker's loop there (`ThreadWorker.held`) is what a batch in progress, or a slow
network, does; it makes the moment certain instead of rare. The queue's content is read back
in the order the next consumer will take it: kombu LPUSHes new messages and BRPOPs from the
right, so the right end is next.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
import redis
from celery import Celery
from celery.worker import state as worker_state

from eventpipe.queues import queue_name
from launcher.embedded import start_redis
from tasks import transport
from tasks.pool import CeleryQueues
from tests.support.pipeline import wait_until
from tests.support.thread_worker import ThreadWorker

QUEUE = queue_name(3)
# kombu's BRPOP waits 1 s by default; longer here, so that the one in flight when the queue
# is cancelled is still waiting when the test sends (nothing else changes with it).
BRPOP_TIMEOUT_S = 60


@dataclass
class Rig:
    worker: ThreadWorker
    broker: redis.Redis
    queues: CeleryQueues
    ran: list[int]

    def send(self, number: int, countdown: float | None = None) -> str:
        result = self.worker.app.send_task("record", args=[number], queue=QUEUE,
                                           countdown=countdown)
        return str(result.id)

    def waiting(self) -> list[dict[str, Any]]:
        """The headers of the queue's tasks, in the order a consumer takes them."""
        return [json.loads(raw)["headers"] for raw in reversed(self.broker.lrange(QUEUE, 0, -1))]

    def next_ids(self) -> list[str]:
        return [headers["id"] for headers in self.waiting()]

    def etas(self) -> dict[str, datetime]:
        return {headers["id"]: datetime.fromisoformat(headers["eta"])
                for headers in self.waiting() if headers.get("eta")}

    def let_go_as_a_brpop_takes(self, number: int, then: int) -> tuple[str, str]:
        """Let the queue go while the worker's BRPOP waits on it; send a task, which that
        BRPOP takes while the worker's loop is held (it is not read yet), then another, which
        waits in the queue. Their ids, once the hand-over ended."""
        wait_until(self.brpop_waiting, 10, "the worker's BRPOP waiting")
        with ThreadPoolExecutor(1) as pool:
            let_go = pool.submit(self.queues.want, [])
            wait_until(lambda: not self.worker.consumer.task_consumer.consuming_from(QUEUE),
                       10, "the queue cancelled")
            with self.worker.held():
                waiting = self.broker.llen(QUEUE)
                taken = self.send(number)
                # Not so if something given back before the BRPOP was answered (a retry)
                # fed it instead.
                assert self.broker.llen(QUEUE) == waiting, "the BRPOP pending did not take it"
                queued = self.send(then)
            assert let_go.result(30)
        return taken, queued

    def brpop_waiting(self) -> bool:
        """The worker has a BRPOP blocked at the server (it covers QUEUE while consumed)."""
        return any(client["cmd"] == "brpop" and "b" in client["flags"]
                   for client in self.broker.client_list())

    def unacked(self) -> tuple[int, int]:
        """kombu's record of messages delivered and not acknowledged: hash and index."""
        return int(self.broker.hlen("unacked")), int(self.broker.zcard("unacked_index"))


@pytest.fixture
def rig() -> Iterator[Rig]:
    server = start_redis()
    worker = ThreadWorker(f"{server.url}/1", [QUEUE], brpop_timeout_s=BRPOP_TIMEOUT_S)
    broker = redis.Redis.from_url(f"{server.url}/1")
    ran: list[int] = []

    @worker.app.task(name="record", shared=False)  # this app's only, not every later one's
    def record(number: int) -> None:
        ran.append(number)

    try:
        worker.start()
        yield Rig(worker, broker, CeleryQueues(worker.consumer, timeout_s=30), ran)
    finally:
        worker.stop()
        broker.close()
        server.stop()


def test_a_batch_popped_as_its_queue_is_cancelled_goes_back_to_be_taken_next(rig: Rig) -> None:
    taken, queued = rig.let_go_as_a_brpop_takes(1, then=2)
    # The hand-over ends once the task is back, in front of the one sent after it.
    assert rig.next_ids() == [taken, queued]
    assert rig.unacked() == (0, 0)

    assert rig.queues.want([QUEUE])
    wait_until(lambda: len(rig.ran) == 2, 10, "both tasks run")
    assert rig.ran == [1, 2]
    wait_until(lambda: rig.unacked() == (0, 0), 10, "both acknowledged")


def test_retries_held_for_a_moving_queue_go_back_first_in_the_order_they_fall_due(
        rig: Rig) -> None:
    """The worker holds two retries with a countdown (Celery keeps them unacknowledged in
    memory), and a BRPOP in flight takes a batch as the queue moves; a later batch waits in
    the queue. The next consumer must get the retries first, as they fall due, then the
    batches in their order: what this worker would have done, in the same order."""
    later = rig.send(1, countdown=BRPOP_TIMEOUT_S)
    sooner = rig.send(2, countdown=BRPOP_TIMEOUT_S / 2)
    wait_until(lambda: len(worker_state.scheduled_requests) == 2, 10, "both retries held")
    taken, queued = rig.let_go_as_a_brpop_takes(3, then=4)
    assert rig.next_ids() == [sooner, later, taken, queued]
    etas = rig.etas()  # still retries with a countdown, due when they were
    assert etas.keys() == {sooner, later} and etas[sooner] < etas[later]
    assert rig.unacked() == (0, 0)
    assert not worker_state.scheduled_requests and rig.ran == []
    assert rig.worker.consumer.qos.value == 1  # the prefetch the retries raised is given back


def test_a_task_popped_for_a_queue_no_longer_consumed_goes_back_in_front() -> None:
    """Before: a task a BRPOP took after its queue stopped being consumed otherwise than by
    the pool's hand-over (the worker stopping: `celery control shutdown`, Flower's, SIGTERM;
    `cancel_consumer`) went behind its queue (kombu's reject), and was applied after the
    batches of its partition queued since (a review's finding). The workers read Redis through
    `tasks.transport`, whose delivery to no consumer puts it back in front."""
    server = start_redis()
    app = Celery("front", broker=f"{server.url}/1", set_as_current=False)
    app.conf.broker_transport = f"{transport.__name__}:Transport"
    broker = redis.Redis.from_url(f"{server.url}/1")
    try:
        with app.connection_for_write() as connection:
            for number in (1, 2):
                app.send_task("record", args=[number], queue=QUEUE, connection=connection)
            channel = connection.default_channel
            popped = broker.brpop([QUEUE], timeout=5)  # what the worker's BRPOP took
            assert popped is not None
            channel.connection._deliver(json.loads(popped[1]), QUEUE)  # no consumer here
        assert [json.loads(raw)["headers"]["argsrepr"]
                for raw in reversed(broker.lrange(QUEUE, 0, -1))] == ["[1]", "[2]"]
        assert (broker.hlen("unacked"), broker.zcard("unacked_index")) == (0, 0)
    finally:
        broker.close()
        server.stop()
