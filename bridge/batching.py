"""Grouping consecutive messages of one partition into one task, bounded by count, bytes, time.

A batch is sent when it holds `max_events` messages or `max_bytes` of message bytes, or has
waited `max_wait_s` and its partition is not *held*. The bridge holds a partition while the
task it sent last still waits in the partition's queue: no worker is free for it, so sending
another small task would only add per-task work; the messages join the next batch instead.
Light traffic thus goes out at once, and a backlog in batches as large as the bounds allow.
A message larger than `max_bytes` on its own travels alone: the task stays bounded whatever
the producers send.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from eventpipe.queues import TaskMessage


@dataclass(slots=True)
class _Pending:
    started: float
    size: int = 0
    messages: list[TaskMessage] = field(default_factory=list)


class Batcher:
    def __init__(self, max_events: int, max_bytes: int, max_wait_s: float) -> None:
        self.max_events = max(1, max_events)
        self.max_bytes = max(1, max_bytes)
        self.max_wait_s = max_wait_s
        self._pending: dict[int, _Pending] = {}

    def add(self, partition: int, message: TaskMessage, now: float) -> list[list[TaskMessage]]:
        """Add a message; returns the partition's batches that just became full, in order."""
        ready: list[list[TaskMessage]] = []
        size = message.size
        pending = self._pending.get(partition)
        if pending is not None and pending.size + size > self.max_bytes:
            ready.append(self._pending.pop(partition).messages)
            pending = None
        if pending is None:
            pending = self._pending[partition] = _Pending(now)
        pending.messages.append(message)
        pending.size += size
        if len(pending.messages) >= self.max_events or pending.size >= self.max_bytes:
            ready.append(self._pending.pop(partition).messages)
        return ready

    def due(self, now: float, held: Collection[int] = ()) -> list[tuple[int, list[TaskMessage]]]:
        """Batches that have waited `max_wait_s`, of partitions not `held`, removed from the
        batcher."""
        ready = [p for p, pending in self._pending.items()
                 if now - pending.started >= self.max_wait_s and p not in held]
        return [(p, self._pending.pop(p).messages) for p in ready]

    def partitions(self) -> set[int]:
        """Partitions with messages waiting for their batch to be sent."""
        return set(self._pending)

    def drop(self, partition: int) -> None:
        self._pending.pop(partition, None)

    def clear(self) -> None:
        self._pending.clear()
