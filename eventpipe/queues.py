"""The Celery side of the wire: queue names, the task name, and how messages travel.

The bridge only sends; the workers (`tasks/`) register the task. Both build their Celery app
here so the two can never disagree on broker, serializer or routing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery

from eventpipe.messages import Headers, RawMessage, headers_of, headers_size
from eventpipe.settings import Settings

APPLY_TASK = "eventpipe.apply_events"
QUEUE_PREFIX = "events.p"


def queue_name(partition: int) -> str:
    """One Celery queue per Kafka partition keeps a partition's events in order."""
    return f"{QUEUE_PREFIX}{partition}"


def queue_depths(broker: redis.Redis, partitions: Iterable[int]) -> dict[int, int]:
    """Tasks waiting in these partitions' queues of a Redis Celery broker: one round trip."""
    chosen = list(partitions)
    with broker.pipeline(transaction=False) as pipe:
        for partition in chosen:
            pipe.llen(queue_name(partition))
        replies = pipe.execute()
    return {p: int(depth) for p, depth in zip(chosen, replies, strict=True)}


# kombu's Redis transport keeps each message delivered and not yet acknowledged in a hash by
# delivery tag (`[message, exchange, routing key]` as JSON), indexed by delivery time, and
# hands it out again once the visibility timeout passes.
_UNACKED, _UNACKED_INDEX = "unacked", "unacked_index"


def unacked_counts(broker: redis.Redis, longer_than_s: float) -> tuple[int, int]:
    """The messages, of every queue, a Redis Celery broker holds as delivered and not
    acknowledged, and those of them held for longer than `longer_than_s` (by kombu's index
    of their delivery times), in one round trip: a worker applies them, holds them for later
    (a retry, a task taken ahead while it holds one), or was killed with them (a running
    worker puts them back in their queue once the visibility timeout passed,
    `visibility_timeout_s`)."""
    with broker.pipeline(transaction=False) as pipe:
        pipe.hlen(_UNACKED)
        pipe.zcount(_UNACKED_INDEX, "-inf", time.time() - longer_than_s)
        held, overdue = pipe.execute()
    return int(held), int(overdue)


def visibility_timeout_s(settings: Settings) -> int:
    """How long kombu's Redis transport waits before it hands out again a message delivered
    and not acknowledged: longer than any retry's countdown, so that a waiting retry is not
    handed out twice."""
    return max(900, int(settings.retry_backoff_max_s * 4))


def drop_unacked(broker: redis.Redis, queues: Collection[str]) -> int:
    """Forget the messages of these queues a Redis Celery broker holds as delivered and not
    acknowledged (a worker killed with them, retries it held): how many. Others' are left."""
    mine = []
    for tag, entry in broker.hgetall(_UNACKED).items():
        try:
            routed_to = json.loads(entry)[2]
        except (ValueError, LookupError, TypeError):
            continue  # not kombu's: not ours to judge
        if routed_to in queues:
            mine.append(tag)
    _forget_unacked(broker, mine)
    return len(mine)


def drop_unreadable_unacked(broker: redis.Redis) -> list[str]:
    """Remove the entries of kombu's record of unacknowledged messages that are none it
    wrote (not JSON `[message, exchange, routing key]`: another program's, a hand edit), and
    say which. kombu hands each entry back once the visibility timeout passes, and fails on
    such a one with an error that stops its worker, at every start after."""
    unreadable = []
    for tag, entry in broker.hgetall(_UNACKED).items():
        try:
            found = json.loads(entry)
        except ValueError:
            found = None
        if not (isinstance(found, list) and len(found) == 3 and isinstance(found[0], dict)):
            unreadable.append(tag)
    _forget_unacked(broker, unreadable)
    return [(tag.decode("utf-8", "replace") if isinstance(tag, bytes) else tag)[:100]
            for tag in unreadable]


def _forget_unacked(broker: redis.Redis, tags: list[Any]) -> None:
    """Out of kombu's record of unacknowledged messages and its index, in one transaction."""
    if tags:
        with broker.pipeline() as pipe:
            pipe.hdel(_UNACKED, *tags)
            pipe.zrem(_UNACKED_INDEX, *tags)
            pipe.execute()


def partition_of(queue: str) -> int | None:
    """The partition a queue serves; None for a queue that is not a partition's."""
    number = queue.removeprefix(QUEUE_PREFIX)
    return int(number) if number != queue and number.isdigit() else None


@dataclass(frozen=True, slots=True)
class TaskMessage:
    """One Kafka message as a task carries it: raw bytes (msgpack keeps them binary), a null
    value as null, the Kafka timestamp (the contract's clock for `occurredAt` in the future),
    how many times it was already tried alone after an unforeseen error, and its headers,
    kept for its dead letter. `unreadable`: why Kafka could not hand the message over (its
    record batch cannot be decoded), which has then neither key nor value: it is
    dead-lettered so (`eventpipe.kafka.UNREADABLE`)."""

    offset: int
    key: bytes | None
    value: bytes | None  # None: a tombstone
    timestamp_ms: int | None = None
    attempts: int = 0
    headers: Headers = ()
    unreadable: str | None = None

    def to_wire(self) -> list[Any]:
        wire = [self.offset, self.key, self.value, self.timestamp_ms, self.attempts]
        # Only when there are any: a worker of before them reads five parts.
        if self.unreadable is not None:
            return [*wire, [list(header) for header in self.headers], self.unreadable]
        return [*wire, [list(header) for header in self.headers]] if self.headers else wire

    @classmethod
    def from_wire(cls, raw: list[Any]) -> TaskMessage:
        """The message a bridge's task carries; ValueError for anything else (a task sent by
        hand, another program's), whose offsets would enter the ledger as marks."""
        # Parts past those known are a later bridge's (each part was added so, in a rolling
        # upgrade): not this worker's to judge.
        if not isinstance(raw, list | tuple) or len(raw) < 5:
            raise ValueError("not a message of a bridge's task: fewer than 5 parts")
        offset, key, value, timestamp_ms, attempts, *rest = raw
        headers = rest[0] if rest else []
        unreadable = rest[1] if len(rest) > 1 else None
        if not (_count(offset) and _count(attempts)
                and all(part is None or isinstance(part, bytes) for part in (key, value))
                # Any the Kafka client gave: a producer may set one before 1970.
                and (timestamp_ms is None or type(timestamp_ms) is int)
                and isinstance(headers, list | tuple)
                and all(isinstance(header, list | tuple) and len(header) == 2
                        and isinstance(header[0], str)
                        and (header[1] is None or isinstance(header[1], bytes))
                        for header in headers)
                and (unreadable is None or isinstance(unreadable, str))):
            raise ValueError(f"not a message of a bridge's task: offset {str(offset)[:20]!r}")
        return cls(offset, key, value, timestamp_ms, attempts, headers_of(headers), unreadable)

    @property
    def size(self) -> int:
        size = len(self.value or b"") + len(self.key or b"")
        return size + headers_size(self.headers) if self.headers else size

    @property
    def raw(self) -> RawMessage:
        return RawMessage(self.key, self.value, self.headers)


def _count(value: Any) -> bool:
    """An int of zero or more, as msgpack gives one (bool is an int to Python, not here)."""
    return type(value) is int and value >= 0


def task_summary(topic: str, partition: int, messages: list[TaskMessage]) -> str:
    """What Flower shows for a task: where its messages are, never their content (which holds
    personal data)."""
    first, last = messages[0].offset, messages[-1].offset
    span = f"offset {first}" if first == last else f"offsets {first}–{last}"
    return f"{topic} p{partition} {span}, {len(messages)} events"


# The consumer group a task was sent for, in its headers (which Celery keeps across its
# retries, and workers of before it ignore): two pipelines of one topic name on two Kafka
# clusters, given one Celery broker by mistake, must not apply each other's tasks.
GROUP_HEADER = "kafka_group"
# Kafka's id of the topic the messages were read from (`eventpipe.offset_ledger.filed_under`):
# the worker marks them done in that topic's ledger, never in a topic's made again since.
TOPIC_ID_HEADER = "kafka_topic_id"
# A batch retried because the offset ledger stopped answering names the run whose end it
# did not answer: alive, not dead (`tasks.processing.Processor.run`).
FORGIVE_HEADER = "ledger_forgive"


def send_batch(app: Celery, topic: str, partition: int, messages: list[TaskMessage], *,
               group: str, topic_id: str, countdown: float | None = None) -> None:
    """Queue one task applying `messages` on their partition's queue, for consumer group
    `group`, read from the topic Kafka names `topic_id`."""
    app.send_task(APPLY_TASK, args=[topic, partition, [m.to_wire() for m in messages]],
                  queue=queue_name(partition), countdown=countdown,
                  headers={GROUP_HEADER: group, TOPIC_ID_HEADER: topic_id},
                  argsrepr=task_summary(topic, partition, messages), kwargsrepr="{}")


def make_celery(settings: Settings, main: str = "eventpipe") -> Celery:
    app = Celery(main, broker=settings.celery_broker_url, set_as_current=False)
    app.conf.update(
        # Binary-safe and compact: message values travel as the bytes Kafka gave.
        task_serializer="msgpack",
        accept_content=["msgpack"],
        task_ignore_result=True,
        # The effect is idempotent, so a task is acknowledged only once it is done, and a
        # task whose worker died is handed out again.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A task whose broker connection is lost cannot be acknowledged any more: its message
        # comes back, so stop working on it rather than apply it twice in parallel.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_create_missing_queues=True,
        task_default_queue=queue_name(0),
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": visibility_timeout_s(settings),
        },
        # Off until a monitor asks: three events a task are a third of Celery's own work per
        # task. Flower turns them on by itself (every 5 s while it runs), as does
        # `celery -A tasks control enable_events`; worker heartbeats are sent regardless.
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    return app
