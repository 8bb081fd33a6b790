"""The dead-letter queue operators read: a Redis Stream, one entry per open dead letter.

Readable with plain `redis-cli XRANGE <stream> - +`: each entry holds the original value and
key bytes (`value_null` set for a null value, a tombstone; `headers` as JSON, each value in
base64, when the message has any), the Kafka position, the event id and type when they could
be read, the error (class, message, traceback), attempts, first and last failure times, the
worker, the earlier episodes and the DLQ key. It is a projection of the `dead_letters` table
(`eventpipe.dlq.projection` keeps it in step): Redis may lose it, the SQL record may not.

- One entry per DLQ key: putting a key that is there replaces its entry (atomically, in one
  Lua script, with the index `<stream>:index` from key to entry id and size), so the entry of
  a dead letter that failed again moves to the end with its new attempts and time.
- Bounded in entries and in bytes (`DLQ_MAX_ENTRIES`, `DLQ_MAX_BYTES`): adding to a full
  stream raises `DeadLetterQueueFull`, a transient error — the dead letter stays recorded in
  SQL and is projected once operators make room; nothing is dropped. From 80 % of either bound
  every add logs a warning.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, cast

import redis

from eventpipe.dlq.letter import DeadLetter, history_from_json, history_json
from eventpipe.effects import Position
from eventpipe.errors import TransientError
from eventpipe.messages import (
    Headers,
    RawMessage,
    headers_from_json,
    headers_json,
    headers_size,
)
from eventpipe.redis_clients import decoded
from eventpipe.times import utc_iso

log = logging.getLogger(__name__)

ENTRY_ID = re.compile(r"[0-9]{1,19}-[0-9]{1,19}")
WARN_RATIO = 0.8
# How long a refused dead letter says the stream is full (`refusing`).
REFUSAL_KEPT_S = 300
# The most bytes of messages a page of entries shows (`page`): past it, the next page.
PAGE_MAX_BYTES = 8 * 1024 * 1024

# KEYS: stream, index. ARGV: dlq keys. The entries of those the index names, as XRANGE gives
# them, read at once: an entry put again meanwhile (under a new id) is never missed.
_GET_KEYS = """
local found = {}
for _, key in ipairs(ARGV) do
  local indexed = redis.call('HGET', KEYS[2], key)
  if indexed then
    local id = string.match(indexed, '^(%S+)')
    local entry = id and redis.call('XRANGE', KEYS[1], id, id, 'COUNT', 1)[1]
    if entry then found[#found + 1] = entry end
  end
end
return found
"""

_DIGITS = re.compile(r"-?[0-9]+")

# The total of bytes, counted again from the index where it is no number (a hand edit: HSET
# from redis-cli), rather than an error for every put. KEYS: index, totals.
_TOTAL = """
local function total(index, totals)
  -- Digits only: Lua's tonumber takes '1.5', '0x10' or 'nan', which HINCRBY then refuses,
  -- and against which no bound holds.
  local said = redis.call('HGET', totals, 'bytes') or '0'
  if string.match(said, '^%-?%d+$') then return tonumber(said) end
  local bytes = 0
  for _, line in ipairs(redis.call('HVALS', index)) do
    bytes = bytes + (tonumber(string.match(line, '^%S+ (%d+)')) or 0)
  end
  redis.call('HSET', totals, 'bytes', bytes)
  return bytes
end
"""

# KEYS: stream, index, totals. ARGV: dlq key, max entries, max bytes, size, revision,
# field/value pairs. Replaces the key's entry if there is one; refuses a new entry beyond the
# bounds. The index holds "<entry id> <size> <revision>" per key; a line that is none (a
# hand edit) is taken as no line, its entry, if any, left to `mend` as one no line names.
_PUT = _TOTAL + """
local old_id, old_size = string.match(redis.call('HGET', KEYS[2], ARGV[1]) or '', '^(%S+) (%d+)')
old_size = tonumber(old_size) or 0
local size = tonumber(ARGV[4])
local bytes = total(KEYS[2], KEYS[3]) - old_size + size
local entries = redis.call('XLEN', KEYS[1])
if not old_id then entries = entries + 1 end
if entries > tonumber(ARGV[2]) or bytes > tonumber(ARGV[3]) then
  return {false, entries, bytes}
end
if old_id then redis.call('XDEL', KEYS[1], old_id) end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 6))
redis.call('HSET', KEYS[2], ARGV[1], id .. ' ' .. size .. ' ' .. ARGV[5])
redis.call('HSET', KEYS[3], 'bytes', bytes)
return {id, entries, bytes}
"""

# KEYS: stream, index, totals. ARGV: dlq keys. Removes their entries; how many there were.
_REMOVE = _TOTAL + """
total(KEYS[2], KEYS[3])  -- a number HINCRBY takes, counted again if it was none
local removed = 0
for i = 1, #ARGV do
  local old = redis.call('HGET', KEYS[2], ARGV[i])
  if old then
    local old_id, size = string.match(old, '^(%S+) (%d+)')
    redis.call('HDEL', KEYS[2], ARGV[i])
    if old_id then  -- else a line that is none (a hand edit): only it goes
      redis.call('XDEL', KEYS[1], old_id)
      redis.call('HINCRBY', KEYS[3], 'bytes', -tonumber(size))
      removed = removed + 1
    end
  end
end
return removed
"""


# KEYS: stream, index, totals. ARGV: dlq key, entry id, size, … of entries the index did not
# name when read. Each such entry is indexed again if the index names none of its key that
# is there (its line lost), else deleted (an older copy); keys whose entry is gone are
# dropped; the total of bytes is counted again from the index. How many were out of step.
_MEND = """
local changed = 0
for i = 1, #ARGV, 3 do
  local key, id = ARGV[i], ARGV[i + 1]
  if #redis.call('XRANGE', KEYS[1], id, id) > 0 then
    local named = redis.call('HGET', KEYS[2], key)
    local named_id = named and string.match(named, '^(%S+)')
    if named_id ~= id then
      if named_id and #redis.call('XRANGE', KEYS[1], named_id, named_id) > 0 then
        redis.call('XDEL', KEYS[1], id)
      else
        redis.call('HSET', KEYS[2], key, id .. ' ' .. ARGV[i + 2])
      end
      changed = changed + 1
    end
  end
end
local index = redis.call('HGETALL', KEYS[2])
local bytes = 0
for i = 1, #index, 2 do
  local id, size = string.match(index[i + 1], '^(%S+) (%d+)')
  if not id or #redis.call('XRANGE', KEYS[1], id, id) == 0 then  -- none, or its entry gone
    redis.call('HDEL', KEYS[2], index[i])
    changed = changed + 1
  else
    bytes = bytes + tonumber(size)
  end
end
redis.call('HSET', KEYS[3], 'bytes', bytes)
return changed
"""

# KEYS: the turn. ARGV: how long it lasts, in ms. A turn kept for ever (set by hand, or
# copied without its time) or of another kind would be no one's again: taken all the same.
_TURN = """
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return 1 end
if redis.call('PTTL', KEYS[1]) >= 0 and redis.call('TYPE', KEYS[1]).ok == 'string' then
  return 0
end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return 1
"""

# KEYS: marker. ARGV: the rebuild's claim, then 'intact' to mark the stream intact,
# 'release' to give the claim up, or the seconds to extend it by. Only while the marker
# still holds the claim.
_CLAIMED = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == 'intact' then
  redis.call('SET', KEYS[1], '1')
elseif ARGV[2] == 'release' then
  redis.call('DEL', KEYS[1])
else
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return 1
"""
# A rebuild extends its claim at every step; one whose worker died is taken over this soon.
REBUILD_LEASE_S = 30


class DeadLetterQueueFull(TransientError):
    """The DLQ is at its bound: projecting waits until operators make room. `by_count`: the
    bound reached is the number of entries (no new entry fits, however small), not bytes."""

    def __init__(self, message: str, *, by_count: bool) -> None:
        super().__init__(message)
        self.by_count = by_count


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """A dead letter as the DLQ shows it, with the message's bytes: `value` None when it shows
    none of them (`value_missing`); a null value (a tombstone) is `b""` with `tombstone`."""

    letter: DeadLetter
    value: bytes | None
    key: bytes | None
    entry_id: str | None = field(default=None, compare=False)
    tombstone: bool = False
    headers: Headers = ()

    @classmethod
    def of(cls, letter: DeadLetter, message: RawMessage | None) -> StreamEntry:
        if message is None:
            return cls(letter, None, None)
        return cls(letter, message.value or b"", message.key, tombstone=message.value is None,
                   headers=message.headers)

    @property
    def size(self) -> int:
        """The bytes of its message it shows."""
        return len(self.value or b"") + len(self.key or b"") + headers_size(self.headers)

    @property
    def raw(self) -> RawMessage | None:
        """The message as Kafka gave it; None when the entry shows none of its bytes."""
        if self.value is None:
            return None
        return RawMessage(self.key, None if self.tombstone else self.value, self.headers)

    def fields(self) -> dict[str, bytes | str]:
        letter = self.letter
        fields: dict[str, bytes | str] = {
            "dlq_key": letter.dlq_key,
            "value": self.value if self.value is not None else b"",
            "value_missing": "1" if self.value is None else "",
            "topic": letter.position.topic or "",
            "partition": _text_of(letter.position.partition),
            "offset": _text_of(letter.position.offset),
            "event_id": letter.event_id or "",
            "event_type": letter.event_type or "",
            "error_class": letter.error_class,
            "error_message": letter.reason,
            "traceback": letter.traceback or "",
            "attempts": str(letter.attempts),
            "first_failure_at": utc_iso(letter.first_failure_at),
            "last_failure_at": utc_iso(letter.last_failure_at),
            "worker": letter.worker,
            "history": history_json(letter.history),
        }
        if self.key is not None:
            fields["key"] = self.key
        if self.tombstone:
            fields["value_null"] = "1"
        if self.headers:
            fields["headers"] = headers_json(self.headers)
        return fields

    @classmethod
    def from_fields(cls, entry_id: str, fields: dict[bytes, bytes]) -> StreamEntry:
        def text(name: str) -> str:
            return fields.get(name.encode(), b"").decode("utf-8", "replace")

        def number(name: str) -> int | None:
            raw = text(name)
            return int(raw) if raw.isdigit() else None

        def moment(name: str) -> datetime:
            found = datetime.fromisoformat(text(name).replace("Z", "+00:00"))
            if found.utcoffset() is None:  # no worker writes one: not comparable with others
                raise ValueError(f"{name} has no offset from UTC")
            return found

        letter = DeadLetter(
            dlq_key=text("dlq_key"), error_class=text("error_class"),
            reason=text("error_message"), first_failure_at=moment("first_failure_at"),
            last_failure_at=moment("last_failure_at"), worker=text("worker"),
            event_id=text("event_id") or None, event_type=text("event_type") or None,
            position=Position(text("topic") or None, number("partition"), number("offset")),
            traceback=text("traceback") or None, attempts=number("attempts") or 0,
            history=history_from_json(text("history")),
        )
        value = None if text("value_missing") else fields.get(b"value", b"")
        return cls(letter, value, fields.get(b"key"), entry_id,
                   tombstone=value is not None and text("value_null") == "1",
                   headers=_headers(text("headers"), letter.dlq_key))


def _headers(raw: str, dlq_key: str) -> Headers:
    """The headers an entry keeps; none when it keeps none, or none that can be read (said:
    the value, maybe the only copy left once Kafka's retention passed, is kept)."""
    if not raw:
        return ()
    try:
        return headers_from_json(raw)
    except (ValueError, TypeError):
        log.warning("the headers of a DLQ entry cannot be read: shown without them",
                    extra={"dlqKey": dlq_key})
        return ()


def _text_of(number: int | None) -> str:
    return "" if number is None else str(number)


@dataclass(frozen=True, slots=True)
class Filter:
    """Which entries an operation applies to; empty fields match everything."""

    event_type: str | None = None
    error_class: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, entry: StreamEntry) -> bool:
        letter = entry.letter
        return ((self.event_type is None or letter.event_type == self.event_type)
                and (self.error_class is None or letter.error_class == self.error_class)
                and (self.since is None or letter.last_failure_at >= self.since)
                and (self.until is None or letter.last_failure_at <= self.until))


class DeadLetterStream:
    def __init__(self, client: redis.Redis, stream: str, max_entries: int,
                 max_bytes: int) -> None:
        self.client = client
        self.stream = stream
        self.index = f"{stream}:index"
        self.totals = f"{stream}:totals"
        # Set once the stream is known to match SQL; Redis losing its data loses this too.
        self.marker = f"{stream}:intact"
        self.refusal = f"{stream}:refused"  # set as a letter is kept out (`refusing`)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._put = client.register_script(_PUT)
        self._get_keys = client.register_script(_GET_KEYS)
        self._remove = client.register_script(_REMOVE)
        self._mend = client.register_script(_MEND)
        self._total = client.register_script(_TOTAL + "return total(KEYS[1], KEYS[2])")
        self._claimed = client.register_script(_CLAIMED)
        self._turn = client.register_script(_TURN)
        self._waitaof: bool | None = None  # unknown until tried

    def sync_to_disk(self, timeout_ms: int = 1000) -> bool:
        """Wait until what this client wrote is in Redis's append-only file, where Redis can
        say so (7.2+, appendonly on); False where it cannot. The SQL record is the durable
        one either way: this only narrows the window in which the stream lags it."""
        if self._waitaof is False:
            return False
        try:
            self.client.execute_command("WAITAOF", 1, 0, timeout_ms)  # type: ignore[no-untyped-call]
        except redis.ResponseError:  # an older Redis, or one without an append-only file
            self._waitaof = False
            return False
        self._waitaof = True
        return True

    def intact(self) -> bool:
        """False when Redis lost the stream (restarted without persistence, flushed) since
        it was last rebuilt (or while it is being rebuilt): the stream may lack dead letters
        that SQL records as open."""
        return self.client.get(self.marker) in (b"1", "1")

    def claim_rebuild(self, lease_s: int = REBUILD_LEASE_S) -> str | None:
        """The claim of the one caller that should rebuild a lost stream, None for the others:
        the marker holds it while that caller works, and lapses if it dies."""
        claim = f"rebuilding {uuid.uuid4().hex}"
        return claim if self.client.set(self.marker, claim, nx=True, ex=lease_s) else None

    def begin_rebuild(self, lease_s: int = REBUILD_LEASE_S) -> str:
        """Claim a rebuild whatever the marker says (an operator asked for one)."""
        claim = f"rebuilding {uuid.uuid4().hex}"
        self.client.set(self.marker, claim, ex=lease_s)
        return claim

    def mark_intact(self, claim: str) -> bool:
        """Mark the stream rebuilt, if the marker still holds `claim`. Redis restarting during
        the rebuild took the claim with the entries already put back (the client reconnects by
        itself), and a newer rebuild replaces it: either way this one proves nothing."""
        return bool(self._claimed(keys=[self.marker], args=[claim, "intact"]))

    def hold_rebuild(self, claim: str, lease_s: int = REBUILD_LEASE_S) -> bool:
        """Extend the rebuild's lease while it works; False once it lost the claim (Redis
        restarted, or another rebuild began), when it must stop."""
        return bool(self._claimed(keys=[self.marker], args=[claim, str(lease_s)]))

    def release_rebuild(self, claim: str) -> None:
        """Give up a rebuild that failed, so that the next worker to look starts another
        at once rather than when the lease ends."""
        self._claimed(keys=[self.marker], args=[claim, "release"])

    def forget_intact(self) -> None:
        """Have the stream rebuilt whole, by the next worker that looks."""
        self.client.delete(self.marker)

    def mend(self) -> int:
        """Make the stream, its index and its total agree again after a hand edit (XDEL,
        XADD, HDEL from redis-cli), keeping the bytes every dead letter's entry shows (past
        Kafka's retention, the only copy): an entry that is no dead letter is deleted, one
        whose index line was lost indexed again, keys whose entry is gone dropped, the
        bytes counted again. How many were out of step. Beside puts and removes: the index
        is read after the stream, so an entry put meanwhile is named; and the script
        decides each entry and key on what it finds then, atomically."""
        unread: list[str] = []  # entries that are no dead letter
        read: dict[str, tuple[str, int]] = {}  # entry id → (dlq key, size)
        low = "-"
        while chunk := cast(Any, self.client.xrange(self.stream, min=low, max="+", count=500)):
            for raw_id, fields in chunk:
                entry_id = decoded(raw_id)
                entry = _dead_letter(entry_id, fields)
                key = entry.letter.dlq_key if entry is not None else ""
                if key:
                    read[entry_id] = (key, sum(len(name) + len(value)
                                               for name, value in fields.items()))
                else:
                    unread.append(entry_id)
            low = f"({decoded(chunk[-1][0])}"
        if unread:
            self.client.xdel(self.stream, *unread)
        named = {decoded(value).split(" ")[0] for value in self.client.hvals(self.index)}
        # Newest first: of two entries of one key that no line names, the later is kept.
        lost = [str(part) for entry_id, (key, size) in reversed(read.items())
                if entry_id not in named for part in (key, entry_id, size)]
        return len(unread) + int(self._mend(keys=[self.stream, self.index, self.totals],
                                            args=lost))

    def take_turn(self, task: str, every_s: float) -> bool:
        """True for one caller per `every_s` across every process: who does `task` now."""
        return bool(self._turn(keys=[f"{self.stream}:turn:{task}"], args=[int(every_s * 1000)]))

    def put(self, entry: StreamEntry) -> str:
        """Add or replace the entry of `entry.letter.dlq_key`; its entry id."""
        flat: list[bytes | str] = []
        size = 0  # in bytes, as Redis holds them: text counted once encoded
        for name, value in entry.fields().items():
            data = value.encode() if isinstance(value, str) else value
            flat.extend((name, data))
            size += len(name) + len(data)
        if size > self.max_bytes and (entry.value is not None or entry.key is not None):
            # It could never enter, and would hold back every dead letter after it: it enters
            # without its message's value and headers (then its key too, if need be), which
            # stay in Kafka at its position.
            log.error("dead letter larger than DLQ_MAX_BYTES: shown without its message",
                      extra={"dlqKey": entry.letter.dlq_key, "dlqEntryBytes": size,
                             "dlqMaxBytes": self.max_bytes})
            smaller = StreamEntry(entry.letter, None, entry.key if entry.value is not None
                                  else None)
            return self.put(smaller)
        entry_id, entries, total = self._put(
            keys=[self.stream, self.index, self.totals],
            args=[entry.letter.dlq_key, self.max_entries, self.max_bytes, size,
                  entry.letter.revision, *flat])
        if not entry_id:
            self.client.set(self.refusal, "1", ex=REFUSAL_KEPT_S)
            raise DeadLetterQueueFull(
                f"dead-letter queue {self.stream} is full: this entry would make it {entries} "
                f"entries, {total} bytes (bounds {self.max_entries} entries, {self.max_bytes} "
                "bytes): replay or purge entries, or raise DLQ_MAX_ENTRIES / DLQ_MAX_BYTES",
                by_count=int(entries) > self.max_entries)
        if entries >= self.max_entries * WARN_RATIO or total >= self.max_bytes * WARN_RATIO:
            log.warning("dead-letter queue near its bound", extra={
                "dlqDepth": entries, "dlqBytes": total, "dlqMaxEntries": self.max_entries,
                "dlqMaxBytes": self.max_bytes})
        return decoded(entry_id)

    def holding(self, dlq_keys: list[str]) -> set[str]:
        """Those of these keys that have an entry (one round trip)."""
        if not dlq_keys:
            return set()
        named = self.client.hmget(self.index, dlq_keys)
        return {key for key, line in zip(dlq_keys, named, strict=True) if line is not None}

    def standing(self, dlq_keys: list[str]) -> tuple[set[str], bool]:
        """`holding` these keys (at least one), and whether it is `refusing`, in one round
        trip."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(self.index, dlq_keys)
        pipe.exists(self.refusal)
        named, refused = pipe.execute()
        return ({key for key, line in zip(dlq_keys, named, strict=True) if line is not None},
                bool(refused))

    def remove(self, *dlq_keys: str) -> int:
        """Remove the entries of these keys (one round trip); how many were there."""
        if not dlq_keys:
            return 0
        return int(self._remove(keys=[self.stream, self.index, self.totals],
                                args=list(dlq_keys)))

    def depth(self) -> int:
        return int(self.client.xlen(self.stream))

    def size_bytes(self) -> int:
        return self._bytes(self.client.hget(self.totals, "bytes"))

    def refusing(self) -> bool:
        """Whether it kept a dead letter out, its bounds reached, within `REFUSAL_KEPT_S`:
        the projection tries again at each round, so while it is full this holds."""
        return bool(self.client.exists(self.refusal))

    def fill(self) -> tuple[int, int]:
        """`depth` and `size_bytes`, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        pipe.xlen(self.stream)
        pipe.hget(self.totals, "bytes")
        depth, size = pipe.execute()
        return int(depth), self._bytes(size)

    def _bytes(self, total: bytes | str | None) -> int:
        """The total of bytes read; counted again from the index where it is no number (as
        the scripts take one: digits only)."""
        said = decoded(total or b"0")
        if _DIGITS.fullmatch(said):
            return int(said)
        return int(self._total(keys=[self.index, self.totals]))

    def keys(self) -> set[str]:
        """The DLQ keys the stream holds."""
        return {decoded(key) for key in self.client.hkeys(self.index)}

    def sizes(self) -> tuple[int, int]:
        """Entries in the stream, keys in its index: equal unless someone edited one of them
        by hand (an XDEL from redis-cli)."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.xlen(self.stream)
            pipe.hlen(self.index)
            entries, indexed = pipe.execute()
        return int(entries), int(indexed)

    def server_time(self) -> datetime:
        """The Redis server's clock: the one reference every worker and operator shares."""
        seconds, microseconds = self.client.time()
        return datetime.fromtimestamp(seconds + microseconds / 1e6, UTC)

    def revisions(self, keys: Sequence[str] | None = None) -> dict[str, int | None]:
        """The revision of each key's entry, or of those of `keys` the stream holds, from the
        index (None for an entry put before the index held revisions)."""
        lines = (self.client.hgetall(self.index).items() if keys is None else
                 zip(keys, self.client.hmget(self.index, keys) if keys else (), strict=True))
        found: dict[str, int | None] = {}
        for key, value in lines:
            if value is not None:
                parts = decoded(value).split(" ")
                found[decoded(key)] = int(parts[2]) if len(parts) > 2 else None
        return found

    def get(self, entry_id: str) -> StreamEntry | None:
        if ENTRY_ID.fullmatch(entry_id) is None:
            return None  # not a stream id: no such entry, rather than a Redis error
        found: Any = self.client.xrange(self.stream, min=entry_id, max=entry_id, count=1)
        return self._entry(found[0][0], found[0][1]) if found else None

    def get_key(self, dlq_key: str) -> StreamEntry | None:
        indexed = self.client.hget(self.index, dlq_key)
        return self.get(decoded(indexed).split(" ")[0]) if indexed else None

    def find_event(self, event_id: str) -> list[StreamEntry]:
        return [entry for entry in self.scan() if entry.letter.event_id == event_id]

    def get_keys(self, dlq_keys: Sequence[str]) -> list[StreamEntry]:
        """The entries of these keys that the stream holds, in the order asked (one round
        trip)."""
        if not dlq_keys:
            return []
        found: Any = self._get_keys(keys=[self.stream, self.index], args=list(dlq_keys))
        return [entry for raw_id, flat in found if (entry := self._entry(
            raw_id, dict(zip(flat[::2], flat[1::2], strict=True)))) is not None]

    def scan(self, where: Filter = Filter(), after: str | None = None) -> Iterator[StreamEntry]:
        """Entries in the order they entered the stream, matching `where`, after entry id
        `after`. The times of `where` are the letters' last failures, read from each entry:
        an entry's id is when it entered the stream, which a rebuild after Redis lost it
        makes any time later, and the Redis server's clock besides."""
        low = f"({after}" if after else "-"
        while True:
            chunk: Any = self.client.xrange(self.stream, min=low, max="+", count=500)
            if not chunk:
                return
            for raw_id, fields in chunk:
                entry = self._entry(raw_id, fields)
                if entry is not None and where.matches(entry):
                    yield entry
            low = f"({decoded(chunk[-1][0])}"

    def _entry(self, raw_id: bytes | str, fields: dict[bytes, bytes]) -> StreamEntry | None:
        """The entry as a dead letter; None for one that is none (added with redis-cli's
        XADD), which is left out and has the stream rebuilt (`mend` takes it out)."""
        entry = _dead_letter(decoded(raw_id), fields)
        if entry is None:
            log.warning("DLQ stream entry %s is no dead letter (added by hand?): left out, "
                        "and the stream rebuilt", decoded(raw_id))
            self.forget_intact()
        return entry

    def page(self, where: Filter = Filter(), after: str | None = None, limit: int = 50,
             max_bytes: int = PAGE_MAX_BYTES) -> Page:
        """Up to `limit` entries after `after`, and no more once their messages passed
        `max_bytes` (the first whatever its size): a page of large poison messages must not
        make an answer of hundreds of megabytes."""
        entries: list[StreamEntry] = []
        size = 0
        for entry in self.scan(where, after):
            if len(entries) >= limit or (entries and size + entry.size > max_bytes):
                return Page(entries, more=True)
            entries.append(entry)
            size += entry.size
        return Page(entries, more=False)


class Page(NamedTuple):
    entries: list[StreamEntry]
    more: bool  # entries follow that the page left out


def _dead_letter(entry_id: str, fields: dict[bytes, bytes]) -> StreamEntry | None:
    """The entry as a dead letter; None if it is none (a time, a number or the history
    unreadable: added by hand)."""
    try:
        return StreamEntry.from_fields(entry_id, fields)
    except (ValueError, TypeError):
        return None

