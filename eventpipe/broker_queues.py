"""How many tasks wait in each partition's queue of the Celery broker, whatever it is.

The bridge needs it (a partition whose tasks still wait is not read again however long they
wait, and a light partition's next batch waits for its queue to empty), and so do
`eventpipe status` and `GET /status`. Redis answers for every queue in one round trip
(`LLEN`); an AMQP broker (RabbitMQ) answers a passive declare per queue with its ready
messages. Neither counts the task a worker holds (delivered, not acknowledged): the offset
ledger has its offsets leased. Of another broker nothing is known (`depth_reader` gives
None), and the callers fall back on their other evidence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import redis
from kombu.connection import Connection
from kombu.exceptions import OperationalError

from eventpipe.queues import queue_depths, queue_name

_AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")
_NOT_FOUND = 404  # AMQP reply code: no such queue (no task was ever sent to it)


class Unanswered(Exception):
    """The Celery broker could not be asked."""


class QueueDepths(Protocol):
    def read(self, partitions: Iterable[int]) -> dict[int, int]:
        """Tasks waiting per partition queue; raises `Unanswered`."""
        ...

    def close(self) -> None: ...


class RedisDepths:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def read(self, partitions: Iterable[int]) -> dict[int, int]:
        try:
            return queue_depths(self.client, partitions)
        except redis.RedisError as exc:
            raise Unanswered(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self.client.close()


class AmqpDepths:
    """One connection, opened on first use and again after a failure; every call bounded by
    `timeout_s`, so a broker that hangs costs the caller that long, not its loop."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.connection: Any = Connection(  # type: ignore[no-untyped-call]
            url, connect_timeout=timeout_s,
            transport_options={"read_timeout": timeout_s, "write_timeout": timeout_s})
        self.errors = (OperationalError, *self.connection.connection_errors,
                       *self.connection.channel_errors)

    def read(self, partitions: Iterable[int]) -> dict[int, int]:
        try:
            self.connection.ensure_connection(max_retries=0)
            channel = self.connection.channel()
            depths = {}
            try:
                for partition in partitions:
                    depths[partition], channel = self._depth(channel, queue_name(partition))
            finally:
                channel.close()
            return depths
        except self.errors as exc:
            self.connection.collect()  # the next call connects afresh
            raise Unanswered(f"{type(exc).__name__}: {exc}") from exc

    def _depth(self, channel: Any, queue: str) -> tuple[int, Any]:
        try:
            return int(channel.queue_declare(queue=queue, passive=True).message_count), channel
        except self.connection.channel_errors as exc:
            if getattr(exc, "code", None) != _NOT_FOUND:
                raise
            return 0, self.connection.channel()  # the broker closed the channel that asked

    def close(self) -> None:
        self.connection.release()


def depth_reader(url: str, redis_client: Callable[[str], redis.Redis],
                 timeout_s: float = 5.0) -> QueueDepths | None:
    """A reader of the queues of the Celery broker at `url` (a Redis one made by
    `redis_client`, one of `eventpipe.redis_clients`' factories); None for a broker it
    cannot ask."""
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme in ("redis", "rediss"):
        return RedisDepths(redis_client(url))
    if scheme in _AMQP_SCHEMES:
        return AmqpDepths(url, timeout_s)
    return None
