"""A Kafka message as Kafka gave it, for its dead letter: key, value and headers.

A null value (a tombstone, which a compacted topic reads as "delete this key") is not an empty
one, and a replay must give back both, and the headers, as they were: other consumers of the
topic read them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

# (name, value) pairs in Kafka's order; a name may repeat, a value may be null.
Headers = tuple[tuple[str, bytes | None], ...]


class Message(NamedTuple):
    key: bytes | None
    value: bytes | None  # None: a tombstone
    headers: Headers = ()


def headers_of(raw: Any) -> Headers:
    """The headers as the Kafka client gives them (a list of pairs, or None) or as they
    travel in a task (lists), as `Headers`."""
    return tuple((str(name), value if isinstance(value, bytes) or value is None
                  else str(value).encode()) for name, value in raw or ())


def headers_size(headers: Headers) -> int:
    return sum(len(name) + len(value or b"") for name, value in headers)
