"""Per-partition progress: what was handed out, what is done, what may be committed.

Pure bookkeeping, no I/O. The bridge records every dispatched offset, feeds in what the
offset ledger says is done or leased, and asks:
- `committable()`: the offset to commit — the oldest offset not yet done (Kafka's committed
  offset is the next one to read), so a commit never moves past unfinished work; and
  `settled`, the offsets it takes for done since the last commit was recorded, for the
  database to vouch for (`eventpipe.positions.save`);
- `redelivery()`: the offset to re-read from, when the oldest unfinished offset was lost on
  the way (see `needs_redelivery`);
- `read()`: whether a message read skipped offsets the bridge expected to read first;
- `drained()`: whether the tasks of an earlier reading (`drain()`) no longer keep the
  partition from being read;
- `paused_for()`: why it is paused, as the status board says.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

# Looks at a queue that count as two in a row are at least this far apart: a worker takes a
# task off it a moment before kombu records the task as held.
LOOK_GAP_S = 0.5
# A worker takes a task off its queue a moment before it leases the task's offsets: for that
# moment the head is neither queued nor leased. It is taken for lost only once seen so for
# this long (or a quarter of the redelivery timeout, if shorter).
TAKEN_GRACE_S = 1.0
# The spans of offsets taken for done kept for the database to vouch for, at most: past it
# (commits the database refused for a long while, on a topic whose offsets leave gaps), the
# oldest are no longer looked for, rather than the bridge's memory grow without end.
SETTLED_SPANS_MAX = 10_000


class Unreadable(NamedTuple):
    """A record batch Kafka cannot hand over, beginning at `batch`, met where the reading
    stood at `at`: the reading went on from `end`, or, while that is not known, is held at
    `at` (the next try to find it not before `again_at`); `why`, as the Kafka client said it."""

    batch: int
    at: int
    end: int | None
    why: str
    again_at: float

    @property
    def holding(self) -> bool:
        return self.end is None


@dataclass(slots=True)
class PartitionProgress:
    partition: int
    committed: int | None = None
    outstanding: deque[tuple[int, float]] = field(default_factory=deque)  # (offset, sent at)
    pending: set[int] = field(default_factory=set)  # outstanding offsets not yet done
    done_ahead: set[int] = field(default_factory=set)  # done, but behind an unfinished one
    # Of those, the ones workers of a version before `kafka_done_ranges` did: not looked for.
    unrecorded: set[int] = field(default_factory=set)
    # Spans of offsets taken for done (first, last), in the order they were, since the
    # database last recorded a position of the partition (the bridge empties it then); at
    # most SETTLED_SPANS_MAX, the newest.
    settled: deque[tuple[int, int]] = field(
        default_factory=lambda: deque(maxlen=SETTLED_SPANS_MAX))
    leased: set[int] = field(default_factory=set)
    last_dispatched: int | None = None
    last_progress: float = 0.0
    # Read again since its last event done (`reset`): sending again the offsets below this
    # one, in flight when it was, is no progress.
    resend_below: int | None = None
    overtaken_since: float | None = None
    # (the head offset, when it was first seen neither leased nor queued)
    unaccounted: tuple[int, float] | None = None
    paused_at: float | None = None  # since when the bridge keeps it unread; None: read
    # Whether the ledger's marks of this partition are its own: False until marks left by an
    # earlier topic of the same name (recreated from offset 0) are known gone (`Bridge._vouch`).
    vouched: bool = True
    # Taken again by a bridge that found its position lost in the database: read again from
    # where its vouch seeks it, nothing read before that (`Bridge._taken_again`).
    retaken: bool = False
    # Until when tasks sent before the partition was last set to be read (by an earlier
    # owner, or before a re-read) may keep it unread while they wait in its queue (`drain`);
    # the queue's length last seen, and how many of those tasks may still be in it.
    drain_until: float | None = None
    drain_depth: int = 0
    drain_left: int = 0
    # Whether those tasks are known gone from the queue (taken by workers): then whatever the
    # reading skips below the log's start, and no task applies, is lost (`Bridge._skipped`).
    earlier_gone: bool = False
    # Spans the reading skipped below the log's start, not counted yet, [first, end), each
    # with the time it is counted at the latest (none until the queue is seen empty), and
    # how many looks in a row found nothing that could still apply them (`queue_seen`, `due`).
    below_start: list[tuple[int, int, float]] = field(default_factory=list)
    quiet: bool = False  # the last look found the earlier tasks gone and the queue empty
    quiet_looks: int = 0
    last_quiet_look: float = -math.inf
    # The offset the bridge expects to read next: where it set the reading (the committed
    # offset, a re-read), then past the last message read; None until known.
    next_read: int | None = None
    # Whether a message was read since the reading was last set (assigned, or sought back):
    # until one is, the Kafka client's position may be the one from before the seek, which
    # it makes in the background.
    read_since_set: bool = False
    lost: int = 0  # events counted lost to Kafka's retention since this bridge was given it
    lost_at: float | None = None  # when it last counted some
    unreadable: Unreadable | None = None  # the last batch Kafka could not hand over
    # Since when Kafka has handed none of it over while holding messages past its reading
    # (`Bridge._stuck_s`); None while it hands them over.
    stuck_since: float | None = None
    # Since when its committed offset has been past the end of Kafka's log
    # (`Bridge._past_end_s`); None while it is not.
    past_end_since: float | None = None

    @property
    def paused(self) -> bool:
        return self.paused_at is not None

    @property
    def in_flight(self) -> int:
        return len(self.pending)

    def may_resume(self, max_in_flight: int) -> bool:
        """Whether a partition paused at `max_in_flight` has room again: half of it free
        (with a bound of 1, none in flight)."""
        return self.in_flight <= max_in_flight // 2

    @property
    def skipped(self) -> int:
        """Offsets skipped below the log's start whose count waits (`due`)."""
        return sum(end - first for first, end, _ in self.below_start)

    def paused_for(self, *, unsent: bool, stopping: bool) -> str | None:
        """Why the bridge keeps the partition unread (`eventpipe.status.PAUSE_CAUSES`), None
        while it reads it. `unsent`: a batch the Celery broker refused waits to be sent again."""
        if not self.paused:
            return None
        if stopping:
            return "stopping"
        if unsent:
            return "broker"
        if not self.vouched:
            return "assigning"
        if self.draining:
            return "draining"
        return "backpressure"

    def low(self) -> int | None:
        """The oldest offset whose fate the ledger can still tell us, if any."""
        return self.outstanding[0][0] if self.outstanding else None

    def stalled_s(self, now: float) -> float | None:
        """For how long none of its offsets in flight was done, while some are."""
        return round(now - self.last_progress, 1) if self.outstanding else None

    def high(self) -> int | None:
        """The newest offset whose fate is awaited, if any."""
        return self.outstanding[-1][0] if self.outstanding else None

    @property
    def draining(self) -> bool:
        return self.drain_until is not None

    def drain(self, queued: int | None, now: float, timeout_s: float) -> None:
        """The partition is set to be read (assigned, or re-read) while `queued` tasks wait in
        its queue: it is read once they are taken, so that a re-read adds no copies of its
        offsets beside them, beyond the bound on what is in flight; or once none of them was
        taken for `timeout_s`, whatever the queue holds (no worker serves it: the wait must
        end). None: the length is not known, and it is read at once."""
        self.drain_until = now + timeout_s if queued else None
        self.drain_depth = self.drain_left = queued or 0
        self.earlier_gone = queued == 0

    def drained(self, queued: int | None, now: float, timeout_s: float) -> bool:
        """Whether the partition stops draining now, the queue's length `queued`: the tasks
        it waits for are gone (the queue is first in, first out, so they are once as many
        were taken as it held; another pipeline's tasks may come in meanwhile), or none was
        taken for `timeout_s`."""
        if queued == 0:
            self.earlier_gone = True
        if self.drain_until is None:
            return False
        if queued is not None:
            # Taken at least: what the queue lost since last seen (more may have come).
            taken = max(0, self.drain_depth - queued)
            self.drain_depth = queued
            if taken:
                self.drain_left -= taken
                self.drain_until = now + timeout_s
        gone = queued == 0 or (queued is not None and self.drain_left <= 0)
        if not gone and now < self.drain_until:
            return False
        self.drain_until = None
        self.earlier_gone = gone
        return True

    def skipped_below(self, first: int, end: int, count_by: float = math.inf) -> None:
        """The reading skipped [first, end) below the log's start: counted by `count_by` at
        the latest, as one span with any it overlaps (each offset is counted once)."""
        for span in list(self.below_start):
            if span[0] <= end and first <= span[1]:
                self.below_start.remove(span)
                first, end, count_by = min(first, span[0]), max(end, span[1]), \
                    max(count_by, span[2])
        self.below_start.append((first, end, count_by))
        self.quiet_looks = 0  # its own looks, from now on

    def queue_seen(self, empty: bool, none_held: bool, now: float, wait_s: float) -> None:
        """A look at the partition's queue (`empty` or not) and at the tasks any worker holds
        (took, and has not acknowledged: `none_held`). A task sent before that could still
        apply a skipped offset waits in the queue, or is held: once the earlier reading's
        tasks are gone and the queue is empty, only those held then remain, which are
        handed out again and applied within `wait_s` (kombu's visibility timeout and the
        task's time limit); with none held either, nothing remains."""
        if empty:
            self.earlier_gone = True
        self.quiet = self.earlier_gone and empty
        if not (self.quiet and none_held):
            self.quiet_looks = 0
        elif now - self.last_quiet_look >= LOOK_GAP_S:  # looks apart, not two of one moment
            self.quiet_looks += 1
            self.last_quiet_look = now
        if self.quiet:
            self.below_start = [(first, end, min(count_by, now + wait_s))
                                for first, end, count_by in self.below_start]

    def due(self, now: float) -> list[tuple[int, int, float]]:
        """The spans to count now, taken out, the last look having found the queue empty (a
        task a dead worker held goes back to it): all of them once two looks in a row (a
        worker takes a task off the queue a moment before it is recorded as held) found no
        task held either, else those whose wait is over."""
        if not self.quiet:
            return []
        chosen = [span for span in self.below_start if self.quiet_looks >= 2 or now >= span[2]]
        for span in chosen:
            self.below_start.remove(span)
        return chosen

    def read(self, offset: int) -> int | None:
        """A message at `offset` was read: the first offset it skipped (the read went past
        offsets expected first), else None."""
        expected, self.next_read = self.next_read, offset + 1
        self.read_since_set = True
        return expected if expected is not None and offset > expected else None

    def dispatched(self, offsets: list[int], now: float) -> None:
        """Offsets sent, in any order: they are awaited lowest first, each once (two
        messages at one offset, records that claim the same one, are marked done as one).
        Below those sent before come the records of a batch that lists its offsets out of
        order, and what the Kafka client reads again from the log's start by itself (a
        committed offset past the end of a log cut since): awaited all the same, however
        far below the commit, so that none is passed over lost."""
        if not self.outstanding and not (offsets and self.resend_below is not None
                                         and offsets[0] < self.resend_below):
            self.last_progress = now
        top = -1 if self.last_dispatched is None else self.last_dispatched
        below: list[int] = []  # below one sent already (seldom: as said above)
        for offset in offsets:
            if offset > top:
                self.outstanding.append((offset, now))
                self.pending.add(offset)
                top = offset
            elif offset not in self.pending and offset not in self.done_ahead:
                below.append(offset)
                self.pending.add(offset)
        if below:
            self.outstanding = deque(sorted([*self.outstanding, *((o, now) for o in below)]))
        if top >= 0:
            self.last_dispatched = top

    def observe(self, done: set[int], leased: set[int], now: float,
                unrecorded: set[int] | None = None) -> None:
        """Take in the ledger's view: offsets done, offsets with a live lease, and which of
        the done ones the database records no range of (`OffsetLedger.read`)."""
        newly_done = done & self.pending
        if newly_done:
            self.last_progress = now
            self.resend_below = None
            self.pending -= newly_done
            self.done_ahead |= newly_done
            if unrecorded:
                self.unrecorded |= newly_done & unrecorded
        while self.outstanding and self.outstanding[0][0] in self.done_ahead:
            offset = self.outstanding.popleft()[0]
            self.done_ahead.discard(offset)
            if offset in self.unrecorded:
                self.unrecorded.discard(offset)
            elif self.settled and self.settled[-1][1] + 1 == offset:
                self.settled[-1] = (self.settled[-1][0], offset)
            else:
                self.settled.append((offset, offset))
        self.leased = leased
        if self.done_ahead and self.outstanding:
            if self.overtaken_since is None:
                self.overtaken_since = now
        else:
            self.overtaken_since = None

    def committable(self, read_to: int | None = None) -> int | None:
        """Offset to commit now, or None when there is nothing new to commit. `read_to`:
        where the Kafka client's reading stands: with nothing outstanding, the offsets
        between the last sent and it hold no message. Taken only once a message was read
        since the reading was last set, and every message read was sent: one read and
        dropped unsent (the bridge stopping, the partition revoked) is below it too."""
        if not self.read_since_set or self.last_dispatched is None \
                or self.last_dispatched + 1 != self.next_read:
            read_to = None
        if self.outstanding:
            candidate = self.outstanding[0][0]
        elif self.last_dispatched is not None or read_to is not None:
            candidate = max(-1 if self.last_dispatched is None else self.last_dispatched + 1,
                            -1 if read_to is None else read_to)
        else:
            return None
        if self.committed is not None and candidate <= self.committed:
            return None
        return candidate

    def redelivery(self, now: float, timeout_s: float, queued: int | None = None) -> int | None:
        """The offset to read again from, if the oldest unfinished offset was lost.

        `queued`: tasks waiting in the partition's Celery queue (None: unknown)."""
        if not self.outstanding:
            return None
        head, sent_at = self.outstanding[0]
        if head in self.leased or (queued is not None and queued > 0):
            self.unaccounted = None  # the head is held, or may be waiting among the tasks
        elif queued == 0 and (self.unaccounted is None or self.unaccounted[0] != head):
            self.unaccounted = (head, now)  # a depth unknown (None) is no sighting
        since = self.unaccounted[1] if self.unaccounted is not None else None
        if needs_redelivery(head in self.leased, now, sent_at, self.last_progress,
                            self.overtaken_since, timeout_s, queued, unaccounted_since=since):
            return head
        return None

    def unobserved(self) -> None:
        """A check of the head skipped (the ledger unreadable, the partition's batch not
        sent yet): its next check starts the grace afresh, rather than count a time it was
        not looked at."""
        self.unaccounted = None

    def reset(self, offset: int) -> None:
        """Forget everything handed out: the partition is about to be read again from
        `offset`. Its stall goes on from its last event done while it sends again what was
        in flight: a partition whose events are lost on the way again and again (workers that
        fail every batch) is no less stuck."""
        if self.outstanding:
            self.resend_below = max(self.resend_below or 0, self.outstanding[-1][0] + 1)
        self.next_read = offset
        self.read_since_set = False
        self.outstanding.clear()
        self.pending.clear()
        self.done_ahead.clear()
        self.unrecorded.clear()
        self.leased = set()
        self.last_dispatched = None
        self.overtaken_since = None
        self.unaccounted = None


def needs_redelivery(
    head_leased: bool, now: float, head_sent_at: float, last_progress: float,
    overtaken_since: float | None, timeout_s: float, queued: int | None = None,
    unaccounted_since: float | None = None,
) -> bool:
    """Whether the oldest unfinished offset of a partition was lost on the way.

    A worker leases the offsets it holds (a batch being applied, a retry waiting), so a
    leased offset is never lost. Otherwise it is lost when
    - later offsets of the partition are done: one partition's tasks run in order in one
      worker, so work that was overtaken was dropped (a worker killed mid-batch), whatever
      waits behind it in the queue — after a short grace in case two workers serve the
      partition by mistake; or
    - nothing at all has happened on the partition for `timeout_s` (the queue was flushed),
      and no task waits in its queue: the head's may be among them (a worker stalled or
      slow), and reading it again would only add copies behind it — the backpressure bound
      would not hold. Nor when the head was first seen neither leased nor queued
      (`unaccounted_since`) less than `TAKEN_GRACE_S` ago: a worker may have just taken its
      task, after a long wait in the queue, and not yet leased it.
    """
    if head_leased:
        return False
    if overtaken_since is not None and now - overtaken_since >= timeout_s / 4:
        return True
    if queued is not None and queued > 0:
        return False
    if (unaccounted_since is not None
            and now - unaccounted_since < min(TAKEN_GRACE_S, timeout_s / 4)):
        return False
    return now - max(head_sent_at, last_progress) >= timeout_s
