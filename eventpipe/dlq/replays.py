"""A replay by filter that spans calls: the API's bulk replay, a call at a time, by a cursor.

Its first call notes in Redis the keys of the entries that match then, in the stream's order
(`{stream}:replay:{cursor}`, a sorted set, with the selection and the time it began beside
it); each call replays the first of them, and drops those it is done with whatever became of
them (replayed, refused, without bytes), so that calls made again go on past them and end.
By key rather than by place in the stream: a rebuild of the stream, or the projection putting
an entry back, gives it a new id, not a new key. An entry that failed again since the replay
began (its last failure is later) is dropped too: it is left for a later replay, as is every
key the replay does not hold. One call of a replay runs at a time (`hold`). A replay not
called for `KEEP_S` is forgotten.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from eventpipe.dlq.stream import DeadLetterStream, Filter, StreamEntry
from eventpipe.errors import TransientError

KEEP_S = 3600
CURSOR_BYTES = 16  # a cursor is their URL-safe base64: 22 characters
_PAGE = 500


@dataclass(frozen=True, slots=True)
class Begun:
    selection: str  # `selection_of` the filter it was begun with
    at: datetime


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

    def begin(self, where: Filter, at: datetime) -> str:
        """Note the keys of the entries matching `where` now; the new replay's cursor. A
        Redis at its memory bound refuses it (a `TransientError`), leaving nothing behind."""
        cursor = secrets.token_urlsafe(CURSOR_BYTES)
        keys = self._keys(cursor)
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.set(f"{keys}:of", json.dumps([selection_of(where), at.isoformat()]),
                         ex=KEEP_S)
                page: dict[str, int] = {}
                for place, entry in enumerate(self.stream.scan(where)):
                    page[entry.letter.dlq_key] = place
                    if len(page) >= _PAGE:
                        pipe.zadd(keys, page, nx=True)
                        page = {}
                if page:
                    pipe.zadd(keys, page, nx=True)
                pipe.expire(keys, KEEP_S)
                pipe.execute()
        except Exception as exc:
            self.end(cursor)  # a deletion, which a full Redis still takes
            if isinstance(exc, redis.ResponseError) and str(exc).startswith("OOM"):
                raise TransientError("Redis is at its memory bound: the replay's entries "
                                     "could not be noted; free memory, or replay a narrower "
                                     "selection") from exc
            raise
        return cursor

    def begun(self, cursor: str) -> Begun | None:
        """What the replay was begun with; None when there is no such replay (it ended, or
        was forgotten)."""
        found = self.client.get(f"{self._keys(cursor)}:of")
        if found is None:
            return None
        chosen, at = json.loads(found)
        return Begun(chosen, datetime.fromisoformat(at))

    def hold(self, cursor: str, for_s: float) -> bool:
        """Take the replay for one call, for `for_s` at most (a call the HTTP server killed
        gives it back then); False while another call has it."""
        return bool(self.client.set(f"{self._keys(cursor)}:held", 1, nx=True,
                                    px=int(for_s * 1000)))

    def release(self, cursor: str) -> None:
        self.client.delete(f"{self._keys(cursor)}:held")

    def entries(self, cursor: str, since: datetime) -> Iterator[StreamEntry]:
        """The entries left to replay, in order; those no longer in the stream, or whose
        last failure is later than `since`, are dropped as they are found."""
        keys = self._keys(cursor)
        low = "-inf"
        while True:
            found: Any = self.client.zrangebyscore(keys, low, "+inf", start=0, num=_PAGE,
                                                   withscores=True)
            if not found:
                return
            page = [_text(key) for key, _ in found]
            held = [entry for entry in self.stream.get_keys(page)
                    if entry.letter.last_failure_at <= since]
            if dropped := set(page) - {entry.letter.dlq_key for entry in held}:
                self.client.zrem(keys, *dropped)
            yield from held
            low = f"({found[-1][1]!r}"

    def taken(self, cursor: str, entries: Iterable[StreamEntry]) -> None:
        """Drop what a call is done with, and keep the replay for `KEEP_S` more."""
        keys = self._keys(cursor)
        with self.client.pipeline(transaction=False) as pipe:
            if dlq_keys := [entry.letter.dlq_key for entry in entries]:
                pipe.zrem(keys, *dlq_keys)
            pipe.expire(keys, KEEP_S)
            pipe.expire(f"{keys}:of", KEEP_S)
            pipe.execute()

    def end(self, cursor: str) -> None:
        keys = self._keys(cursor)
        self.client.delete(keys, f"{keys}:of")

    def _keys(self, cursor: str) -> str:
        return f"{self.stream.stream}:replay:{cursor}"


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw
