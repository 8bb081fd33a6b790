"""The bridge's bookkeeping: commit only past done work; re-read only what was lost."""

from __future__ import annotations

import pytest

from bridge.batching import Batcher
from bridge.offsets import (
    SETTLED_SPANS_MAX,
    TAKEN_GRACE_S,
    PartitionProgress,
    needs_redelivery,
)
from eventpipe.queues import TaskMessage

TIMEOUT = 60.0


def test_commit_stops_at_the_oldest_unfinished_offset() -> None:
    progress = PartitionProgress(0)
    assert progress.committable() is None
    progress.dispatched([10, 11, 12], now=0)
    progress.dispatched([13, 14], now=1)
    progress.observe({11, 12, 14}, set(), now=2)
    assert progress.committable() == 10 and progress.in_flight == 2
    progress.observe({10}, set(), now=3)
    assert progress.committable() == 13
    progress.committed = 13
    assert progress.committable() is None
    progress.observe({13}, set(), now=4)
    assert progress.committable() == 15  # everything dispatched is done: commit past the last
    assert progress.in_flight == 0


def test_with_nothing_outstanding_the_commit_follows_the_reading_past_offsets_with_no_message(
        ) -> None:
    progress = PartitionProgress(0, committed=5)
    progress.read(4)
    progress.dispatched([4], now=0)
    progress.observe({4}, set(), now=0)
    assert progress.committable(5) is None
    assert progress.committable(7) == 7  # a transaction's marker at 5 and 6, read past
    progress.read(7)  # read, not sent: waiting for its batch, or dropped as the bridge stops
    assert progress.committable(9) is None
    progress.reset(5)  # sought back: the client's position may still be the one before
    assert progress.committable(7) is None
    progress.read(7)
    progress.read(8)
    progress.dispatched([7, 8], now=0)
    assert progress.committable(12) == 7  # something outstanding: not past it
    progress.observe({7, 8}, set(), now=1)
    assert progress.committable(10) == 10 and progress.committable() == 9


def test_offsets_read_out_of_order_commit_nothing_past_one_not_done() -> None:
    """A record batch whose records list their offsets backwards (2, 1, 0: Apache Kafka
    refuses such a batch, a broker may take it): the commit stopped at the first offset sent,
    2, though nothing was done, and 0 and 1, lost on the way, were never read again (a
    hostile test's finding). The oldest offset not done is the lowest, whatever the order
    they came in."""
    progress = PartitionProgress(0, committed=0)
    progress.next_read = 0
    assert [progress.read(offset) for offset in (2, 1, 0)] == [0, None, None]
    progress.dispatched([2, 1, 0], now=0)
    assert (progress.low(), progress.high(), progress.committable()) == (0, 2, None)
    progress.observe({2}, set(), now=1)
    progress.observe({1}, set(), now=2)
    assert progress.committable() is None
    progress.observe({0}, set(), now=3)
    assert progress.committable() == 3 and progress.in_flight == 0


def test_a_batch_with_offsets_below_those_sent_before_is_awaited_in_order() -> None:
    progress = PartitionProgress(0)
    progress.dispatched([5, 6], now=0)
    progress.dispatched([3, 4], now=1)
    assert (progress.low(), progress.high()) == (3, 6)
    progress.observe({5, 6}, set(), now=2)
    assert progress.committable() == 3
    progress.observe({3, 4}, set(), now=3)
    assert progress.committable() == 7
    assert list(progress.settled) == [(3, 6)]


def test_an_offset_sent_twice_is_awaited_once() -> None:
    """Two messages at one offset (records of a batch that claim the same one): awaited as
    one, so that its mark done lets the commit past it, rather than the second copy keep
    the partition at it for ever."""
    progress = PartitionProgress(0)
    progress.dispatched([7, 7], now=0)
    progress.dispatched([7, 8], now=1)
    assert progress.in_flight == 2
    progress.observe({7, 8}, set(), now=2)
    assert progress.committable() == 9 and not progress.outstanding


def test_offsets_below_the_commit_read_again_from_the_log_s_start_are_awaited() -> None:
    """A review's finding: a committed offset past the end of a log cut since (an unclean
    leader election): Apache Kafka refuses the fetch, and the Kafka client reads from the
    log's start by itself. The events written since sit below the commit: they are awaited
    as any, so that one lost on the way is read again, and no commit passes them undone."""
    progress = PartitionProgress(0, committed=1000)
    progress.dispatched(list(range(990, 1000)), now=0)  # sent before the log was cut
    progress.observe(set(range(990, 1000)), set(), now=1)
    progress.dispatched(list(range(676, 681)), now=2)  # read again from the log's start
    assert (progress.low(), progress.in_flight, progress.committable()) == (676, 5, None)
    assert progress.redelivery(now=2 + TIMEOUT, timeout_s=TIMEOUT, queued=0) is None  # grace
    assert progress.redelivery(now=4 + TIMEOUT, timeout_s=TIMEOUT, queued=0) == 676
    progress.dispatched(list(range(681, 1005)), now=3)
    progress.observe(set(range(681, 1005)), set(), now=4)
    assert progress.committable() is None  # 676–680 not done: nothing past them


def test_offsets_may_have_gaps() -> None:
    progress = PartitionProgress(0)
    progress.dispatched([3, 7, 8], now=0)  # e.g. transaction markers between them
    progress.observe({3, 7}, set(), now=1)
    assert progress.committable() == 8


def test_what_is_taken_for_done_is_kept_as_spans_for_the_database_to_vouch_for() -> None:
    progress = PartitionProgress(0)
    progress.dispatched([3, 4, 7, 8, 9], now=0)  # 5 and 6: a gap in the log
    progress.observe({3, 4, 8}, set(), now=1)  # 8 waits behind 7: not taken for done yet
    assert list(progress.settled) == [(3, 4)]
    progress.observe({7, 9}, set(), now=2)
    assert list(progress.settled) == [(3, 4), (7, 9)]
    progress.reset(4)  # read again from 4: what was taken for done stays so
    progress.dispatched([4, 5], now=3)
    progress.observe({4, 5}, set(), now=4)
    assert list(progress.settled) == [(3, 4), (7, 9), (4, 5)]


def test_what_workers_of_a_version_before_the_ranges_did_is_not_looked_for() -> None:
    """They record no ranges of offsets in the database: taken for done unchecked, never
    for work the database lost (a review's finding: during an upgrade, a bridge read their
    partitions again and again while they served them)."""
    progress = PartitionProgress(0)
    progress.dispatched([1, 2, 3, 4], now=0)
    progress.observe({2, 3}, set(), now=1, unrecorded={2, 3})
    progress.observe({1, 2, 3, 4}, set(), now=2, unrecorded={4})
    assert list(progress.settled) == [(1, 1)]


def test_the_spans_kept_for_the_database_are_bounded() -> None:
    progress = PartitionProgress(0)
    offsets = list(range(0, 2 * (SETTLED_SPANS_MAX + 5), 2))  # each its own span
    progress.dispatched(offsets, now=0)
    progress.observe(set(offsets), set(), now=1)
    assert len(progress.settled) == SETTLED_SPANS_MAX
    assert progress.settled[-1] == (offsets[-1], offsets[-1])  # the oldest go first


def test_done_marks_for_offsets_not_dispatched_here_are_ignored() -> None:
    progress = PartitionProgress(0)
    progress.dispatched([5], now=0)
    progress.observe({1, 2, 5, 99}, set(), now=1)
    assert progress.committable() == 6 and progress.in_flight == 0


def test_overtaken_head_without_a_lease_is_redelivered_after_a_grace() -> None:
    progress = PartitionProgress(0)
    progress.dispatched([1, 2], now=0)
    progress.dispatched([3, 4], now=0)
    progress.observe({3, 4}, set(), now=10)  # a later batch finished first: 1-2 were dropped
    assert progress.redelivery(now=10 + TIMEOUT / 4 - 1, timeout_s=TIMEOUT) is None
    assert progress.redelivery(now=10 + TIMEOUT / 4, timeout_s=TIMEOUT) == 1


def test_a_leased_head_is_never_redelivered() -> None:
    progress = PartitionProgress(0)
    progress.dispatched([1, 2], now=0)
    progress.observe({2}, {1}, now=1)  # 1 waits for its parent
    assert progress.redelivery(now=10_000, timeout_s=TIMEOUT) is None


def test_a_silent_partition_is_redelivered_after_the_timeout() -> None:
    progress = PartitionProgress(0)
    progress.dispatched([1], now=100)
    assert progress.redelivery(now=100 + TIMEOUT - 1, timeout_s=TIMEOUT) is None
    assert progress.redelivery(now=100 + TIMEOUT, timeout_s=TIMEOUT) == 1
    progress.reset(1)
    assert progress.redelivery(now=1_000, timeout_s=TIMEOUT) is None
    assert progress.in_flight == 0 and progress.committable() is None
    assert progress.next_read == 1  # read again from there


def test_a_read_that_goes_past_offsets_expected_first_says_the_first_it_skipped() -> None:
    progress = PartitionProgress(0)
    assert progress.read(40) is None  # where the reading starts is not known: no skip
    assert progress.read(41) is None
    assert progress.read(44) == 42  # 42 and 43 never came
    progress.next_read = 10  # set where the reading starts (a commit, a re-read)
    assert progress.read(10) is None
    assert progress.read(3) is None  # read again from an earlier offset: nothing skipped
    assert progress.next_read == 4


def test_progress_elsewhere_in_the_partition_postpones_the_timeout() -> None:
    assert not needs_redelivery(False, now=100, head_sent_at=0, last_progress=50,
                                overtaken_since=None, timeout_s=TIMEOUT)
    assert needs_redelivery(False, now=100, head_sent_at=0, last_progress=40,
                            overtaken_since=None, timeout_s=TIMEOUT)


def _message(offset: int, size: int = 2) -> TaskMessage:
    return TaskMessage(offset, None, b"x" * size)


def test_batches_close_on_count_and_on_time() -> None:
    batcher = Batcher(max_events=3, max_bytes=1000, max_wait_s=0.05)
    assert batcher.add(0, _message(1), now=0) == []
    assert batcher.add(1, _message(1), now=0.01) == []
    assert batcher.add(0, _message(2), now=0.02) == []
    [full] = batcher.add(0, _message(3), now=0.03)
    assert [m.offset for m in full] == [1, 2, 3]
    assert batcher.due(now=0.05) == []
    due = batcher.due(now=0.07)
    assert [(p, [m.offset for m in ms]) for p, ms in due] == [(1, [1])]
    batcher.add(2, _message(9), now=1)
    batcher.drop(2)
    assert batcher.due(now=5) == []


def test_a_held_partition_keeps_its_batch_until_released_or_full() -> None:
    batcher = Batcher(max_events=3, max_bytes=1000, max_wait_s=0)
    batcher.add(0, _message(1), now=0)
    batcher.add(1, _message(1), now=0)
    # Partition 0's last task still waits in its queue: its messages wait for the next batch.
    assert [p for p, _ in batcher.due(now=1, held={0})] == [1]
    assert batcher.partitions() == {0}
    batcher.add(0, _message(2), now=1)
    [full] = batcher.add(0, _message(3), now=1)  # a full batch leaves, held or not
    assert [m.offset for m in full] == [1, 2, 3]
    batcher.add(0, _message(4), now=2)
    assert batcher.due(now=2, held={0}) == []
    assert [(p, [m.offset for m in ms]) for p, ms in batcher.due(now=2)] == [(0, [4])]


def test_batches_are_bounded_in_bytes_and_a_large_message_travels_alone() -> None:
    batcher = Batcher(max_events=500, max_bytes=100, max_wait_s=1)
    assert batcher.add(0, _message(1, 40), now=0) == []
    assert batcher.add(0, _message(2, 40), now=0) == []
    [closed] = batcher.add(0, _message(3, 40), now=0)  # 120 bytes would not fit
    assert [m.offset for m in closed] == [1, 2]
    before, alone = batcher.add(0, _message(4, 5000), now=0)
    assert [m.offset for m in before] == [3] and [m.offset for m in alone] == [4]
    assert batcher.due(now=10) == []


def test_no_redelivery_while_tasks_of_the_partition_wait_in_its_queue() -> None:
    progress = PartitionProgress(0)
    progress.dispatched([1, 2], now=0)
    # A worker stalled for many redelivery periods: its queue holds the partition's tasks.
    assert progress.redelivery(now=10 * TIMEOUT, timeout_s=TIMEOUT, queued=3) is None
    assert progress.redelivery(now=10 * TIMEOUT, timeout_s=TIMEOUT, queued=0) is None
    assert progress.redelivery(now=10 * TIMEOUT + TAKEN_GRACE_S, timeout_s=TIMEOUT,
                               queued=0) == 1


def test_a_task_just_taken_after_a_long_wait_in_its_queue_is_not_taken_for_lost() -> None:
    """The worker took the partition's task off its queue, and leases its offsets a moment
    later: one sync may see it neither queued nor leased, long after it was sent."""
    progress = PartitionProgress(0)
    progress.dispatched([1, 2], now=0)
    assert progress.redelivery(now=10 * TIMEOUT, timeout_s=TIMEOUT, queued=1) is None
    assert progress.redelivery(now=10 * TIMEOUT + 0.2, timeout_s=TIMEOUT, queued=0) is None
    progress.observe(set(), {1, 2}, now=10 * TIMEOUT + 0.4)  # its lease, seen at the next sync
    assert progress.redelivery(now=10 * TIMEOUT + 0.4, timeout_s=TIMEOUT, queued=0) is None
    assert progress.redelivery(now=20 * TIMEOUT, timeout_s=TIMEOUT, queued=0) is None
    # Its worker killed: the lease lapses, and the head is unaccounted for from then on.
    progress.observe(set(), set(), now=30 * TIMEOUT)
    assert progress.redelivery(now=30 * TIMEOUT, timeout_s=TIMEOUT, queued=0) is None
    assert progress.redelivery(now=30 * TIMEOUT + TAKEN_GRACE_S, timeout_s=TIMEOUT,
                               queued=0) == 1


def test_a_lost_head_overtaken_is_read_again_even_while_tasks_wait_behind_it() -> None:
    """A worker killed mid-batch while a backlog fills the partition's queue: the later
    batches are done, so the head was dropped; the tasks waiting are behind it."""
    progress = PartitionProgress(0)
    progress.dispatched([1, 2], now=0)
    progress.dispatched([3, 4], now=0)
    progress.observe(set(), {1, 2}, now=0)
    progress.observe({3, 4}, set(), now=TIMEOUT)  # its lease lapsed; later work done
    assert progress.redelivery(now=TIMEOUT + TIMEOUT / 4 - 1, timeout_s=TIMEOUT,
                               queued=3) is None
    assert progress.redelivery(now=TIMEOUT + TIMEOUT / 4, timeout_s=TIMEOUT, queued=3) == 1


def test_a_head_waiting_again_is_not_missing_since_it_was_first_seen_unaccounted() -> None:
    """Seen neither queued nor leased (taken by a worker letting the queue go), then waiting
    again (its task put back in front of the queue at the hand-over): when the next worker
    takes it at last, the grace starts then."""
    progress = PartitionProgress(0)
    progress.dispatched([1], now=0)
    assert progress.redelivery(now=100, timeout_s=TIMEOUT, queued=0) is None
    for second in range(101, 300):
        assert progress.redelivery(now=second, timeout_s=TIMEOUT, queued=1) is None
    assert progress.redelivery(now=300.2, timeout_s=TIMEOUT, queued=0) is None
    progress.observe(set(), {1}, now=300.4)  # its lease, seen at the next sync
    assert progress.redelivery(now=300.4, timeout_s=TIMEOUT, queued=0) is None


def test_a_queue_depth_unknown_leaves_the_timeout_alone_to_decide() -> None:
    """A broker whose queues cannot be read (or not this time): as before queue depths were
    read, the timeout decides."""
    progress = PartitionProgress(0)
    progress.dispatched([1], now=0)
    assert progress.redelivery(now=TIMEOUT - 1, timeout_s=TIMEOUT, queued=None) is None
    assert progress.redelivery(now=TIMEOUT, timeout_s=TIMEOUT, queued=None) == 1


def test_a_check_skipped_starts_the_grace_afresh() -> None:
    """The ledger unreadable for a while: the head's task may have been taken meanwhile, and
    its lease is not seen yet."""
    progress = PartitionProgress(0)
    progress.dispatched([1], now=0)
    assert progress.redelivery(now=100, timeout_s=TIMEOUT, queued=0) is None
    progress.unobserved()
    assert progress.redelivery(now=500, timeout_s=TIMEOUT, queued=0) is None
    assert progress.redelivery(now=500 + TAKEN_GRACE_S, timeout_s=TIMEOUT, queued=0) == 1


@pytest.mark.parametrize("bound", [1, 2, 3, 5000])
def test_a_partition_paused_at_its_bound_resumes_once_half_of_it_is_free(bound: int) -> None:
    progress = PartitionProgress(0)
    progress.dispatched(list(range(bound)), now=0.0)
    assert not progress.may_resume(bound)
    progress.observe(set(range(bound - bound // 2)), set(), now=1.0)
    assert progress.in_flight == bound // 2 and progress.may_resume(bound)


def test_a_paused_partition_says_why_one_cause_at_a_time() -> None:
    progress = PartitionProgress(0, vouched=False)
    assert progress.paused_for(unsent=True, stopping=True) is None  # read: no cause
    progress.paused_at = 0.0
    progress.drain(3, now=0, timeout_s=60)
    assert progress.paused_for(unsent=True, stopping=True) == "stopping"
    assert progress.paused_for(unsent=True, stopping=False) == "broker"
    assert progress.paused_for(unsent=False, stopping=False) == "assigning"
    progress.vouched = True
    assert progress.paused_for(unsent=False, stopping=False) == "draining"
    assert progress.drained(0, now=1, timeout_s=60)
    assert progress.paused_for(unsent=False, stopping=False) == "backpressure"


def test_a_partition_drains_until_its_queue_is_seen_empty_or_no_task_is_taken_for_long() -> None:
    progress = PartitionProgress(0)
    progress.drain(0, now=0, timeout_s=60)
    assert not progress.draining and progress.earlier_gone  # nothing waits: read at once
    progress.drain(None, now=0, timeout_s=60)
    assert not progress.draining and not progress.earlier_gone  # unknown: read at once
    assert not progress.drained(4, now=1, timeout_s=60) and not progress.earlier_gone
    assert not progress.drained(0, now=2, timeout_s=60) and progress.earlier_gone  # seen gone
    progress.drain(3, now=0, timeout_s=60)
    assert progress.draining and not progress.earlier_gone
    assert not progress.drained(2, now=10, timeout_s=60)
    assert not progress.drained(None, now=10, timeout_s=60)
    assert progress.drained(0, now=11, timeout_s=60)
    assert not progress.draining and progress.earlier_gone
    progress.drain(3, now=100, timeout_s=60)
    assert not progress.drained(3, now=159, timeout_s=60)
    assert progress.drained(3, now=160, timeout_s=60)  # none taken: the wait must end
    assert not progress.draining and not progress.earlier_gone
    # Slow workers, still taking its tasks: it waits on, a wait from the last one taken.
    progress.drain(5000, now=200, timeout_s=60)
    assert not progress.drained(4000, now=250, timeout_s=60)
    assert not progress.drained(4000, now=300, timeout_s=60)
    assert not progress.drained(None, now=305, timeout_s=60)
    assert progress.drained(4000, now=310, timeout_s=60) and not progress.earlier_gone


def test_a_drain_ends_once_as_many_tasks_were_taken_as_the_queue_held() -> None:
    """A review's finding: another pipeline's tasks coming into the same queue kept it from
    being seen empty, and each task taken put the wait off: the partition stayed unread for
    hours. The queue is first in, first out: once as many were taken as it held, its own are
    gone."""
    progress = PartitionProgress(0)
    progress.drain(10, now=0, timeout_s=60)
    assert not progress.drained(15, now=1, timeout_s=60)  # 5 more came
    assert not progress.drained(9, now=2, timeout_s=60)  # 6 taken
    assert not progress.drained(12, now=3, timeout_s=60)  # more came
    assert progress.drained(8, now=4, timeout_s=60)  # 4 more taken: the 10 are gone
    assert progress.earlier_gone


def test_a_skip_below_the_log_start_waits_until_nothing_sent_before_can_apply_it() -> None:
    progress = PartitionProgress(0)
    progress.drain(3, now=0, timeout_s=60)  # tasks of an earlier reading in the queue
    assert progress.drained(3, now=60, timeout_s=60)  # read all the same: none was taken
    progress.skipped_below(10, 20)
    progress.queue_seen(False, True, now=100, wait_s=1_000)
    assert progress.due(10_000) == []  # they may wait in the queue for ever: no deadline
    progress.queue_seen(True, False, now=200, wait_s=1_000)  # gone; tasks held somewhere
    assert progress.earlier_gone and progress.due(1_199) == []
    # A dead worker's task is handed back to the queue: not while it waits there.
    progress.queue_seen(False, True, now=1_200, wait_s=1_000)
    assert progress.due(1_200) == []
    progress.queue_seen(True, False, now=1_300, wait_s=1_000)
    assert progress.due(1_300) == [(10, 20, 1_200)]  # those held then were handed out again


def test_a_skip_is_counted_after_two_looks_in_a_row_find_nothing_that_could_apply_it() -> None:
    """A review's finding: a worker takes a task off the queue a moment before kombu records
    it as held: one look can find neither."""
    progress = PartitionProgress(0)
    progress.drain(0, now=0, timeout_s=60)
    progress.skipped_below(10, 20)
    progress.queue_seen(True, True, now=1, wait_s=1_000)
    assert progress.due(1) == []
    progress.queue_seen(False, False, now=2, wait_s=1_000)  # the new reading's tasks
    progress.queue_seen(True, True, now=3, wait_s=1_000)
    assert progress.due(3) == []
    progress.queue_seen(True, True, now=3.1, wait_s=1_000)  # the same moment: one look
    assert progress.due(3.1) == []
    progress.queue_seen(True, True, now=4, wait_s=1_000)
    assert progress.due(4) == [(10, 20, 1_001)]
    progress.skipped_below(30, 40)  # a later skip: its own two looks
    progress.queue_seen(True, True, now=5, wait_s=1_000)
    assert progress.due(5) == []
    progress.queue_seen(True, True, now=6, wait_s=1_000)
    assert progress.due(6) == [(30, 40, 1_005)]


def test_overlapping_spans_skipped_below_the_log_start_are_one() -> None:
    """A review's finding: a re-read from before a span already skipped counted its offsets
    twice."""
    progress = PartitionProgress(0)
    progress.skipped_below(100, 200, count_by=10)
    progress.skipped_below(60, 250, count_by=20)
    progress.skipped_below(300, 310, count_by=5)
    assert sorted(progress.below_start) == [(60, 250, 20), (300, 310, 5)]
    assert progress.skipped == 190 + 10  # as the status board says it


def test_a_partition_is_stalled_from_its_last_event_done_while_some_are_in_flight() -> None:
    progress = PartitionProgress(0)
    assert progress.stalled_s(100.0) is None  # nothing in flight
    progress.dispatched([0, 1, 2], 100.0)
    assert progress.stalled_s(130.0) == 30.0
    progress.observe({0}, set(), 140.0)
    assert progress.stalled_s(150.0) == 10.0
    progress.observe({1, 2}, set(), 160.0)
    assert progress.stalled_s(500.0) is None


def test_a_partition_read_again_and_again_stays_stalled_from_its_last_event_done() -> None:
    """A review's finding: workers failing every batch (a pool that cannot run them) made
    the bridge read the partition again each REDELIVERY_TIMEOUT_S, and each time it sent the
    events again the stall started afresh, so `eventpipe status` never called it stuck."""
    progress = PartitionProgress(0)
    progress.dispatched([0, 1, 2], 100.0)
    for now in (160.0, 220.0, 280.0):  # lost, read again from 0, sent again
        progress.reset(0)
        progress.dispatched([0, 1, 2], now)
    assert progress.stalled_s(290.0) == 190.0
    progress.observe({0}, set(), 300.0)
    assert progress.stalled_s(310.0) == 10.0
    progress.observe({1, 2}, set(), 320.0)
    progress.reset(3)  # nothing in flight: a new start
    progress.dispatched([3], 400.0)
    assert progress.stalled_s(410.0) == 10.0
    # Read again from offsets Kafka's retention took since: what comes next is new work.
    progress.reset(3)
    progress.dispatched([9], 3770.0)
    assert progress.stalled_s(3771.0) == 1.0
