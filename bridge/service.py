"""The bridge: a Kafka consumer group member that hands each partition's events to that
partition's Celery queue and commits offsets only past events that are done.

Loop, in order:
1. consume messages; add each to its partition's pending batch;
2. send batches that are full, or have waited long enough while no earlier task of their
   partition waits in its queue (`bridge.batching`), as one task each, to `events.pN`;
3. every `commit_interval_s`, read the offset ledger, commit each partition's offset up to
   its oldest unfinished event (into the database, then to Kafka: `eventpipe.positions`),
   pause partitions with too much in flight (resume once half of it is free), and re-read
   from Kafka any partition whose oldest unfinished event was lost.
Rebalances commit what is done for revoked partitions. SIGTERM stops consuming, waits up to
`shutdown_drain_timeout_s` for work in flight, commits and leaves the group.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import redis
from celery import Celery
from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from bridge.batching import Batcher
from bridge.bounded import Bounded
from bridge.offsets import PartitionProgress, Unreadable
from eventpipe import metrics, positions, redis_clients, sqlite_file
from eventpipe.broker_queues import Unanswered, depth_reader
from eventpipe.database import BRIEF_S, make_engine
from eventpipe.errors import TransientError, key_of_another_kind
from eventpipe.events import peek_identity
from eventpipe.failures import describe
from eventpipe.kafka import (
    MessageReader,
    client_config,
    consumer_config,
    read_topic_id,
    said,
    unreadable,
    unreadable_end,
    unserved,
)
from eventpipe.logs import Repeats
from eventpipe.messages import read_headers
from eventpipe.offset_ledger import Marks, OffsetLedger, filed_under
from eventpipe.queues import TaskMessage, make_celery, queue_name, send_batch, visibility_timeout_s
from eventpipe.settings import Settings, SettingsError
from eventpipe.status import BRIDGE, PUBLISH_EVERY_S, STUCK_S, WHY_MAX, Board, process_name

log = logging.getLogger(__name__)

# How often the queues of held partitions are looked at: at most every QUEUE_CHECK_S, and
# never for more than a fifth of the loop's time (a broker asked one queue at a time, far
# away, answers slower than Redis next door). At light traffic some partition is nearly
# always held: every 5 ms, the asking cost more of the cores the workers share than the
# later release cost in waiting (docs/performance.md).
QUEUE_CHECK_S = 0.02
QUEUE_CHECK_SHARE = 0.2
READ_WAIT_S = 0.05  # the longest a read waits for a first message while none is held
# Partitions not yet vouched for (`Bridge._vouch`) are asked about again at most this often,
# each time waiting at most VOUCH_TIMEOUT_S for each of Kafka's two answers (the committed
# offsets, the topic's id): the loop serves the others meanwhile.
VOUCH_AGAIN_S = 5.0
VOUCH_TIMEOUT_S = 2.0
# Kafka's id of the topic is asked again at most this often before a commit, and at once
# before a partition's last commit (revoked, or the bridge stopping): a topic deleted and
# made again under its name must not take the offsets this bridge read of the earlier one.
TOPIC_CHECK_S = 5.0
# After the database failed to record a commit's offsets, nothing is committed for this long
# (but a partition's last commit), twice as long after each failure in a row, up to
# POSITIONS_AGAIN_MAX_S: a database that does not answer holds the loop for up to
# `eventpipe.database.BRIEF_S` at each try, and the loop sends the other partitions' batches.
POSITIONS_AGAIN_S = 5.0
POSITIONS_AGAIN_MAX_S = 30.0
# A partition with nothing new to commit records no position, so a loss there (a restore, a
# failover under the running bridge) would wait for its next message: the positions recorded
# of such partitions are read back this often, in the transaction of a commit if there is one.
POSITIONS_RECHECK_S = 10.0
# After the end of a record batch Kafka cannot hand over could not be found, the next try.
UNREADABLE_AGAIN_S = 10.0
# The most offsets of one such batch dead-lettered one by one (its header says how many).
UNREADABLE_MAX_OFFSETS = 100_000


def read_ready(consumer: Consumer, limit: int, wait_s: float) -> list[Message]:
    """Up to `limit` messages the Kafka client holds now; when it holds none, the first to
    arrive within `wait_s` with those that came along. `consume(limit, wait_s)` would wait
    out `wait_s` unless `limit` messages came: at light traffic every event waited for it, to
    make batches that the held partitions make anyway while a task waits in its queue
    (docs/performance.md)."""
    messages = consumer.consume(num_messages=limit, timeout=0)
    if messages:
        return messages
    first = consumer.poll(wait_s)
    if first is None:
        return []
    came_along = consumer.consume(num_messages=limit - 1, timeout=0) if limit > 1 else []
    return [first, *came_along]


class Bridge:
    def __init__(
        self, settings: Settings, *, celery: Celery | None = None,
        ledger: OffsetLedger | None = None, clock: Callable[[], float] = time.monotonic,
        engine: Engine | None = None,
    ) -> None:
        self.settings = settings
        self.topic = settings.kafka_topic
        self.celery = celery or make_celery(settings, main="bridge")
        # Where each partition's offset is recorded before Kafka's commit (`eventpipe.positions`).
        # A SQLite file that is not there is refused, not made empty: a bridge started in
        # another directory than the pipeline's would read a relative path there. A position
        # need not wait on the disk: one a crash of the database takes back, while Kafka has
        # its offset, only reads its partition again (a first one does: `positions.save`).
        # Waiting on each made every shipped run slower (docs/performance.md).
        # And none may hold the loop long: `brief`.
        self.engine = engine or make_engine(settings, create=False, synced=False, brief=True)
        # And none is waited for longer, whatever answers for the database (`bridge.bounded`).
        self._database = Bounded(BRIEF_S, name="bridge-database")
        self._positions_again = 0.0
        self._positions_wait_s = POSITIONS_AGAIN_S
        self._next_recheck = 0.0
        # The embedded database's file as the bridge found it: looked at before each record.
        self._database_file = sqlite_file.Watch(settings.database_url)
        self._written: dict[int, int] = {}  # the position it last recorded of each partition
        self.ledger = ledger or OffsetLedger(redis_clients.pipeline(settings.redis_url),
                                             settings.kafka_group_id)
        self.broker_queues = depth_reader(settings, redis_clients.pipeline)
        # Every time the bridge keeps is an interval (batches' waits, syncs, redelivery
        # timeouts): a wall clock stepped back would stall them all for the step, one
        # stepped forward would make every unleased head look lost.
        self.clock = clock
        self.batcher = Batcher(settings.batch_max_events, settings.batch_max_bytes,
                               settings.batch_max_wait_ms / 1000)
        self.partitions: dict[int, PartitionProgress] = {}
        self.unsent: dict[int, list[TaskMessage]] = {}
        self.queued: dict[int, int] = {}  # tasks waiting in each partition's queue, last seen
        # Partitions whose last task may still wait in their queue (`bridge.batching`): only
        # known of a broker that can be asked its queue lengths.
        self.held: set[int] = set()
        self._next_queue_check = 0.0
        self._next_vouch = 0.0  # partitions not vouched for are asked about again from then
        self.high_watermarks: dict[int, int] = {}  # from librdkafka's statistics
        self.board = Board(self.ledger.client, settings.kafka_group_id)
        self.name = process_name()
        self._next_publish = 0.0
        self.stopping = False
        # Set when the group gave this bridge a partition no worker serves, or its topic was
        # made again under it: raised once the bridge has stopped (an exception raised in a
        # Kafka callback would be lost there).
        self.must_stop: SettingsError | TransientError | None = None
        self.consumer = Consumer(consumer_config(settings, stats_cb=self._on_stats))
        self.admin = AdminClient(client_config(settings))
        # Kafka's id of the topic, read as partitions are vouched for: the ledger's marks and
        # the tasks are filed under it (`eventpipe.offset_ledger.filed_under`). Asked again
        # before commits (`_same_topic`), which wait while Kafka does not say.
        self.topic_id: str | None = None
        self._topic_said = False
        self._ledger_said = Repeats(window_s=60.0)  # per partition
        self._backwards_said = Repeats(window_s=60.0)  # per partition
        self._past_end_said = Repeats(window_s=600.0)  # per partition
        self._next_topic_check = 0.0
        self._debug = log.isEnabledFor(logging.DEBUG)
        # Finds where a record batch Kafka cannot hand over ends (`_unreadable`); made then.
        self._unreadable_reader: MessageReader | None = None
        # How long a task a worker died with stays held before it goes back to its queue, and
        # how long a span skipped below the log's start may wait to be counted after its
        # queue was seen empty.
        self._visibility_s = visibility_timeout_s(settings)
        self._count_wait_s = self._visibility_s + settings.task_time_limit_s

    # -- lifecycle ---------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def stop(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %s: stopping", signal.Signals(signum).name)
            self.stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def run(self) -> None:
        try:
            self._check_topic()
        except SettingsError:
            self.consumer.close()
            raise
        try:
            self._serve()
        except Exception as exc:
            if self.must_stop is None:
                raise
            raise self.must_stop from exc  # what to fix, not what it led to
        if self.must_stop is not None:
            raise self.must_stop

    def _serve(self) -> None:
        self.consumer.subscribe([self.topic], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_lost)
        log.info("bridge started", extra={"topic": self.topic,
                                          "group": self.settings.kafka_group_id})
        next_sync = 0.0
        try:
            while not self.stopping:
                self._consume_once()
                now = self.clock()
                self._release_held(now)
                for partition, messages in self.batcher.due(now, self.held):
                    self._dispatch(partition, messages)
                if now >= next_sync:
                    self._sync(now)
                    # From its end: a sync that waited on Kafka is not followed by another.
                    next_sync = self.clock() + self.settings.commit_interval_s
                if now >= self._next_publish:
                    # On its own clock: a long commit interval or an unreachable ledger must
                    # not make the bridge look gone.
                    self._publish_status()
                    self._next_publish = now + PUBLISH_EVERY_S
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        """Drop what was read but not sent, wait (bounded) for what was sent, commit, leave."""
        try:
            self.stopping = True  # also when serving ended with an error: nothing is resumed
            self.batcher.clear()
            self.unsent.clear()
            deadline = self.clock() + self.settings.shutdown_drain_timeout_s
            for progress in self.partitions.values():
                if not progress.paused:  # counted, as `_forget` counts it back
                    progress.paused_at = self.clock()
                    metrics.PAUSED.inc()
            self._pause_all()
            # Seen stopping, not gone; not again once Redis did not answer, whose waits
            # would take the drain's time.
            said = self._publish_status()
            self._next_publish = self.clock() + PUBLISH_EVERY_S
            while self.clock() < deadline and any(p.in_flight
                                                  for p in self.partitions.values()):
                self._sync(self.clock(), redeliver=False)
                # Serve the group's callbacks while waiting; all partitions are paused.
                self.consumer.consume(num_messages=1, timeout=0.2)
                if said and self.clock() >= self._next_publish:
                    said = self._publish_status()
                    self._next_publish = self.clock() + PUBLISH_EVERY_S
            self._sync(self.clock(), redeliver=False, final=True)
            for progress in self.partitions.values():
                self._uncounted(progress)
            left = sum(p.in_flight for p in self.partitions.values())
            log.info("bridge stopped", extra={"inFlightLeft": left})
        finally:
            with contextlib.suppress(redis.RedisError):
                self.board.leave(BRIDGE, self.name)
            # Leaving the group at once hands the partitions over without a session timeout.
            self.consumer.close()
            if self._unreadable_reader is not None:
                self._unreadable_reader.close()
            self.engine.dispose()

    def _pause_all(self) -> None:
        assigned = [TopicPartition(self.topic, p) for p in self.partitions]
        if assigned:
            self.consumer.pause(assigned)

    # -- consuming and dispatching -----------------------------------------------------------

    def _consume_once(self) -> None:
        started = time.perf_counter()
        # Short polls while batches wait on their queues, so they leave soon after a worker
        # takes the task ahead of them.
        waiting = self.held & self.batcher.partitions()
        messages = read_ready(self.consumer, self.settings.batch_max_events,
                              QUEUE_CHECK_S if waiting else READ_WAIT_S)
        if messages:
            metrics.KAFKA_CONSUME.observe(time.perf_counter() - started)
        now = self.clock()
        held: set[int] = set()
        for record in messages:
            error = record.error()
            if error is not None:
                self._consumer_error(record, error, now)
                continue
            partition = record.partition()
            if partition is None or (progress := self._reading(partition)) is None:
                continue
            if (known := progress.unreadable) is not None and known.holding \
                    and (record.offset() or 0) >= known.at:
                held.add(partition)  # past a batch not yet sent on: read again once it is
                continue
            kind, timestamp = record.timestamp()
            self._take(progress, TaskMessage(
                record.offset() or 0, record.key(), record.value(),
                timestamp if kind != TIMESTAMP_NOT_AVAILABLE else None,
                headers=read_headers(record)), now)
        for partition in held:  # the client went past the batch by itself: back to it
            if (known := self.partitions[partition].unreadable) is not None:
                self.consumer.seek(TopicPartition(self.topic, partition, known.at))

    def _reading(self, partition: int | None) -> PartitionProgress | None:
        """The partition's progress, unless it was revoked while its messages were on their
        way, or taken again, to be read again from where its vouch seeks it."""
        progress = self.partitions.get(partition) if partition is not None else None
        return None if progress is None or progress.retaken else progress

    def _take(self, progress: PartitionProgress, message: TaskMessage, now: float) -> None:
        partition = progress.partition
        progress.stuck_since = None
        expected = progress.next_read
        if (skipped := progress.read(message.offset)) is not None:
            self._skipped(partition, skipped, message.offset)
        elif expected is not None and message.offset < expected - 1 \
                and self._backwards_said.let_through(str(partition)) is not None:
            log.warning("Kafka handed over offset %d of partition %d after offset %d: its "
                        "client read again from an earlier offset by itself (the committed "
                        "offset past the end of a log cut since?), or a record batch lists "
                        "its offsets out of order; each is applied, and no commit passes one "
                        "not done", message.offset, partition, expected - 1,
                        extra={"partition": partition, "offset": message.offset})
        if self._debug:
            identity = peek_identity(message.value)  # never raises, whatever the bytes
            log.debug("event received", extra={
                "eventId": identity.event_id, "eventType": identity.event_type,
                "partition": partition, "offset": message.offset})
        for full in self.batcher.add(partition, message, now):
            self._dispatch(partition, full)

    def _consumer_error(self, record: Message, error: KafkaError, now: float) -> None:
        if error.code() == KafkaError._PARTITION_EOF:
            return
        if unreadable(error) and (progress := self._reading(record.partition())) is not None:
            self._unreadable(progress, record.offset() or 0, said(error), now)
            return
        log.error("consumer error: %s", error)
        if error.fatal():
            raise KafkaException(error)

    def _unreadable(self, progress: PartitionProgress, batch: int, why: str,
                    now: float) -> None:
        """Kafka cannot hand over the record batch that begins at `batch`, and would fetch it
        again forever: its offsets from where the reading stands to its end are sent on as
        messages without bytes, which the workers dead-letter (`UnreadableMessage`), and the
        reading goes on past it. While its end cannot be found (Kafka not answering), the
        partition waits, said in the status, and the next fetch's error tries again."""
        partition, start = progress.partition, max(batch, progress.next_read or 0)
        if (known := progress.unreadable) is not None and known.holding \
                and now < known.again_at:
            self._hold(progress, known.at)
            return
        try:
            end = unreadable_end(self._reader(), self.topic, partition, batch, start)
        except TransientError as exc:
            log.warning("Kafka cannot hand over offset %d of partition %d (%s), and its "
                        "batch's end could not be found: tried again in %.0f s: %s", start,
                        partition, why, UNREADABLE_AGAIN_S, exc, extra={"partition": partition})
            progress.unreadable = Unreadable(batch, start, None, why, now + UNREADABLE_AGAIN_S)
            self._hold(progress, start)
            return
        if end is None:
            return  # said again by a fetch from before the reading went past the batch
        if end - start > UNREADABLE_MAX_OFFSETS:
            # A batch's header says how many offsets it takes, whatever it holds: so many
            # messages could not be held. It waits, named in the status, for an operator.
            why = (f"{why}; its header claims {end - batch:,} offsets, more than "
                   f"{UNREADABLE_MAX_OFFSETS:,} to dead-letter one by one: skip it on purpose")
            if progress.unreadable is None or progress.unreadable.why != why:
                log.error("Kafka cannot hand over offsets from %d of partition %d: %s", start,
                          partition, why, extra={"partition": partition, "offsetFirst": start})
            progress.unreadable = Unreadable(batch, start, None, why, now + UNREADABLE_AGAIN_S)
            self._hold(progress, start)
            return
        progress.unreadable = Unreadable(batch, start, end, why, now)
        log.error("Kafka cannot hand over %s of partition %d: %s; they are "
                  "dead-lettered (UnreadableMessage) and the reading goes on from offset %d",
                  _span(start, end - 1), partition, why, end, extra={
                      "partition": partition, "offsetFirst": start, "offsetLast": end - 1})
        reason = (f"Kafka cannot hand this message over: its record batch (offsets from "
                  f"{batch} to {end - 1}) cannot be read: {why}")
        for offset in range(start, end):
            self._take(progress, TaskMessage(offset, None, None, unreadable=reason), now)
        # The Kafka client fetches a batch it cannot decode again and again, but skips one of
        # a format it does not know by itself: moved on, it hands over what follows already.
        if self._positions([partition]).get(partition, 0) < end:
            self.consumer.seek(TopicPartition(self.topic, partition, end))

    def _hold(self, progress: PartitionProgress, at: int) -> None:
        """Keep the reading of the partition at `at`, a batch Kafka cannot hand over not yet
        sent on: the Kafka client fetches a batch it cannot decode again and again, but goes
        past one of a format it does not know by itself, and what follows it would be taken
        for offsets after a gap."""
        if self._positions([progress.partition]).get(progress.partition, at) > at:
            self.consumer.seek(TopicPartition(self.topic, progress.partition, at))

    def _reader(self) -> MessageReader:
        if self._unreadable_reader is None:
            self._unreadable_reader = MessageReader(self.settings, timeout_s=VOUCH_TIMEOUT_S)
        return self._unreadable_reader

    def _dispatch(self, partition: int, messages: list[TaskMessage]) -> None:
        progress = self.partitions.get(partition)
        if progress is None:
            return
        waiting = self.unsent.pop(partition, None)
        if waiting:
            messages = waiting + messages
        if not messages:
            return
        # In offset order, as a worker takes a task's messages (a run's range is its first
        # and last): only a record batch listing its offsets out of order changes it.
        messages.sort(key=_offset_of)
        try:
            send_batch(self.celery, self.topic, partition, messages,
                       group=self.settings.kafka_group_id, topic_id=self.topic_id or "")
        except Exception as exc:
            # The Celery broker is unreachable: keep the batch, stop reading the partition,
            # and try again at the next sync. Nothing is committed past it meanwhile.
            log.error("could not send batch to %s: %s", queue_name(partition), exc, extra={
                "partition": partition, "events": len(messages),
                "offsetFirst": messages[0].offset, "offsetLast": messages[-1].offset})
            self.unsent[partition] = messages
            self._pause(progress)
            return
        progress.dispatched([m.offset for m in messages], self.clock())
        if self.broker_queues is not None:
            self.held.add(partition)
        metrics.IN_FLIGHT.labels(str(partition)).set(progress.in_flight)
        log.info("batch sent", extra={"partition": partition, "events": len(messages),
                                      "offsetFirst": messages[0].offset,
                                      "offsetLast": messages[-1].offset,
                                      "queue": queue_name(partition)})
        if progress.in_flight >= self.settings.max_in_flight_per_partition:
            self._pause(progress)

    def _skipped(self, partition: int, first: int, offset: int) -> None:
        """The reading of `partition` went from `first` on to `offset`. Offsets a log holds no
        message at are no loss (a transaction's marker, a key compacted away); offsets below
        the log's start are: Kafka deleted those events (the topic's retention) before the
        bridge read them, and the Kafka client went on from the log's start
        (`auto.offset.reset`). Unless a task applied them before (the offset ledger says),
        they were never applied and nothing here can bring them back: said at once, counted
        (`bridge_events_lost_to_retention_total`), alerted on. The log's start is the one
        the Kafka client keeps from its latest fetch: no request to Kafka."""
        try:
            start, _ = self.consumer.get_watermark_offsets(
                TopicPartition(self.topic, partition), cached=True)
        except KafkaException as exc:
            log.debug("the start of the log of partition %d is not known: %s", partition, exc)
            return
        if start > offset:
            # From a fetch later than the one that brought `offset`: whether the offsets
            # skipped were deleted or never held a message cannot be told.
            self._not_counted(partition, first, offset - 1, "and Kafka's log now starts past "
                              f"them, at {start}: deleted by its retention before the bridge "
                              "read them, or holding no message (a transaction's marker)")
            return
        if start <= first:
            return
        if self.broker_queues is None:
            self._not_counted(partition, first, start - 1, "below the start of Kafka's log; "
                              "tasks sent before may still apply some of them, and the Celery "
                              "broker's queues cannot be read")
            return
        # Tasks sent before (by an earlier reading, or before a re-read) may still apply some
        # of them: counted once none can (`_count_lost`).
        self.partitions[partition].skipped_below(first, start)
        log.warning("%s of partition %d skipped, below the start of Kafka's log: deleted by its "
                    "retention before the bridge read them; counted once no task sent before "
                    "can still apply them", _span(first, start - 1), partition, extra={
                        "partition": partition, "offsetFirst": first, "offsetLast": start - 1})

    def _count_lost(self, partition: int, now: float) -> None:
        """Count what the spans the reading skipped below the log's start hold that no task
        applied (the offset ledger's marks, done or leased), once no task sent before can
        still apply them (`PartitionProgress.queue_seen`). Called by `_sync` once it has
        measured the queues."""
        progress = self.partitions[partition]
        assert self.broker_queues is not None  # spans are kept only where queues can be read
        depth = self.queued.get(partition)  # measured at the start of this sync
        try:
            # A task a worker died with goes back to its queue only once a running worker
            # sees its visibility timeout passed: until then it is as good as queued.
            found = self.broker_queues.held(self._visibility_s) if depth == 0 else None
        except Unanswered:
            progress.quiet_looks = 0  # no look: at a later sync
            return
        held, overdue = found if found is not None else (None, None)
        progress.queue_seen(depth == 0 and not overdue, held == 0, now, self._count_wait_s)
        spans = progress.due(now)
        try:
            counted = [(first, end, end - first - self.ledger.applied_or_held(
                self._ledger_topic, partition, first, end)) for first, end, _ in spans]
        except redis.RedisError:  # at a later sync
            for span in spans:
                progress.skipped_below(*span)
            return
        for first, end, lost in counted:
            if lost <= 0:
                log.info("%s of partition %d, deleted by Kafka, were applied by tasks sent "
                         "before: no event lost", _span(first, end - 1), partition,
                         extra={"partition": partition})
                continue
            progress.lost += lost
            progress.lost_at = now
            metrics.LOST_TO_RETENTION.labels(self.topic, str(partition)).inc(lost)
            log.error("events lost: Kafka deleted %d event(s) of partition %d, at %s, before the "
                      "bridge read them (the topic's retention passed them while the pipeline "
                      "was behind or stopped); they were never applied", lost, partition,
                      _span(first, end - 1), extra={
                          "partition": partition, "offsetFirst": first,
                          "offsetLast": end - 1, "events": lost})

    def _uncounted(self, progress: PartitionProgress) -> None:
        """Say the spans skipped below the log's start that leave with a partition uncounted:
        its next reader starts past them."""
        for first, end, _ in progress.below_start:
            self._not_counted(progress.partition, first, end - 1, "below the start of Kafka's "
                              "log; the partition left this bridge before tasks sent before "
                              "could no longer apply them")
        progress.below_start.clear()

    def _not_counted(self, partition: int, first: int, last: int, why: str) -> None:
        log.warning("%s of partition %d skipped, %s: not counted", _span(first, last),
                    partition, why, extra={"partition": partition, "offsetFirst": first,
                                           "offsetLast": last})

    def _release_held(self, now: float) -> None:
        """Release the held partitions with messages waiting whose queue is empty now."""
        waiting = sorted(self.held & self.batcher.partitions())
        if not waiting or now < self._next_queue_check or self.broker_queues is None:
            return
        started = time.monotonic()
        depths = self._measure_queues(waiting)
        spent = time.monotonic() - started
        self._next_queue_check = now + max(QUEUE_CHECK_S, spent / QUEUE_CHECK_SHARE)
        if depths is None:
            self.held.clear()  # unknown: send as if no task were waiting
            return
        self.held -= {partition for partition, depth in depths.items() if depth == 0}

    def _pause(self, progress: PartitionProgress) -> None:
        if not progress.paused:
            self.consumer.pause([TopicPartition(self.topic, progress.partition)])
            progress.paused_at = self.clock()
            metrics.PAUSED.inc()
            log.info("partition paused", extra={"partition": progress.partition,
                                                "inFlight": progress.in_flight})

    def _resume(self, progress: PartitionProgress) -> None:
        if progress.paused:
            self.consumer.resume([TopicPartition(self.topic, progress.partition)])
            progress.paused_at = None
            metrics.PAUSED.dec()
            log.info("partition resumed", extra={"partition": progress.partition,
                                                 "inFlight": progress.in_flight})

    # -- the ledger: commit, backpressure, redelivery ----------------------------------------

    def _sync(self, now: float, *, redeliver: bool = True,
              only: list[int] | None = None, final: bool = False) -> None:
        """`final`: the last sync of these partitions (revoked, or the bridge stopping)."""
        chosen = {p: self.partitions[p] for p in (only or list(self.partitions))
                  if p in self.partitions}
        unvouched = [p for p, progress in chosen.items() if not progress.vouched]
        if unvouched and now >= self._next_vouch:
            self._vouch(unvouched, timeout_s=VOUCH_TIMEOUT_S)
            self._next_vouch = self.clock() + VOUCH_AGAIN_S  # from its end
            chosen = self._still_ours(chosen)
        for partition in unvouched:
            if partition in chosen and not chosen[partition].vouched:
                # Nothing it says of them can be trusted yet.
                chosen.pop(partition).unobserved()
        # The queues first: a task seen gone from its queue was taken before the ledger is
        # read, so a lease its worker wrote at once is seen with it.
        self._queue_depths(chosen)
        lows = {p: low for p, progress in chosen.items()
                if (low := progress.low()) is not None}
        # Only what each partition awaits: a mark past it (a hand edit) is not read as a set
        # of offsets that could be billions long.
        highs = {p: high for p, progress in chosen.items()
                 if (high := progress.high()) is not None}
        if lows:
            try:
                progress_by_partition = self._marks(lows, highs)
            except redis.RedisError as exc:
                # Without the ledger nothing is known to be done: commit nothing, wait.
                log.warning("offset ledger unreachable: %s", exc)
                for progress in chosen.values():
                    progress.unobserved()
                return
            # Those whose marks could not be read wait, as all do when the ledger does not
            # answer: neither committed nor read again (which would only add copies).
            for partition in lows.keys() - progress_by_partition.keys():
                chosen.pop(partition).unobserved()
            for partition, marks in progress_by_partition.items():
                chosen[partition].observe(marks.done, marks.leased, now,
                                          unrecorded=marks.unrecorded)
        self._commit(chosen, now, final=final)
        chosen = self._still_ours(chosen)
        for partition, progress in chosen.items():
            metrics.IN_FLIGHT.labels(str(partition)).set(progress.in_flight)
            if partition in self.unsent and not self.stopping:
                self._dispatch(partition, [])
                progress.unobserved()
                self._maybe_resume(progress)  # sent now, unless refused again
                continue
            if not final:
                self._end_drain(progress, now)
            if progress.below_start:
                self._count_lost(partition, now)
            self._maybe_resume(progress)
            if redeliver:
                self._maybe_redeliver(progress, now)
            else:
                progress.unobserved()

    def _marks(self, lows: dict[int, int], highs: dict[int, int]) -> dict[int, Marks]:
        """What the ledger says of these partitions. A key of one holding a value of another
        kind (a hand edit) fails the script that reads them all: each is read alone then, so
        that only that one waits (its commits, named in the log and by `status` as stalled),
        not every partition."""
        try:
            return self.ledger.read(self._ledger_topic, lows, highs)
        except redis.ResponseError as exc:
            if not key_of_another_kind(exc):
                raise
        found: dict[int, Marks] = {}
        for partition, low in lows.items():
            try:
                found |= self.ledger.read(self._ledger_topic, {partition: low},
                                          {partition: highs[partition]})
            except redis.ResponseError as exc:
                if not key_of_another_kind(exc):
                    raise
                if self._ledger_said.let_through(str(partition)) is not None:
                    log.error("the offset ledger's keys of partition %d (under %s:…:%d, "
                              "REDIS_URL) hold a value of another kind: its commits wait "
                              "until the key is deleted (%s)", partition, self.ledger.base,
                              partition, exc, extra={"partition": partition})
        return found

    def _maybe_resume(self, progress: PartitionProgress) -> None:
        """Read a paused partition again once nothing keeps it paused: its batch sent, its
        earlier reading's tasks gone, half of its bound on what is in flight free."""
        if progress.paused and not self.stopping and not progress.draining \
                and progress.partition not in self.unsent \
                and progress.may_resume(self.settings.max_in_flight_per_partition):
            self._resume(progress)

    def _end_drain(self, progress: PartitionProgress, now: float) -> None:
        queued = self.queued.get(progress.partition)
        if progress.drained(queued, now, self.settings.redelivery_timeout_s):
            log.info("reading the partition: %s", "the tasks sent before are gone from its queue"
                     if progress.earlier_gone else "none of the tasks sent before was seen taken "
                     "for REDELIVERY_TIMEOUT_S", extra={"partition": progress.partition,
                                                        "queued": queued})

    def _still_ours(self, chosen: dict[int, PartitionProgress]) -> dict[int, PartitionProgress]:
        """Those of `chosen` this bridge still holds as they were: a vouch or a commit that
        found the topic made again dropped them all (`_remade`), one that found work the
        database lost took its partition again (`_taken_again`)."""
        return {p: progress for p, progress in chosen.items()
                if self.partitions.get(p) is progress}

    def _publish_status(self) -> bool:
        """Say on the status board what this bridge holds (`eventpipe.status`); whether it
        was said."""
        now = self.clock()
        reading = self._positions(list(self.partitions))
        said = {"topic": self.topic, "partitions": {str(p): {
            "committed": progress.committed, "highWatermark": self.high_watermarks.get(p),
            "inFlight": progress.in_flight, "paused": progress.paused,
            "pausedFor": progress.paused_for(unsent=p in self.unsent, stopping=self.stopping),
            "pausedS": None if progress.paused_at is None else round(now - progress.paused_at, 1),
            "queued": self.queued.get(p), "lost": progress.lost, "skipped": progress.skipped,
            "lostAgoS": None if progress.lost_at is None else round(now - progress.lost_at, 1),
            "stuckS": self._stuck_s(progress, reading.get(p), now),
            "pastEndS": self._past_end_s(progress, now),
            "stalledS": progress.stalled_s(now),
            **self._unreadable_said(progress)}
            for p, progress in self.partitions.items()}}
        try:
            self.board.publish(BRIDGE, self.name, said)
        except redis.RedisError as exc:
            log.debug("status not published: %s", exc)
            return False
        return True

    def _stuck_s(self, progress: PartitionProgress, position: int | None,
                 now: float) -> float | None:
        """For how long Kafka has handed over nothing of a partition being read while its
        high watermark is past the reading (`position`: the Kafka client's, past offsets that
        hold no message, such as a transaction's marker): a batch it cannot hand over and
        says nothing of (a record cut short makes the client grow its fetches, silently), or
        whose end cannot be found."""
        high = self.high_watermarks.get(progress.partition)
        read = max(progress.next_read or 0, position or 0)
        if progress.paused or progress.next_read is None or high is None or high <= read:
            progress.stuck_since = None
            return None
        if progress.stuck_since is None:
            progress.stuck_since = now
        return round(now - progress.stuck_since, 1)

    def _past_end_s(self, progress: PartitionProgress, now: float) -> float | None:
        """For how long the partition's committed offset has been past the end of Kafka's log
        (its high watermark, as its fetches report it). The log was cut (an unclean leader
        election, a restore), or the offset set by hand: Apache Kafka answers such a fetch
        with an error, and the Kafka client reads from the log's start; a broker that answers
        with nothing leaves the events it takes below that offset unread. Said once it lasts
        STUCK_S (a report of the watermark from before a burst of writes lasts seconds), for
        an operator to lower the partition's position."""
        high = self.high_watermarks.get(progress.partition)
        committed = progress.committed
        if high is None or committed is None or high >= committed:
            progress.past_end_since = None
            return None
        if progress.past_end_since is None:
            progress.past_end_since = now
        elapsed = now - progress.past_end_since
        if elapsed > STUCK_S \
                and self._past_end_said.let_through(str(progress.partition)) is not None:
            log.error("partition %d: its committed offset %d is past the end of Kafka's log "
                      "(offset %d): the log was cut (an unclean leader election, a restore), "
                      "or the offset set by hand; Apache Kafka's client reads it again from "
                      "the log's start, but on a broker that answers with nothing the events "
                      "written below it are not read until its position is lowered "
                      "(docs/operations.md)", progress.partition,
                      committed, high, extra={"partition": progress.partition,
                                              "committed": committed, "highWatermark": high})
        return round(elapsed, 1)

    def _positions(self, partitions: list[int]) -> dict[int, int]:
        """Where the Kafka client's reading of each stands: past the last message handed
        over, and past the offsets after it that hold none (a transaction's marker, records
        of an aborted one). A local answer; none for a partition it does not know yet."""
        try:
            found = self.consumer.position([TopicPartition(self.topic, p) for p in partitions])
        except KafkaException:
            return {}
        return {tp.partition: tp.offset for tp in found if tp.offset >= 0}

    @staticmethod
    def _unreadable_said(progress: PartitionProgress) -> dict[str, Any]:
        known = progress.unreadable
        if known is None or not known.holding:
            return {}
        return {"unreadableAt": known.at, "unreadableWhy": known.why[:WHY_MAX]}

    def _commit(self, chosen: dict[int, PartitionProgress], now: float, *,
                final: bool = False) -> None:
        # Past the offsets at the end that hold no message (a transaction's marker): none
        # would ever be committed past (`PartitionProgress.committable` says when it may).
        reading = self._positions(list(chosen))
        offsets = {p: c for p, progress in chosen.items()
                   if (c := progress.committable(reading.get(p))) is not None}
        idle = self._idle_to_recheck(chosen, offsets, now)
        if not (offsets or idle) or not self._same_topic(now, final=final) \
                or not self._recorded(offsets, chosen, now, final=final, idle=idle):
            return
        try:
            # Named with the topic's id: a commit landing on a topic made again since is
            # known for another's by whoever reads it (`_vouch`).
            answers = self.consumer.commit(offsets=[
                TopicPartition(self.topic, p, o, metadata=self.topic_id or None)
                for p, o in offsets.items()], asynchronous=False)
        except KafkaException as exc:
            log.warning("offset commit failed, will retry: %s", exc, extra={"offsets": offsets})
            return
        # The request may succeed while a partition's commit fails: that one is not committed.
        for answer in answers or []:
            if answer.error is not None and offsets.pop(answer.partition, None) is not None:
                log.warning("offset commit failed, will retry: %s", answer.error,
                            extra={"partition": answer.partition})
        for partition, offset in offsets.items():
            chosen[partition].committed = offset
            metrics.COMMITTED_OFFSET.labels(self.topic, str(partition)).set(offset)
        # Not past a span skipped below the log's start that is not counted yet: its count
        # needs the marks of what tasks applied of it.
        kept = {p: min([offset, *(first for first, _, _ in chosen[p].below_start)])
                for p, offset in offsets.items()}
        with contextlib.suppress(redis.RedisError):  # trimmed at the next commit instead
            self.ledger.trim(self._ledger_topic, kept)
        log.debug("committed", extra={"offsets": offsets})

    def _database_replaced(self) -> bool:
        """Whether the embedded database's file was deleted, or another put in its place,
        since the bridge started, or a file beside it it writes through (the WAL, its index)
        was deleted: what it would record goes where nobody reads, and Kafka's offsets would
        move past work no database holds. It stops, committing nothing more."""
        lost = self._database_file.lost()
        if lost is None:
            return False
        if self.must_stop is None:
            self.must_stop = TransientError(
                f"{lost} while the bridge ran: it stops and commits nothing more; stop every "
                "process of the pipeline (they keep writing to the file they opened), then "
                "start them again")
            log.error("%s", self.must_stop)
        self.stopping = True
        return True

    def _idle_to_recheck(self, chosen: dict[int, PartitionProgress], offsets: dict[int, int],
                         now: float) -> list[int]:
        """Those of `chosen` with nothing to commit whose recorded positions are due to be
        read back (every POSITIONS_RECHECK_S)."""
        if now < self._next_recheck:
            return []
        self._next_recheck = now + POSITIONS_RECHECK_S
        return [p for p in chosen if p not in offsets and p in self._written]

    def _recorded(self, offsets: dict[int, int], chosen: dict[int, PartitionProgress],
                  now: float, *, final: bool, idle: Sequence[int] = ()) -> bool:
        """Record the offsets about to be committed in the database (`eventpipe.positions`),
        but those of partitions where it lost work (left out of `offsets`, and taken again);
        whether any was. Kafka hears of none the database does not hold. The positions of
        the `idle` partitions are read back in the same transaction, for the same losses."""
        if now < self._positions_again and not final:
            return False
        if self._database_replaced():
            return False
        try:
            # Copies: the call may outlive the wait, and the loop goes on changing these.
            engine, topic_id, asked = self.engine, self.topic_id or "", dict(offsets)
            written = {p: self._written[p] for p in (*offsets, *idle) if p in self._written}
            settled = {p: list(chosen[p].settled) for p in offsets}
            lost = self._database.call(lambda: positions.save(
                engine, self.topic, topic_id, asked, datetime.now(UTC), written=written,
                settled=settled))
        except (SQLAlchemyError, OSError) as exc:
            log.warning("could not record the offsets in the database: nothing is committed "
                        "until it can (tried again in %.0f s): %s", self._positions_wait_s, exc,
                        extra={"offsets": offsets})
            self._positions_again = self.clock() + self._positions_wait_s
            self._positions_wait_s = min(self._positions_wait_s * 2, POSITIONS_AGAIN_MAX_S)
            return False
        self._positions_wait_s = POSITIONS_AGAIN_S
        for partition, loss in sorted(lost.items()):
            offsets.pop(partition, None)
            self._taken_again(partition, loss)
        for partition, offset in offsets.items():
            self._written[partition] = offset
            chosen[partition].settled.clear()  # the position vouches for them now
        return bool(offsets)

    def _taken_again(self, partition: int, loss: positions.Lost) -> None:
        """The database lost the position this bridge recorded of the partition, or work
        done since (a failover, or a restore, while the bridge ran): what the bridge knows of
        the partition says done what the database does not hold. It starts again as one
        just assigned, vouched for at the next sync, and so read again from the database's
        position (`_vouch`)."""
        log.warning("the database lost work this bridge took for done (a failover, or a "
                    "restore, while the bridge ran?): %s; the partition is taken again from "
                    "what the database holds", loss.why, extra={
                        "partition": partition, "recorded": self._written.get(partition)})
        if loss.offsets:  # a lost position is counted as its partition is read again
            metrics.DATABASE_REWINDS.labels(self.topic, str(partition)).inc(loss.offsets)
        self._drop([partition])
        progress = self.partitions[partition] = PartitionProgress(partition, vouched=False,
                                                                  retaken=True)
        self._pause(progress)
        self._next_vouch = 0.0

    def _maybe_redeliver(self, progress: PartitionProgress, now: float) -> None:
        offset = progress.redelivery(now, self.settings.redelivery_timeout_s,
                                     self.queued.get(progress.partition))
        if offset is None:
            return
        # Seek first: if it fails, the bookkeeping still describes what was handed out, and
        # the redelivery is decided again at the next sync.
        try:
            self.consumer.seek(TopicPartition(self.topic, progress.partition, offset))
        except KafkaException as exc:
            log.warning("seek failed, will retry: %s", exc)
            return
        queued = self.queued.get(progress.partition)  # None: not known
        log.warning("events lost on the way; re-reading partition from offset %d%s", offset,
                    f" once the {queued} task(s) still in its queue are taken" if queued else "",
                    extra={"partition": progress.partition, "offset": offset,
                           "inFlight": progress.in_flight, "queued": queued})
        metrics.REDELIVERIES.labels(str(progress.partition)).inc()
        self.batcher.drop(progress.partition)
        self.unsent.pop(progress.partition, None)
        self.held.discard(progress.partition)
        progress.reset(offset)
        # The tasks behind the lost one still run: copies sent now would join them in the
        # queue, beyond the bound on what is in flight.
        progress.drain(queued, now, self.settings.redelivery_timeout_s)
        if progress.draining:
            self._pause(progress)
        else:
            self._resume(progress)

    def _queue_depths(self, chosen: dict[int, PartitionProgress]) -> None:
        if self.broker_queues is None or not chosen:
            return
        depths = self._measure_queues(list(chosen))
        if depths is None:
            self.queued.clear()  # unknown: redelivery falls back to its other evidence
            return
        for partition, depth in depths.items():
            metrics.QUEUE_DEPTH.labels(queue_name(partition)).set(depth)

    def _measure_queues(self, partitions: list[int]) -> dict[int, int] | None:
        """Tasks waiting in these partitions' queues, remembered in
        `queued`; None when the Celery broker cannot be asked."""
        assert self.broker_queues is not None
        try:
            depths = self.broker_queues.read(partitions)
        except Unanswered:
            return None
        self.queued.update(depths)
        return depths

    def _on_stats(self, raw: str) -> None:
        # Lag from librdkafka's own view: its high watermark comes from fetch responses,
        # which is right even on brokers whose ListOffsets answer is not.
        stats: dict[str, Any] = json.loads(raw)
        partitions = stats.get("topics", {}).get(self.topic, {}).get("partitions", {})
        for key, values in partitions.items():
            partition = int(key)
            if partition < 0 or partition not in self.partitions:
                continue
            high = values.get("hi_offset", -1)
            if high >= 0:
                self.high_watermarks[partition] = high
            progress = self.partitions[partition]
            committed = progress.committed
            if committed is None and progress.vouched:
                # Never committed: the group stands at the log's start, where it reads from
                # (`auto.offset.reset`), and the lag is the whole log. Without it, a partition
                # whose first event is stuck would show no lag and no alert would see it.
                low = values.get("lo_offset", -1)
                committed = low if low >= 0 else None
            if high >= 0 and committed is not None:
                metrics.CONSUMER_LAG.labels(self.topic, key).set(max(0, high - committed))

    @property
    def _ledger_topic(self) -> str:
        """The name the offset ledger keeps this topic's marks under."""
        return filed_under(self.topic, self.topic_id or "")

    def _same_topic(self, now: float, *, final: bool = False) -> bool:
        """Whether the topic is still the one whose offsets this bridge read, as Kafka said
        it at the last look (every TOPIC_CHECK_S), or says it now for a `final` commit. While
        Kafka does not say, nothing is committed; a topic made again stops the bridge
        (`_remade`). A commit made between the topic's making and the next look names the
        earlier topic's id, and whoever reads it next takes it for none (`_vouch`)."""
        if final or now >= self._next_topic_check:
            found = read_topic_id(self.admin, self.topic, VOUCH_TIMEOUT_S)
            self._next_topic_check = self.clock() + TOPIC_CHECK_S  # from the answer
            # No id where there was one says nothing either.
            self._topic_said = bool(found) or (found == "" and not self.topic_id)
            if found == "" and self.topic_id:
                log.warning("Kafka gives no id of topic %s now (it gave %s): nothing is "
                            "committed until it does; restart the bridge if the broker has "
                            "no topic ids any more", self.topic, self.topic_id)
            if found and self._made_again(found):
                return False
        return self._topic_said

    def _made_again(self, found: str) -> bool:
        """Whether `found`, Kafka's id of the topic now, is not the one this bridge read it
        under (then `_remade`): the topic made again, or given an id where it had none (a
        broker upgraded: what the bridge read is filed under the name alone, and its commits
        name no id). None where there was one (a broker downgraded) says nothing."""
        if found and self.topic_id is not None and found != self.topic_id:
            self._remade(found)
            return True
        return False

    def _check_topic(self) -> None:
        """Refuse, before joining the group, a topic with partitions no worker serves."""
        partitions = self._partitions_of_topic()
        if partitions is not None and partitions > self.settings.kafka_partitions:
            raise unserved(self.settings, partitions)

    def _partitions_of_topic(self) -> int | None:
        """How many partitions the topic has; None if it does not exist or Kafka is away
        (the group's assignment is checked too, `_served_or_stop`)."""
        try:
            found = self.consumer.list_topics(self.topic, timeout=10).topics.get(self.topic)
        except KafkaException as exc:
            log.warning("could not read the topic's partitions: %s", exc)
            return None
        return len(found.partitions) if found is not None and found.partitions else None

    # -- rebalance callbacks -----------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, assigned: list[TopicPartition]) -> None:
        # Taken here rather than by the client once this returns: a partition that is not
        # assigned yet may not be paused (below), and that pause is what keeps it unread.
        consumer.assign(assigned)
        assigned = self._served_or_stop(assigned)
        for tp in assigned:
            self.partitions[tp.partition] = PartitionProgress(tp.partition, vouched=False)
        self._vouch([tp.partition for tp in assigned])
        # A new progress is not paused, and the Kafka client keeps a partition paused across
        # a rebalance that gives it back: resumed here, it is read again whatever came before
        # (unless the bridge is stopping: its drain reads only what it already fetched). One
        # not vouched for stays paused until it is: the ledger's marks of events read before
        # would be forgotten with the stale ones.
        readable = [tp for tp in assigned if self._readable(tp.partition)]
        if readable and not self.stopping:
            consumer.resume(readable)
        for tp in assigned:
            if (progress := self.partitions.get(tp.partition)) is not None \
                    and (not progress.vouched or progress.draining):
                self._pause(progress)
        log.info("partitions assigned", extra={
            "partitions": [tp.partition for tp in assigned],
            "committed": {tp.partition: progress.committed for tp in assigned
                          if (progress := self.partitions.get(tp.partition)) is not None}})

    def _readable(self, partition: int) -> bool:
        """Vouched for, and with no task of an earlier reading left in its queue."""
        progress = self.partitions.get(partition)
        return progress is not None and progress.vouched and not progress.draining

    def _vouch(self, partitions: list[int], timeout_s: float = 10.0) -> None:
        """Trust what the ledger says of these partitions once it holds no marks of an earlier
        topic. The ledger is filed under Kafka's id of the topic, so marks a task of a topic
        of the same name made, before or after it was deleted, are not read here. A
        partition the group never committed starts from its first offset, and whatever the
        ledger says of it is stale still: a broker that gives no topic ids, or a bridge that
        died before its first commit. Forgetting it costs at most duplicates; trusting marks
        of other messages at the same offsets would commit past events never applied. Until
        the topic's id and the committed offsets are known and the marks forgotten (Kafka or
        Redis may not answer as partitions are assigned), the partitions commit nothing, and
        this is tried again at a later sync (they stay paused meanwhile), each of Kafka's
        two answers awaited at most `timeout_s`.

        Each commit names the topic's id (its metadata). An offset committed under another
        id was committed to an earlier topic of this name (by a bridge that had not yet seen
        it made again): it is not this topic's, and the partition is read from its start as
        one never committed.

        A committed offset past what the database holds (`eventpipe.positions`: restored from
        a backup, left behind by a failover, emptied) is not trusted either: the partition is
        read again from the database's position, its ledger's marks forgotten, as they would
        commit past work the database lost."""
        found = self._committed(self.consumer,
                                [TopicPartition(self.topic, p) for p in partitions], timeout_s)
        if found is None:
            return
        # Shown at once, before the rest is known (the lag, the status, the commit alert's
        # series): the commits that name no id, or the one this bridge knows.
        for partition, (offset, under) in found.items():
            if (progress := self.partitions.get(partition)) is not None \
                    and (not under or under == self.topic_id):
                progress.committed = offset
                metrics.COMMITTED_OFFSET.labels(self.topic, str(partition)).set(offset)
        named = read_topic_id(self.admin, self.topic, timeout_s)
        if named is None or self._made_again(named):  # said in the log
            return
        self.topic_id = named or self.topic_id or ""
        earlier = sorted(p for p, (_, under) in found.items()
                         if under and self.topic_id and under != self.topic_id)
        known = {p: offset for p, (offset, _) in found.items() if p not in earlier}
        try:
            engine, topic_id = self.engine, self.topic_id
            committed = {p: known[p] for p in partitions if p in known}
            retaken = [p for p in partitions
                       if (taken := self.partitions.get(p)) is not None and taken.retaken]
            behind, kept = self._database.call(lambda: positions.rewinds(
                engine, self.topic, topic_id, committed, retaken))
        except (SQLAlchemyError, OSError) as exc:
            log.warning("could not read what the database holds of new partitions: %s; they "
                        "are read once it answers", describe(exc),
                        extra={"partitions": partitions})
            return
        try:
            # Records the topic's id even when no partition is new (`OffsetLedger.forget`).
            self.ledger.forget(self._ledger_topic,
                               [p for p in partitions if p not in known or p in behind])
        except redis.RedisError as exc:
            log.warning("could not clear the ledger of new partitions: %s; nothing is "
                        "committed for them until it is", exc, extra={"partitions": partitions})
            return
        if earlier:
            log.warning("offsets committed to an earlier topic of this name: read from the "
                        "start", extra={"partitions": earlier, "committed": {
                            p: found[p][0] for p in earlier}})
        # Where to read again from: None for the log's start.
        again: dict[int, int | None] = {p: None for p in earlier}
        again.update((p, rewind.offset) for p, rewind in behind.items())
        starts: dict[int, int] = {}
        try:
            for partition, start in sorted(again.items()):
                if start is None:
                    start, _ = self.consumer.get_watermark_offsets(
                        TopicPartition(self.topic, partition), timeout=timeout_s)
                if partition in known:
                    # Not past Kafka's own offset: what retention deleted is counted lost there.
                    start = min(start, known[partition])
                self.consumer.seek(TopicPartition(self.topic, partition, start))
                starts[partition] = start
            if starts:
                # In the place of the offsets not trusted, for whoever reads them (`eventpipe
                # verify`, the lag, Kafka's tools), should nothing come to commit past them.
                self.consumer.commit(offsets=[
                    TopicPartition(self.topic, p, start, metadata=self.topic_id or None)
                    for p, start in starts.items()], asynchronous=False)
        except KafkaException as exc:  # not fetching yet, Kafka away: at a later sync
            log.warning("could not read them again yet: %s", exc)
            return
        for partition, rewind in behind.items():
            if partition in known:
                self._rewound(partition, starts[partition], known[partition], rewind.why)
        known.update(starts)
        # Tasks an earlier owner sent (or this bridge, before a restart) may still wait in
        # the queues: those partitions are read once they are taken (`PartitionProgress.drain`).
        # Unknown, they are read at once.
        waiting = self._measure_queues(partitions) if self.broker_queues is not None else None
        for partition in partitions:
            if (progress := self.partitions.get(partition)) is not None:
                progress.vouched, progress.retaken = True, False
                if partition in kept:  # checked at the first commit too (`_recorded`)
                    self._written[partition] = kept[partition]
                progress.drain(waiting.get(partition) if waiting else None, self.clock(),
                               self.settings.redelivery_timeout_s)
                progress.committed = progress.next_read = known.get(partition)
                progress.read_since_set = False
                # At zero from the start: an alert sees the first loss as an increase.
                metrics.LOST_TO_RETENTION.labels(self.topic, str(partition))
                # Exported from the start, not from this bridge's first commit: a partition
                # whose oldest event is stuck commits nothing, and its alert needs the series.
                if progress.committed is not None:
                    metrics.COMMITTED_OFFSET.labels(self.topic, str(partition)).set(
                        progress.committed)
                if progress.draining:
                    self._pause(progress)
                    log.info("partition read once the %d task(s) an earlier reading sent are "
                             "gone from its queue", self.queued.get(partition, 0),
                             extra={"partition": partition})
                elif not self.stopping:
                    self._resume(progress)

    def _rewound(self, partition: int, start: int, committed: int, why: str) -> None:
        """Say and count a partition read again from `start` for the database."""
        if start < committed:
            log.warning("the database lacks messages Kafka counts as done (restored from a "
                        "backup, or left behind by a failover?): reading offsets %d–%d again: "
                        "%s", start, committed - 1, why, extra={
                            "partition": partition, "offset": start, "committed": committed})
            metrics.DATABASE_REWINDS.labels(self.topic, str(partition)).inc(committed - start)

    def _served_or_stop(self, assigned: list[TopicPartition]) -> list[TopicPartition]:
        """The partitions whose queues workers serve (those below KAFKA_PARTITIONS). Any other
        means the topic grew past the setting while this bridge ran: its events would be sent
        to queues no worker consumes, and stay there. The bridge reads none of them and
        stops, saying what to set."""
        count = self.settings.kafka_partitions
        beyond = max((tp.partition for tp in assigned if tp.partition >= count), default=None)
        if beyond is not None and self.must_stop is None:
            self.must_stop = unserved(
                self.settings, max(beyond + 1, self._partitions_of_topic() or 0))
            log.error("%s", self.must_stop)
            self.stopping = True
        return [tp for tp in assigned if tp.partition < count]

    def _committed(
        self, consumer: Consumer, assigned: list[TopicPartition], timeout_s: float = 10.0,
    ) -> dict[int, tuple[int, str]] | None:
        """The group's committed offset of each partition that has one, with the topic id its
        commit names ("" for none); None if unknown."""
        try:
            found = consumer.committed(assigned, timeout=timeout_s)
        except KafkaException as exc:
            log.warning("could not read committed offsets: %s", exc)
            return None
        return {tp.partition: (tp.offset, tp.metadata or "") for tp in found if tp.offset >= 0}

    def _on_revoke(self, _consumer: Consumer, revoked: list[TopicPartition]) -> None:
        numbers = [tp.partition for tp in revoked if tp.partition in self.partitions]
        for partition in numbers:
            self.batcher.drop(partition)
            self.unsent.pop(partition, None)
        try:
            self._sync(self.clock(), redeliver=False, only=numbers, final=True)
        except Exception as exc:  # the new owner re-reads from the last commit either way
            log.warning("final commit on revoke failed: %s", exc)
        for partition in numbers:
            self._forget(partition)
        log.info("partitions revoked", extra={"partitions": numbers})

    def _on_lost(self, _consumer: Consumer, lost: list[TopicPartition]) -> None:
        self._drop([tp.partition for tp in lost])
        log.warning("partitions lost", extra={"partitions": [tp.partition for tp in lost]})

    def _remade(self, found: str) -> None:
        """The topic was deleted and made again while this bridge read it: what it knows of
        its partitions is of the earlier topic, and an offset it would commit now would skip
        the new topic's events. It drops them unread (paused) and stops, to be started
        again."""
        self.must_stop = TransientError(
            f"topic {self.topic} was deleted and made again while the bridge read it (Kafka's "
            f"id {self.topic_id}, now {found}): the bridge stops and commits nothing more; "
            f"start it again to read the new topic" if self.topic_id else
            f"Kafka gives topic {self.topic} an id now ({found}), where it gave none: the "
            f"bridge stops and commits nothing more; start it again to read it under the id")
        log.error("%s", self.must_stop)
        self.stopping = True
        with contextlib.suppress(KafkaException):
            self._pause_all()
        self._drop(list(self.partitions))

    def _drop(self, partitions: list[int]) -> None:
        """Forget partitions that are no longer ours, with what was read of them and not
        sent."""
        for partition in partitions:
            self.batcher.drop(partition)
            self.unsent.pop(partition, None)
            self._forget(partition)

    def _forget(self, partition: int) -> None:
        """Drop a partition that is no longer ours, and the series this bridge exported for
        it: its new owner reports them now."""
        self.queued.pop(partition, None)
        self.high_watermarks.pop(partition, None)
        self.held.discard(partition)
        self._written.pop(partition, None)
        progress = self.partitions.pop(partition, None)
        if progress is not None and progress.paused:
            metrics.PAUSED.dec()
        if progress is not None:
            self._uncounted(progress)
        # Not the count of events lost to retention: a count, not a state, whose increase a
        # removal could hide before it is scraped.
        for gauge, labels in ((metrics.CONSUMER_LAG, (self.topic, str(partition))),
                              (metrics.COMMITTED_OFFSET, (self.topic, str(partition))),
                              (metrics.QUEUE_DEPTH, (queue_name(partition),)),
                              (metrics.IN_FLIGHT, (str(partition),))):
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)


def _offset_of(message: TaskMessage) -> int:
    return message.offset


def _span(first: int, last: int) -> str:
    return f"offset {first}" if first == last else f"offsets {first}–{last}"


def run(settings: Settings) -> None:
    bridge = Bridge(settings)
    bridge.install_signal_handlers()
    bridge.run()
