"""A dead letter: one failed (or held) event or message, with everything needed to explain it.

One dead letter per failed event, named by its DLQ key: `e:<fingerprint>` for a message that
is a valid event (its fingerprint covers the event id and the payload), `m:<fingerprint>` for
bytes that are not, `u:<fingerprint of its position>` for a message Kafka could not hand over
(its record batch cannot be decoded: no bytes name it). The same event failing again — a
duplicate message, a redelivery, a replay — updates its dead letter instead of adding another.

States:
- `waiting`: held by a rule that waits (an order for its user), not shown yet; it enters the
  DLQ (`open`) after the parking time if its condition has not cleared;
- `open`: in the dead-letter queue, shown to operators;
- `replaying`: claimed by a replay, being published back to Kafka;
- `replayed`, `purged`: taken out of the DLQ by an operator;
- `resolved`: its condition cleared by itself (the parent arrived, the email was freed), the
  event it was about was superseded by a newer version of its entity, or (for an event given
  up on its own) a copy of that event has had a fate since (applied, or stale).
A dead letter that fails again after leaving the DLQ keeps its earlier life as an `Episode`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from eventpipe.effects import Position
from eventpipe.errors import InvalidEvent
from eventpipe.events import Event, message_fingerprint, parse_event, position_fingerprint

WAITING = "waiting"
OPEN = "open"
REPLAYING = "replaying"
REPLAYED = "replayed"
PURGED = "purged"
RESOLVED = "resolved"
# States of a dead letter that is not in the DLQ and has not failed since.
CLOSED = frozenset({REPLAYED, PURGED, RESOLVED})

# Failures of a message, decided by the pipeline itself (not by a rule that spans keys).
INVALID_EVENT = "InvalidEvent"
ID_REUSED = "IdReused"
WORKER_CRASHED = "WorkerCrashed"
UNREADABLE_MESSAGE = "UnreadableMessage"


def event_key(fingerprint: str) -> str:
    return f"e:{fingerprint}"


def message_key(key: bytes | None, value: bytes | None) -> str:
    return f"m:{message_fingerprint(key, value)}"


def unreadable_key(topic: str, topic_id: str, partition: int, offset: int) -> str:
    return f"u:{position_fingerprint(topic, topic_id, partition, offset)}"


def key_of(event: Event | None, key: bytes | None, value: bytes | None) -> str:
    """The DLQ key of a message: its event's when it is one, else its bytes'."""
    return event_key(event.fingerprint) if event is not None else message_key(key, value)


def made_of(dlq_key: str, key: bytes | None, value: bytes | None) -> bool:
    """Whether the message (key, value) is one a dead letter of `dlq_key` can be about: the
    same bytes, or the same event. Bytes read back from Kafka by position are checked so: a
    topic made anew (a fresh broker, a recreated topic) holds other messages at the same
    offsets."""
    if dlq_key == message_key(key, value):
        return True
    if not dlq_key.startswith("e:"):
        return False
    try:
        return dlq_key == event_key(parse_event(value, key).fingerprint)
    except InvalidEvent:
        return False


@dataclass(frozen=True, slots=True)
class Episode:
    """An earlier life of a dead letter: how it failed, and how it left the DLQ."""

    error_class: str
    reason: str
    attempts: int
    first_failure_at: str
    last_failure_at: str
    worker: str
    ended: str  # replayed, purged or resolved
    ended_at: str

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Episode:
        return cls(str(raw["error_class"]), str(raw["reason"]), int(raw["attempts"]),
                   str(raw["first_failure_at"]), str(raw["last_failure_at"]),
                   str(raw["worker"]), str(raw["ended"]), str(raw["ended_at"]))


@dataclass(frozen=True, slots=True)
class DeadLetter:
    dlq_key: str
    error_class: str
    reason: str
    first_failure_at: datetime
    last_failure_at: datetime
    worker: str
    event_id: str | None = None
    event_type: str | None = None
    position: Position = field(default_factory=Position)
    traceback: str | None = None
    attempts: int = 1
    state: str = OPEN
    # For an event held by a rule that spans keys: its entity and what it waits for.
    entity_kind: str | None = None
    entity_key: str | None = None
    parent_kind: str | None = None
    parent_key: str | None = None
    deadline: datetime | None = None
    history: tuple[Episode, ...] = ()
    revision: int = 0
    # The state before the change that saved this letter (None: it is new), as the save
    # returns it; not stored. What a worker says and counts of the change follows from it.
    was: str | None = field(default=None, compare=False)

    @property
    def entered(self) -> bool:
        """The change that saved it put it in the DLQ: open now, and new, waiting or closed
        before. A replay's claim that ends unpublished or lapses (replaying → open) is the
        letter coming back, not a new entry."""
        return self.state == OPEN and self.was not in (OPEN, REPLAYING)

    @property
    def parked(self) -> bool:
        """The change that saved it began its wait for a parent."""
        return self.state == WAITING and self.was != WAITING


def history_json(history: tuple[Episode, ...]) -> str:
    return json.dumps([asdict(episode) for episode in history])


def history_from_json(raw: str | None) -> tuple[Episode, ...]:
    """Episodes written by this module; anything else reads as no history, never an error."""
    try:
        return tuple(Episode.from_json(item) for item in json.loads(raw or "[]"))
    # Overflow: a count of 1e400; recursion: arrays nested past the interpreter's bound.
    except (ValueError, TypeError, KeyError, ArithmeticError, RecursionError):
        return ()
