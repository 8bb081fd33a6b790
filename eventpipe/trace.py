"""`eventpipe trace <eventId>`: an event's life, from what the system holds about it.

The applied-events ledger says where in Kafka the event was read and when it was applied
(or found stale); the DLQ holds every failed episode with its attempts; Kafka itself gives
back the message at that position. Logs carry the same `eventId` for the step-by-step story.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, select

from eventpipe.dlq import DeadLetter, DeadLetterQueue
from eventpipe.tables import applied_events

FetchMessage = Callable[[str, int, int], bytes | None]


@dataclass(frozen=True, slots=True)
class Trace:
    event_id: str
    applied: dict[str, Any] | None
    dead_letters: list[DeadLetter]
    message: bytes | None

    @property
    def found(self) -> bool:
        return self.applied is not None or bool(self.dead_letters)


def gather(event_id: str, engine: Engine, dlq: DeadLetterQueue,
           fetch: FetchMessage | None = None) -> Trace:
    with engine.connect() as conn:
        row = conn.execute(select(applied_events).where(applied_events.c.event_id == event_id)
                           ).first()
    applied = dict(row._mapping) if row is not None else None
    letters = dlq.find_event(event_id)
    message = None
    if fetch is not None:
        position = _position(applied, letters)
        if position is not None:
            message = fetch(*position)
    return Trace(event_id, applied, letters, message)


def _position(applied: dict[str, Any] | None,
              letters: list[DeadLetter]) -> tuple[str, int, int] | None:
    if applied and applied["kafka_topic"] is not None:
        return applied["kafka_topic"], applied["kafka_partition"], applied["kafka_offset"]
    for letter in letters:
        if letter.topic and letter.partition is not None and letter.offset is not None:
            return letter.topic, letter.partition, letter.offset
    return None


def render(trace: Trace) -> str:
    lines = [f"event {trace.event_id}"]
    if not trace.found:
        lines.append("  not applied and not in the dead-letter queue: not yet consumed, "
                     "waiting for a retry, or never sent")
        return "\n".join(lines)
    if trace.applied:
        a = trace.applied
        lines.append(f"  kafka     {a['kafka_topic']} partition {a['kafka_partition']} "
                     f"offset {a['kafka_offset']}")
        lines.append(f"  occurred  {a['occurred_at'].isoformat()}")
        lines.append(f"  {a['outcome']:9s} {a['applied_at'].isoformat()}  ({a['event_type']})")
    for letter in trace.dead_letters:
        lines.append(f"  dead-lettered {letter.last_failure_at.isoformat()} entry "
                     f"{letter.entry_id}: {letter.error_class}: {letter.error_message}")
        lines.append(f"    at {letter.topic} partition {letter.partition} offset "
                     f"{letter.offset}; {letter.attempts} attempt(s) since "
                     f"{letter.first_failure_at.isoformat()} on {letter.worker}")
        for failure in letter.history:
            lines.append(f"    earlier: {failure.error_class}: {failure.error_message} "
                         f"({failure.attempts} attempt(s), replayed {failure.replayed_at})")
    if trace.message is not None:
        try:
            body = json.dumps(json.loads(trace.message), indent=2)
        except ValueError:
            body = repr(trace.message)
        lines.append("  message:")
        lines.extend(f"    {line}" for line in body.splitlines())
    return "\n".join(lines)
