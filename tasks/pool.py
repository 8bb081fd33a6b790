"""Elastic workers: processes started without a partition list share the partition queues.

The sharing is a Kafka consumer group's, not ours. Each such worker process runs a
`PoolMember` thread: a consumer in the group `{KAFKA_GROUP_ID}.workers`, subscribed to the
coordination topic `{KAFKA_TOPIC}.workers`, which has as many partitions as the events topic
and never holds a message. The group coordinator decides who holds which coordination
partition (membership, failure detection by session timeout, rebalancing); a member turns
its assignment into Celery's: coordination partition p assigned, consume `events.p{p}`;
revoked, stop consuming it, once the batch in progress has ended, before the group may give it
to another member. Queues change on Celery's own thread (`Consumer.call_soon`): under the
solo pool that thread runs the batches, so a change waits for the current batch by itself.

Failure modes, and why they are safe:
- A member killed or frozen (SIGKILL, SIGSTOP, a host lost): after the session timeout
  (`KAFKA_SESSION_TIMEOUT_MS`) the group gives its partitions to the others. Its unfinished
  batch is read again from Kafka by the bridge once its lease lapses
  (`REDELIVERY_TIMEOUT_S`), after the new owner applied later batches of the partition.
- A frozen member that wakes up still consumes its old queues until its consumer hears it
  was dropped (its next poll), plus the batch it may start on waking: for that moment a
  partition may have two consumers.
- A retry scheduled with a countdown, which Celery holds in memory until due, is handed back
  to its queue when the queue is cancelled (`hand_back`), for the new consumer; so is a
  message that a BRPOP sent before the cancel still takes from the queue (the workers'
  transport, `tasks.transport`). Both go back in front, where they came from (kombu's reject would
  push them behind the batches queued since), and the revocation returns once they are back:
  an orderly hand-over keeps the partition's order.
- A process whose Celery thread stops answering (a batch past `TASK_TIME_LIMIT_S` plus a
  margin), that cannot change its queues, or whose member thread fails, exits, so that its
  supervisor restarts it and the group moves its partitions: it never holds partitions it
  does not serve, nor serves partitions it does not hold.
In every case effects stay exactly-once through the guards every batch passes anyway (the
fate record, version guards, the offset ledger); only around a killed or frozen member may
a partition's batches be applied out of order, and `applied_events.worker` names the
process that applied each event.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NoReturn

from celery.worker import state as worker_state
from confluent_kafka import Consumer, KafkaError, TopicPartition
from kombu.transport.redis import Channel as RedisChannel

from eventpipe import metrics, redis_clients
from eventpipe.broker_queues import Unanswered, depth_reader
from eventpipe.kafka import consumer_config, ensure_topic
from eventpipe.queues import partition_of, queue_name
from eventpipe.settings import Settings
from tasks.transport import requeue_next

log = logging.getLogger(__name__)

POLL_S = 0.5
IDLE_FETCH_WAIT_MS = 500  # librdkafka's own default
WATCH_EVERY_S = 5.0  # how often Celery's thread is asked to answer
STUCK_MARGIN_S = 30.0  # beyond TASK_TIME_LIMIT_S: no batch may hold Celery's thread longer
BRPOP_MARGIN_S = 2.0  # beyond a BRPOP's timeout: Redis has answered it
RESYNC_S = 1.0  # how soon a change of the queues the broker failed is asked again


def pool_topic(settings: Settings) -> str:
    return f"{settings.kafka_topic}.workers"


def pool_group(settings: Settings) -> str:
    return f"{settings.kafka_group_id}.workers"


class CeleryQueues:
    """Keeps the partition queues a Celery worker process consumes equal to the ones it
    should, changed on the consumer's own thread. Each change makes Celery match the latest
    wish (not a delta), so changes that run late, or in any order, still end right."""

    def __init__(self, consumer: Any, timeout_s: float) -> None:
        self.consumer = consumer
        self.timeout_s = timeout_s
        self._wanted: set[str] = set()
        self._changing = 0  # changes of the queues under way (`want`)
        self._lock = threading.Lock()

    def want(self, queues: Iterable[str]) -> bool:
        """Consume exactly `queues`; True once Celery does, which under the solo pool is after
        the batch in progress, with every message taken from the queues let go back in them,
        in front; False if Celery did not within `timeout_s`. A change the broker failed
        (a blip in a hand-over) is asked again every `RESYNC_S` until then: given up at
        once, the queues let go would have had no consumer until `timeout_s` ended."""
        with self._lock:
            self._wanted = set(queues)
            self._changing += 1
        try:
            return self._until_taken()
        finally:
            with self._lock:
                self._changing -= 1

    def _until_taken(self) -> bool:
        deadline = time.monotonic() + self.timeout_s
        while True:
            outcome = _Outcome()
            self.consumer.call_soon(partial(self._sync, outcome))
            if not outcome.settled.wait(max(0.0, deadline - time.monotonic())):
                return False
            if outcome.done:
                return True
            if time.monotonic() + RESYNC_S >= deadline:
                return False
            time.sleep(RESYNC_S)

    def _sync(self, outcome: _Outcome) -> None:
        try:
            self._cancel_unwanted()
        except Exception as exc:  # the broker is away: asked again
            log.warning("the worker's queues could not be changed, asking again: %s", exc)
            outcome.settled.set()
            return
        # Costs nothing when only adding: kombu sends no BRPOP for an added queue while one
        # is pending either.
        self._after_earlier_brpop(lambda: self._take_wanted(outcome))

    def answers(self) -> threading.Event:
        """Set once Celery's thread runs again: a batch may hold it, nothing else should.
        There, first, the partition queues Celery consumes are made the pool's again if they
        were changed by hand (Celery's `cancel_consumer` and `add_consumer` control commands,
        Flower's buttons): a queue cancelled would wait for good, since the pool gives its
        partition to this process and no other takes it; a queue added would have two
        consumers, applying its partition's batches side by side."""
        answered = threading.Event()

        def run() -> None:
            try:
                self._undo_changes_by_hand()
            finally:
                answered.set()

        self.consumer.call_soon(run)
        return answered

    def _undo_changes_by_hand(self) -> None:
        with self._lock:
            if self._changing:  # `want` is making Celery's queues what they should be
                return
            wanted = set(self._wanted)
        consuming = self._consuming()
        if consuming == wanted:
            return
        log.warning("the partition queues this worker consumes were changed by hand (celery "
                    "control add_consumer or cancel_consumer?): made the pool's again; to "
                    "move partitions between workers, stop one and the pool hands them over",
                    extra={"added": sorted(consuming - wanted),
                           "cancelled": sorted(wanted - consuming)})
        self._sync(_Outcome())  # a failure is said there, and the next watch tries again

    def _wanted_now(self) -> set[str]:
        with self._lock:
            return set(self._wanted)

    def _consuming(self) -> set[str]:
        return {queue.name for queue in self.consumer.task_consumer.queues
                if partition_of(queue.name) is not None}

    def _cancel_unwanted(self) -> None:
        for name in sorted(self._consuming() - self._wanted_now()):
            self.consumer.cancel_task_queue(name)

    def _after_earlier_brpop(self, then: Callable[[], None], until: float | None = None) -> None:
        """Run `then` on Celery's thread once the BRPOP that was waiting when queues were
        cancelled is answered: it may still take a message from one of them (which goes back
        in front, `tasks.transport`), and held retries must go back in front of that one.
        Celery's loop runs these callbacks before it sends a new BRPOP, so one pending here is
        the earlier one; a callback queued from the loop waits for its next turn. Redis answers
        within the BRPOP's timeout; past it and a margin, go on (a paused BRPOP is read only
        when the worker may take a message again)."""
        channel = getattr(self.consumer.task_consumer, "channel", None)
        if not isinstance(channel, RedisChannel) or not channel._in_poll:
            then()
            return
        now = time.monotonic()
        if until is None:
            until = now + channel.brpop_timeout + BRPOP_MARGIN_S
        elif now > until:
            log.warning("a BRPOP sent before the queues changed is still unanswered")
            then()
            return
        deadline = until
        self.consumer.call_soon(lambda: self._after_earlier_brpop(then, deadline))

    def _take_wanted(self, outcome: _Outcome) -> None:
        try:
            consuming = self._consuming()
            hand_back(self.consumer, consuming)
            for name in sorted(self._wanted_now() - consuming):
                self.consumer.add_task_queue(name)
        except Exception as exc:  # the broker is away: asked again
            log.warning("the worker's queues could not be changed, asking again: %s", exc)
        else:
            outcome.done = True
        outcome.settled.set()


@dataclass(slots=True)
class _Outcome:
    """How one change of the queues ended, on Celery's thread."""

    settled: threading.Event = field(default_factory=threading.Event)
    done: bool = False


def requeue_request(request: Any) -> None:
    """Give a task Celery holds back to its queue, in front, as Celery's own reject with
    requeue would (the message's state, Flower's `task-rejected`) but for the place. Other
    brokers put a requeued message back in its place themselves; Celery's reject logs a
    connection error rather than raise it (the closing channel requeues the message then)."""
    if not isinstance(request.message.channel, RedisChannel):
        request.reject(requeue=True)
        return
    requeue_next(request.message)
    request.acknowledged = True  # no longer this process's to acknowledge
    request.send_event("task-rejected", requeue=True)


def hand_back(consumer: Any, consumed: Collection[str],
              requeue: Callable[[Any], None] = requeue_request) -> int:
    """Requeue the retries this process holds for partition queues it no longer consumes,
    so that they go to the queues' new consumer rather than run here after the hand-over:
    Celery keeps a task with a countdown unacknowledged in memory until it is due. They go
    back in front, the one due last first, so that the next consumer takes them in the order
    they fall due and before the batches queued behind them, as this process would have.
    How many. On Celery's thread."""
    held = [request for request in list(worker_state.scheduled_requests)
            if _moved(request.delivery_info.get("routing_key"), consumed)]
    for request in sorted(held, key=lambda request: request.eta, reverse=True):
        if request._eta_timer_entry is not None:
            consumer.timer.cancel(request._eta_timer_entry)
        requeue(request)
        consumer.qos.decrement_eventually()
        worker_state.scheduled_requests.discard(request)
        worker_state.requests.pop(request.id, None)
    if held:
        log.info("retries handed back with their partitions", extra={"tasks": len(held)})
    return len(held)


def _moved(routing_key: str | None, consumed: Collection[str]) -> bool:
    return (routing_key is not None and partition_of(routing_key) is not None
            and routing_key not in consumed)


def exit_to_start_again(reason: str) -> NoReturn:
    log.critical("%s: this worker process stops, so that its supervisor starts it again and "
                 "the pool gives its partitions to the others", reason)
    os._exit(70)


def _broker_answers(settings: Settings) -> Callable[[], bool]:
    """Whether the Celery broker answers now (a broker that cannot be asked is taken to),
    asked with the short timeouts of a request: the member's thread waits on it."""
    broker = depth_reader(settings, redis_clients.request, timeout_s=2.0)

    def answers() -> bool:
        if broker is None:
            return True
        try:
            broker.read([0])
        except Unanswered:
            return False
        return True

    return answers


class PoolMember:
    def __init__(self, settings: Settings, queues: CeleryQueues, name: str,
                 on_stuck: Callable[[str], None] = exit_to_start_again,
                 broker_answers: Callable[[], bool] | None = None) -> None:
        self.settings = settings
        self.queues = queues
        self.name = name
        # A process that cannot follow its assignment must not stay in the group holding
        # partitions it does not serve, or serving partitions it does not hold.
        self.on_stuck = on_stuck
        # While the broker does not answer, Celery's thread is reconnecting to it (and runs
        # no callback meanwhile): not stuck, and a restart would not reach the broker either.
        self.broker_answers = broker_answers or _broker_answers(settings)
        self.stuck_after_s = settings.task_time_limit_s + STUCK_MARGIN_S
        self.owned: set[int] = set()
        self._stop = threading.Event()
        self._leaving = False
        self._thread = threading.Thread(target=self._run, name="pool-member", daemon=True)

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Leave the group (at once: the others take the partitions without waiting for the
        session timeout). Called once Celery stopped consuming, so nothing is cancelled."""
        self._leaving = True
        self._stop.set()
        self._thread.join(timeout_s)

    def consumer_config(self) -> dict[str, Any]:
        """The member's Kafka consumer: in the pool's group, on the coordination topic."""
        return consumer_config(self.settings, **{
            "group.id": pool_group(self.settings), "client.id": self.name,
            # Only the partitions that move are revoked when a member joins or leaves; the
            # others keep being applied.
            "partition.assignment.strategy": "cooperative-sticky",
            # A revocation waits for the batch in progress: the group must wait as long.
            "max.poll.interval.ms": int((self.stuck_after_s + STUCK_MARGIN_S) * 1000),
            # The topic never holds a message, so a fetch finds nothing however long it waits:
            # the bridge's short wait would only cost the broker requests (two members kept a
            # Tansu 5 % of a core busier at 25 ms).
            "fetch.wait.max.ms": IDLE_FETCH_WAIT_MS,
            "statistics.interval.ms": 0})

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                # As many partitions as the events topic, even after it grew.
                have = ensure_topic(self.settings, pool_topic(self.settings), grow=True)
                if have > self.settings.kafka_partitions:
                    log.warning("the pool's topic %s has %d partitions, more than "
                                "KAFKA_PARTITIONS=%d here: raise the setting if it was raised "
                                "elsewhere; if the topic is left from a larger events topic, "
                                "delete it to have it made anew (its members may get unequal "
                                "shares of the queues)", pool_topic(self.settings), have,
                                self.settings.kafka_partitions)
                break
            except Exception as exc:  # Kafka is away: join once it answers
                log.warning("worker pool: no coordination topic yet: %s", exc)
                self._stop.wait(2.0)
        if self._stop.is_set():
            return
        consumer: Consumer | None = None
        failure = "no reason given"
        try:
            consumer = Consumer(self.consumer_config())
            consumer.subscribe([pool_topic(self.settings)], on_assign=self._on_assign,
                               on_revoke=self._on_revoke, on_lost=self._on_lost)
            log.info("joined the worker pool", extra={"group": pool_group(self.settings)})
            self._serve(consumer)
        except Exception as exc:
            log.exception("worker pool member failed")
            failure = str(exc)
        finally:
            if consumer is not None:
                self._leaving = True  # leave the group at once; the process goes next
                consumer.close()
        if not self._stop.is_set():
            self.on_stuck(f"the worker pool member stopped: {failure}")

    def _serve(self, consumer: Consumer) -> None:
        """Poll (the rebalance callbacks run here) and watch that Celery's thread answers."""
        ping: threading.Event | None = None
        pinged_at = checked_at = 0.0
        away = False
        while not self._stop.is_set():
            record = consumer.poll(POLL_S)
            error = record.error() if record is not None else None
            if error is not None and error.code() != KafkaError._PARTITION_EOF:
                log.warning("worker pool: %s", error)
            now = time.monotonic()
            if ping is None or ping.is_set():
                if now - pinged_at >= WATCH_EVERY_S:
                    ping, pinged_at = self.queues.answers(), now
                continue
            # Not answered yet: a batch holds Celery's thread, or it is reconnecting to its
            # broker (and runs no callback meanwhile). While the broker does not answer the
            # watch starts over, so Celery has a whole window once it is back, whatever its
            # own delay between reconnections.
            if now - pinged_at >= WATCH_EVERY_S and now - checked_at >= WATCH_EVERY_S:
                checked_at = now
                answers = self.broker_answers()
                if not answers and not away:
                    log.warning("the Celery broker does not answer (CELERY_BROKER_URL): "
                                "Celery reconnects to it by itself; this worker waits")
                away = not answers
                if away:
                    ping, pinged_at = None, now
                    continue
            if now - pinged_at > self.stuck_after_s:
                self.on_stuck(f"Celery's thread has not answered for {now - pinged_at:.0f} s")
                ping, pinged_at = None, now

    def _on_assign(self, _consumer: Consumer, assigned: list[TopicPartition]) -> None:
        partitions = sorted(tp.partition for tp in assigned)
        if not partitions:
            return
        metrics.POOL_REBALANCES.labels("assigned").inc(len(partitions))
        self.owned.update(partitions)
        self._follow(f"take partitions {partitions}")
        log.info("partitions assigned to this worker", extra={"partitions": partitions})

    def _on_revoke(self, _consumer: Consumer, revoked: list[TopicPartition]) -> None:
        self._let_go([tp.partition for tp in revoked], "revoked")

    def _on_lost(self, _consumer: Consumer, lost: list[TopicPartition]) -> None:
        # The group already gave them away: let go as on a revoke (the batch in progress is
        # waited for), in the hand-over window the module's failure modes describe.
        self._let_go([tp.partition for tp in lost], "lost")

    def _let_go(self, partitions: list[int], how: str) -> None:
        partitions = sorted(set(partitions) & self.owned)
        if not partitions:
            return
        metrics.POOL_REBALANCES.labels(how).inc(len(partitions))
        self.owned.difference_update(partitions)
        # While leaving, Celery has stopped consuming already; otherwise the group waits in
        # this callback until the batch in progress ended and the queues are cancelled.
        if not self._leaving:
            self._follow(f"let go of partitions {partitions}")
        metrics.POOL_PARTITIONS.set(len(self.owned))
        log.info("partitions %s by this worker", how, extra={"partitions": partitions})

    def _follow(self, what: str) -> None:
        metrics.POOL_PARTITIONS.set(len(self.owned))
        if not self.queues.want(queue_name(p) for p in sorted(self.owned)):
            self.on_stuck(f"Celery did not {what} within {self.queues.timeout_s:.0f} s")
