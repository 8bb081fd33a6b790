"""The Celery side of the wire: queue names, the task name, and how messages travel.

The bridge only sends; the workers (`tasks/`) register the task. Both build their Celery app
here so the two can never disagree on broker, serializer or routing.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from celery import Celery

from eventpipe.settings import Settings

APPLY_TASK = "eventpipe.apply_events"
QUEUE_PREFIX = "events.p"


def queue_name(partition: int) -> str:
    """One Celery queue per Kafka partition keeps a partition's events in order."""
    return f"{QUEUE_PREFIX}{partition}"


def partition_of(queue: str) -> int | None:
    if not queue.startswith(QUEUE_PREFIX):
        return None
    suffix = queue.removeprefix(QUEUE_PREFIX)
    return int(suffix) if suffix.isdigit() else None


@dataclass(frozen=True, slots=True)
class Message:
    """One Kafka message as a task carries it, with its retry state."""

    offset: int
    key: bytes | None
    value: bytes
    history: bytes | None = None  # the DLQ history header of a replayed message
    attempts: int = 0  # attempts already made on this message
    first_failure_at: str | None = None

    def to_wire(self) -> list[Any]:
        return [self.offset, _b64(self.key), _b64(self.value), _b64(self.history),
                self.attempts, self.first_failure_at]

    @classmethod
    def from_wire(cls, raw: list[Any]) -> Message:
        offset, key, value, history, attempts, first_failure_at = raw
        return cls(int(offset), _unb64(key), _unb64(value) or b"", _unb64(history),
                   int(attempts), first_failure_at)


def _b64(raw: bytes | None) -> str | None:
    # Values may be any bytes (poison included); JSON carries them safely as base64.
    return None if raw is None else base64.b64encode(raw).decode("ascii")


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def make_celery(settings: Settings, main: str = "eventpipe") -> Celery:
    app = Celery(main, broker=settings.celery_broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # The effect is idempotent, so a task is acknowledged only once it is done, and a
        # task whose worker died is handed out again.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A task whose broker connection is lost cannot be acknowledged any more: its message
        # comes back, so stop working on it rather than apply it twice in parallel.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_create_missing_queues=True,
        task_default_queue=queue_name(0),
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # Longer than any retry countdown, so a waiting retry is not handed out twice.
            "visibility_timeout": max(900, int(settings.retry_backoff_max_s * 4)),
        },
        worker_send_task_events=True,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    return app
