"""The Celery broker's Redis transport as the workers read it: kombu's, except that what no
kombu or bridge wrote into a queue stops no worker, and that a task popped for a queue no
longer consumed goes back in front of it (`_InFront`), not behind its partition's later batches.

kombu's worker pops a queue's next item and, on one that is no message kombu wrote (not
JSON, or JSON of another shape: another program's `LPUSH`, a hand edit), fails with an error
that stops the worker and with it every partition it serves; so does Celery, on a message of
kombu's shape that is no task it can read (no task id, a body of another shape), or it puts
the item back and takes it again for ever. On a queue key, or kombu's record of the messages
it delivered, of another kind (`SET events.p1 …`), every wait or delivery fails.

Here such an item is said, counted (`foreign_tasks_total`, with no topic) and dropped: it was
popped, and no bridge wrote it. On a partition's queue, where only bridges' tasks belong, an
item must be one a bridge writes (Celery's message protocol 2 in msgpack, `_task_shape`);
elsewhere (a reply to a control command) what kombu can deliver is delivered. A key of
another kind is renamed aside as it is met, kept for whoever looks into it, so the queue or
the record is one of kombu's again; a task an overwritten queue held is one the bridge reads
again from Kafka, as those of a flushed queue (`REDELIVERY_TIMEOUT_S`).

The checks build kombu's own message from the item, as kombu is about to, so what kombu would
fail on they refuse. Where kombu's client is not redis-py's own (`global_keyprefix`), the
worker reads as kombu does.
"""

from __future__ import annotations

import functools
import logging
import secrets
import time
from collections.abc import Mapping
from typing import Any

import redis
from kombu import transport as kombu_transports
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from eventpipe import logs, metrics
from eventpipe.errors import redis_refuses_writes
from eventpipe.queues import partition_of

log = logging.getLogger(__name__)

_SAID = logs.Repeats(window_s=60.0)  # per queue, and per key set aside

# Each key not of its kind (nor missing) renamed to itself + ARGV[1], in one step, so a key
# made anew of the right kind meanwhile is never the one moved.
_SET_ASIDE = """
local moved = {}
for i, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'none' and kind ~= ARGV[i + 1] then
    redis.call('RENAME', key, key .. ARGV[1])
    moved[#moved + 1] = {key, kind}
  end
end
return moved
"""

MSGPACK = "application/x-msgpack"


def set_aside(client: redis.Redis, kinds: Mapping[str, str]) -> list[tuple[str, str]]:
    """Rename aside each of these keys that holds a value of another kind than its own
    (`kinds`: key → `list`, `hash`, `zset`…), to `<key>.set-aside.<ms>.<random>`: the key and
    the kind it held of each."""
    if not kinds:
        return []
    suffix = f".set-aside.{time.time_ns() // 1_000_000}.{secrets.token_hex(3)}"
    moved = client.eval(_SET_ASIDE, len(kinds), *kinds, suffix, *kinds.values())
    found = [(bytes_to_str(key), bytes_to_str(kind)) for key, kind in moved]
    for key, kind in found:
        if _SAID.let_through(f"key {key}") is not None:
            log.error("Celery broker key %s held a value of another kind (%s), not kombu's %s: "
                      "renamed to %s (another program writes into the Celery broker's "
                      "database, CELERY_BROKER_URL?)", key, kind, kinds[key], key + suffix,
                      extra={"key": key, "kind": kind, "renamedTo": key + suffix})
    return found


def _task_shape(message: Any) -> str | None:
    """Why a message of a partition's queue is no task a bridge sends (`send_batch`: Celery's
    protocol 2 in msgpack), in what Celery reads of it before the task's own checks; None if
    it is one. Its body is decoded as msgpack only, never by what it says it is."""
    headers = message.headers
    if message.content_type != MSGPACK or message.content_encoding != "binary":
        return f"content {str(message.content_type)[:40]!r}, not {MSGPACK}"
    if not (isinstance(headers, dict) and isinstance(headers.get("task"), str)
            and isinstance(headers.get("id"), str)
            and isinstance(headers.get("shadow"), str | None)
            and (headers.get("timelimit") is None
                 or (isinstance(headers["timelimit"], list | tuple)
                     and len(headers["timelimit"]) == 2))):
        return "no task's headers"
    if message.errors or not isinstance(message.body, bytes) or not message.body:
        return "no body, or one that does not decompress"
    message.accept = {MSGPACK}
    body = message.decode()
    if not (isinstance(body, list | tuple) and len(body) == 3
            and isinstance(body[0], list | tuple) and isinstance(body[1], dict)
            and isinstance(body[2], dict | None)):
        return "a body of no task's shape"
    return None


class _Checks(kombu_redis.Channel):
    """What the checking channels add to kombu's (`Channel`, `SentinelChannel`)."""

    def _get_client(self) -> Any:
        made = super()._get_client()
        if made is not redis.Redis:
            return made
        return functools.partial(_CheckingClient, channel=self)

    def unreadable(self, queue: str, item: bytes) -> str | None:
        """Why kombu and Celery, about to deliver `item` of `queue`, would fail on it; None
        if they would not."""
        try:
            message = self.Message(loads(bytes_to_str(item)), channel=self)
            delivery = message.delivery_info
            # What kombu's record of unacknowledged messages reads of it, as it takes it.
            if not (isinstance(message.delivery_tag, str) and isinstance(delivery, dict)
                    and isinstance(delivery.get("exchange"), str)
                    and isinstance(delivery.get("routing_key"), str)):
                return "no delivery tag, exchange and routing key"
            if partition_of(queue) is not None:
                return _task_shape(message)
        except Exception as exc:  # whatever kombu would raise: its own checks are these
            return f"{type(exc).__name__}: {str(exc)[:100]}"
        return None

    def queue_of(self, key: bytes) -> str:
        """The queue a key of it serves (past the priority's suffix)."""
        return str(bytes_to_str(key)).rsplit(self.sep, 1)[0]

    def drop(self, queue: str, item: bytes, why: str) -> None:
        # As kombu does after a delivery, so that one queue's items do not keep the next
        # from its turn.
        self._queue_cycle.rotate(queue)
        metrics.FOREIGN_TASKS.labels("").inc()
        held = _SAID.let_through(f"queue {queue}")
        if held is not None:
            log.error("an item on queue %s is no message a bridge wrote (%s): dropped; "
                      "whatever wrote it into this pipeline's Celery broker "
                      "(CELERY_BROKER_URL) is not a bridge%s", queue, why,
                      f" ({held} more since the last such line)" if held else "",
                      extra={"queue": queue, "item": repr(item[:100])})

    def set_aside_queues_of_another_kind(self) -> bool:
        """Rename aside the keys of this channel's queues that are no lists: whether any."""
        keys = {self._q_for_pri(queue, step): "list"
                for queue in self.active_queues for step in self.priority_steps}
        with self.conn_or_acquire() as client:
            return bool(set_aside(client, keys))

    def _restore(self, message: Any, leftmost: bool = False) -> None:
        """kombu's, from its record of the delivery; one taken with no record (`_QoS`), as
        this process holds it (a worker stopping hands back what it holds)."""
        unrecorded: set[Any] = getattr(self.qos, "unrecorded", set())
        if message.delivery_tag not in unrecorded:
            super()._restore(message, leftmost)
            return
        unrecorded.discard(message.delivery_tag)
        self.push_back(message, leftmost)

    def push_back(self, message: Any, leftmost: bool = False) -> None:
        """A delivered message back in its queue, as this process holds it: in front (where
        it came from) unless `leftmost`."""
        delivery = message.delivery_info
        with self.conn_or_acquire() as client:
            self._do_restore_message(message._raw, delivery["exchange"],
                                     delivery["routing_key"], client, leftmost)

    def set_aside_records_of_another_kind(self) -> bool:
        """Rename aside kombu's record of delivered messages, and its index, where either is
        no longer of its kind: whether either was."""
        with self.conn_or_acquire() as client:
            return bool(set_aside(client, {self.unacked_key: "hash",
                                           self.unacked_index_key: "zset"}))


class _CheckingClient(redis.Redis):
    """kombu's client, its waits for a queue's next item checked (`_Checks`)."""

    def __init__(self, *args: Any, channel: _Checks, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._channel = channel

    def parse_response(self, connection: Any, command_name: str | bytes, **options: Any) -> Any:
        if command_name != "BRPOP":
            return super().parse_response(connection, command_name, **options)
        try:
            reply = super().parse_response(connection, command_name, **options)
        except redis.ResponseError as exc:
            if not (_wrong_type(exc) and self._channel.set_aside_queues_of_another_kind()):
                raise
            return None  # nothing popped: kombu waits again
        if reply:
            key, item = reply
            queue = self._channel.queue_of(key)
            why = self._channel.unreadable(queue, item)
            if why is not None:
                self._channel.drop(queue, item, why)
                return None  # as a wait that timed out
        return reply


class _QoS(kombu_redis.QoS):
    """kombu's record of delivered tasks, which hands a task whose worker died to another once
    the visibility timeout passes. While Redis takes no writes (at its memory bound, or failing
    to save its snapshot) kombu would end the worker at the first write the record needs,
    unrecoverable, and a bare `celery worker` stays down. Here the worker goes on: a task taken
    then runs with no record of its delivery (the bridge, not the record, reads again the
    events of a task whose worker dies, well before the visibility timeout), the record of one
    taken before is left to Redis if it refuses to drop it (handed back later: a copy, as any
    redelivery), and the hand-back waits for writes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unrecorded: set[Any] = set()  # delivered with no record in Redis (`append`)

    def append(self, message: Any, delivery_tag: Any) -> None:
        """kombu's, once more after its record of the message fails on a key of another kind
        renamed aside meanwhile (the message was popped: else it would be lost to Redis)."""
        try:
            super().append(message, delivery_tag)
        except redis.ResponseError as exc:
            if _refused(exc):
                virtual.QoS.append(self, message, delivery_tag)
                self.unrecorded.add(delivery_tag)
                return
            if not (_wrong_type(exc) and self.channel.set_aside_records_of_another_kind()):
                raise
            super().append(message, delivery_tag)

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        """kombu's hand-back, under a lock it writes: asked again at the next poll."""
        try:
            super().restore_visible(*args, **kwargs)
        except redis.ResponseError as exc:
            if not _refused(exc):
                raise

    def ack(self, delivery_tag: Any) -> None:
        if delivery_tag in self.unrecorded:
            self.unrecorded.discard(delivery_tag)
        else:
            try:
                super().ack(delivery_tag)
                return
            except redis.ResponseError as exc:
                if not _refused(exc):
                    raise
                self._drop_record(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        """kombu's; what Redis refuses is left as the record says (see the class)."""
        if delivery_tag not in self.unrecorded:
            try:
                super().reject(delivery_tag, requeue=requeue)
                return
            except redis.ResponseError as exc:
                if not _refused(exc):
                    raise
        self.unrecorded.discard(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def _drop_record(self, delivery_tag: Any) -> None:
        """The record of a task done, dropped outside a transaction: Redis at its memory
        bound refuses every command of one, these too, but takes them alone."""
        try:
            with self.channel.conn_or_acquire() as client:
                client.pipeline(transaction=False).zrem(self.unacked_index_key, delivery_tag) \
                    .hdel(self.unacked_key, delivery_tag).execute()
        except redis.RedisError:
            pass  # kept: handed back once the visibility timeout passes, and applied again


def _refused(exc: Exception) -> bool:
    """Whether Redis refused for its state, not the command's; said once a minute."""
    refused = redis_refuses_writes(exc)
    if refused is not None and _SAID.let_through("refused") is not None:
        log.error("the Celery broker (CELERY_BROKER_URL) takes no writes: %s; tasks run with "
                  "no record of their delivery, and none is handed back from one, until it "
                  "does", refused)
    return refused is not None


def requeue_next(message: Any) -> None:
    """Put an unacknowledged task message of kombu's Redis transport back where its queue's
    next consumer takes it first: where it came from, since a partition's queue is taken
    oldest first.

    That is the list's right end (kombu LPUSHes and BRPOPs from the right), where kombu's own
    visibility restore puts it. kombu's reject with requeue pushes it at the left end instead
    (`QoS.reject` → `restore_by_tag(leftmost=True)` → LPUSH), behind every batch of the
    partition queued since, which would then be applied before it."""
    channel = message.channel
    unrecorded: set[Any] = getattr(channel.qos, "unrecorded", set())
    try:
        if message.delivery_tag in unrecorded:  # taken while Redis took no record of it
            channel.push_back(message)
        else:  # one transaction: out of kombu's unacked hash and index, RPUSHed
            channel.qos.restore_by_tag(message.delivery_tag, leftmost=False)
    except redis.ResponseError as exc:
        # Redis takes no writes: the record, if any, hands it back once the visibility
        # timeout passes; the bridge reads its events again before.
        if not _refused(exc):
            raise
    unrecorded.discard(message.delivery_tag)
    # Forgotten in this process only (the in-memory half of kombu's ack): Redis holds no
    # record of it any more, and its next consumer may hold one under the same tag already.
    virtual.QoS.ack(channel.qos, message.delivery_tag)
    message._state = "REQUEUED"  # as kombu's own Message.requeue() leaves it


def back_in_front(channel: Any, raw: dict[str, Any]) -> None:
    """A message popped from a queue after it was let go (a BRPOP sent before, answered
    after): back where it came from, in front, for the queue's next consumer."""
    message = channel.Message(raw, channel=channel)
    # Recorded as kombu records a delivery: the requeue takes it from that record.
    channel.qos.append(message, message.delivery_tag)
    requeue_next(message)
    log.info("a task taken as its queue was let go is back in front of it",
             extra={"queue": message.delivery_info.get("routing_key")})


class _InFront:
    """kombu's transport, but that a message popped for a queue no longer consumed here goes
    back in front (`back_in_front`), where kombu's rejection pushes it behind the batches of
    its partition queued since, to be applied after them: the worker stopping (Celery cancels
    its queues, then the BRPOP in flight answers), or a queue cancelled by hand."""

    channels: list[Any]

    def _reject_inbound_message(self, raw_message: dict[str, Any]) -> None:
        for channel in self.channels:
            if channel:
                back_in_front(channel, raw_message)
                return


def _wrong_type(exc: redis.ResponseError) -> bool:
    # Said alone, or after the place of the command in a pipeline ("Command # 2 (…) …").
    return "WRONGTYPE Operation against a key holding the wrong kind of value" in str(exc)


class Channel(_Checks):
    QoS = _QoS


class SentinelChannel(_Checks, kombu_redis.SentinelChannel):
    QoS = _QoS


class Transport(_InFront, kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(_InFront, kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def read_redis_brokers_here() -> None:
    """Have kombu read Redis brokers (`redis://`, `rediss://`, `redis+socket://`,
    `sentinel://`) through these transports in this process (a worker's: Flower and `celery
    inspect`, which take no tasks, keep kombu's). Through its table of aliases, not Celery's
    `broker_transport`, so that what the worker shows of its broker is still the URL, and a
    failover to another URL of a list keeps them."""
    for scheme, transport in (("redis", Transport), ("rediss", Transport),
                              ("sentinel", SentinelTransport)):
        kombu_transports.TRANSPORT_ALIASES[scheme] = f"{__name__}:{transport.__name__}"
        # kombu keeps what it resolved by name: had this process connected already, the
        # name would still give kombu's own.
        kombu_transports._transport_cache.pop(scheme, None)
