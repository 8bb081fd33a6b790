"""Keeping the operators' Redis stream in step with the dead letters recorded in SQL.

Rows whose latest revision is not in the stream (`in_stream` false) are projected: an open
dead letter is put (added or replaced) with its message's bytes; any other state removes its
entry. The bytes come from the caller when it has them (the batch that just dead-lettered
the message), else from the entry the stream shows already (past Kafka's retention, the only
copy), else from Kafka at the recorded position. Then the revision written is marked,
so a row changed meanwhile is projected again next time.

Redis may lose the stream (a crash without persistence, FLUSHALL): `restore` rebuilds it
from SQL — every open dead letter put back with bytes fetched from Kafka, entries SQL does
not know removed — and reports what Kafka no longer has. The reconciler notices the loss by
itself (`repair_if_lost`, a marker key lost with the data) and rebuilds within a second;
`eventpipe dlq restore` does the same on demand. Differences the marker survives (a replica
that missed the last writes, an entry deleted by hand, a projection racing another) are found
by `heal` and projected again.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import redis
from sqlalchemy import Engine, func, select, update

from eventpipe.database import reading
from eventpipe.dlq import records
from eventpipe.dlq.letter import OPEN, REPLAYING, UNREADABLE_MESSAGE, DeadLetter, made_of
from eventpipe.dlq.stream import (
    REBUILD_LEASE_S,
    DeadLetterQueueFull,
    DeadLetterStream,
    StreamEntry,
)
from eventpipe.effects import Position
from eventpipe.messages import RawMessage
from eventpipe.tables import dead_letters

log = logging.getLogger(__name__)

HEAL_EVERY_S = 2.0
# Dead letters put back per step of a rebuild, each fetched from Kafka; the rebuild's lease
# (`REBUILD_LEASE_S`) is extended between steps, and between fetches as they take time.
REBUILD_STEP = 100
SWEEP_EVERY_S = 60.0

# The message at a position (key, value, headers); None when Kafka no longer has it.
Fetch = Callable[[Position], RawMessage | None]
Payloads = Mapping[str, RawMessage]


@dataclass(slots=True)
class Projected:
    put: int = 0
    removed: int = 0
    missing_bytes: list[str] = field(default_factory=list)  # dlq keys shown without value
    full: bool = False
    stopped: bool = False  # a rebuild that lost its claim before its end


def project(engine: Engine, stream: DeadLetterStream, fetch: Fetch | None,
            payloads: Payloads | None = None, *, limit: int = 500,
            rebuilding: bool = False) -> Projected:
    """Bring up to `limit` unprojected dead letters into the stream. Without `fetch`, only
    those whose bytes are in `payloads` (the rest wait for a caller that can read Kafka).
    `rebuilding`: every letter is being put anew (`restore`), in the stream's order.

    Room goes in the order the letters began to fail: changes to entries the stream shows
    need none and go first; then letters it does not show, whatever their revision (a
    replay's copy failing again is a letter the DLQ no longer shows, begun anew: else it
    would take back at once the room its replay freed, for ever, ahead of letters that never
    had any). While the stream refuses letters for want of room (`refusing`), a batch's new
    letters (no `fetch`) wait for the reconciler's rounds, which take every waiting letter in
    that order."""
    report = Projected()
    with reading(engine) as conn:  # marked below only where the revision read still holds
        pending = records.unprojected(conn, limit, None if fetch else list(payloads or ()),
                                      rebuilding=rebuilding)
        kept = records.kept_messages(conn, [p.dlq_key for p in pending if p.state == OPEN])
    written: list[DeadLetter] = []
    # Messages SQL does not keep yet: those handed over are kept whatever the stream does
    # (full, or Redis away); those the stream or Kafka gives, as they are shown.
    to_keep = {letter.dlq_key: message for letter in pending
               if letter.state == OPEN and letter.dlq_key not in kept
               and (message := (payloads or {}).get(letter.dlq_key)) is not None}
    refused: DeadLetterQueueFull | None = None
    try:
        # Out of the DLQ first (one round trip; it also makes room), then into it.
        gone = [letter for letter in pending if letter.state != OPEN]
        report.removed = stream.remove(*(letter.dlq_key for letter in gone))
        written += gone
        ahead, present = _in_turn([p for p in pending if p.state == OPEN], stream,
                                  rebuilding=rebuilding, batch=fetch is None)
        for letter in ahead:
            if refused is not None and refused.by_count:  # only a replacement may go in
                if present is None:
                    present = stream.holding([p.dlq_key for p in ahead])
                if letter.dlq_key not in present:
                    continue
            message = (payloads or {}).get(letter.dlq_key) or kept.get(letter.dlq_key)
            if message is None and fetch is not None:
                message = _shown(stream, letter) or fetched(fetch, letter)
            elif message is None:
                continue
            if message is None:
                report.missing_bytes.append(letter.dlq_key)
            elif letter.dlq_key not in kept:
                to_keep[letter.dlq_key] = message
            try:
                stream.put(StreamEntry.of(letter, message))
            except DeadLetterQueueFull as exc:  # a letter it shows may still be replaced
                refused = exc
                continue
            report.put += 1
            written.append(letter)
    finally:
        if written or to_keep:
            if report.put:
                stream.sync_to_disk()
            with engine.begin() as conn:
                records.mark_projected(conn, written)
                records.keep_messages(conn, to_keep)
    if refused is not None:
        report.full = True
        with reading(engine) as conn:
            waiting = records.count_unprojected(conn)
        log.error("%s; %d dead letter(s) wait in SQL", refused, waiting)
    return report


def _in_turn(letters: list[DeadLetter], stream: DeadLetterStream, *, rebuilding: bool,
             batch: bool) -> tuple[list[DeadLetter], set[str] | None]:
    """The open letters in the order they take room (`project`), and those the stream shows
    (None: not asked)."""
    if rebuilding or not letters:
        return letters, None
    present, refusing = stream.standing([letter.dlq_key for letter in letters])
    if batch and refusing:
        letters = [letter for letter in letters if letter.dlq_key in present]
    # By when each began to fail: the same message handed over again (a redelivery, a
    # duplicate) moves its last failure, not its place.
    return sorted(letters, key=lambda letter: (letter.dlq_key not in present,
                                               letter.first_failure_at, letter.dlq_key)), present


def _shown(stream: DeadLetterStream, letter: DeadLetter) -> RawMessage | None:
    """The message the letter's entry shows: once Kafka's retention has passed, the only
    copy, which showing the letter again must not throw away."""
    entry = stream.get_key(letter.dlq_key)
    message = entry.raw if entry is not None else None
    if message is None or not made_of(letter.dlq_key, message.key, message.value):
        return None
    return message


def fetched(fetch: Fetch, letter: DeadLetter) -> RawMessage | None:
    """The message at the letter's position, if Kafka still has it and it is the letter's
    (never for one Kafka could not hand over: it has no bytes to be known by)."""
    if letter.error_class == UNREADABLE_MESSAGE:
        return None
    message = fetch(letter.position)
    if message is not None and not made_of(letter.dlq_key, message.key, message.value):
        log.warning("the message now at %s is not the dead letter's: shown without its bytes",
                    letter.position, extra={"dlqKey": letter.dlq_key})
        return None
    return message


def open_count(engine: Engine) -> int:
    """Dead letters in the DLQ, as SQL records them."""
    with reading(engine) as conn:
        return int(conn.execute(select(func.count()).select_from(dead_letters)
                                .where(dead_letters.c.state == OPEN)).scalar_one())


def open_keys(engine: Engine) -> list[str]:
    """The keys of the dead letters in the DLQ, as SQL records them."""
    with reading(engine) as conn:
        return list(conn.execute(select(dead_letters.c.dlq_key)
                                 .where(dead_letters.c.state == OPEN)).scalars())


def restore(engine: Engine, stream: DeadLetterStream, fetch: Fetch,
            progress: Callable[[int], None] | None = None,
            claim: str | None = None, lease_s: int = REBUILD_LEASE_S) -> Projected:
    """Rebuild the stream from SQL: every open dead letter put back (under a new entry id),
    oldest failure first, strays removed;
    `progress` is told how many were put back at each step. The rebuild holds `claim` in the
    marker for `lease_s` (extended as it works, so a long rebuild keeps it) and stops if it
    loses it; the stream is marked intact at the end only if the claim held (see
    `mark_intact`)."""
    claim = claim or stream.begin_rebuild(lease_s)
    stream.mend()  # after a hand edit the index may no longer say what the stream holds
    shown = stream.keys()  # before SQL: a key put after this is no stray
    with engine.begin() as conn:
        conn.execute(update(dead_letters).where(dead_letters.c.state == OPEN)
                     .values(in_stream=False))
        # A replay's letters keep their entries: the replay's end projects them.
        kept = {row.dlq_key for row in conn.execute(
            select(dead_letters.c.dlq_key).where(dead_letters.c.state.in_((OPEN, REPLAYING))))}
    report = Projected()
    report.removed = stream.remove(*(shown - kept))
    held = _Holding(stream, claim, lease_s)
    while _pending(engine):
        if not held.hold():
            log.warning("the DLQ rebuild stopped: Redis restarted again, or another rebuild "
                        "began")
            report.stopped = True
            return report
        step = project(engine, stream, held.fetching(fetch), limit=REBUILD_STEP,
                       rebuilding=True)
        if progress is not None:
            progress(step.put)
        report.put += step.put
        report.removed += step.removed
        report.missing_bytes += step.missing_bytes
        if step.full:
            report.full = True  # the rest waits in SQL, projected once there is room
            break
    if not stream.mark_intact(claim):
        log.warning("the DLQ rebuild was overtaken: Redis restarted again, or another rebuild "
                    "began; it is rebuilt once more")
        report.stopped = True
    return report


class _Holding:
    """A rebuild's claim on the stream's marker, extended at each step and between the
    fetches of one: a step's fetches may each wait for Kafka (`MessageReader.fetch`, seconds
    where the position holds nothing), so a step of them could outlast the lease, and the
    rebuild would stop there at every attempt."""

    def __init__(self, stream: DeadLetterStream, claim: str, lease_s: int) -> None:
        self.stream = stream
        self.claim = claim
        self.lease_s = lease_s
        self.held_at = time.monotonic()  # claimed just now

    def hold(self) -> bool:
        self.held_at = time.monotonic()
        return self.stream.hold_rebuild(self.claim, self.lease_s)

    def fetching(self, fetch: Fetch) -> Fetch:
        def fetched(position: Position) -> RawMessage | None:
            if time.monotonic() - self.held_at > self.lease_s / 3:
                self.hold()  # a claim lost meanwhile is seen at the step's end
            return fetch(position)
        return fetched


def repair_if_lost(engine: Engine, stream: DeadLetterStream, fetch: Fetch) -> Projected | None:
    """Rebuild the stream if Redis lost it (see `DeadLetterStream.intact`); None if it is
    intact or another worker is rebuilding it."""
    claim = stream.claim_rebuild()
    if claim is None:
        return None
    try:
        report = restore(engine, stream, fetch, claim=claim)
    except Exception:  # the database or Kafka went away: the next round starts again
        with contextlib.suppress(redis.RedisError):
            stream.release_rebuild(claim)
        raise
    if report.put or report.missing_bytes:
        log.error("the DLQ stream had lost its entries (Redis restarted without persistence, "
                  "or was flushed): %d rebuilt from SQL, %d without their bytes (no longer in "
                  "Kafka)", report.put, len(report.missing_bytes))
    return report


def heal(engine: Engine, stream: DeadLetterStream, every_s: float = HEAL_EVERY_S) -> int:
    """Bring back in step a stream that differs from SQL although its marker survived: a
    promoted replica that missed the last writes, an entry deleted by hand, a projection that
    put an older revision after a newer one was removed. How many entries were out of step.

    One process at a time, every `HEAL_EVERY_S`, compares counts (the open dead letters SQL
    says are shown, the stream's entries and index); when they differ, and every
    `SWEEP_EVERY_S` anyway (equal counts can hide a lost entry behind a stale one), it
    compares keys and revisions, and marks what differs to be projected again: a missing or
    outdated entry is put, one SQL closed is removed. Marks are conditional on the revision
    read, so a row that changed meanwhile is left to its own projection.

    SQL is read before Redis: an entry is put before its row is marked shown and its row
    leaves `open` before the entry is removed, so a concurrent projection can make an entry
    look extra (projected again: harmless), never make a shown one look missing.
    `every_s` 0: compare everything now (tests, an operator's check)."""
    if every_s > 0 and not stream.take_turn("heal", every_s):
        return 0
    with reading(engine) as conn:
        expected = records.count_shown(conn)
    entries, indexed = stream.sizes()
    if entries != indexed:
        log.warning("the DLQ stream and its index disagree (edited by hand?): it is rebuilt")
        stream.forget_intact()
        return abs(entries - indexed)
    if expected == entries and every_s > 0 and not stream.take_turn("sweep", SWEEP_EVERY_S):
        return 0
    with reading(engine) as conn:
        shown = records.shown(conn)
        claimed = records.claimed(conn)
    present = stream.revisions()
    stale = {key: revision for key, revision in shown.items()
             if key not in present or present[key] not in (revision, None)}
    extra = [key for key in present if key not in shown and key not in claimed]
    with engine.begin() as conn:
        rows = records.load(conn, extra)
        stale.update({key: letter.revision for key, letter in rows.items()})
        records.mark_unprojected(conn, stale)
    strays = [key for key in extra if key not in rows]
    stream.remove(*strays)
    if stale or strays:
        log.warning("the DLQ stream was out of step with SQL (Redis lost writes, or a write "
                    "raced another): %d entries are projected again, %d unknown to SQL "
                    "removed", len(stale), len(strays))
    return len(stale) + len(strays)


def _pending(engine: Engine) -> bool:
    with reading(engine) as conn:
        return bool(records.unprojected(conn, 1))
