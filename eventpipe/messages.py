"""A Kafka message as Kafka gave it, for its dead letter: key, value and headers.

A null value (a tombstone, which a compacted topic reads as "delete this key") is not an empty
one, and a replay must give back both, and the headers, as they were: other consumers of the
topic read them.
"""

from __future__ import annotations

import base64
import json
import logging
import operator
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

# (name, value) pairs in Kafka's order; a name may repeat, a value may be null.
Headers = tuple[tuple[str, bytes | None], ...]


class RawMessage(NamedTuple):
    key: bytes | None
    value: bytes | None  # None: a tombstone
    headers: Headers = ()


def headers_of(raw: Any) -> Headers:
    """The headers as the Kafka client gives them (a list of pairs, or None) or as they
    travel in a task (lists), as `Headers`."""
    return tuple((str(name), None if value is None else bytes(value)) for name, value in raw or ())


# `record.headers()` written as a call: CPython's specialised method calls (3.11+) skip the
# check that turns "a result with an exception set" into SystemError, so the client's
# decoding error would surface later, outside any handler, or the list it hands back (a
# header holding no name) be touched: a crash. Called through `methodcaller`, it is checked.
_HEADERS = operator.methodcaller("headers")


def read_headers(record: Any) -> Headers:
    """A consumed message's headers. The Kafka client decodes their names as UTF-8 and fails
    for one that is not (Kafka's protocol has them as bytes: a producer of another client may
    send any): the message is then kept without them, said in the log, rather than never
    read. It fails with `SystemError` (the decoding's error set under it), so whatever it
    raises is taken so; and it is asked once only: asked again, it hands back a name it
    could not make."""
    try:
        raw = _HEADERS(record)
        return headers_of(raw) if raw else ()
    except Exception as exc:
        log.warning("headers of %s [%s] offset %s cannot be read: kept without them: %s",
                    record.topic(), record.partition(), record.offset(), exc)
        return ()


def headers_json(headers: Headers) -> str:
    """As the DLQ keeps them: JSON, `[[name, base64 or null], …]` in Kafka's order."""
    return json.dumps([[name, None if value is None else base64.b64encode(value).decode()]
                       for name, value in headers])


def headers_from_json(raw: str) -> Headers:
    """What `headers_json` wrote; ValueError or TypeError for anything else."""
    return tuple((str(name), None if value is None else base64.b64decode(value))
                 for name, value in json.loads(raw))


def headers_size(headers: Headers) -> int:
    """Their size in bytes, names as UTF-8."""
    return sum(len(name.encode()) + len(value or b"") for name, value in headers)
