"""`eventpipe trace <eventId>`: an event's life, from what the system holds about it.

`applied_events` says where in Kafka the event was read, when it was applied (or found stale)
and by which worker; `dead_letters` holds every failure or hold of it, with its state and its
earlier lives; the DLQ stream says whether operators see it now; Kafka gives back the message.
Logs carry the same `eventId` for the step-by-step story.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import Engine, select

from eventpipe.dlq.letter import DeadLetter
from eventpipe.dlq.projection import Fetch
from eventpipe.dlq.records import letter_of
from eventpipe.dlq.stream import DeadLetterStream
from eventpipe.effects import Position
from eventpipe.errors import TransientError
from eventpipe.messages import RawMessage
from eventpipe.tables import applied_events, dead_letters
from eventpipe.terminal import printable
from eventpipe.times import utc_iso


@dataclass(frozen=True, slots=True)
class Trace:
    event_id: str
    applied: dict[str, Any] | None
    dead_letters: list[DeadLetter]
    # The entry id of each DLQ key of this event the operators' stream shows; None if Redis
    # did not answer (SQL holds the story, the stream only shows it).
    in_stream: dict[str, str] | None
    message: RawMessage | None
    unfetched: str | None = None  # why the message could not be fetched from Kafka

    @property
    def found(self) -> bool:
        return self.applied is not None or bool(self.dead_letters)


def gather(event_id: str, engine: Engine, stream: DeadLetterStream,
           fetch: Fetch | None = None) -> Trace:
    with engine.connect() as conn:
        row = conn.execute(select(applied_events)
                           .where(applied_events.c.event_id == event_id)).first()
        letters = [letter_of(r) for r in conn.execute(
            select(dead_letters).where(dead_letters.c.event_id == event_id)
            .order_by(dead_letters.c.first_failure_at))]
    applied = dict(row._mapping) if row is not None else None
    try:
        shown: dict[str, str] | None = {entry.letter.dlq_key: entry.entry_id or "?"
                                        for entry in stream.find_event(event_id)}
    except redis.RedisError:
        shown = None
    message, unfetched = None, None
    position = _position(applied, letters)
    if fetch is not None and position is not None:
        try:
            message = fetch(position)
        except TransientError as exc:  # what SQL and the stream hold is still the story
            unfetched = str(exc)
    return Trace(event_id, applied, letters, shown, message, unfetched)


def _position(applied: dict[str, Any] | None, letters: list[DeadLetter]) -> Position | None:
    if applied and applied["kafka_topic"] is not None:
        return Position(applied["kafka_topic"], applied["kafka_partition"],
                        applied["kafka_offset"])
    for letter in letters:
        if letter.position.topic is not None:
            return letter.position
    return None


def render(trace: Trace) -> str:
    def one(value: object) -> str:  # a field from the data: its newlines forge no line
        return printable(str(value), one_line=True)

    lines = [f"event {one(trace.event_id)}"]
    if not trace.found:
        lines.append("  neither applied nor dead-lettered: not yet consumed, waiting for a "
                     "retry, or never sent")
        return printable("\n".join(lines))
    if trace.applied:
        a = trace.applied
        lines.append(f"  kafka     {one(a['kafka_topic'])} partition {a['kafka_partition']} "
                     f"offset {a['kafka_offset']}")
        lines.append(f"  occurred  {utc_iso(a['occurred_at'])}")
        lines.append(f"  {a['outcome']:9s} {utc_iso(a['applied_at'])}  "
                     f"({one(a['event_type'])}, by {one(a['worker'] or 'an unnamed worker')})")
    for letter in trace.dead_letters:
        if trace.in_stream is None:
            shown = "the DLQ stream did not answer"
        elif letter.dlq_key in trace.in_stream:
            shown = f"in the DLQ as entry {trace.in_stream[letter.dlq_key]}"
        else:
            shown = "not in the DLQ stream"
        lines.append(f"  {letter.state:9s} {one(letter.error_class)}: {one(letter.reason)}")
        lines.append(f"    {one(letter.dlq_key)}; {letter.attempts} attempt(s) from "
                     f"{utc_iso(letter.first_failure_at)} to {utc_iso(letter.last_failure_at)}"
                     f" on {one(letter.worker)}; {shown}")
        if letter.position.topic is not None:
            lines.append(f"    at {one(letter.position.topic)} partition "
                         f"{letter.position.partition} offset {letter.position.offset}")
        if letter.deadline is not None:
            lines.append(f"    until {utc_iso(letter.deadline)}")
        for episode in letter.history:
            lines.append(f"    earlier: {one(episode.error_class)}: {one(episode.reason)} "
                         f"({episode.attempts} attempt(s); {one(episode.ended)} at "
                         f"{one(episode.ended_at)})")
    if trace.message is not None:
        value = trace.message.value
        try:
            body = json.dumps(json.loads(value), indent=2) if value is not None else \
                "null (a tombstone)"
        except (ValueError, RecursionError):  # not JSON, or nested past the stack's depth
            body = repr(value)
        lines.append("  message:")
        lines.extend(f"    {line}" for line in body.splitlines())
    elif trace.unfetched is not None:
        lines.append(f"  message:  not fetched: {trace.unfetched} (`--no-kafka` does without)")
    return printable("\n".join(lines))
