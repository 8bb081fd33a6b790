"""A replay by filter that spans calls: the API's bulk replay, a call at a time, by a cursor.

Its first call notes in Redis the keys of the entries that match then, in the stream's order
(`{stream}:replay:{cursor}`, a sorted set), each with its last failure as it was then (`:at`),
and the selection it was begun with (`:of`); each call replays the first of them, and drops
those it is done with whatever became of them (replayed, refused, without bytes, another
replay's), so that calls made again go on past them and end. By key rather than by place in
the stream: a rebuild of the stream, or the projection putting an entry back, gives it a new
id, not a new key. An entry whose last failure changed since (it failed again) is passed over
and dropped: it is left for a later replay, as is every key the replay does not hold. One
call of a replay runs at a time (`hold`). A replay not called for `KEEP_S` is forgotten.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

import redis

from eventpipe.dlq.stream import DeadLetterStream, Filter, StreamEntry
from eventpipe.errors import TransientError
from eventpipe.redis_clients import decoded

KEEP_S = 3600
CURSOR_BYTES = 16  # a cursor is their URL-safe base64: 22 characters
_PAGE = 500
FULL = ("Redis is at its memory bound: the replay could not be noted; free memory, or replay "
        "a narrower selection")

# KEYS: the hold. ARGV: its holder's token. Gives it back only if it is still that holder's.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def selection_of(where: Filter) -> str:
    """The filter as one text, its times in UTC: what a later call must send again."""
    def when(moment: datetime | None) -> str | None:
        return None if moment is None else moment.astimezone(UTC).isoformat()

    return json.dumps([where.event_type, where.error_class, when(where.since),
                       when(where.until)])


class Replays:
    def __init__(self, stream: DeadLetterStream) -> None:
        self.stream = stream
        self.client = stream.client
        self.passed = 0  # entries `entries` passed over: their last failure changed
        self._release = self.client.register_script(_RELEASE)

    def begin(self, where: Filter) -> str:
        """Note the keys of the entries matching `where` now; the new replay's cursor. A
        Redis at its memory bound refuses it (a `TransientError`), leaving nothing behind."""
        cursor = secrets.token_urlsafe(CURSOR_BYTES)
        keys = self._keys(cursor)
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.set(f"{keys}:of", selection_of(where), ex=KEEP_S)
                places: dict[str, int] = {}
                failed: dict[Any, Any] = {}  # redis-py's mapping type
                for place, entry in enumerate(self.stream.scan(where)):
                    places[entry.letter.dlq_key] = place
                    failed[entry.letter.dlq_key] = entry.letter.last_failure_at.isoformat()
                    if len(places) >= _PAGE:
                        pipe.zadd(keys, places, nx=True)
                        pipe.hset(f"{keys}:at", mapping=failed)
                        places, failed = {}, {}
                if places:
                    pipe.zadd(keys, places, nx=True)
                    pipe.hset(f"{keys}:at", mapping=failed)
                for key in (keys, f"{keys}:at"):
                    pipe.expire(key, KEEP_S)
                pipe.execute()
        except Exception as exc:
            self.end(cursor)  # deletions, which a full Redis still takes
            if isinstance(exc, redis.exceptions.OutOfMemoryError):
                raise TransientError(FULL) from exc
            raise
        return cursor

    def selection(self, cursor: str) -> str | None:
        """The selection the replay was begun with (`selection_of`); None when there is no
        such replay (it ended, or was forgotten)."""
        found = self.client.get(f"{self._keys(cursor)}:of")
        return None if found is None else decoded(found)

    def hold(self, cursor: str, for_s: float) -> str | None:
        """Take the replay for one call, for `for_s` at most; the token that gives it back,
        None while another call has it."""
        token = secrets.token_hex(8)
        try:
            taken = self.client.set(f"{self._keys(cursor)}:held", token, nx=True,
                                    px=int(for_s * 1000))
        except redis.exceptions.OutOfMemoryError as exc:
            raise TransientError(FULL) from exc
        return token if taken else None

    def release(self, cursor: str, token: str) -> None:
        self._release(keys=[f"{self._keys(cursor)}:held"], args=[token])

    def entries(self, cursor: str) -> Iterator[StreamEntry]:
        """The entries left to replay, in order; those no longer in the stream, or whose last
        failure changed, are dropped as they are found (the latter counted in `passed`)."""
        keys = self._keys(cursor)
        low = "-inf"
        while True:
            found: Any = self.client.zrangebyscore(keys, low, "+inf", start=0, num=_PAGE,
                                                   withscores=True)
            if not found:
                return
            page = [decoded(key) for key, _ in found]
            noted = dict(zip(page, self.client.hmget(f"{keys}:at", page), strict=True))
            entries = self.stream.get_keys(page)
            held = [entry for entry in entries
                    if (at := noted[entry.letter.dlq_key]) is not None
                    and decoded(at) == entry.letter.last_failure_at.isoformat()]
            self.passed += len(entries) - len(held)
            if dropped := set(page) - {entry.letter.dlq_key for entry in held}:
                self._drop(keys, dropped)
            yield from held
            low = f"({found[-1][1]!r}"

    def taken(self, cursor: str, entries: Iterable[StreamEntry]) -> None:
        """Drop what a call is done with, and keep the replay for `KEEP_S` more."""
        keys = self._keys(cursor)
        self._drop(keys, {entry.letter.dlq_key for entry in entries})
        with self.client.pipeline(transaction=False) as pipe:
            for key in (keys, f"{keys}:at", f"{keys}:of"):
                pipe.expire(key, KEEP_S)
            pipe.execute()

    def end(self, cursor: str) -> None:
        keys = self._keys(cursor)
        self.client.delete(keys, f"{keys}:at", f"{keys}:of")

    def _drop(self, keys: str, dlq_keys: set[str]) -> None:
        if dlq_keys:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.zrem(keys, *dlq_keys)
                pipe.hdel(f"{keys}:at", *dlq_keys)
                pipe.execute()

    def _keys(self, cursor: str) -> str:
        return f"{self.stream.stream}:replay:{cursor}"

