"""What the bridge reads, and when, with a real broker and Redis: events Kafka deleted before
the bridge read them are said and counted, offsets no message holds are no loss, and a
partition whose queue still holds the tasks of an earlier reading is read again once they are
gone, so that the queue never holds two copies of its offsets."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from prometheus_client import REGISTRY
from sqlalchemy import create_engine, delete, update

from bridge import service
from bridge.service import Bridge
from eventpipe import positions
from eventpipe.effects import Position
from eventpipe.errors import TransientError
from eventpipe.kafka import MessageReader, unreadable_end
from eventpipe.messages import RawMessage
from eventpipe.migrations import upgrade
from eventpipe.queues import TaskMessage, queue_name, send_batch, visibility_timeout_s
from eventpipe.settings import Settings
from eventpipe.status import (
    BRIDGE,
    STUCK_S,
    DlqStatus,
    PartitionStatus,
    assemble,
    problems,
)
from eventpipe.tables import kafka_done_ranges, kafka_positions
from tests.support.broker import TopicFactory, commit_offset, produce, settings_for
from tests.support.pipeline import wait_until
from tests.support.raw_kafka import (
    batch_with_header,
    cut_short_batch,
    out_of_order_batch,
    produce_batch,
    undecodable_batch,
    unknown_format_batch,
)
from tests.support.services import REDIS_URL

QUEUE = queue_name(0)


class _LogStartsAt:
    """The bridge's Kafka client, but for the start of the log, which it reports as Apache
    Kafka would once retention deleted the log up to `start` (the broker here deletes
    nothing)."""

    def __init__(self, consumer: Consumer, start: int) -> None:
        self._consumer, self._start = consumer, start

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)

    def get_watermark_offsets(self, partition: TopicPartition,
                              *args: Any, **kwargs: Any) -> tuple[int, int]:
        low, high = self._consumer.get_watermark_offsets(partition, *args, **kwargs)
        return max(low, self._start), high


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def queue() -> Iterator[redis.Redis]:
    """Partition 0's Celery queue, which no worker serves here: empty before and after."""
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(QUEUE)
    yield client
    client.delete(QUEUE)
    client.close()


@contextmanager
def reading_bridge(kafka_broker: str, topic: str, committed: int, *, log_start: int = 0,
                   group: str | None = None, clock: _Clock | None = None,
                   **settings: Any) -> Iterator[Bridge]:
    """A bridge of `group` (a new one by default) given partition 0 of `topic`, committed at
    `committed`, and vouched for. Its tasks go to a Celery broker no worker serves."""
    group = group or f"group-{uuid.uuid4().hex}"
    chosen = dataclasses.replace(settings_for(kafka_broker, topic, partitions=1),
                                 kafka_group_id=group, redis_url=REDIS_URL,
                                 celery_broker_url=REDIS_URL, **settings)
    commit_offset(kafka_broker, group, topic, 0, committed)
    bridge = Bridge(chosen, clock=clock or _Clock())
    consumer = bridge.consumer
    bridge.consumer = _LogStartsAt(consumer, log_start)  # type: ignore[assignment]
    try:
        bridge._on_assign(consumer, [TopicPartition(topic, 0)])

        def vouched() -> bool:  # at a later sync if the client was not fetching it yet
            bridge._next_vouch = 0.0
            bridge._sync(bridge.clock(), redeliver=False)
            return bridge.partitions[0].vouched

        wait_until(vouched, 30, "the partition vouched for")
        yield bridge
    finally:
        consumer.close()


def _applied(bridge: Bridge, offsets: Iterable[int]) -> None:
    """What a worker does of partition 0's offsets it gave their fates: their ranges
    recorded in the database, in the fates' transaction, then marked done in the ledger."""
    offsets = list(offsets)
    with bridge.engine.begin() as conn:
        positions.record_done(conn, positions.Done(bridge.topic, bridge.topic_id or "", 0,
                                                   offsets))
    bridge.ledger.settle(bridge._ledger_topic, 0, offsets)


def _read_once(bridge: Bridge) -> None:
    bridge._consume_once()
    for partition, messages in bridge.batcher.due(bridge.clock()):  # as read, held or not
        bridge._dispatch(partition, messages)


def _read_up_to(bridge: Bridge, offset: int) -> None:
    def read() -> bool:
        _read_once(bridge)
        return (bridge.partitions[0].next_read or 0) > offset

    wait_until(read, 30, f"offset {offset} read", interval_s=0)


def _syncs_apart(bridge: Bridge, count: int) -> None:
    """Syncs a second apart on the bridge's clock (a `_Clock`)."""
    for _ in range(count):
        bridge.clock.now += 1  # type: ignore[attr-defined]
        bridge._sync(bridge.clock())


def _read_from_the_log_start(bridge: Bridge, topic: str, start: int) -> None:
    """What the Kafka client does on Apache Kafka, told the committed offset is out of range:
    it goes on from the log's start. Read up to the last of ten messages."""
    wait_until(lambda: _seek(bridge, TopicPartition(topic, 0, start)), 30, "the seek")
    _read_up_to(bridge, 9)


def _seek(bridge: Bridge, position: TopicPartition) -> bool:
    try:
        bridge.consumer.seek(position)
    except KafkaException:  # not fetching it yet
        return False
    return True


def _lost(topic: str) -> float | None:
    return REGISTRY.get_sample_value("bridge_events_lost_to_retention_total",
                                     {"topic": topic, "partition": "0"})


def _shown(bridge: Bridge) -> PartitionStatus:
    """Partition 0 as `eventpipe status` shows it, from what the bridge published."""
    bridge._publish_status()
    dlq = DlqStatus(open=0, in_stream=0, by_error_class={}, by_event_type={})
    return assemble(datetime.now(UTC), bridge.topic, bridge.settings.kafka_group_id, 1,
                    bridge.board.members(), {}, dlq).partitions[0]


def _sent(monkeypatch: pytest.MonkeyPatch) -> list[TaskMessage]:
    """The messages the bridge sends, as it sends them."""
    sent: list[TaskMessage] = []

    def capture(*args: Any, **kwargs: Any) -> None:
        sent.extend(args[3])
        send_batch(*args, **kwargs)

    monkeypatch.setattr(service, "send_batch", capture)
    return sent


def _until_high_watermark(bridge: Bridge, high: int) -> None:
    """Read on until the Kafka client's statistics give partition 0's high watermark."""
    def known() -> bool:
        _read_once(bridge)
        return bridge.high_watermarks.get(0) == high

    wait_until(known, 30, "Kafka's high watermark, from the client's statistics")


def _events(count: int) -> list[tuple[bytes, bytes, tuple[()]]]:
    return [(b"k", b"{}", ()) for _ in range(count)]


def test_events_kafka_deleted_before_the_bridge_read_them_are_said_and_counted(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    """Before: a group whose committed offset Kafka's retention had passed (a bridge stopped
    longer than the retention, or a lag beyond it) was read on from the log's start by the
    Kafka client (`auto.offset.reset`), and the commits went past events never applied,
    said only in librdkafka's log. They are said in one line, counted per partition, and
    alerted on (EventpipeEventsLostToRetention)."""
    topic = kafka_topic(partitions=1)
    produce(kafka_broker, topic, _events(10))
    with reading_bridge(kafka_broker, topic, committed=3, log_start=7) as bridge:
        assert _lost(topic) == 0  # at zero from the start: the alert sees the first loss
        # Workers applied the tasks the bridge sent of 4 before it stopped (a review's
        # finding: they were counted among the lost).
        _applied(bridge, [4])
        _read_from_the_log_start(bridge, topic, 7)
        assert bridge.partitions[0].in_flight == 10 - 7
        assert _lost(topic) == 0  # its task of 7-9 is queued
        assert (_shown(bridge).skipped, _shown(bridge).lost) == (4, 0)
        queue.delete(QUEUE)  # taken, and done
        _syncs_apart(bridge, 2)  # two looks in a row: nothing can apply 3-6 any more
        assert _lost(topic) == 3
        assert "events lost: Kafka deleted 3 event(s) of partition 0, at offsets 3–6, before " \
            "the bridge read them" in caplog.text
        assert (_shown(bridge).skipped, _shown(bridge).lost) == (0, 3)  # and in its problems


def test_offsets_skipped_below_a_log_start_newer_than_the_read_are_not_counted(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    """A review's finding: the start the Kafka client keeps is from its latest fetch, which
    may be ahead of the message read. Past that message, it cannot tell the offsets skipped
    before it deleted from offsets that never held one (a transaction's marker): said, not
    counted, so that no alert cries loss where there may be none."""
    topic = kafka_topic(partitions=1)
    produce(kafka_broker, topic, _events(10))
    with reading_bridge(kafka_broker, topic, committed=3, log_start=9) as bridge:
        _read_from_the_log_start(bridge, topic, 7)
        assert _lost(topic) == 0
        assert "offsets 3–6 of partition 0 skipped, and Kafka's log now starts past them, " \
            "at 9" in caplog.text


def test_offsets_skipped_while_tasks_may_still_apply_them_are_counted_once_they_are_done(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    """Reviews' findings: a partition read while the tasks of an earlier reading were not
    seen gone from its queue (nobody took them for REDELIVERY_TIMEOUT_S), or while workers
    held some (taken, not acknowledged), counted among the lost the events those tasks would
    still apply; and a skip not counted then was never counted. It is counted once no task
    that could apply it is left, less what the tasks applied."""
    topic = kafka_topic(partitions=1)
    produce(kafka_broker, topic, _events(10))
    group = f"group-{uuid.uuid4().hex}"
    with reading_bridge(kafka_broker, topic, 3, group=group) as earlier:
        _read_up_to(earlier, 9)  # one task of 3-9, which nobody takes for long
    clock = _Clock()
    with reading_bridge(kafka_broker, topic, 3, log_start=7, group=group,
                        clock=clock) as bridge:
        clock.now += bridge.settings.redelivery_timeout_s
        bridge._sync(clock())
        assert not bridge.partitions[0].draining
        _read_from_the_log_start(bridge, topic, 7)
        assert _lost(topic) == 0
        assert "offsets 3–6 of partition 0 skipped, below the start of Kafka's log: deleted " \
            "by its retention before the bridge read them; counted once no task sent before " \
            "can still apply them" in caplog.text
        # Workers take the earlier task (3-9) and the new one (7-9); the first is held still
        # (delivered, not acknowledged, as kombu records it), the second is done.
        queue.rpop(QUEUE)
        queue.rpop(QUEUE)
        tag = f"test-{uuid.uuid4().hex}"
        queue.hset("unacked", tag, "{}")
        try:
            _applied(bridge, [3, 4, 7, 8, 9])
            bridge._sync(clock())
            # Committed past them (a review's finding: that trimmed the ledger's marks of 3
            # and 4, and all four were counted), not counted yet: the task is held.
            assert bridge.partitions[0].committed == 10
            assert _lost(topic) == 0
            queue.hdel("unacked", tag)  # it was done: its worker died on 5
            _syncs_apart(bridge, 2)
        finally:
            queue.hdel("unacked", tag)
        assert _lost(topic) == 2
        assert "events lost: Kafka deleted 2 event(s) of partition 0, at offsets 3–6" \
            in caplog.text


def test_a_skip_below_the_log_start_is_counted_once_its_wait_is_over_whatever_is_held(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis) -> None:
    """Counting must not wait for ever (workers that always hold some task, a broker that
    does not tell which): once the queue is seen empty, the tasks held then are handed out
    again and applied within kombu's visibility timeout and the task time limit; what the
    ledger does not mark then is counted."""
    topic = kafka_topic(partitions=1)
    produce(kafka_broker, topic, _events(10))
    clock = _Clock()
    tag = f"test-{uuid.uuid4().hex}"
    queue.hset("unacked", tag, "{}")  # some worker holds a task, now and later
    try:
        with reading_bridge(kafka_broker, topic, committed=3, log_start=7,
                            clock=clock) as bridge:
            _read_from_the_log_start(bridge, topic, 7)
            queue.delete(QUEUE)  # its task of 7-9 taken
            bridge._sync(clock())
            assert _lost(topic) == 0
            clock.now += bridge._count_wait_s - 1
            bridge._sync(clock())
            assert _lost(topic) == 0
            clock.now += 1
            bridge._sync(clock())
            assert _lost(topic) == 4
    finally:
        queue.hdel("unacked", tag)


def test_a_task_a_dead_worker_held_past_its_visibility_timeout_keeps_a_skip_uncounted(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis) -> None:
    """A review's finding: only a running worker hands a dead one's task back to its queue,
    once kombu's visibility timeout passed; with none running, the wait ended and the skip
    was counted while that task could still apply it. Such a task counts as queued."""
    topic = kafka_topic(partitions=1)
    produce(kafka_broker, topic, _events(10))
    tag = f"test-{uuid.uuid4().hex}"
    queue.hset("unacked", tag, "{}")
    queue.zadd("unacked_index", {tag: time.time() - 2 * visibility_timeout_s(Settings())})
    try:
        with reading_bridge(kafka_broker, topic, committed=3, log_start=7) as bridge:
            _read_from_the_log_start(bridge, topic, 7)
            queue.delete(QUEUE)
            _syncs_apart(bridge, 1)
            bridge.clock.now += 10 * bridge._count_wait_s  # type: ignore[attr-defined]
            _syncs_apart(bridge, 2)
            assert _lost(topic) == 0
            queue.hdel("unacked", tag)  # a worker started, handed it back, and it was done
            queue.zrem("unacked_index", tag)
            _syncs_apart(bridge, 2)
            assert _lost(topic) == 4
    finally:
        queue.hdel("unacked", tag)
        queue.zrem("unacked_index", tag)


def test_offsets_a_log_holds_no_message_at_are_no_loss(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis) -> None:
    """A transactional producer's commits take an offset each, which no message holds: the
    reading goes past them, and nothing is lost."""
    topic = kafka_topic(partitions=1)
    producer = Producer({"bootstrap.servers": kafka_broker,
                         "transactional.id": f"tx-{uuid.uuid4().hex}"})
    producer.init_transactions(30)
    for _ in range(3):
        producer.begin_transaction()
        for _ in range(2):
            producer.produce(topic, b"{}", b"k", partition=0)
        producer.commit_transaction(30)
    with reading_bridge(kafka_broker, topic, committed=0) as bridge:
        _read_up_to(bridge, 7)  # 0, 1, 3, 4, 6, 7: the markers at 2, 5 and 8
        assert bridge.partitions[0].in_flight == 6
        assert _lost(topic) == 0


def test_a_partition_given_with_tasks_of_an_earlier_reading_queued_is_read_once_they_are_gone(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis) -> None:
    """Before: a bridge given a partition (a rebalance, a restart) read it from the committed
    offset at once, and its tasks joined those the earlier reading had sent: the queue held
    two copies of the same events, beyond MAX_IN_FLIGHT_PER_PARTITION (Redis's memory), and
    each applied twice. It waits until they are taken."""
    topic = kafka_topic(partitions=1)
    produce(kafka_broker, topic, _events(6))
    group = f"group-{uuid.uuid4().hex}"
    with reading_bridge(kafka_broker, topic, 0, group=group) as earlier:
        _read_up_to(earlier, 5)
    assert queue.llen(QUEUE) == 1  # its one task of six events, never taken
    with reading_bridge(kafka_broker, topic, 0, group=group) as bridge:
        progress = bridge.partitions[0]
        assert progress.draining and progress.paused
        assert _shown(bridge).paused_for == "draining"
        bridge.clock.now += 7  # type: ignore[attr-defined]
        assert (_shown(bridge).paused_s or 0) >= 7  # how long, counted from the pause
        for _ in range(5):
            _read_once(bridge)
            bridge._sync(bridge.clock())
        assert queue.llen(QUEUE) == 1 and progress.next_read == 0
        queue.rpop(QUEUE)  # a worker took it
        bridge._sync(bridge.clock())
        assert not progress.draining and not progress.paused
        assert (_shown(bridge).paused_for, _shown(bridge).paused_s) == (None, None)
        _read_up_to(bridge, 5)
        assert queue.llen(QUEUE) == 1 and progress.in_flight == 6


def test_a_reread_waits_for_the_tasks_still_queued_behind_the_lost_one(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis) -> None:
    """A review's finding: re-reading a partition whose task was lost (a worker killed mid-
    batch, a later task of the partition done) sent new copies at once beside the tasks still
    queued behind the lost one: a queue beyond MAX_IN_FLIGHT_PER_PARTITION, growing at each
    re-read (36,000 events against a bound of 5,000 in the review's model). The re-read
    starts once they are taken."""
    topic = kafka_topic(partitions=1)
    produce(kafka_broker, topic, _events(6))
    clock = _Clock()
    with reading_bridge(kafka_broker, topic, 0, clock=clock, batch_max_events=2) as bridge:
        _read_up_to(bridge, 5)
        assert queue.llen(QUEUE) == 3  # 0-1, 2-3, 4-5
        queue.rpop(QUEUE)  # taken by a worker killed mid-batch
        queue.rpop(QUEUE)  # taken by a worker that applied it
        _applied(bridge, [2, 3])
        bridge._sync(clock())
        clock.now += bridge.settings.redelivery_timeout_s
        bridge._sync(clock())
        progress = bridge.partitions[0]
        assert progress.draining and progress.paused and progress.next_read == 0
        for _ in range(5):
            _read_once(bridge)
            bridge._sync(clock())
        assert queue.llen(QUEUE) == 1  # 4-5 alone, no copy beside it
        queue.rpop(QUEUE)  # a worker took it
        bridge._sync(clock())
        _read_up_to(bridge, 5)
        assert queue.llen(QUEUE) == 3


def test_a_partition_whose_earlier_tasks_nobody_takes_is_read_all_the_same(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis) -> None:
    """Draining must end: with no worker taking the earlier tasks (none serves the queue, or
    another pipeline's tasks keep it full), the partition is read once none was taken for
    REDELIVERY_TIMEOUT_S."""
    topic = kafka_topic(partitions=1)
    produce(kafka_broker, topic, _events(6))
    group = f"group-{uuid.uuid4().hex}"
    with reading_bridge(kafka_broker, topic, 0, group=group) as earlier:
        _read_up_to(earlier, 5)
    clock = _Clock()
    with reading_bridge(kafka_broker, topic, 0, group=group, clock=clock) as bridge:
        progress = bridge.partitions[0]
        clock.now += bridge.settings.redelivery_timeout_s - 1
        bridge._sync(clock())
        assert progress.draining
        clock.now += 1
        bridge._sync(clock())
        assert not progress.draining and not progress.paused
        _read_up_to(bridge, 5)
        assert queue.llen(QUEUE) == 2


def test_a_stopping_bridge_says_so_on_the_board_while_it_waits_for_what_it_sent(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis) -> None:
    """A review's finding: a bridge stopping published nothing while it waited (up to
    SHUTDOWN_DRAIN_TIMEOUT_S) for the tasks it had sent, so after 10 s the status said no
    bridge was running, and never why its partitions were paused."""
    topic = kafka_topic(partitions=1)
    produce(kafka_broker, topic, _events(3))
    with reading_bridge(kafka_broker, topic, 0, clock=time.monotonic,  # type: ignore[arg-type]
                        shutdown_drain_timeout_s=120) as bridge:
        _read_up_to(bridge, 2)
        board = bridge.board

        def said() -> str | None:
            members = board.members()
            return members[0].said["partitions"]["0"].get("pausedFor") if members else None

        stopping = threading.Thread(target=bridge._shutdown)
        stopping.start()
        wait_until(lambda: said() == "stopping", 10, "the bridge seen stopping")
        board.leave(BRIDGE, bridge.name)
        wait_until(lambda: said() == "stopping", 10, "the same said again while it waits")
        _applied(bridge, [0, 1, 2])  # what it sent is done
        stopping.join(30)  # well before its drain's time is over: it ended the wait
        assert not stopping.is_alive() and bridge.partitions[0].in_flight == 0
        assert board.members() == []


def test_a_batch_the_celery_broker_refused_pauses_its_partition_until_it_is_sent(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The status says why; and once the batch is sent at a sync, that sync reads the
    partition again (a review's finding: it stayed paused to the next, said to be for
    backpressure with nothing in flight to speak of)."""
    topic = kafka_topic(partitions=1)
    produce(kafka_broker, topic, _events(3))
    with reading_bridge(kafka_broker, topic, 0) as bridge:
        def refused(*args: Any, **kwargs: Any) -> None:
            raise ConnectionError("the Celery broker is away")

        monkeypatch.setattr(service, "send_batch", refused)
        _read_up_to(bridge, 2)
        progress = bridge.partitions[0]
        assert progress.paused and _shown(bridge).paused_for == "broker"
        assert queue.llen(QUEUE) == 0
        monkeypatch.setattr(service, "send_batch", send_batch)
        bridge._sync(bridge.clock())
        assert queue.llen(QUEUE) == 1 and progress.in_flight == 3
        assert not progress.paused and _shown(bridge).paused_for is None


def test_a_batch_kafka_cannot_hand_over_is_sent_on_from_where_the_reading_stands(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The committed offset inside a record batch Kafka cannot hand over (offsets 1-5): the
    offsets of it from there to its end go to the workers without bytes, to be dead-lettered
    with why; none before the committed offset, none past the batch, and the reading goes on
    after it, nothing taken for skipped."""
    topic = kafka_topic(partitions=1)
    produce(kafka_broker, topic, _events(1))
    assert produce_batch(kafka_broker, topic, 0, undecodable_batch(5)) == 1
    produce(kafka_broker, topic, _events(2))
    sent = _sent(monkeypatch)
    with reading_bridge(kafka_broker, topic, committed=3) as bridge:
        _read_up_to(bridge, 7)
        assert [(m.offset, m.value is None, m.unreadable is not None) for m in sent] == [
            (3, True, True), (4, True, True), (5, True, True), (6, False, False),
            (7, False, False)]
        assert "offsets from 1 to 5) cannot be read: Decompression" in (sent[0].unreadable or "")
        assert "Kafka cannot hand over offsets 3–5 of partition 0" in caplog.text
        assert bridge.partitions[0].skipped == 0 and bridge.partitions[0].in_flight == 5


def test_a_batch_kafka_cannot_hand_over_near_the_end_of_its_partition_is_read_past(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A review's finding: the search for the batch's end doubled its steps past the
    partition's end, where Tansu answers nothing: the search failed, and the partition
    waited for more messages to come after the batch. No read goes past the high watermark
    the first one gives."""
    topic = kafka_topic(partitions=1)
    produce(kafka_broker, topic, _events(1))
    produce_batch(kafka_broker, topic, 0, undecodable_batch(5))  # offsets 1-5
    produce(kafka_broker, topic, _events(1))  # offset 6: the partition ends at 7
    sent = _sent(monkeypatch)
    with reading_bridge(kafka_broker, topic, committed=0) as bridge:
        _read_up_to(bridge, 6)
        assert [(m.offset, m.unreadable is not None) for m in sent] == [
            (0, False), (1, True), (2, True), (3, True), (4, True), (5, True), (6, False)]


def test_a_batch_of_a_format_the_client_does_not_know_is_dead_lettered_not_skipped(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A review's finding: a batch of a format (magic byte) the Kafka client does not know
    it reports once and skips by itself; the bridge took its offset for one that holds no
    message, and a valid event was lost with no fate, `verify` clean. It is dead-lettered,
    each message read once."""
    topic = kafka_topic(partitions=1)
    produce(kafka_broker, topic, _events(1))
    produce_batch(kafka_broker, topic, 0, unknown_format_batch(b"k", b"{}"))  # offset 1
    produce(kafka_broker, topic, _events(2))
    sent = _sent(monkeypatch)
    with reading_bridge(kafka_broker, topic, committed=0) as bridge:
        _read_up_to(bridge, 3)
        assert [(m.offset, m.unreadable is not None) for m in sent] == [
            (0, False), (1, True), (2, False), (3, False)]
        assert "MagicByte 3" in (sent[1].unreadable or "")
        assert bridge.partitions[0].skipped == 0


def test_a_batch_the_client_goes_past_by_itself_holds_the_reading_while_its_end_is_unknown(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A review's finding: the Kafka client goes past a batch of a format it does not know
    by itself; while the bridge could not find the batch's end (Kafka not answering), what
    followed was read and the batch's offset taken for a gap: lost. The reading is held at
    the batch until its end is found."""
    topic = kafka_topic(partitions=1)
    produce(kafka_broker, topic, _events(1))
    produce_batch(kafka_broker, topic, 0, unknown_format_batch(b"k", b"{}"))  # offset 1
    produce(kafka_broker, topic, _events(2))
    sent = _sent(monkeypatch)
    answers = [TransientError("Kafka did not answer")]

    def end_once_kafka_answers(*args: Any) -> int | None:
        if answers:
            raise answers.pop()
        return unreadable_end(*args)

    monkeypatch.setattr(service, "unreadable_end", end_once_kafka_answers)
    with reading_bridge(kafka_broker, topic, committed=0) as bridge:
        def met() -> bool:
            _read_once(bridge)
            return not answers

        wait_until(met, 30, "the batch met")
        for _ in range(20):  # the client goes on fetching; nothing past the batch is taken
            _read_once(bridge)
        assert [m.offset for m in sent] == [0] and bridge.partitions[0].skipped == 0
        bridge.clock.now += service.UNREADABLE_AGAIN_S + 1  # type: ignore[attr-defined]
        _read_up_to(bridge, 3)
        assert [(m.offset, m.unreadable is not None) for m in sent] == [
            (0, False), (1, True), (2, False), (3, False)]


def test_a_batch_whose_header_claims_too_many_offsets_waits_named_not_held_in_memory(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A review's finding: a batch's header says how many offsets it takes, whatever it
    holds; a few bytes claiming billions would have the bridge make a message of each. Past
    UNREADABLE_MAX_OFFSETS it is not sent on: the partition waits, and the status says why."""
    monkeypatch.setattr(service, "UNREADABLE_MAX_OFFSETS", 50)
    topic = kafka_topic(partitions=1)
    produce_batch(kafka_broker, topic, 0, undecodable_batch(60))
    produce(kafka_broker, topic, _events(1))
    with reading_bridge(kafka_broker, topic, committed=0) as bridge:
        def said_why() -> bool:
            _read_once(bridge)
            return bridge.partitions[0].unreadable is not None

        wait_until(said_why, 30, "the batch met")
        progress = bridge.partitions[0]
        assert progress.in_flight == 0 and progress.unreadable is not None
        assert progress.unreadable.end is None
        assert "its header claims 60 offsets, more than 50" in progress.unreadable.why
        assert bridge._unreadable_said(progress)["unreadableAt"] == 0


def test_a_partition_kafka_hands_nothing_of_while_holding_more_is_said_stuck(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis) -> None:
    """A record cut short: the Kafka client says nothing, takes it for a message not received
    whole and grows its fetches for ever. What the bridge can see is Kafka's high watermark
    past its reading, and for how long (the status names it past STUCK_S)."""
    topic = kafka_topic(partitions=1)
    produce(kafka_broker, topic, _events(1))
    produce_batch(kafka_broker, topic, 0, cut_short_batch())
    produce(kafka_broker, topic, _events(2))
    with reading_bridge(kafka_broker, topic, committed=0) as bridge:
        _read_up_to(bridge, 0)
        _until_high_watermark(bridge, 4)
        progress = bridge.partitions[0]
        assert bridge._stuck_s(progress, bridge._positions([0]).get(0), bridge.clock()) == 0.0
        bridge.clock.now += 200  # type: ignore[attr-defined]
        _read_once(bridge)
        assert progress.next_read == 1
        assert bridge._publish_status()
        [said] = [m.said for m in bridge.board.members() if m.name == bridge.name]
        assert said["partitions"]["0"]["stuckS"] == 200.0


def test_a_partition_committed_past_the_end_of_kafkas_log_is_said_not_silent(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis) -> None:
    """A hostile test's finding: a committed offset past the end of Kafka's log (a log cut by
    an unclean leader election, or a restore; an offset set by hand). Apache Kafka answers the
    fetch with an error, and the Kafka client reads from the log's start; the broker here
    answers with nothing, and the events it then took below that offset were never read,
    while the status said nothing was wrong and the lag was 0. It is said, past STUCK_S."""
    topic = kafka_topic(partitions=1)
    produce(kafka_broker, topic, _events(3))
    with reading_bridge(kafka_broker, topic, committed=10) as bridge:
        _until_high_watermark(bridge, 3)
        assert _shown(bridge).past_end_s == 0.0
        bridge.clock.now += STUCK_S + 1  # type: ignore[attr-defined]
        shown = _shown(bridge)
        assert shown.past_end_s == STUCK_S + 1
        [said] = [line for line in problems([shown], [], []) if line.startswith("partition")]
        assert said.startswith("partition 0: its committed offset 10 is past the end of "
                               "Kafka's log (offset 3) for ")


def test_a_partition_ending_in_a_transactions_marker_is_committed_past_it_not_stuck(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis) -> None:
    """A review's finding: a transaction's commit marker takes an offset no message holds.
    The bridge committed up to the last message, so an idle partition ending in a marker
    showed a lag of 1 for ever (the alert that its oldest event is not done fired), and the
    status took it for a partition Kafka hands nothing of. The Kafka client's reading is past
    the marker: the commit, and the status, follow it."""
    topic = kafka_topic(partitions=1)
    producer = Producer({"bootstrap.servers": kafka_broker,
                         "transactional.id": f"tx-{uuid.uuid4().hex}"})
    producer.init_transactions(15)
    producer.begin_transaction()
    producer.produce(topic, key=b"k", value=b"{}", partition=0)
    producer.commit_transaction(15)  # offset 0 the message, offset 1 the marker
    with reading_bridge(kafka_broker, topic, committed=0) as bridge:
        _read_up_to(bridge, 0)
        _until_high_watermark(bridge, 2)
        _applied(bridge, [0])
        _syncs_apart(bridge, 1)
        assert _committed(bridge, topic) == 2
        progress = bridge.partitions[0]
        assert bridge._stuck_s(progress, bridge._positions([0]).get(0), bridge.clock()) is None


def test_a_final_commit_goes_no_further_than_what_was_sent(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis) -> None:
    """A review's finding: stopping (or a revocation) drops what waits to be sent, then
    commits one last time; the commit followed the Kafka client's reading, past those
    messages, which no task ever carried. It goes no further than what was sent."""
    topic = kafka_topic(partitions=1)
    produce(kafka_broker, topic, _events(3))
    with reading_bridge(kafka_broker, topic, committed=0) as bridge:
        _read_up_to(bridge, 2)
        _applied(bridge, range(0, 3))
        _syncs_apart(bridge, 1)
        assert _committed(bridge, topic) == 3
        produce(kafka_broker, topic, _events(5))

        def read_not_sent() -> bool:  # offsets 3-7 read, waiting for their batch
            bridge._consume_once()
            return bridge.partitions[0].next_read == 8

        wait_until(read_not_sent, 30, "offsets 3-7 read")
        assert bridge.batcher.partitions() == {0}
        bridge.batcher.clear()  # as stopping, or a revocation, drops them
        bridge._sync(bridge.clock(), redeliver=False, final=True)
        assert _committed(bridge, topic) == 3


def test_a_batch_listing_its_offsets_backwards_is_committed_past_only_once_all_are_done(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A hostile test's finding: a record batch whose records list offsets 2, 1, 0 (Apache
    Kafka refuses it; the broker here takes it). The bridge took the first offset it sent,
    2, for the oldest not done: it committed 2 with nothing done, and 0 and 1, were their
    task lost, were never read again. They go in one task, in offset order, and nothing is
    committed past one not done."""
    topic = kafka_topic(partitions=1)
    produce_batch(kafka_broker, topic, 0, out_of_order_batch(
        [(b"k", f'{{"n": {n}}}'.encode()) for n in range(3)]))
    sent = _sent(monkeypatch)
    with reading_bridge(kafka_broker, topic, committed=0) as bridge:
        def all_sent() -> bool:
            _read_once(bridge)
            return len(sent) == 3

        wait_until(all_sent, 30, "the batch sent", interval_s=0)
        assert [(m.offset, m.value) for m in sent] == [
            (0, b'{"n": 2}'), (1, b'{"n": 1}'), (2, b'{"n": 0}')]
        _syncs_apart(bridge, 1)
        assert _committed(bridge, topic) == 0
        _applied(bridge, [2])
        _applied(bridge, [1])
        _syncs_apart(bridge, 1)
        assert _committed(bridge, topic) == 0
        _applied(bridge, [0])
        _syncs_apart(bridge, 1)
        assert _committed(bridge, topic) == 3


def test_a_header_whose_name_is_not_utf8_leaves_its_message_without_headers(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A review's finding: Kafka's protocol has header names as bytes, and the Kafka client
    raises `SystemError` (not the `UnicodeDecodeError` it wraps) for one that is not UTF-8.
    It escaped the bridge's loop: the bridge stopped, and stopped again at every restart. The
    message goes on without its headers, and the reader of single messages reads it so."""
    topic = kafka_topic(partitions=1)
    produce(kafka_broker, topic, _events(1))
    produce_batch(kafka_broker, topic, 0, batch_with_header(b"k", b"{}", b"\xff\xfe-trace", b"x"))
    produce(kafka_broker, topic, _events(1))
    sent = _sent(monkeypatch)
    with reading_bridge(kafka_broker, topic, committed=0) as bridge:
        _read_up_to(bridge, 2)
        assert [(m.offset, m.value, m.headers) for m in sent] == [
            (0, b"{}", ()), (1, b"{}", ()), (2, b"{}", ())]
    reader = MessageReader(settings_for(kafka_broker, topic, partitions=1))
    try:
        assert reader.fetch(Position(topic, 0, 1)) == RawMessage(b"k", b"{}", ())
    finally:
        reader.close()


def test_kafka_is_told_no_offset_the_database_has_not_recorded(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Each commit's offsets go into the database first (`eventpipe.positions`): a database
    that cannot record them holds the commit back, and it is made once the database can,
    after POSITIONS_AGAIN_S."""
    topic = kafka_topic(partitions=1)
    produce(kafka_broker, topic, _events(10))
    with reading_bridge(kafka_broker, topic, committed=3) as bridge:
        _read_up_to(bridge, 9)
        _applied(bridge, range(3, 10))  # every task applied
        recording = bridge.engine
        bridge.engine = create_engine(f"sqlite:///{tmp_path / 'no-schema.db'}")
        _syncs_apart(bridge, 1)
        assert "could not record the offsets in the database" in caplog.text
        assert _committed(bridge, topic) == 3
        bridge.engine.dispose()
        bridge.engine = recording
        _syncs_apart(bridge, int(service.POSITIONS_AGAIN_S) - 1)
        assert _committed(bridge, topic) == 3  # not asked again before then
        _syncs_apart(bridge, 1)
        assert _committed(bridge, topic) == 10
        with recording.connect() as conn:
            assert positions.read(conn, topic, [0]) == {
                0: positions.Position(bridge.topic_id or "", 10)}


def _committed(bridge: Bridge, topic: str) -> int:
    [found] = bridge.consumer.committed([TopicPartition(topic, 0)], timeout=10)
    assert bridge.partitions[0].committed == found.offset
    return int(found.offset)


def test_a_position_the_database_lost_under_a_running_bridge_is_read_again(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    """A failover promotes a replica that had the position of offset 6, and the work below
    it, not the 10 the bridge recorded on the old primary since. At its next commit the
    bridge finds the position behind what it recorded: it takes the partition again, reads
    offsets 6-9 again (their marks in the ledger forgotten) and commits 6 in Kafka's place."""
    topic = kafka_topic(partitions=1)
    produce(kafka_broker, topic, _events(12))
    with reading_bridge(kafka_broker, topic, committed=3) as bridge:
        _applied_and_committed_up_to_9(bridge, topic, queue)
        with bridge.engine.begin() as conn:  # the failover
            conn.execute(update(kafka_positions).where(kafka_positions.c.kafka_topic == topic)
                         .values(next_offset=6))
        _applied_up_to_11(bridge)
        _syncs_apart(bridge, 1)
        assert "the database lost the position this bridge recorded" in caplog.text
        assert not bridge.partitions[0].vouched and bridge.partitions[0].paused
        _syncs_apart(bridge, 1)  # vouched for again
        assert "reading offsets 6–9 again" in caplog.text
        progress = bridge.partitions[0]
        assert progress.committed == 6 and _committed(bridge, topic) == 6
        queue.delete(QUEUE)
        wait_until(lambda: _sync_read(bridge) and progress.next_read == 12, 30,
                   "offsets 6-11 read again")
        assert progress.in_flight == 6  # not done: the ledger's marks of them were forgotten


def test_a_position_lost_on_a_partition_with_nothing_new_is_found_within_the_recheck(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    """A review's finding: the database restored from a backup under a running bridge, on a
    partition that gets no new message. Only a commit looked at the positions, and an idle
    partition has none to make: the read model went on missing offsets 6-9 with nothing to
    say so. Its position is read back every POSITIONS_RECHECK_S, and the loss found."""
    topic = kafka_topic(partitions=1)
    produce(kafka_broker, topic, _events(10))
    with reading_bridge(kafka_broker, topic, committed=3) as bridge:
        _applied_and_committed_up_to_9(bridge, topic, queue)
        with bridge.engine.begin() as conn:  # the restore
            conn.execute(update(kafka_positions).where(kafka_positions.c.kafka_topic == topic)
                         .values(next_offset=6))
        _syncs_apart(bridge, int(service.POSITIONS_RECHECK_S) + 1)
        assert "the database lost the position this bridge recorded" in caplog.text
        _syncs_apart(bridge, 1)  # vouched for again
        assert "reading offsets 6–9 again" in caplog.text
        progress = bridge.partitions[0]
        assert progress.committed == 6 and _committed(bridge, topic) == 6
        wait_until(lambda: _sync_read(bridge) and progress.next_read == 10, 30,
                   "offsets 6-9 read again")


@contextmanager
def _on_a_new_file(kafka_broker: str, kafka_topic: TopicFactory,
                   path: Path) -> Iterator[tuple[Bridge, str]]:
    """A bridge of a new topic of six events, committed at 0, on a new SQLite file."""
    url = f"sqlite:///{path}"
    upgrade(url)
    topic = kafka_topic(partitions=1)
    produce(kafka_broker, topic, _events(6))
    with reading_bridge(kafka_broker, topic, committed=0, database_url=url) as bridge:
        yield bridge, topic


@pytest.mark.parametrize(("deleted", "said"), [
    ("eventpipe.db*", "the database file {path} was deleted or replaced"),
    ("eventpipe.db-wal", "the database's write-ahead log {path}-wal was deleted"),
    ("eventpipe.db-shm", "the database's shared-memory index {path}-shm was deleted"),
])
def test_an_embedded_database_deleted_under_the_bridge_stops_it_committing_nothing(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis,
        tmp_path: Path, deleted: str, said: str) -> None:
    """A review's finding: the SQLite file deleted under running processes, they wrote on to
    the file they had open, and Kafka's offsets moved past work no file held. The bridge
    looks at the file before each record of its positions: gone, or another in its place, it
    stops, committing nothing more. A hostile test's: the file's WAL deleted (`rm
    eventpipe.db-wal`), they committed on into the WAL they had open, which no new connection
    reads, with no word said; a review's: its index (`-shm`) deleted, processes started since
    commit into the WAL without seeing the others' commits, which vanish. So it stops then."""
    path = tmp_path / "eventpipe.db"
    with _on_a_new_file(kafka_broker, kafka_topic, path) as (bridge, topic):
        _read_up_to(bridge, 2)
        _applied(bridge, range(0, 3))
        _syncs_apart(bridge, 1)
        assert _committed(bridge, topic) == 3
        for leftover in tmp_path.glob(deleted):
            leftover.unlink()
        _read_up_to(bridge, 5)
        _applied(bridge, range(3, 6))
        _syncs_apart(bridge, 1)
        assert _committed(bridge, topic) == 3 and bridge.stopping
        assert f"{said.format(path=path.absolute())} while the bridge ran" \
            in str(bridge.must_stop)


def test_the_first_position_of_a_partition_vouches_for_what_it_passes_too(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The adversarial tester's finding: under `eventpipe up`, a SQLite file replaced by a
    new one, the bridge stopped and was started again, read every partition from the start
    (no position in the new file), and the workers, still writing to the file they had open,
    marked it all done: the first position, which nothing checked, passed every event, none
    of which the new file held, and Kafka's offsets followed. The first commit of a
    partition now needs the ranges of what it passes too."""
    with _on_a_new_file(kafka_broker, kafka_topic, tmp_path / "eventpipe.db") as (bridge, topic):
        _read_up_to(bridge, 5)
        # Done, as the ledger says, by workers whose ranges went to another file.
        bridge.ledger.settle(bridge._ledger_topic, 0, list(range(6)))
        _syncs_apart(bridge, 1)
        assert "the database lacks 6 message(s) the workers recorded as done, and holds no " \
            "position of it" in caplog.text
        [kafkas] = bridge.consumer.committed([TopicPartition(topic, 0)], timeout=10)
        assert kafkas.offset == 0 and not bridge.partitions[0].vouched
        with bridge.engine.connect() as conn:
            assert [p.next_offset for p in positions.read(conn, topic, [0]).values()] in ([], [0])
        queue.delete(QUEUE)
        progress = bridge.partitions[0]
        wait_until(lambda: _sync_read(bridge) and progress.next_read == 6, 30,
                   "offsets 0-5 read again")
        assert progress.in_flight == 6  # the ledger's marks of them were forgotten
        _applied(bridge, range(6))  # by workers of this file
        _syncs_apart(bridge, 1)
        assert _committed(bridge, topic) == 6


def test_work_the_database_lost_since_its_last_position_is_read_again(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    """A failover promotes a replica that had the position of offset 10, and the work below
    it, but not the batch of 10 and 11 the workers applied since, which the ledger in Redis
    still says done. (Before: the position was all the bridge looked at; it committed 12,
    and 10 and 11 were never in the database.) At its next commit it finds their ranges
    missing, and takes the partition again: 10 and 11 are read again, their marks forgotten,
    and counted."""
    topic = kafka_topic(partitions=1)
    produce(kafka_broker, topic, _events(12))
    with reading_bridge(kafka_broker, topic, committed=3) as bridge:
        _applied_and_committed_up_to_9(bridge, topic, queue)
        read_again = REGISTRY.get_sample_value(
            "bridge_events_read_again_for_the_database_total",
            {"topic": topic, "partition": "0"}) or 0.0
        _applied_up_to_11(bridge)
        with bridge.engine.begin() as conn:  # the failover
            conn.execute(delete(kafka_done_ranges).where(kafka_done_ranges.c.kafka_topic == topic,
                                                        kafka_done_ranges.c.last_offset >= 10))
        _syncs_apart(bridge, 1)
        assert "the database lacks 2 message(s) the workers recorded as done since its " \
            "position" in caplog.text
        assert REGISTRY.get_sample_value("bridge_events_read_again_for_the_database_total", {
            "topic": topic, "partition": "0"}) == read_again + 2
        assert not bridge.partitions[0].vouched and bridge.partitions[0].paused
        _syncs_apart(bridge, 1)  # vouched for again
        progress = bridge.partitions[0]
        assert progress.vouched and progress.committed == 10
        queue.delete(QUEUE)
        wait_until(lambda: _sync_read(bridge) and progress.next_read == 12, 30,
                   "offsets 10-11 read again")
        assert progress.in_flight == 2  # not done: the ledger's marks of them were forgotten
        assert _committed(bridge, topic) == 10
        with bridge.engine.connect() as conn:
            assert positions.read(conn, topic, [0])[0].next_offset == 10


def _applied_and_committed_up_to_9(bridge: Bridge, topic: str, queue: redis.Redis) -> None:
    """Offsets 3-9 read, sent, applied (their task taken) and committed."""
    _read_up_to(bridge, 9)
    _applied(bridge, range(3, 10))
    _syncs_apart(bridge, 1)
    assert _committed(bridge, topic) == 10
    queue.delete(QUEUE)


def _applied_up_to_11(bridge: Bridge) -> None:
    _read_up_to(bridge, 11)
    _applied(bridge, [10, 11])


def _sync_read(bridge: Bridge) -> bool:
    bridge.clock.now += 1  # type: ignore[attr-defined]
    bridge._sync(bridge.clock())
    _read_once(bridge)
    return True


def test_a_partition_taken_again_is_read_again_even_where_the_database_is_not_behind_kafka(
        kafka_broker: str, kafka_topic: TopicFactory, queue: redis.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    """Reviews' findings: a partition taken again was sought back only where the database's
    position was below Kafka's committed offset. Its position gone (a database that went back
    to before the bridge's first position), it went on from where it had read, past the
    messages it had dropped, with its ledger's marks kept. It is read again from the log's
    start, its marks forgotten."""
    topic = kafka_topic(partitions=1)
    produce(kafka_broker, topic, _events(12))
    with reading_bridge(kafka_broker, topic, committed=3) as bridge:
        _applied_and_committed_up_to_9(bridge, topic, queue)
        with bridge.engine.begin() as conn:
            conn.execute(delete(kafka_positions).where(kafka_positions.c.kafka_topic == topic))
        _applied_up_to_11(bridge)
        _syncs_apart(bridge, 2)
        assert "the database lost the position this bridge recorded" in caplog.text
        # The row gone was made again at 0 as the loss was found, for whoever reads it next.
        assert "reading offsets 0–9 again: the database holds its messages up to offset 0" \
            in caplog.text
        progress = bridge.partitions[0]
        assert progress.vouched and _committed(bridge, topic) == 0
        queue.delete(QUEUE)
        wait_until(lambda: _sync_read(bridge) and progress.next_read == 12, 30,
                   "offsets 0-11 read again")
        assert progress.in_flight == 12
