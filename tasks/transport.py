"""The Celery broker's Redis transport as the workers read it: kombu's, except that what no
kombu wrote into a queue stops no worker.

kombu's worker pops a queue's next item and, on one that is no message kombu wrote (not
JSON, or JSON of another shape: another program's `LPUSH`, a hand edit), fails with an error
that stops the worker and with it every partition it serves. On a queue key of another kind
(`SET events.p1 …`) every wait fails, at each start. Here such an item is said, counted
(`foreign_tasks_total`, with no topic) and dropped: it was popped, and no bridge wrote it. Such
a key is renamed aside, kept for whoever looks into it, and the queue is a list again for the
bridge's next task; a task the key's overwriting took with it is one the bridge reads again
from Kafka, as the tasks of a flushed queue (`REDELIVERY_TIMEOUT_S`).

The check builds kombu's own message from the item, as kombu is about to, so it refuses
exactly what kombu would fail on; what kombu takes and Celery refuses (no task's headers, a
body of no known format) Celery itself drops and says. Where kombu's client is not redis-py's
own (`global_keyprefix`), the worker reads as kombu does.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import redis
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from eventpipe import logs, metrics

log = logging.getLogger(__name__)

_SAID = logs.Repeats(window_s=60.0)  # per queue

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


def set_aside(client: redis.Redis, kinds: dict[str, str]) -> list[tuple[str, str, str]]:
    """Rename aside each of these keys that holds a value of another kind than its own
    (`kinds`: key → `list`, `hash`, `zset`…): (key, the kind it held, its new name) of each."""
    suffix = f".set-aside.{time.time_ns() // 1_000_000}"
    moved = client.eval(_SET_ASIDE, len(kinds), *kinds, suffix, *kinds.values())
    found = [(bytes_to_str(key), bytes_to_str(kind)) for key, kind in moved]
    for key, kind in found:
        log.error("Celery broker key %s held a value of another kind (%s), not kombu's %s: "
                  "renamed to %s (another program writes into the Celery broker's database, "
                  "CELERY_BROKER_URL?)", key, kind, kinds[key], key + suffix,
                  extra={"key": key, "kind": kind, "renamedTo": key + suffix})
    return [(key, kind, key + suffix) for key, kind in found]


class Channel(kombu_redis.Channel):
    def _get_client(self) -> Any:
        made = super()._get_client()
        if made is not redis.Redis:
            return made
        return functools.partial(_CheckingClient, channel=self)

    def unreadable(self, item: bytes) -> str | None:
        """Why kombu, about to deliver `item`, would fail on it; None if it would not."""
        try:
            message = self.Message(loads(bytes_to_str(item)), channel=self)
            delivery = message.delivery_info
            # What kombu's record of unacknowledged messages reads of it, as it takes it.
            if not (isinstance(message.delivery_tag, str) and isinstance(delivery, dict)
                    and isinstance(delivery.get("exchange"), str)
                    and isinstance(delivery.get("routing_key"), str)):
                return "no delivery tag, exchange and routing key"
        except Exception as exc:  # whatever kombu would raise: its own checks are these
            return f"{type(exc).__name__}: {str(exc)[:100]}"
        return None

    def set_aside_queues_of_another_kind(self) -> bool:
        """Rename aside the keys of this channel's queues that are no lists: whether any."""
        keys = {self._q_for_pri(queue, step): "list"
                for queue in self.active_queues for step in self.priority_steps}
        with self.conn_or_acquire() as client:
            return bool(keys and set_aside(client, keys))


class _CheckingClient(redis.Redis):
    """kombu's client, its waits for a queue's next item checked (`Channel`)."""

    def __init__(self, *args: Any, channel: Channel, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._channel = channel

    def parse_response(self, connection: Any, command_name: str | bytes, **options: Any) -> Any:
        if command_name != "BRPOP":
            return super().parse_response(connection, command_name, **options)
        try:
            reply = super().parse_response(connection, command_name, **options)
        except redis.ResponseError as exc:
            if not (str(exc).startswith("WRONGTYPE")
                    and self._channel.set_aside_queues_of_another_kind()):
                raise
            return None  # nothing popped: kombu waits again
        if reply:
            queue, item = reply
            why = self._channel.unreadable(item)
            if why is not None:
                _dropped(bytes_to_str(queue), item, why)
                return None  # as a wait that timed out
        return reply


def _dropped(queue: str, item: bytes, why: str) -> None:
    metrics.FOREIGN_TASKS.labels("").inc()
    held = _SAID.let_through(queue)
    if held is None:
        return
    log.error("an item on queue %s is no message kombu wrote (%s): dropped; whatever wrote it "
              "into this pipeline's Celery broker (CELERY_BROKER_URL) is not a bridge%s",
              queue, why, f" ({held} more since the last such line)" if held else "",
              extra={"queue": queue, "item": repr(item[:100])})


class Transport(kombu_redis.Transport):
    Channel = Channel


def read_redis_brokers_here() -> None:
    """Have kombu read `redis://` and `rediss://` brokers through this transport in this
    process (a worker's: Flower and `celery inspect`, which take no items, keep kombu's).
    Through its table of aliases, not Celery's `broker_transport`, so that what the worker
    shows of its broker is still the URL, and a failover to another URL of a list keeps it."""
    for scheme in ("redis", "rediss"):
        TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
