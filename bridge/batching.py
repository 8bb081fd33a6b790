"""Grouping consecutive messages of one partition into one task, bounded by count and time."""

from __future__ import annotations

from dataclasses import dataclass, field

from eventpipe.queues import Message


@dataclass(slots=True)
class _Pending:
    started: float
    messages: list[Message] = field(default_factory=list)


class Batcher:
    def __init__(self, max_events: int, max_wait_s: float) -> None:
        self.max_events = max(1, max_events)
        self.max_wait_s = max_wait_s
        self._pending: dict[int, _Pending] = {}

    def add(self, partition: int, message: Message, now: float) -> list[Message] | None:
        """Add a message; returns the partition's batch when it just became full."""
        pending = self._pending.get(partition)
        if pending is None:
            pending = self._pending[partition] = _Pending(now)
        pending.messages.append(message)
        if len(pending.messages) >= self.max_events:
            del self._pending[partition]
            return pending.messages
        return None

    def due(self, now: float) -> list[tuple[int, list[Message]]]:
        """Batches that have waited `max_wait_s`, removed from the batcher."""
        ready = [p for p, pending in self._pending.items()
                 if now - pending.started >= self.max_wait_s]
        return [(p, self._pending.pop(p).messages) for p in ready]

    def drop(self, partition: int) -> None:
        self._pending.pop(partition, None)

    def clear(self) -> None:
        self._pending.clear()
