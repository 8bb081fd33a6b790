"""A replay by filter that spans calls: the API's bulk replay, a call at a time, by a cursor.

Its first call notes in Redis the keys of the entries that match then, in the stream's order
(`{stream}:replay:{cursor}`, a sorted set, with the selection it was made for beside it);
each call replays the first of them, and drops those it took whatever became of them
(replayed, refused, without bytes, another replay's), so that calls made again go on past
them and end. By key rather than by place in the stream: a rebuild of the stream gives its
entries new ids, not new keys. An entry that fails again after the replay began is a key it
already took, or none it holds: it is left for a later replay. A replay not called for
`KEEP_S` is forgotten.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from typing import Any

from eventpipe.dlq.stream import DeadLetterStream, Filter, StreamEntry

KEEP_S = 3600
CURSOR_BYTES = 16  # a cursor is their URL-safe base64: 22 characters
_PAGE = 500


class Replays:
    def __init__(self, stream: DeadLetterStream) -> None:
        self.stream = stream
        self.client = stream.client

    def begin(self, where: Filter) -> str:
        """Note the keys of the entries matching `where` now; the new replay's cursor."""
        cursor = secrets.token_urlsafe(CURSOR_BYTES)
        keys = self._keys(cursor)
        with self.client.pipeline(transaction=False) as pipe:
            pipe.set(f"{keys}:of", repr(where), ex=KEEP_S)
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
        return cursor

    def of(self, cursor: str) -> str | None:
        """The selection (`repr` of its `Filter`) the replay was begun for; None when there
        is no such replay (it ended, or was forgotten)."""
        found = self.client.get(f"{self._keys(cursor)}:of")
        return None if found is None else _text(found)

    def entries(self, cursor: str) -> Iterator[StreamEntry]:
        """The entries left to replay, in order; those no longer in the stream are dropped as
        they are found gone."""
        keys = self._keys(cursor)
        low = "-inf"
        while True:
            found: Any = self.client.zrangebyscore(keys, low, "+inf", start=0, num=_PAGE,
                                                   withscores=True)
            if not found:
                return
            page = [_text(key) for key, _ in found]
            held = self.stream.get_keys(page)
            if gone := set(page) - {entry.letter.dlq_key for entry in held}:
                self.client.zrem(keys, *gone)
            yield from held
            low = f"({found[-1][1]!r}"

    def taken(self, cursor: str, entries: Iterable[StreamEntry]) -> None:
        """Drop what a call took, and keep the replay for `KEEP_S` more."""
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
