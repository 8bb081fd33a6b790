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
  batch is read again from Kafka by the bridge (the offsets were neither done nor leased).
- A frozen member that wakes up still consumes its old queues until its consumer hears it
  was dropped (its next poll, within a second): for that moment a partition may have two
  consumers. Effects stay exactly-once through the guards every batch passes anyway (the
  fate record, version guards, the offset ledger's running ranges), and the fate record
  (`applied_events.worker`) names the process that applied each event.
- A retry scheduled with a countdown stays with the process that scheduled it (Celery keeps
  it in memory until due) and runs there even after a hand-over, out of its partition's
  order: the same guards make that safe, as for any retry.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition

from eventpipe import metrics
from eventpipe.kafka import consumer_config, ensure_topic
from eventpipe.queues import queue_name
from eventpipe.settings import Settings

log = logging.getLogger(__name__)

POLL_S = 0.5


def pool_topic(settings: Settings) -> str:
    return f"{settings.kafka_topic}.workers"


def pool_group(settings: Settings) -> str:
    return f"{settings.kafka_group_id}.workers"


class CeleryQueues:
    """Changes the queues a Celery worker process consumes, on the consumer's own thread."""

    def __init__(self, consumer: Any, timeout_s: float) -> None:
        self.consumer = consumer
        self.timeout_s = timeout_s

    def add(self, queues: Iterable[str]) -> bool:
        chosen = list(queues)
        return self._on_celery_thread(lambda: [self.consumer.add_task_queue(q) for q in chosen])

    def cancel(self, queues: Iterable[str]) -> bool:
        """Stop consuming `queues`; True once done, which under the solo pool is after the
        batch in progress ended."""
        chosen = list(queues)
        return self._on_celery_thread(
            lambda: [self.consumer.cancel_task_queue(q) for q in chosen])

    def _on_celery_thread(self, change: Callable[[], object]) -> bool:
        done = threading.Event()

        def run() -> None:
            try:
                change()
            finally:
                done.set()

        self.consumer.call_soon(run)
        return done.wait(self.timeout_s)


class PoolMember:
    def __init__(self, settings: Settings, queues: CeleryQueues, name: str) -> None:
        self.settings = settings
        self.queues = queues
        self.name = name
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

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                # As many partitions as the events topic, even after it grew.
                ensure_topic(self.settings, pool_topic(self.settings), grow=True)
                break
            except Exception as exc:  # Kafka is away: join once it answers
                log.warning("worker pool: no coordination topic yet: %s", exc)
                self._stop.wait(2.0)
        consumer = Consumer(consumer_config(self.settings, **{
            "group.id": pool_group(self.settings), "client.id": self.name,
            # Partitions dealt one by one over the members: 12 over 3 is 4, 4 and 4.
            "partition.assignment.strategy": "roundrobin",
            "statistics.interval.ms": 0}))
        consumer.subscribe([pool_topic(self.settings)], on_assign=self._on_assign,
                           on_revoke=self._on_revoke, on_lost=self._on_lost)
        log.info("joined the worker pool", extra={"group": pool_group(self.settings)})
        try:
            while not self._stop.is_set():
                record = consumer.poll(POLL_S)
                error = record.error() if record is not None else None
                if error is not None and error.code() != KafkaError._PARTITION_EOF:
                    log.warning("worker pool: %s", error)
        except Exception:
            log.exception("worker pool member stopped")
        finally:
            # Never consume a queue the group does not know is ours.
            self._let_go(list(self.owned), "left")
            consumer.close()

    def _on_assign(self, _consumer: Consumer, assigned: list[TopicPartition]) -> None:
        partitions = sorted(tp.partition for tp in assigned)
        if not partitions:
            return
        metrics.POOL_REBALANCES.labels("assigned").inc()
        if not self.queues.add(queue_name(p) for p in partitions):
            log.error("Celery did not take the queues of partitions %s in time", partitions)
        self.owned.update(partitions)
        metrics.POOL_PARTITIONS.set(len(self.owned))
        log.info("partitions assigned to this worker", extra={"partitions": partitions})

    def _on_revoke(self, _consumer: Consumer, revoked: list[TopicPartition]) -> None:
        self._let_go([tp.partition for tp in revoked], "revoked")

    def _on_lost(self, _consumer: Consumer, lost: list[TopicPartition]) -> None:
        # The group already gave them away: stop at once, the batch in progress included in
        # the hand-over window (see the module's failure modes).
        self._let_go([tp.partition for tp in lost], "lost")

    def _let_go(self, partitions: list[int], how: str) -> None:
        partitions = sorted(set(partitions) & self.owned)
        if not partitions:
            return
        metrics.POOL_REBALANCES.labels(how).inc()
        # While leaving, Celery has stopped consuming already; otherwise the group waits in
        # this callback until the batch in progress ended and the queues are cancelled.
        if not self._leaving and not self.queues.cancel(queue_name(p) for p in partitions):
            log.error("Celery did not let go of partitions %s in time", partitions)
        self.owned.difference_update(partitions)
        metrics.POOL_PARTITIONS.set(len(self.owned))
        log.info("partitions %s by this worker", how, extra={"partitions": partitions})
