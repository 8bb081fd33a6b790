"""Test data: a fixed clock, wire-format messages turned into received events, dead letters."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from itertools import count
from typing import Any

from eventpipe.dlq.letter import DeadLetter
from eventpipe.dlq.stream import StreamEntry
from eventpipe.effects import Position, Received
from eventpipe.events import parse_event
from eventpipe.samples import Document, encode

T0 = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
_offsets = count()


def at(seconds: float) -> datetime:
    """`seconds` after T0."""
    return T0 + timedelta(seconds=seconds)


def received(*messages: tuple[str, Document], partition: int = 3) -> list[Received]:
    """Validated events as the workers get them, each at its own Kafka offset."""
    return [Received.of(parse_event(encode(doc), key),
                        Position("events", partition, next(_offsets)))
            for key, doc in messages]


def dead_letter(offset: int, event_type: str = "OrderPlaced", error: str = "InvalidEvent", *,
                value: bytes | None = None, topic: str = "events") -> StreamEntry:
    """A dead letter of the message at `offset`, with every field filled, as the DLQ shows it."""
    letter = DeadLetter(
        dlq_key=f"m:{offset:032x}", error_class=error, reason="data.x: is required",
        first_failure_at=T0, last_failure_at=T0 + timedelta(seconds=1), worker="host:1",
        event_id=f"e-{offset}", event_type=event_type, position=Position(topic, 0, offset),
        traceback="Traceback …", attempts=1)
    return StreamEntry(letter, f'{{"n": {offset}}}'.encode() if value is None else value,
                       f"k-{offset}".encode())


DELETE = object()  # for `mutated`: remove the field instead of setting it


def mutated(document: Document, path: str, value: Any) -> Document:
    """A deep copy of `document` with the field at `path` ("data.items.0.sku") set to `value`,
    or removed when `value` is `DELETE`."""
    copy: Document = json.loads(json.dumps(document))
    target: Any = copy
    *parents, last = path.split(".")
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    index: Any = int(last) if isinstance(target, list) else last
    if value is DELETE:
        del target[index]
    else:
        target[index] = value
    return copy
