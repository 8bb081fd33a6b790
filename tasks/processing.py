"""One task's work: turn a partition's messages into applied events, retries and dead letters.

The Celery task (`tasks.app`) is a thin wrapper around `Processor.run`, which
1. leases the batch's offsets, so the bridge knows the work is in hand;
2. validates every message — bytes that are not an event are dead-lettered at once;
3. applies the valid events in one transaction (`eventpipe.apply.apply_batch`);
4. dead-letters rejected events, schedules a retry for each event whose parent is missing
   (or dead-letters it once its budget is spent);
5. marks every finished offset done in the delivery ledger, leasing the retried ones.
A failure of the world (database down, DLQ full) raises `TransientError`: the caller retries
the whole batch later, and nothing is dead-lettered for it.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import traceback as tb
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from sqlalchemy import Engine

from eventpipe import metrics
from eventpipe.apply import apply_batch
from eventpipe.dlq import DeadLetter, DeadLetterQueue, history_from_header
from eventpipe.effects import Delivery, Outcome, Position, Status
from eventpipe.errors import InvalidEvent, TransientError, is_transient
from eventpipe.events import Event, parse_event, peek_identity
from eventpipe.progress import DeliveryLedger
from eventpipe.queues import Message
from eventpipe.settings import Settings
from tasks.retry import backoff_delay

log = logging.getLogger("eventpipe.tasks")


@dataclass(frozen=True, slots=True)
class Retry:
    """Messages to send again, as one task, after `countdown` seconds."""

    messages: list[Message]
    countdown: float
    reason: str


@dataclass(slots=True)
class Report:
    retries: list[Retry] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True, slots=True)
class _Failed:
    message: Message
    error_class: str
    error_message: str
    traceback: str
    event_id: str | None
    event_type: str | None


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Processor:
    def __init__(
        self, settings: Settings, engine: Engine, dlq: DeadLetterQueue, ledger: DeliveryLedger,
        *, clock: Callable[[], float] = time.time, rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.dlq = dlq
        self.ledger = ledger
        self.clock = clock
        self.rng = rng or random.Random()
        self.worker = worker_name()

    def run(self, topic: str, partition: int, messages: list[Message]) -> Report:
        report = Report()
        offsets = [m.offset for m in messages]
        self.ledger.lease(topic, partition, offsets,
                          self.clock() + self.settings.redelivery_timeout_s)
        self._check_owner(topic, partition)
        valid: list[tuple[Message, Delivery]] = []
        failed: list[_Failed] = []
        for message in messages:
            try:
                event = parse_event(message.value, message.key)
            except InvalidEvent as exc:
                identity = peek_identity(message.value)
                failed.append(_Failed(message, type(exc).__name__, str(exc), _trace(exc),
                                      identity.event_id, identity.event_type))
                continue
            valid.append((message, Delivery(event, Position(topic, partition, message.offset))))

        outcomes = self._apply([d for _, d in valid], report, topic, partition, messages)
        if outcomes is None:
            return report  # split into single-message retries: nothing settles here
        done: list[int] = []
        waiting: list[tuple[Message, Event, Outcome]] = []
        applied_at = self.clock()
        finished: Counter[tuple[str, str]] = Counter()  # counted once per batch, not per event
        for (message, delivery), outcome in zip(valid, outcomes, strict=True):
            event = delivery.event
            if outcome.status is Status.MISSING_PARENT:
                waiting.append((message, event, outcome))
                continue
            if outcome.status is Status.REJECTED:
                failed.append(_Failed(message, "RejectedEvent", outcome.reason or "rejected", "",
                                      event.event_id, event.event_type.value))
                continue
            done.append(message.offset)
            report.statuses[outcome.status.value] += 1
            finished[(event.event_type.value, outcome.status.value)] += 1
            if outcome.status is Status.APPLIED:
                metrics.END_TO_END.labels(event.event_type.value).observe(
                    max(0.0, applied_at - event.occurred_at.timestamp()))
            log.debug("event %s", outcome.status.value, extra=_context(
                message, topic, partition, event.event_id, event.event_type.value))

        for (event_type, status), number in finished.items():
            metrics.EVENTS_PROCESSED.labels(event_type, status).inc(number)
            metrics.RATE.add(event_type, number)
        leases = self._retry_later(topic, partition, waiting, failed, report)

        for failure in failed:
            self._dead_letter(topic, partition, failure)
            done.append(failure.message.offset)
            report.statuses["dead_lettered"] += 1
        self.ledger.settle(topic, partition, done, leases)
        return report

    def _check_owner(self, topic: str, partition: int) -> None:
        other = self.ledger.claim(topic, partition, self.worker,
                                  2 * self.settings.redelivery_timeout_s)
        if other is not None:
            # Effects stay exactly-once (version guards, the ledger's key), but two workers
            # interleave the partition's batches, so per-key order is no longer kept.
            metrics.OWNER_CHANGES.labels(str(partition)).inc()
            log.warning("partition %d was just served by %s: if it is still running, two "
                        "workers serve this partition", partition, other,
                        extra={"topic": topic, "partition": partition, "otherWorker": other})

    def _retry_later(
        self, topic: str, partition: int, waiting: list[tuple[Message, Event, Outcome]],
        failed: list[_Failed], report: Report,
    ) -> dict[int, float]:
        """Schedule the events whose parent is missing (or give up on them); their leases.

        They are retried together, as one task: a burst of children ahead of their parents
        costs one retry, not one per event.
        """
        leases: dict[int, float] = {}
        retrying: list[Message] = []
        for message, event, outcome in waiting:
            attempts = message.attempts + 1
            event_type = event.event_type.value
            if attempts >= self.settings.retry_max_attempts:
                failed.append(_Failed(
                    replace(message, attempts=attempts), "MissingParent",
                    f"{outcome.reason}; gave up after {attempts} attempts", "",
                    event.event_id, event_type))
                continue
            first = message.first_failure_at or _iso(self.clock())
            retrying.append(replace(message, attempts=attempts, first_failure_at=first))
            report.statuses["retried"] += 1
            metrics.EVENTS_PROCESSED.labels(event_type, "retried").inc()
            metrics.RETRIES.labels(event_type, "missing_parent").inc()
            log.info("parent missing, retrying", extra={
                **_context(message, topic, partition, event.event_id, event_type),
                "attempt": attempts, "reason": outcome.reason})
        if retrying:
            countdown = backoff_delay(max(m.attempts for m in retrying),
                                      self.settings.retry_backoff_base_s,
                                      self.settings.retry_backoff_max_s, self.rng)
            report.retries.append(Retry(retrying, countdown, "missing_parent"))
            until = self.clock() + countdown + self.settings.redelivery_timeout_s
            leases.update((m.offset, until) for m in retrying)
        return leases

    def _apply(
        self, deliveries: list[Delivery], report: Report, topic: str, partition: int,
        messages: list[Message],
    ) -> list[Outcome] | None:
        started = time.perf_counter()
        try:
            return apply_batch(self.engine, deliveries)
        except Exception as exc:
            if is_transient(exc):
                raise TransientError(f"applying the batch failed: {exc}") from exc
            if len(messages) > 1:
                # An error nobody foresaw: give every message a try of its own, so one bad
                # event cannot hold back the others (each keeps its own budget).
                log.exception("batch failed unexpectedly; retrying its messages one by one",
                              extra={"topic": topic, "partition": partition})
                report.retries.extend(Retry([m], 0.0, "split") for m in messages)
                self.ledger.lease(topic, partition, [m.offset for m in messages],
                                  self.clock() + self.settings.redelivery_timeout_s)
                return None
            self._single_failed(exc, report, topic, partition, messages[0])
            return None
        finally:
            metrics.DB_OPERATION.labels("apply_batch").observe(time.perf_counter() - started)

    def _single_failed(
        self, exc: Exception, report: Report, topic: str, partition: int, message: Message
    ) -> None:
        attempts = message.attempts + 1
        identity = peek_identity(message.value)
        if attempts >= self.settings.retry_max_attempts:
            self._dead_letter(topic, partition, _Failed(
                replace(message, attempts=attempts), type(exc).__name__, str(exc), _trace(exc),
                identity.event_id, identity.event_type))
            self.ledger.settle(topic, partition, [message.offset], {})
            report.statuses["dead_lettered"] += 1
            return
        countdown = backoff_delay(attempts, self.settings.retry_backoff_base_s,
                                  self.settings.retry_backoff_max_s, self.rng)
        first = message.first_failure_at or _iso(self.clock())
        report.retries.append(Retry([replace(message, attempts=attempts, first_failure_at=first)],
                                    countdown, "error"))
        self.ledger.settle(topic, partition, [], {
            message.offset: self.clock() + countdown + self.settings.redelivery_timeout_s})
        metrics.RETRIES.labels(metrics.event_type_label(identity.event_type), "error").inc()
        log.exception("event failed unexpectedly, retrying in %.1fs", countdown, extra={
            **_context(message, topic, partition, identity.event_id, identity.event_type),
            "attempt": attempts})

    def _dead_letter(self, topic: str, partition: int, failure: _Failed) -> None:
        message = failure.message
        now = datetime.fromtimestamp(self.clock(), UTC)
        first = (datetime.fromisoformat(message.first_failure_at)
                 if message.first_failure_at else now)
        entry = DeadLetter(
            value=message.value, key=message.key, topic=topic, partition=partition,
            offset=message.offset, event_id=failure.event_id, event_type=failure.event_type,
            error_class=failure.error_class, error_message=failure.error_message,
            traceback=failure.traceback, attempts=max(1, message.attempts),
            first_failure_at=first, last_failure_at=now, worker=self.worker,
            history=history_from_header(message.history),
        )
        entry_id, added = self.dlq.add(entry)
        if added:
            event_type = metrics.event_type_label(failure.event_type)
            metrics.DLQ_ENTRIES.labels(event_type).inc()
            metrics.EVENTS_PROCESSED.labels(event_type,
                                            "dead_lettered").inc()
        log.warning("dead-lettered: %s: %s", failure.error_class, failure.error_message, extra={
            **_context(message, topic, partition, failure.event_id, failure.event_type),
            "dlqEntryId": entry_id, "errorClass": failure.error_class,
            "attempt": max(1, message.attempts)})


def _context(
    message: Message, topic: str, partition: int, event_id: str | None, event_type: str | None
) -> dict[str, object]:
    return {"eventId": event_id, "eventType": event_type, "topic": topic,
            "partition": partition, "offset": message.offset}


def _trace(exc: BaseException) -> str:
    return "".join(tb.format_exception(exc))


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()
