"""One task's work: a partition's messages in, every one of them given a durable fate.

`Processor.run`, which the Celery task (`tasks.app`) wraps:
1. leases the offsets (the bridge then knows the work is in hand; `tasks.lease_keeper` renews
   the lease while the run lasts, and a retry's until it runs) and records the range as
   running, in one Redis round trip; if an earlier attempt at an overlapping range never
   finished — the process died — the messages are applied one at a time, and one that has
   killed its worker `CRASH_MAX_ATTEMPTS` times is dead-lettered
   (`eventpipe.failures.after_crashes`);
2. parses each message: bytes that are not a valid event become a dead letter at once;
3. applies the events and records the failures in one transaction (`eventpipe.apply`), with
   the offsets of the messages it gives their fates (`eventpipe.positions.record_done`), which
   the bridge looks for before it records a position past them;
4. on a failure, carries out `eventpipe.failures.decide`: retry the rest later (the world
   failed), split the part in two (something in it is bad), dead-letter a single message, or
   retry it alone later;
5. puts new dead letters in the operators' stream (the SQL record is already durable; the
   reconciler repairs the stream if this step is lost), and marks the offsets done in the
   offset ledger as it clears the running range, in one round trip at the end (a process
   that dies before it only makes those events come back as duplicates). A run that splits
   or isolates marks each part done as it commits (the rest stays leased, step 1), so the
   bridge sees it progress however many parts it takes. Whatever ends a run, its running
   record goes; deaths it found and did not get past are put back for the next attempt.
"""

from __future__ import annotations

import logging
import random
import time
import traceback as tb
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import redis
from sqlalchemy import Engine

from eventpipe import metrics
from eventpipe.apply import BatchResult, apply_batch
from eventpipe.dlq.letter import (
    INVALID_EVENT,
    UNREADABLE_MESSAGE,
    DeadLetter,
    event_key,
    key_of,
    message_key,
    unreadable_key,
)
from eventpipe.dlq.projection import Fetch, project
from eventpipe.dlq.stream import DeadLetterStream
from eventpipe.effects import Fate, Position, Received
from eventpipe.errors import (
    REDIS_UNAVAILABLE,
    FailureKind,
    InvalidEvent,
    TransientError,
    classify,
    unresponsive,
)
from eventpipe.events import EventType, parse_event, peek_identity
from eventpipe.failures import (
    GiveUp,
    RetryAlone,
    RetryLater,
    RetryPolicy,
    Split,
    after_crashes,
    decide,
    describe,
)
from eventpipe.messages import RawMessage
from eventpipe.offset_ledger import Crashed, OffsetLedger, filed_under
from eventpipe.positions import Done
from eventpipe.queues import TaskMessage
from eventpipe.settings import Settings
from eventpipe.times import from_kafka_millis
from tasks import letters_said
from tasks.lease_keeper import LeaseKeeper

log = logging.getLogger(__name__)
# The fates counted in events_processed_per_second: the event is done with, not in the DLQ.
_DONE_WITH = frozenset({Fate.APPLIED.value, Fate.DUPLICATE.value, Fate.STALE.value})


@dataclass(frozen=True, slots=True)
class Later:
    """Messages to send again, as one task, after `delay_s` seconds."""

    messages: list[TaskMessage]
    delay_s: float
    reason: str
    transient: bool  # a failure of the world (the whole rest of the batch), not of a message


@dataclass(frozen=True, slots=True)
class _Committed:
    """A part whose messages have their fates: the events received (each with its message),
    the messages that are no event, and what the transaction did."""

    messages: list[TaskMessage]
    received: list[Received]
    raw: list[TaskMessage]
    failures: list[DeadLetter]
    payloads: dict[str, RawMessage]
    result: BatchResult


@dataclass(slots=True)
class Report:
    later: list[Later] = field(default_factory=list)
    fates: Counter[str] = field(default_factory=Counter)
    done: list[int] = field(default_factory=list)  # committed, not marked done yet


class Processor:
    def __init__(
        self, settings: Settings, engine: Engine, stream: DeadLetterStream,
        ledger: OffsetLedger, fetch: Fetch | None = None, *, worker: str,
        clock: Callable[[], float] = time.time, rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.stream = stream
        self.ledger = ledger
        self.fetch = fetch
        self.worker = worker
        self.clock = clock
        self.rng = rng or random.Random()
        self.policy = RetryPolicy.of(settings)
        self.max_future = timedelta(seconds=settings.max_future_skew_s)
        # As long as the bridge waits for a sign of life; renewed while a run lasts
        # (`keeper`), extended for work that waits to retry. A worker killed mid-batch lets
        # its lease lapse soon, and the batch is re-read.
        self.lease_s = settings.redelivery_timeout_s
        self.keeper = LeaseKeeper(ledger)
        self._run = ""  # the run in progress, as the offset ledger names it
        self._ledger_topic = ""  # its topic, as the offset ledger names it (`filed_under`)
        self._topic_id = ""  # Kafka's id of its topic, as the bridge read it
        self._next = 0  # the first offset it has not given a fate yet
        self.retries = 0
        # The last run whose end the ledger did not answer (or the one it was asked to
        # forgive, still owed): what a retry of its batch forgives.
        self.unended = ""

    def run(self, topic: str, partition: int, messages: list[TaskMessage],
            retries: int = 0, forgive: str = "", topic_id: str = "") -> Report:
        """`retries`: times this batch already waited for the world (its backoff grows).
        `forgive`: an earlier run of these messages that ended alive, but whose end the
        offset ledger did not answer: its record is no death. `topic_id`: Kafka's id of the
        topic the bridge read them from, whose ledger their marks go to."""
        report = Report()
        self._ledger_topic = filed_under(topic, topic_id)
        self._topic_id = topic_id
        self.retries = retries
        self.unended = forgive  # the run the next attempt must forgive, if any
        first, last = messages[0].offset, messages[-1].offset
        self._run = uuid.uuid4().hex  # names this run's record in the ledger
        offsets = [m.offset for m in messages]
        crashed = self.ledger.begin(self._ledger_topic, partition, offsets, self.lease_s,
                                    run=self._run, forgive=forgive)
        self._next = first
        ended = False
        try:
            self.keeper.hold(self._ledger_topic, partition, offsets, self.lease_s,
                             self.settings.task_time_limit_s)
            if crashed is None:
                ended = self._work(topic, partition, [messages], report)
            else:
                log.warning("a worker died applying offsets %d–%d (%d time(s)): isolating "
                            "them", crashed.first, crashed.last, crashed.deaths,
                            extra={"topic": topic, "partition": partition,
                                   "offsetFirst": first, "offsetLast": last})
                ended = self._work(topic, partition, [[m] for m in messages], report, crashed)
        finally:
            self.keeper.release()
            # Neither an error nor a wait for the world is a death: the record of this run
            # goes. The deaths it found are still owed to the messages it did not get to:
            # left as found, so that their next attempt counts them again, no more.
            owed = crashed if crashed is not None and not ended \
                and self._next <= crashed.last else None
            try:
                self.ledger.finish(self._ledger_topic, partition, report.done, run=self._run,
                                   owed=owed)
            except REDIS_UNAVAILABLE:
                # This process lives: its run must not pass for dead once the ledger answers
                # again. The keeper ends it then, and the batch's retry forgives it.
                self.keeper.finish_later(self._ledger_topic, partition, list(report.done),
                                         self._run)
                self.unended = self._run
                raise
        return report

    def revoked(self, topic: str, partition: int, messages: list[TaskMessage],
                topic_id: str) -> None:
        """A batch Celery dropped unapplied (`celery control revoke`, Flower's revoke): a
        retry of it, which keeps its task's id, is dropped too. Its lease is renewed no more,
        where it would otherwise be for the retry's wait and time limit: it lapses within
        REDELIVERY_TIMEOUT_S past the wait, and the bridge reads the messages again from
        Kafka, as any lost batch. (Ended at once, it could be the lease of another copy of
        the same offsets, which a redelivery queued, running elsewhere.)"""
        offsets = [m.offset for m in messages]
        self.keeper.drop(filed_under(topic, topic_id), partition, offsets)
        log.warning("batch revoked, not applied: its events are read again from Kafka",
                    extra={"topic": topic, "partition": partition, "events": len(messages),
                           "offsetFirst": offsets[0], "offsetLast": offsets[-1]})

    # -- the failure path ---------------------------------------------------------------------

    def _work(self, topic: str, partition: int, parts: list[list[TaskMessage]],
              report: Report, crashed: Crashed | None = None) -> bool:
        """Apply the parts in order, splitting those that fail; False if the rest waits for
        the world instead. When isolating after a worker died (`crashed`), each message is
        recorded as the running one before it is applied, so a death points at it, and one
        that died too often is given up."""
        while parts:
            part = parts.pop(0)
            self._next = part[0].offset
            if crashed is not None:
                deaths = crashed.deaths_of(part[0].offset)
                self.ledger.narrow(self._ledger_topic, partition, part[0].offset,
                                   part[-1].offset, deaths, run=self._run)
                verdict = after_crashes(deaths, size=len(part), policy=self.policy)
                if isinstance(verdict, GiveUp):
                    if not self._give_up(topic, partition, part, parts, verdict, report):
                        return False
                    self._progress(topic, partition, parts, report)
                    continue
            try:
                committed = self._apply(topic, partition, part)
            except Exception as exc:
                if unresponsive(exc):
                    # Interrupted mid-exchange, a connection would answer the next batch out
                    # of turn: none of the pool's connections is trusted again.
                    self.engine.dispose()
                decision = decide(exc, size=len(part), attempts=max(m.attempts for m in part),
                                  retries=self.retries, policy=self.policy, rng=self.rng)
                failure = exc
            else:  # committed: nothing from here on is a failure of the part
                if not self._account(topic, partition, committed, parts, report):
                    return False
                self._progress(topic, partition, parts, report)
                continue
            if isinstance(decision, RetryLater):
                rest = [m for p in (part, *parts) for m in p]
                self._later(topic, partition, Later(rest, decision.delay_s, decision.reason,
                                                    transient=True), report)
                return False
            if isinstance(decision, Split):
                middle = len(part) // 2
                log.warning("part failed, splitting it: %s", decision.reason, extra={
                    "topic": topic, "partition": partition, "offsetFirst": part[0].offset,
                    "offsetLast": part[-1].offset})
                parts[:0] = [part[:middle], part[middle:]]
            elif isinstance(decision, RetryAlone):
                message = replace(part[0], attempts=part[0].attempts + 1)
                log.warning("event failed, retrying it alone in %.1fs: %s", decision.delay_s,
                            decision.reason, exc_info=failure, extra=_context(
                                topic, partition, message))
                self._later(topic, partition, Later([message], decision.delay_s,
                                                    decision.reason, transient=False), report)
            elif not self._give_up(topic, partition, part, parts, decision, report, failure):
                return False
            self._progress(topic, partition, parts, report)
        return True

    def _progress(self, topic: str, partition: int, parts: list[list[TaskMessage]],
                  report: Report) -> None:
        """Between the parts of a run that split or isolates: mark what committed done now,
        so the bridge sees progress however many parts it takes (the rest stays leased by
        `keeper`). A run in one part settles at the end, in the round trip that clears its
        record; so do marks that could not be made here."""
        if not parts or not report.done:
            return
        try:
            self.ledger.settle(self._ledger_topic, partition, report.done)
        except redis.RedisError as exc:
            log.warning("progress not marked yet: %s", exc, extra={
                "topic": topic, "partition": partition})
            return
        report.done.clear()

    def _later(self, topic: str, partition: int, later: Later, report: Report) -> None:
        # The offsets stay leased while they wait, and while a batch may run ahead of them
        # once their time comes, so the bridge does not read them again.
        offsets = [m.offset for m in later.messages]
        self.ledger.lease(self._ledger_topic, partition, offsets, later.delay_s + self.lease_s)
        self.keeper.set_aside(self._ledger_topic, partition, offsets, self.lease_s,
                              later.delay_s + self.settings.task_time_limit_s)
        report.later.append(later)
        count_retries(later.messages, "transient" if later.transient else "error")

    def _world_failed(self, topic: str, partition: int, parts: list[list[TaskMessage]],
                      exc: BaseException, report: Report) -> None:
        """The rest of the run waits for the world, as one task, after the next backoff."""
        self._later(topic, partition, Later(
            [m for p in parts for m in p], self.policy.backoff(self.retries + 1, self.rng),
            describe(exc), transient=True), report)

    def _give_up(self, topic: str, partition: int, part: list[TaskMessage],
                 parts: list[list[TaskMessage]], decision: GiveUp, report: Report,
                 exc: BaseException | None = None) -> bool:
        """Dead-letter the part's one message on its own (its batch's transaction is gone);
        False if the world failed meanwhile: then it and the rest wait, as a batch whose
        database fails does."""
        try:
            self._dead_letter(topic, partition, part[0], decision, report, exc)
        except Exception as failure:
            if classify(failure) is not FailureKind.TRANSIENT:
                raise
            self._world_failed(topic, partition, [part, *parts], failure, report)
            return False
        return True

    def _dead_letter(self, topic: str, partition: int, message: TaskMessage, decision: GiveUp,
                     report: Report, exc: BaseException | None = None) -> None:
        now = self._now()
        try:
            event = parse_event(message.value, message.key)
        except InvalidEvent:
            event = None
        identity = peek_identity(message.value)
        letter = DeadLetter(
            dlq_key=key_of(event, message.key, message.value) if message.unreadable is None
            else unreadable_key(topic, self._topic_id, partition, message.offset),
            error_class=decision.error_class,
            reason=decision.reason, first_failure_at=now, last_failure_at=now,
            worker=self.worker, event_id=identity.event_id, event_type=identity.event_type,
            position=Position(topic, partition, message.offset),
            traceback=_trace(exc) if exc is not None else None,
            attempts=message.attempts + 1)
        try:
            result = apply_batch(self.engine, [], [letter], worker=self.worker,
                                 done=self._done_of(topic, partition, [message]))
        except Exception as refused:
            if classify(refused) is FailureKind.TRANSIENT:
                raise  # the world, not the letter: the message waits (`_give_up`)
            # The database refuses the letter itself: a message must still end somewhere,
            # never loop. What is left is what came from the pipeline, not the message.
            log.error("dead letter refused by the database, written without the message's "
                      "identity: %s", refused, extra=_context(topic, partition, message))
            letter = replace(letter, event_id=None, event_type=None, traceback=None,
                             reason=f"{letter.error_class}; its dead letter as first written "
                             f"was refused by the database: {type(refused).__name__}")
            try:
                result = apply_batch(self.engine, [], [letter], worker=self.worker,
                                     done=self._done_of(topic, partition, [message]))
            except Exception as again:
                if classify(again) is FailureKind.TRANSIENT:
                    raise
                # Refused with nothing of the message in it: the table takes no dead letter
                # (a column or a trigger added by hand). A failure of the world, said as such,
                # for the message and the rest of its batch to wait on, rather than an error
                # the bridge would take for a batch lost and read again for ever.
                raise TransientError(f"the database refuses dead letters (the table "
                                     f"dead_letters): {describe(again)}") from again
        metrics.EVENTS_PROCESSED.labels(metrics.event_type_label(identity.event_type),
                                        "dead_lettered").inc()
        self._settled([message], result, report)
        self._announced(topic, partition, result, {letter.dlq_key: message.raw})

    # -- the happy path ------------------------------------------------------------------------

    def _apply(self, topic: str, partition: int, messages: list[TaskMessage]) -> _Committed:
        """Give the part's messages their fates, in one transaction; what `_account` needs."""
        received: list[Received] = []
        raw: list[TaskMessage] = []  # the message of each event received, for its dead letter
        failures: list[DeadLetter] = []
        payloads: dict[str, RawMessage] = {}
        now = self._now()
        for message in messages:
            position = Position(topic, partition, message.offset)
            if message.unreadable is not None:  # no bytes: named by its position
                failures.append(DeadLetter(
                    dlq_key=unreadable_key(topic, self._topic_id, partition, message.offset),
                    error_class=UNREADABLE_MESSAGE, reason=message.unreadable,
                    first_failure_at=now, last_failure_at=now, worker=self.worker,
                    position=position))
                continue
            try:
                event = parse_event(message.value, message.key, max_future=self.max_future,
                                    received_at=from_kafka_millis(message.timestamp_ms))
            except InvalidEvent as exc:
                identity = peek_identity(message.value)
                failures.append(DeadLetter(
                    dlq_key=message_key(message.key, message.value), error_class=INVALID_EVENT,
                    reason=str(exc), first_failure_at=now, last_failure_at=now,
                    worker=self.worker, event_id=identity.event_id,
                    event_type=identity.event_type, position=position, traceback=_trace(exc)))
                payloads[failures[-1].dlq_key] = message.raw
                continue
            received.append(Received.of(event, position))
            raw.append(message)
        started = time.perf_counter()
        try:
            result = apply_batch(self.engine, received, failures, worker=self.worker,
                                 done=self._done_of(topic, partition, messages))
        finally:
            metrics.DB_OPERATION.labels("apply_batch").observe(time.perf_counter() - started)
        return _Committed(messages, received, raw, failures, payloads, result)

    def _account(self, topic: str, partition: int, committed: _Committed,
                 parts: list[list[TaskMessage]], report: Report) -> bool:
        """Mark a committed part done, count what it did, project its dead letters. An error
        here (the task's time limit, say) is none of its events': said, and the rest of the
        run waits for a retry, as after a failure of the world (False)."""
        self._settled(committed.messages, committed.result, report)
        try:
            self._counted(topic, partition, committed)
        except Exception as exc:
            log.warning("part applied, then its bookkeeping failed: %s", describe(exc), extra={
                "topic": topic, "partition": partition,
                "offsetFirst": committed.messages[0].offset,
                "offsetLast": committed.messages[-1].offset})
            if parts:
                self._next = parts[0][0].offset  # the part has its fates: no death owed for it
                self._world_failed(topic, partition, parts, exc, report)
                return False
        return True

    def _counted(self, topic: str, partition: int, committed: _Committed) -> None:
        received, result, payloads = committed.received, committed.result, committed.payloads
        applied_at = result.applied_at.timestamp()
        # Counted by enum member, spelled once per kind: `.value` is slow on every event.
        by_kind: Counter[tuple[EventType, Fate]] = Counter()
        debug = log.isEnabledFor(logging.DEBUG)
        end_to_end: dict[EventType, list[float]] = {}  # observed once per batch
        for item, fate in zip(received, result.fates, strict=True):
            kind = item.event.event_type
            by_kind[(kind, fate)] += 1
            if debug:  # a line per event: its life is found by its eventId
                log.debug("event %s", fate.value, extra={
                    "eventId": item.event.event_id, "eventType": kind.value, "topic": topic,
                    "partition": partition, "offset": item.position.offset})
            if fate is Fate.APPLIED:
                end_to_end.setdefault(kind, []).append(
                    max(0.0, applied_at - item.event.occurred_at.timestamp()))
        for kind, latencies in end_to_end.items():
            metrics.observe_all(metrics.END_TO_END.labels(kind.value), latencies)
        counted: Counter[tuple[str, str]] = Counter(
            {(kind.value, fate.value): number for (kind, fate), number in by_kind.items()})
        for failure in committed.failures:
            counted[(metrics.event_type_label(failure.event_type), "dead_lettered")] += 1
        for (event_type, fate_name), number in counted.items():
            metrics.EVENTS_PROCESSED.labels(event_type, fate_name).inc(number)
            if fate_name in _DONE_WITH:
                metrics.RATE.add(event_type, number)
        if result.dead_letters:  # their projection carries the messages' bytes
            payloads.update((event_key(item.fingerprint), message.raw)
                            for item, message in zip(received, committed.raw, strict=True))
        self._announced(topic, partition, result, payloads)

    @staticmethod
    def _settled(messages: list[TaskMessage], result: BatchResult, report: Report) -> None:
        """The part's fates, and its offsets to mark done, in the report."""
        for fate, number in Counter(result.fates).items():
            report.fates[fate.value] += number
        # The messages that are no event, or were given up, have no fate but their dead letter.
        if unfated := len(messages) - len(result.fates):
            report.fates["dead_lettered"] += unfated
        report.done += (m.offset for m in messages)

    def _announced(self, topic: str, partition: int, result: BatchResult,
                   payloads: dict[str, RawMessage]) -> None:
        """The part's new dead letters in the operators' stream, and said."""
        if not result.dead_letters:
            return
        try:
            project(self.engine, self.stream, self.fetch, payloads)
        except Exception as exc:  # the SQL record stands; the reconciler projects it
            log.warning("dead letters not put in the stream yet: %s", exc, extra={
                "topic": topic, "partition": partition})
        letters_said.say(result.dead_letters)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def _done_of(self, topic: str, partition: int, messages: list[TaskMessage]) -> Done:
        """What the transaction that gives these messages their fates records of them."""
        return Done(topic, self._topic_id, partition, [m.offset for m in messages])


def count_retries(messages: Iterable[TaskMessage], reason: str) -> None:
    """One more try of each message, by its event type (`event_retries_total`)."""
    for message in messages:
        metrics.RETRIES.labels(metrics.event_type_label(peek_identity(message.value).event_type),
                               reason).inc()


def _context(topic: str, partition: int, message: TaskMessage) -> dict[str, object]:
    identity = peek_identity(message.value)
    return {"eventId": identity.event_id, "eventType": identity.event_type, "topic": topic,
            "partition": partition, "offset": message.offset, "attempt": message.attempts}


def _trace(exc: BaseException) -> str:
    return "".join(tb.format_exception(exc))[-8000:]
