"""The dead-letter queue: a Redis Stream of what could never apply, with all its context.

One stream entry per dead-lettered Kafka message, readable with plain `redis-cli XRANGE`:
the original value and key bytes, the Kafka position, the event id and type when they could
be read, the error (class, message, traceback), attempts, first and last failure times, the
worker, and the history of earlier failures when the entry was replayed before.

- Exactly once per message: a hash indexes entries by Kafka position, and adding is one Lua
  script (check, XADD, index), so a worker that dead-letters and then dies before finishing
  does not leave a second entry when the message is delivered again.
- Bounded: at `max_entries` adding raises `DeadLetterQueueFull` (a transient error: the work
  waits and retries, nothing is dropped); from 80 % of the bound every add logs a warning.
- Replay publishes the original bytes back to Kafka with the failure history in a header,
  and deletes the entry only once Kafka has acknowledged the message.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import redis

from eventpipe.errors import TransientError

log = logging.getLogger(__name__)

HISTORY_HEADER = "eventpipe-dlq-history"
_ENTRY_ID = re.compile(r"[0-9]{1,19}-[0-9]{1,19}")
WARN_RATIO = 0.8

# Atomically: return the entry already there for this position and these bytes, or add one
# and index it. The index holds "<entry id> <fingerprint of the value>": a topic recreated
# from offset 0 puts other messages at old positions, and those are new dead letters.
_ADD_ONCE = """
local existing = redis.call('HGET', KEYS[2], ARGV[1])
if existing then
  local id, fingerprint = string.match(existing, '^(%S+) (%S+)$')
  if fingerprint == ARGV[2] and redis.call('XRANGE', KEYS[1], id, id)[1] then
    return {id, 0}
  end
end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
redis.call('HSET', KEYS[2], ARGV[1], id .. ' ' .. ARGV[2])
return {id, 1}
"""

# Delete an entry, and its index line only if the line is still about this entry.
_DELETE = """
local deleted = redis.call('XDEL', KEYS[1], ARGV[2])
local existing = redis.call('HGET', KEYS[2], ARGV[1])
if existing and string.sub(existing, 1, #ARGV[2] + 1) == ARGV[2] .. ' ' then
  redis.call('HDEL', KEYS[2], ARGV[1])
end
return deleted
"""


class DeadLetterQueueFull(TransientError):
    """The DLQ holds `max_entries`: dead-lettering waits until operators make room."""


@dataclass(frozen=True, slots=True)
class Failure:
    """One episode of failures of a message, kept in the history when it is replayed."""

    error_class: str
    error_message: str
    attempts: int
    first_failure_at: str
    last_failure_at: str
    worker: str
    replayed_at: str | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    value: bytes
    key: bytes | None
    topic: str | None
    partition: int | None
    offset: int | None
    event_id: str | None
    event_type: str | None
    error_class: str
    error_message: str
    traceback: str
    attempts: int
    first_failure_at: datetime
    last_failure_at: datetime
    worker: str
    history: tuple[Failure, ...] = ()
    entry_id: str | None = field(default=None, compare=False)

    @property
    def position(self) -> str:
        return f"{self.topic}:{self.partition}:{self.offset}"

    def failure(self, replayed_at: datetime | None = None) -> Failure:
        return Failure(
            self.error_class, self.error_message, self.attempts,
            _iso(self.first_failure_at), _iso(self.last_failure_at), self.worker,
            _iso(replayed_at) if replayed_at else None,
        )

    def to_fields(self) -> dict[str, bytes | str]:
        fields: dict[str, bytes | str] = {
            "value": self.value,
            "topic": self.topic or "",
            "partition": "" if self.partition is None else str(self.partition),
            "offset": "" if self.offset is None else str(self.offset),
            "event_id": self.event_id or "",
            "event_type": self.event_type or "",
            "error_class": self.error_class,
            "error_message": self.error_message,
            "traceback": self.traceback,
            "attempts": str(self.attempts),
            "first_failure_at": _iso(self.first_failure_at),
            "last_failure_at": _iso(self.last_failure_at),
            "worker": self.worker,
            "history": json.dumps([asdict(f) for f in self.history]),
        }
        if self.key is not None:
            fields["key"] = self.key
        return fields

    @classmethod
    def from_fields(cls, entry_id: str, fields: dict[bytes, bytes]) -> DeadLetter:
        def text(name: str) -> str:
            return fields.get(name.encode(), b"").decode("utf-8", "replace")

        def number(name: str) -> int | None:
            raw = text(name)
            return int(raw) if raw else None

        return cls(
            value=fields.get(b"value", b""),
            key=fields.get(b"key"),
            topic=text("topic") or None,
            partition=number("partition"),
            offset=number("offset"),
            event_id=text("event_id") or None,
            event_type=text("event_type") or None,
            error_class=text("error_class"),
            error_message=text("error_message"),
            traceback=text("traceback"),
            attempts=number("attempts") or 0,
            first_failure_at=datetime.fromisoformat(text("first_failure_at")),
            last_failure_at=datetime.fromisoformat(text("last_failure_at")),
            worker=text("worker"),
            history=tuple(Failure(**f) for f in json.loads(text("history") or "[]")),
            entry_id=entry_id,
        )

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready view; bytes that are not UTF-8 are given in base64."""
        return {
            "id": self.entry_id,
            "eventId": self.event_id,
            "eventType": self.event_type,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "key": _bytes_json(self.key),
            "value": _bytes_json(self.value),
            "errorClass": self.error_class,
            "errorMessage": self.error_message,
            "traceback": self.traceback,
            "attempts": self.attempts,
            "firstFailureAt": _iso(self.first_failure_at),
            "lastFailureAt": _iso(self.last_failure_at),
            "worker": self.worker,
            "history": [
                {_camel(k): v for k, v in asdict(failure).items()} for failure in self.history
            ],
        }


@dataclass(frozen=True, slots=True)
class Filter:
    """Which entries an operation applies to; empty fields match everything."""

    event_type: str | None = None
    error_class: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, entry: DeadLetter) -> bool:
        return (
            (self.event_type is None or entry.event_type == self.event_type)
            and (self.error_class is None or entry.error_class == self.error_class)
        )


class DeadLetterQueue:
    def __init__(self, client: redis.Redis, stream: str, max_entries: int) -> None:
        self.client = client
        self.stream = stream
        self.index = f"{stream}:index"
        self.max_entries = max_entries
        self._add_once = client.register_script(_ADD_ONCE)
        self._delete = client.register_script(_DELETE)

    def add(self, entry: DeadLetter) -> tuple[str, bool]:
        """Add `entry` unless its Kafka position is already in; (entry id, whether added)."""
        depth = self.depth()
        if depth >= self.max_entries:
            raise DeadLetterQueueFull(
                f"dead-letter queue {self.stream} holds {depth} entries (bound "
                f"{self.max_entries}): replay or purge entries, or raise DLQ_MAX_ENTRIES"
            )
        if depth + 1 >= self.max_entries * WARN_RATIO:
            log.warning(
                "dead-letter queue near its bound",
                extra={"dlq_depth": depth + 1, "dlq_max_entries": self.max_entries},
            )
        flat: list[bytes | str] = []
        for name, value in entry.to_fields().items():
            flat.extend((name, value))
        fingerprint = hashlib.sha256(entry.value).hexdigest()[:32]
        entry_id, added = self._add_once(keys=[self.stream, self.index],
                                         args=[entry.position, fingerprint, *flat])
        return _text(entry_id), bool(added)

    def depth(self) -> int:
        return int(self.client.xlen(self.stream))

    def get(self, entry_id: str) -> DeadLetter | None:
        if _ENTRY_ID.fullmatch(entry_id) is None:
            return None  # not a stream id: no such entry, rather than a Redis error
        found: Any = self.client.xrange(self.stream, min=entry_id, max=entry_id, count=1)
        return DeadLetter.from_fields(_text(found[0][0]), found[0][1]) if found else None

    def find_event(self, event_id: str) -> list[DeadLetter]:
        return [e for e in self.scan() if e.event_id == event_id]

    def scan(self, where: Filter = Filter(), after: str | None = None) -> Iterator[DeadLetter]:
        """Entries oldest first, matching `where`, strictly after entry id `after`."""
        low = f"({after}" if after else _stream_time(where.since, "-")
        high = _stream_time(where.until, "+")
        while True:
            chunk: Any = self.client.xrange(self.stream, min=low, max=high, count=500)
            if not chunk:
                return
            for raw_id, fields in chunk:
                entry = DeadLetter.from_fields(_text(raw_id), fields)
                if where.matches(entry):
                    yield entry
            low = f"({_text(chunk[-1][0])}"

    def page(
        self, where: Filter = Filter(), after: str | None = None, limit: int = 50
    ) -> list[DeadLetter]:
        page: list[DeadLetter] = []
        for entry in self.scan(where, after):
            page.append(entry)
            if len(page) >= limit:
                break
        return page

    def delete(self, entry: DeadLetter) -> bool:
        assert entry.entry_id is not None
        deleted = self._delete(keys=[self.stream, self.index],
                               args=[entry.position, entry.entry_id])
        return bool(deleted)

    def purge(self, where: Filter = Filter()) -> int:
        return sum(self.delete(entry) for entry in list(self.scan(where)))

    def replay(
        self, entries: list[DeadLetter], publish: Callable[[DeadLetter, bytes], None],
        flush: Callable[[], int],
    ) -> int:
        """Publish each entry back to Kafka, then delete those Kafka acknowledged.

        `publish(entry, history_header)` queues one message; `flush()` waits for delivery
        and returns how many were not delivered, in which case nothing is deleted.
        """
        now = datetime.now(UTC)
        for entry in entries:
            history = [*entry.history, entry.failure(replayed_at=now)]
            publish(entry, json.dumps([asdict(f) for f in history]).encode())
        undelivered = flush()
        if undelivered:
            raise TransientError(f"{undelivered} replayed messages were not acknowledged by "
                                 "Kafka; the entries stay in the dead-letter queue")
        return sum(self.delete(entry) for entry in entries)


def history_from_header(raw: bytes | None) -> tuple[Failure, ...]:
    """The failures carried by a replayed message, or none for a first delivery."""
    if not raw:
        return ()
    try:
        return tuple(Failure(**f) for f in json.loads(raw))
    except (ValueError, TypeError):
        return ()


def with_history(entry: DeadLetter, history: tuple[Failure, ...]) -> DeadLetter:
    return replace(entry, history=history)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _stream_time(moment: datetime | None, default: str) -> str:
    # Stream ids count milliseconds since 1970 and cannot be negative.
    return str(max(0, int(moment.timestamp() * 1000))) if moment else default


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _bytes_json(raw: bytes | None) -> dict[str, str] | None:
    if raw is None:
        return None
    try:
        return {"text": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(raw).decode()}
