"""How many tasks wait in each partition's queue of the Celery broker, whatever it is.

The bridge needs it (a partition whose tasks still wait is not read again however long they
wait, and a light partition's next batch waits for its queue to empty), and so do
`eventpipe status` and `GET /status`. Redis answers for every queue in one round trip
(`LLEN`); an AMQP broker (RabbitMQ) answers a passive declare per queue with its ready
messages. Neither counts a task a worker took (delivered, not acknowledged): the one it
applies has its offsets leased in the offset ledger, but one it took ahead while it holds a
retry (Celery widens a worker's prefetch by one per retry held) is counted nowhere until it
starts, so its partition may be read again after `REDELIVERY_TIMEOUT_S` (duplicates, nothing
lost). Of another broker nothing is known (`depth_reader` gives None), and the callers fall
back on their other evidence.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from eventpipe.queues import make_celery, queue_depths, queue_name, unacked_counts
from eventpipe.settings import Settings

_AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")
_NOT_FOUND = 404  # AMQP reply code: no such queue (no task was ever sent to it)


class Unanswered(Exception):
    """The Celery broker could not be asked: `kind` names the error, the message says all
    the driver did (hosts and ports included: for logs and operators, not API clients)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.kind = type(cause).__name__


class QueueDepths(Protocol):
    def read(self, partitions: Iterable[int]) -> dict[int, int]:
        """Tasks waiting per partition queue; raises `Unanswered`."""
        ...

    def held(self, longer_than_s: float) -> tuple[int, int] | None:
        """How many tasks, of any queue, workers took and have not acknowledged, and how many
        of them for longer than `longer_than_s` (a dead worker's, which only a running worker
        hands back to its queue once kombu's visibility timeout passed); None where the
        broker does not tell (RabbitMQ gives the tasks a worker's connection held back to
        their queue as it closes, and tells nothing of those live workers hold). Raises
        `Unanswered`."""
        ...

    def close(self) -> None: ...


class RedisDepths:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def read(self, partitions: Iterable[int]) -> dict[int, int]:
        try:
            return queue_depths(self.client, partitions)
        except redis.RedisError as exc:
            raise Unanswered(exc) from exc

    def held(self, longer_than_s: float) -> tuple[int, int] | None:
        try:
            return unacked_counts(self.client, longer_than_s)
        except redis.RedisError as exc:
            raise Unanswered(exc) from exc

    def close(self) -> None:
        self.client.close()


class AmqpDepths:
    """One connection and one channel, opened on first use and again after a failure, every
    call bounded by `timeout_s`; made as Celery makes its own (the same URL, TLS and
    transport settings). Callers on several threads (the web API's) take turns."""

    def __init__(self, celery: Celery, timeout_s: float) -> None:
        self.connection: Any = celery.connection_for_read(
            connect_timeout=timeout_s,
            transport_options={"read_timeout": timeout_s, "write_timeout": timeout_s})
        self.errors = (OperationalError, *self.connection.connection_errors,
                       *self.connection.channel_errors)
        self._channel: Any = None
        self._lock = threading.Lock()

    def read(self, partitions: Iterable[int]) -> dict[int, int]:
        with self._lock:
            try:
                if self._channel is None or not self._channel.is_open:
                    self.connection.ensure_connection(max_retries=0)
                    self._channel = self.connection.channel()
                return {p: self._depth(queue_name(p)) for p in partitions}
            except self.errors as exc:
                self._channel = None
                self.connection.collect()  # the next call connects afresh
                raise Unanswered(exc) from exc

    def held(self, longer_than_s: float) -> tuple[int, int] | None:
        return None

    def _depth(self, queue: str) -> int:
        try:
            return int(self._channel.queue_declare(queue=queue, passive=True).message_count)
        except self.connection.channel_errors as exc:
            if getattr(exc, "code", None) != _NOT_FOUND:
                raise
            return 0  # the client has reopened the channel the broker closed for asking

    def close(self) -> None:
        with self._lock:
            self._channel = None
            self.connection.release()


def purge_amqp(settings: Settings, partitions: Iterable[int]) -> int:
    """Drop the tasks waiting in these partitions' queues of an AMQP broker (those a worker
    held unacknowledged went back to their queue as its connection closed); how many.
    `Unanswered` when the broker cannot be asked."""
    celery = make_celery(settings, main="purge")
    with celery.connection_for_write(connect_timeout=5) as connection:
        try:
            channel = connection.channel()
            dropped = 0
            for partition in partitions:
                try:
                    dropped += int(channel.queue_purge(queue_name(partition)) or 0)
                except connection.channel_errors as exc:
                    if getattr(exc, "code", None) != _NOT_FOUND:
                        raise
                    channel = connection.channel()  # the broker closed this one for asking
            return dropped
        except (OperationalError, *connection.connection_errors,
                *connection.channel_errors) as exc:  # a login refused is a channel error
            raise Unanswered(exc) from exc


def is_amqp(url: str) -> bool:
    return url.split("://", 1)[0].split("+", 1)[0].lower() in _AMQP_SCHEMES


def depth_reader(settings: Settings, redis_client: Callable[[str], redis.Redis],
                 timeout_s: float = 5.0) -> QueueDepths | None:
    """A reader of the queues of the Celery broker the settings name (a Redis one through a
    client `redis_client` makes, one of `eventpipe.redis_clients`' factories); None for a
    broker it cannot ask."""
    url = settings.celery_broker_url
    if url.split("://", 1)[0].split("+", 1)[0].lower() in ("redis", "rediss"):
        return RedisDepths(redis_client(url))
    if is_amqp(url):
        return AmqpDepths(make_celery(settings, main="queue-depths"), timeout_s)
    return None
