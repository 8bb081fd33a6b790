"""Dead letters in SQL: the durable record of every failed or held event, and its state.

Written in the same transaction as the batch (or the reconciler round) that decided the fate,
so a dead letter is as durable as the commit the bridge relies on. Every change bumps the
row's `revision` and clears `in_stream`; the projection (`eventpipe.dlq.projection`) then
brings the Redis stream in line and marks the revision it wrote.

Each change reads the rows first (to keep their history), under row locks taken in key order,
so two writers can neither lose each other's update nor deadlock; the rows of a batch or a
reconciler round are then written together (held children can be thousands a round). A lock
cannot hold a row not there yet: two writers of one new letter meet at its insert, and the
second reads it and decides again (`_decided`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from functools import cache
from typing import Any

from sqlalchemy import (
    Connection,
    Insert,
    Select,
    Update,
    and_,
    bindparam,
    case,
    false,
    func,
    insert,
    literal_column,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError

from eventpipe.dlq.letter import (
    CLOSED,
    OPEN,
    PURGED,
    REPLAYED,
    REPLAYING,
    RESOLVED,
    WAITING,
    DeadLetter,
    Episode,
    event_key,
    history_from_json,
    history_json,
)
from eventpipe.effects import Position
from eventpipe.events import utf16_prefix
from eventpipe.keysets import Keyed, rows_in
from eventpipe.messages import Headers, RawMessage, headers_from_json, headers_json
from eventpipe.tables import applied_events, dead_letter_messages, dead_letters
from eventpipe.times import utc_iso

log = logging.getLogger(__name__)

MAX_REASON = 1000
MAX_HISTORY = 20

Change = tuple[DeadLetter | None, DeadLetter]  # a letter as read (None: new), and as it becomes


def _row(letter: DeadLetter) -> dict[str, Any]:
    return {
        "dlq_key": letter.dlq_key, "event_id": letter.event_id,
        "event_type": letter.event_type[:64] if letter.event_type else None,
        "entity_kind": letter.entity_kind, "entity_key": letter.entity_key,
        "parent_kind": letter.parent_kind, "parent_key": letter.parent_key,
        "state": letter.state, "error_class": letter.error_class[:64],
        "reason": utf16_prefix(letter.reason, MAX_REASON), "traceback": letter.traceback,
        "kafka_topic": letter.position.topic, "kafka_partition": letter.position.partition,
        "kafka_offset": letter.position.offset, "attempts": letter.attempts,
        "first_failure_at": letter.first_failure_at, "last_failure_at": letter.last_failure_at,
        "deadline": letter.deadline, "worker": letter.worker[:255],
        "history": history_json(letter.history[-MAX_HISTORY:]),
        "revision": letter.revision, "in_stream": False,
    }


def letter_of(row: Any) -> DeadLetter:
    return DeadLetter(
        dlq_key=row.dlq_key, error_class=row.error_class, reason=row.reason,
        first_failure_at=row.first_failure_at, last_failure_at=row.last_failure_at,
        worker=row.worker, event_id=row.event_id, event_type=row.event_type,
        position=Position(row.kafka_topic, row.kafka_partition, row.kafka_offset),
        traceback=row.traceback, attempts=row.attempts, state=row.state,
        entity_kind=row.entity_kind, entity_key=row.entity_key, parent_kind=row.parent_kind,
        parent_key=row.parent_key, deadline=row.deadline,
        history=history_from_json(row.history), revision=row.revision,
    )


def _locked(query: Select[Any]) -> Select[Any]:
    """Lock the rows read, always in key order, so two writers cannot deadlock on them.
    SQLite renders no FOR UPDATE: its writer already holds the database lock. SQL Server
    renders its hint instead, whose HOLDLOCK also holds the keys no row has yet, so a writer
    of a new letter waits for another that is inserting it."""
    return (query.order_by(dead_letters.c.dlq_key).with_for_update()
            .with_hint(dead_letters, "WITH (UPDLOCK, HOLDLOCK, ROWLOCK)", "mssql"))


_LIVE = dead_letters.c.state.in_((WAITING, OPEN))  # a letter held or in the DLQ
_BY_KEY = Keyed(select(dead_letters), dead_letters.c.dlq_key)
_BY_KEY_LOCKED = Keyed(_locked(select(dead_letters)), dead_letters.c.dlq_key)


def load(conn: Connection, keys: Collection[str], *, lock: bool = False) -> dict[str, DeadLetter]:
    by_key = _BY_KEY_LOCKED if lock else _BY_KEY
    return {row.dlq_key: letter_of(row) for row in by_key.rows(conn, keys)}


def episode(letter: DeadLetter, ended: str, ended_at: datetime) -> Episode:
    return Episode(letter.error_class, letter.reason, letter.attempts,
                   utc_iso(letter.first_failure_at), utc_iso(letter.last_failure_at),
                   letter.worker, ended, utc_iso(ended_at))


def save(conn: Connection, before: DeadLetter, after: DeadLetter) -> DeadLetter:
    """Update `before` into `after`; bumps the revision, marks it unprojected."""
    return save_all(conn, [(before, after)])[0]


def save_all(conn: Connection, changes: Sequence[Change]) -> list[DeadLetter]:
    """`save` for many letters: one INSERT for the new ones, one UPDATE statement (executed
    for each row) for the others, in key order. The letters as saved (each with the state it
    had before, `was`), in the order given; a new letter another writer inserted since this
    one's read found none is left out (`_inserted`)."""
    saved = [replace(after, revision=1 if before is None else before.revision + 1,
                     was=None if before is None else before.state)
             for before, after in changes]
    new = sorted((_row(after) for (before, _), after in zip(changes, saved, strict=True)
                  if before is None), key=lambda row: row["dlq_key"])
    updated = sorted(({**_row(after), "key": after.dlq_key}
                      for (before, _), after in zip(changes, saved, strict=True)
                      if before is not None), key=lambda row: row["key"])
    for row in updated:
        del row["dlq_key"]
    inserted = _inserted(conn, new) if new else set()
    if updated:
        conn.execute(_update_by_key(), updated)
    return [letter for (before, _), letter in zip(changes, saved, strict=True)
            if before is not None or letter.dlq_key in inserted]


def _inserted(conn: Connection, rows: list[dict[str, Any]]) -> set[str]:
    """Insert new letters; the keys inserted. On PostgreSQL the read's row locks cannot hold
    a row that is not there yet: a letter another writer inserted since is skipped (its
    insert is waited for, then met). SQL Server's read holds the keys (`_locked`), and
    SQLite has one writer at a time."""
    if conn.dialect.name != "postgresql":
        conn.execute(dead_letters.insert(), rows)
        return {row["dlq_key"] for row in rows}
    return set(conn.execute(_insert_unless_there(), rows).scalars())


@cache
def _insert_unless_there() -> Insert:
    return postgresql.insert(dead_letters).on_conflict_do_nothing(
        index_elements=[dead_letters.c.dlq_key]).returning(dead_letters.c.dlq_key)


@cache
def _update_by_key() -> Update:
    """Sets the columns each row names (all but the key)."""
    return update(dead_letters).where(dead_letters.c.dlq_key == bindparam("key"))


def _decided(conn: Connection, keys: Collection[str],
             decide: Callable[[Collection[str], Mapping[str, DeadLetter]], list[Change]],
             ) -> list[DeadLetter]:
    """Read the letters of `keys` under their locks and save what `decide` makes of them
    (given the keys and the letters found). On PostgreSQL a new letter another writer
    inserted since the read (the same bad bytes on two partitions, a redelivered batch beside
    the original) is not saved (`_inserted`): the pass is undone to its savepoint, releasing
    what it locked and inserted, and taken again, reading that letter too. The failure folds
    into it, as into one committed before the read, rather than fail the batch on its key;
    and every pass takes its locks in key order, holding none of its own before (a second
    read that locked the other writer's letter after this pass's inserts would deadlock with
    a third writer). Each pass again follows another writer's commit of one of these keys.
    No keys, no statement: most batches and rounds have none."""
    if not keys:
        return []
    while True:
        savepoint = conn.begin_nested() if conn.dialect.name == "postgresql" else None
        changes = decide(keys, load(conn, keys, lock=True))
        written = save_all(conn, changes)
        if savepoint is None:
            return written
        if len(written) == len(changes):
            savepoint.commit()
            return written
        savepoint.rollback()


def record_failures(conn: Connection, failures: Iterable[DeadLetter]) -> list[DeadLetter]:
    """Add each failure, or fold it into the dead letter of the same key: one more attempt at
    its latest position; a dead letter that had left the DLQ reopens (its past is an episode
    of its history), unless the failure is of the very message it left with, handed over
    again by Kafka (a worker died before marking it done, a rebalance): purged stays purged.
    Returns the rows as saved."""
    chosen = {failure.dlq_key: failure for failure in failures}

    def decide(keys: Collection[str], existing: Mapping[str, DeadLetter]) -> list[Change]:
        return [change for key in sorted(keys)
                if (change := _folded(chosen[key], existing.get(key))) is not None]

    # Together: a flood of poison is written a batch at a time, not a statement per message.
    return _decided(conn, chosen, decide)


def _folded(failure: DeadLetter, before: DeadLetter | None) -> Change | None:
    """`failure` as a change of the letter of its key (`record_failures`); None for none."""
    if before is None:
        return None, failure
    if before.state in CLOSED and failure.position.offset is not None \
            and before.position == failure.position:
        return None
    if before.state == REPLAYING and before.position != failure.position:
        # The replayed copy failed before its replayer marked the letter replayed (it then
        # leaves the letter as it finds it): the replay is an episode all the same.
        before = _transitioned(before, REPLAYED, failure.last_failure_at)
    # A dead letter that had left the DLQ starts a new life; the old one is an episode
    # already (written when it left).
    first = before.first_failure_at if before.state not in CLOSED else failure.first_failure_at
    attempts = before.attempts + failure.attempts if before.state not in CLOSED \
        else failure.attempts
    return before, replace(
        failure, first_failure_at=first, attempts=attempts, history=before.history,
        state=OPEN if failure.state == OPEN or before.state == OPEN else failure.state)


def repeat(conn: Connection, keys: Collection[str], position: dict[str, Position],
           now: datetime) -> list[DeadLetter]:
    """Another copy of held or dead-lettered events arrived (a duplicate, a redelivery): one
    more attempt each, at that position. A replay's copy, whether the replay has ended or
    not, is only the letter's new position: should its event be held still, the letter
    reopens there (`create_or_reopen`), which Kafka keeps longer than the first (and a
    redelivery of the first message does not take it back)."""
    existing = load(conn, keys, lock=True)
    changes: list[Change] = []
    for key, before in sorted(existing.items()):
        at = position.get(key, before.position)
        if before.state in (OPEN, WAITING):
            changes.append((before, replace(before, attempts=before.attempts + 1,
                                            last_failure_at=now, position=at)))
        elif before.state in (REPLAYING, REPLAYED) and _later(at, before.position):
            changes.append((before, replace(before, position=at)))
    return save_all(conn, changes)


def _later(position: Position, than: Position) -> bool:
    """Whether a copy at `position` came after the message at `than`: further on in its
    partition (a replay sends its copy back to the partition its message was read from;
    where the topic no longer has it, the copy goes elsewhere, and the letter keeps the
    position it had, whose order with another partition's cannot be told)."""
    if position.offset is None:
        return False
    return than.offset is None or ((position.topic, position.partition) == (
        than.topic, than.partition) and position.offset > than.offset)


def given_up_then_recorded(conn: Connection) -> list[str]:
    """The live dead letters of events given up on their own (an unforeseen error, a worker
    that died on them, a value the database refused: none of which records the event) that a
    copy has given a fate since (applied, or stale): sent again by the producer, read again
    from Kafka, and applied this time. A batch looks for no dead letter of the events it
    records, which would cost every batch a lookup for the rare event given up; these are
    found after it. A copy recorded before the failure leaves the letter alone: the failure
    came after the event had its fate (a copy that kills its worker is one to see). Dead
    letters of held events (which have an entity) are the reconciler's; a reused id's
    (another payload) and a message's that is no event (`m:`) never match."""
    rows = conn.execute(
        select(dead_letters.c.dlq_key, dead_letters.c.first_failure_at,
               applied_events.c.fingerprint, applied_events.c.applied_at)
        .join(applied_events, applied_events.c.event_id == dead_letters.c.event_id)
        .where(_LIVE, dead_letters.c.entity_kind.is_(None),
               dead_letters.c.dlq_key.startswith("e:")))
    # Compared here: in SQL the two columns' collations may differ (SQL Server).
    return [row.dlq_key for row in rows
            if row.fingerprint is not None and row.dlq_key == event_key(row.fingerprint)
            and row.applied_at > row.first_failure_at]


def transition(conn: Connection, letter: DeadLetter, state: str, now: datetime,
               **changes: Any) -> DeadLetter:
    """Move a dead letter to `state`; leaving the DLQ for good closes an episode."""
    return save(conn, letter, _transitioned(letter, state, now, **changes))


def _transitioned(letter: DeadLetter, state: str, now: datetime, **changes: Any) -> DeadLetter:
    history = letter.history
    if state in CLOSED and letter.state not in CLOSED:
        history = (*history, episode(letter, state, now))
    return replace(letter, state=state, history=history, **changes)


_LIVE_OF_KIND = select(dead_letters).where(dead_letters.c.entity_kind == bindparam("kind"), _LIVE)
_LIVE_OF_ENTITIES = Keyed(_LIVE_OF_KIND, dead_letters.c.entity_key)
_LIVE_OF_ENTITIES_LOCKED = Keyed(_locked(_LIVE_OF_KIND), dead_letters.c.entity_key)
_HELD_BY_PARENTS = Keyed(
    select(dead_letters.c.entity_kind, dead_letters.c.entity_key).where(
        dead_letters.c.parent_kind == bindparam("parent_kind"), _LIVE,
        dead_letters.c.entity_key.is_not(None)),
    dead_letters.c.parent_key)


def by_entity(conn: Connection, kind: str, keys: Collection[str], *,
              lock: bool = True) -> dict[str, list[DeadLetter]]:
    """Live (waiting or open) dead letters of these entities, by entity key, locked unless
    the caller only reads: a caller that decides their next state from what it read must
    have a redelivery bumping one of them meanwhile (`repeat`) wait rather than make that
    decision miss its row."""
    found: dict[str, list[DeadLetter]] = {}
    of_entities = _LIVE_OF_ENTITIES_LOCKED if lock else _LIVE_OF_ENTITIES
    for row in of_entities.rows(conn, keys, kind=kind):
        found.setdefault(row.entity_key, []).append(letter_of(row))
    return found


def waiting_on(conn: Connection, parent_kind: str,
               keys: Collection[str]) -> set[tuple[str, str]]:
    """(kind, key) of the entities whose live dead letters are held because of these
    parents."""
    return {(row.entity_kind, row.entity_key)
            for row in _HELD_BY_PARENTS.rows(conn, keys, parent_kind=parent_kind)}


def create_or_reopen(conn: Connection, letters: Sequence[DeadLetter],
                     park_timeout: timedelta | None = None) -> list[DeadLetter]:
    """Add held events' dead letters; one that had left the DLQ comes back with its earlier
    lives (episodes written when it left), but for one an operator purged: that decision
    stands, for as long as the event is held or whenever it is held again (its entity stays
    out of the read model; `eventpipe trace` tells why). A copy of a held event is a
    duplicate, which leaves a purged letter as it is too (`repeat`). One a replay has is
    left to it: the replay's end queues its entity for the round that decides it then."""
    chosen = {letter.dlq_key: letter for letter in letters}

    def decide(keys: Collection[str], before: Mapping[str, DeadLetter]) -> list[Change]:
        changes: list[Change] = []
        for key in keys:
            if key not in before:
                changes.append((None, chosen[key]))
            elif before[key].state not in (PURGED, REPLAYING):
                changes.append((before[key], _reopened(before[key], chosen[key], park_timeout)))
        return changes

    return _decided(conn, chosen, decide)


def _reopened(before: DeadLetter, letter: DeadLetter,
              park_timeout: timedelta | None) -> DeadLetter:
    """`letter` in the row `before`, with its earlier lives. An event replayed less than a
    parking time ago and still held comes back to the DLQ at once: its wait was spent before
    the replay, and waiting anew would hide it for another parking time, as if the replay
    had emptied the DLQ. Held again long after (its parent gone from the read model since),
    it waits as any event does."""
    last = before.history[-1] if before.history else None
    if (before.state == REPLAYED and letter.state == WAITING and park_timeout is not None
            and last is not None and last.ended == REPLAYED
            and datetime.fromisoformat(last.ended_at) + park_timeout > letter.last_failure_at):
        letter = replace(letter, state=OPEN, deadline=None)
    # At the latest copy of its message the letter knew (a replay's), not at the first one
    # its event was recorded at: past Kafka's retention, that one is gone first.
    latest = letter.position if _later(letter.position, before.position) else before.position
    return replace(letter, history=before.history, position=latest)


def due(conn: Connection, now: datetime, limit: int) -> list[DeadLetter]:
    """Waiting dead letters whose parking time is over, and replays whose claim lapsed."""
    query = (select(dead_letters)
             .where(dead_letters.c.state.in_((WAITING, REPLAYING)),
                    dead_letters.c.deadline <= now)
             .order_by(dead_letters.c.deadline).limit(limit))
    return [letter_of(row) for row in conn.execute(query)]


# A letter whose latest revision the stream does not show, but for one a replay holds.
_UNPROJECTED = (dead_letters.c.in_stream == false(), dead_letters.c.state != REPLAYING)


def unprojected(conn: Connection, limit: int, keys: Collection[str] | None = None, *,
                rebuilding: bool = False) -> list[DeadLetter]:
    """Dead letters whose latest revision the stream does not show (of `keys`, if given):
    those that left the DLQ first, then those saved before (most of which the stream shows),
    then new ones; and besides, up to `limit` more, the open letters that began to fail first
    (the projection gives room in that order: those that waited longest must be among those it
    reads, however many letters were saved before). Taking an entry out needs no room and
    makes some; replacing one needs none: a full DLQ must not keep them waiting behind new
    letters. While the stream is `rebuilding`, every letter is put anew, in the order they
    last failed, which is the stream's own (oldest failure first), whatever their revision.
    A letter a replay holds is left out: its entry stays as it is until the replay ends (past
    Kafka's retention the entry has the only copy of its bytes, which the letter needs should
    it come back)."""
    query = select(dead_letters).where(*_UNPROJECTED)
    if keys is not None:
        if not keys:
            return []
        query = query.where(dead_letters.c.dlq_key.in_(sorted(keys)[:limit]))
    # Literal ranks, not bound parameters: SQL Server is wary of parameters in ORDER BY.
    saved_before = "2" if rebuilding else "1"
    ranked = query.order_by(case((dead_letters.c.state != OPEN, literal_column("0")),
                                 (dead_letters.c.revision > 1, literal_column(saved_before)),
                                 else_=literal_column("2")),
                            dead_letters.c.last_failure_at, dead_letters.c.dlq_key).limit(limit)
    found = {row.dlq_key: letter_of(row) for row in conn.execute(ranked)}
    if not rebuilding and len(found) == limit:  # else it holds them all already
        first = query.where(dead_letters.c.state == OPEN).order_by(
            dead_letters.c.first_failure_at, dead_letters.c.dlq_key).limit(limit)
        for row in conn.execute(first):
            found.setdefault(row.dlq_key, letter_of(row))
    return list(found.values())


def kept_messages(conn: Connection, dlq_keys: Collection[str]) -> dict[str, RawMessage]:
    """The messages SQL keeps of these letters (`keep_messages`)."""
    if not dlq_keys:
        return {}
    table = dead_letter_messages
    found = rows_in(conn, select(table.c.dlq_key, table.c.message_key, table.c.message_value,
                                 table.c.headers), table.c.dlq_key, dlq_keys)
    return {row.dlq_key: RawMessage(_bytes(row.message_key), _bytes(row.message_value),
                                    _kept_headers(row.headers, row.dlq_key))
            for row in found}


def keep_messages(conn: Connection, messages: Mapping[str, RawMessage]) -> None:
    """Keep in SQL the messages of these letters that it does not keep yet. Two projections
    may keep one at once: each row goes in under a savepoint, and the second one's, refused
    by the key, is let go (the message is the same: the letter's key names its bytes, or the
    message at its position)."""
    if not messages:
        return
    table = dead_letter_messages
    have = {row.dlq_key for row in rows_in(conn, select(table.c.dlq_key), table.c.dlq_key,
                                           list(messages))}
    for dlq_key, message in sorted(messages.items()):
        if dlq_key in have:
            continue
        try:
            with conn.begin_nested():
                conn.execute(insert(table).values(
                    dlq_key=dlq_key, message_key=message.key, message_value=message.value,
                    headers=headers_json(message.headers) if message.headers else None))
        except IntegrityError:
            continue


def _bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)  # a memoryview from some drivers


def _kept_headers(raw: str | None, dlq_key: str) -> Headers:
    try:
        return headers_from_json(raw) if raw else ()
    except (ValueError, TypeError):
        log.warning("the headers SQL keeps of a dead letter cannot be read: kept without them",
                    extra={"dlqKey": dlq_key})
        return ()


def unshown(conn: Connection) -> list[str]:
    """The open dead letters the stream has not shown since they last changed: held back
    while it was full, marked lost with Redis, or not projected yet."""
    return [row.dlq_key for row in conn.execute(select(dead_letters.c.dlq_key).where(
        dead_letters.c.state == OPEN, dead_letters.c.in_stream == false())).all()]


def count_unprojected(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(dead_letters)
                            .where(*_UNPROJECTED)).scalar_one())


def mark_projected(conn: Connection, letters: Iterable[DeadLetter]) -> None:
    """The stream shows these revisions: a row changed since stays to be projected."""
    _mark(conn, {letter.dlq_key: letter.revision for letter in letters}, in_stream=True)


def shown(conn: Connection) -> dict[str, int]:
    """Open dead letters the stream shows, as SQL records it: DLQ key → revision shown."""
    return {row.dlq_key: row.revision for row in conn.execute(
        select(dead_letters.c.dlq_key, dead_letters.c.revision)
        .where(dead_letters.c.state == OPEN, dead_letters.c.in_stream == true()))}


def claimed(conn: Connection) -> set[str]:
    """Dead letters a replay holds: their entries, if any, are the replay's (`unprojected`)."""
    return set(conn.execute(select(dead_letters.c.dlq_key)
                            .where(dead_letters.c.state == REPLAYING)).scalars())


def count_shown(conn: Connection) -> int:
    """The entries the stream should hold: the open dead letters it shows, and those a replay
    holds (most of which it shows)."""
    return int(conn.execute(select(func.count()).select_from(dead_letters).where(or_(
        and_(dead_letters.c.state == OPEN, dead_letters.c.in_stream == true()),
        dead_letters.c.state == REPLAYING))).scalar_one())


def mark_unprojected(conn: Connection, revisions: Mapping[str, int]) -> None:
    """The stream lost these revisions: project them again (a row changed since already is)."""
    _mark(conn, revisions, in_stream=False)


def _mark(conn: Connection, revisions: Mapping[str, int], *, in_stream: bool) -> None:
    if revisions:
        conn.execute(update(dead_letters)
                     .where(dead_letters.c.dlq_key == bindparam("key"),
                            dead_letters.c.revision == bindparam("at_revision"))
                     .values(in_stream=in_stream),
                     [{"key": key, "at_revision": revisions[key]} for key in sorted(revisions)])


def claim_for_replay(conn: Connection, keys: Collection[str], lease_until: datetime,
                     shown: Mapping[str, datetime] | None = None) -> dict[str, DeadLetter]:
    """Claim the open dead letters of `keys` for one replay: those claimed, by key. A letter
    not open (another replay has it, or it is gone) is left out. A claim lapses at
    `lease_until` if the replayer dies; that time also names the claim (`finish_replay`).
    `shown`: the last failure each letter's entry showed the replay; one that failed again
    since is left out too, open, for a later replay to take as it is then (the copy another
    replay published, failed again: published once more, it would go out twice)."""
    found = load(conn, keys, lock=True)
    shown = shown or {}
    claims = [(letter, replace(letter, state=REPLAYING, deadline=lease_until))
              for letter in found.values() if letter.state == OPEN
              and shown.get(letter.dlq_key, letter.last_failure_at) == letter.last_failure_at]
    return {letter.dlq_key: letter for letter in save_all(conn, claims)}


def finish_replay(conn: Connection, keys: Collection[str], now: datetime, *,
                  published: bool, claim: datetime) -> dict[str, DeadLetter]:
    """End this replay's claims, made to lapse at `claim`: the letters as saved, by key. One
    whose claim lapsed and that moved on meanwhile is left out (its entry is then the
    projection's business, not the replayer's), and so is one another replay claimed since:
    a replayer stopped past its claim must not end the next one's."""
    found = load(conn, keys, lock=True)
    ends = [(letter, _transitioned(letter, REPLAYED if published else OPEN, now, deadline=None))
            for letter in found.values()
            if letter.state == REPLAYING and letter.deadline == claim]
    return {letter.dlq_key: letter for letter in save_all(conn, ends)}


def purge(conn: Connection, keys: Collection[str], now: datetime) -> dict[str, str]:
    """Purge the open letters of `keys`: each letter's state as found (then `open`), by key;
    a key with no letter is left out."""
    found = load(conn, keys, lock=True)
    save_all(conn, [(letter, _transitioned(letter, PURGED, now))
                    for letter in found.values() if letter.state == OPEN])
    return {key: letter.state for key, letter in found.items()}


def resolve(conn: Connection, letters: Sequence[DeadLetter], now: datetime) -> list[DeadLetter]:
    """Close live dead letters whose condition cleared; the ones closed. One that never reached
    the DLQ (waiting, with no earlier life) leaves no trace: it was never a failure anyone
    saw."""
    unseen = {letter.dlq_key: letter for letter in letters
              if letter.state == WAITING and not letter.history}
    waiting = sorted(unseen.values(), key=lambda letter: letter.dlq_key)
    if waiting:
        conn.execute(dead_letters.delete().where(
            dead_letters.c.dlq_key == bindparam("key"),
            dead_letters.c.revision == bindparam("at_revision")),
            [{"key": letter.dlq_key, "at_revision": letter.revision} for letter in waiting])
    return save_all(conn, [(letter, _transitioned(letter, RESOLVED, now))
                           for letter in letters if letter.dlq_key not in unseen])
