"""Events for tests: a fixed clock, and wire-format messages turned into deliveries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import count

from eventpipe.effects import Delivery, Position
from eventpipe.events import parse_event
from eventpipe.samples import Document, encode

T0 = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
_offsets = count()


def at(seconds: float) -> datetime:
    """`seconds` after T0."""
    return T0 + timedelta(seconds=seconds)


def deliveries(*messages: tuple[str, Document], partition: int = 3) -> list[Delivery]:
    """Validated events as the workers get them, each at its own Kafka offset."""
    return [
        Delivery(parse_event(encode(doc), key), Position("events", partition, next(_offsets)))
        for key, doc in messages
    ]
