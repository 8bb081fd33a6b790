"""The reconciler: keeps the dead letters of held events in step with the rules that span keys.

Batches write each entity on its own key and queue the keys they wrote (`reconcile_queue`),
in the same transaction. A reconciler round first surveys: it takes queued keys and
evaluates, as below, every entity they reach, to find those that need a look, held or with a
live dead letter. Most need nothing: visible, with no dead letter, they are left out. On
SQLite the survey runs before the round takes its lock (there the write lock every batch
waits for), in a transaction that only reads, so batches go on writing meanwhile. Then, under
its lock, on committed data, the round:

1. evaluates (`eventpipe.readmodel`, `eventpipe.visibility`) every entity the keys can affect:
   the users written and the other claimants of their emails; the orders written, the orders
   of users that just left the read model and those held because of an evaluated user; the
   payments written, those of the orders evaluated and those held because of them;
2. makes each entity's dead letters say the same: a held entity has one live dead letter for
   its current event (`waiting` for a parent, or `open` for a rejection); a visible one has
   none; one for an older event of the entity is resolved (its event is stale now);
3. opens the waiting dead letters whose parking time is over (after evaluating them again, so
   one whose parent arrived in the meantime resolves instead), and returns to the DLQ the
   replays whose claim lapsed;
4. deletes the queue rows the survey took, in the same transaction.

Step 1 starts from the entities the survey found rather than from the keys queued. An entity
that was visible with no dead letter when the survey read it needs nothing from this round:
whatever changed it since is a batch that queued its keys after the survey read the queue,
for a later round. Only rounds decide whether an entity has a dead letter (a redelivery only
counts an attempt on one, and a replay not sent queues its entity again), and never from
data older than a survey they follow: elsewhere the survey reads under the round's lock, and
on SQLite a round reads and writes under the write lock, so what it read is as new as the
last commit. Every change is evaluated after the batch that caused it committed, on data
that includes it, so the dead letters converge to what the rules say whatever the order of
arrival. Rounds must not overlap (two of them reading different snapshots could write an
older answer last): one runs at a time, under a database lock (`try_lock`; on SQLite, where
a round spans two transactions, a file lock beside the database too) that other callers skip
rather than wait on. Only what a round reads under it decides what it writes; the survey
only chooses what it reads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import Connection, Engine, select, text

from eventpipe import readmodel, upserts
from eventpipe.database import alone, reading
from eventpipe.dlq import records
from eventpipe.dlq.letter import OPEN, REPLAYING, WAITING, DeadLetter, event_key
from eventpipe.effects import Position
from eventpipe.keysets import Keyed
from eventpipe.tables import applied_events, reconcile_queue
from eventpipe.visibility import Held, Standing

log = logging.getLogger(__name__)

# A round takes up to QUEUE_ROWS queue rows, until it holds about ROUND_KEYS keys.
ROUND_KEYS = 5000
QUEUE_ROWS = 200
_LOCK_ID = 0x65766E74  # "evnt": the PostgreSQL advisory lock of the reconciler
_DELETE_QUEUE_ROWS = Keyed(reconcile_queue.delete(), reconcile_queue.c.id)


@dataclass(slots=True)
class Keys:
    users: set[str] = field(default_factory=set)
    orders: set[str] = field(default_factory=set)
    payments: set[str] = field(default_factory=set)

    def add(self, kind: str, key: str) -> None:
        {"user": self.users, "order": self.orders, "payment": self.payments}[kind].add(key)

    def __len__(self) -> int:
        return len(self.users) + len(self.orders) + len(self.payments)


@dataclass(frozen=True, slots=True)
class Survey:
    """What a round takes: the queue rows (`ids`), the entities their keys reach that need a
    look (`needed`), and whether the queue held more rows."""

    ids: list[int]
    needed: Keys
    more: bool


@dataclass(slots=True)
class Round:
    queue_rows: int = 0
    more: bool = False  # the queue held more rows than the round took
    evaluated: int = 0
    changed: list[DeadLetter] = field(default_factory=list)


def try_lock(conn: Connection) -> bool:
    """Take the reconciler's lock for this transaction; False when another round holds it."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        return bool(conn.execute(text("SELECT pg_try_advisory_xact_lock(:id)"),
                                 {"id": _LOCK_ID}).scalar_one())
    if dialect == "mssql":
        status = conn.execute(text(
            "DECLARE @status int; EXEC @status = sp_getapplock @Resource = 'eventpipe.reconcile', "
            "@LockMode = 'Exclusive', @LockOwner = 'Transaction', @LockTimeout = 0; "
            "SELECT @status")).scalar_one()
        return int(status) >= 0
    return True  # SQLite: the write transaction serialises their writes (`alone`, the rounds)


def survey(conn: Connection, round_keys: int = ROUND_KEYS) -> Survey:
    """The oldest queue rows, up to about `round_keys` keys, and the entities they reach that
    are held or have a live dead letter, read in the caller's transaction (which needs no
    lock: nothing is written from what it reads)."""
    ids, keys, more = _take_queue(conn, round_keys)
    needed = Keys()
    if len(keys):
        _evaluate(conn, keys, _Look(conn, needed))
    return Survey(ids, needed, more)


def run_round(conn: Connection, now: datetime, park_timeout: timedelta, surveyed: Survey, *,
              worker: str = "reconciler") -> Round:
    """One round, in the caller's transaction (which holds the lock), of what `surveyed`
    found."""
    done = Round(queue_rows=len(surveyed.ids), more=surveyed.more)
    keys = Keys(set(surveyed.needed.users), set(surveyed.needed.orders),
                set(surveyed.needed.payments))
    due = records.due(conn, now, limit=ROUND_KEYS)
    for letter in due:
        if letter.state == REPLAYING:  # the replayer died between claim and publish
            done.changed.append(records.transition(conn, letter, OPEN, now, deadline=None))
        # Evaluated too: a replay's claim hides its letter from the rounds (it is not live),
        # so its entity's parent may have come meanwhile, leaving nothing to hold it.
        if letter.entity_kind and letter.entity_key:
            keys.add(letter.entity_kind, letter.entity_key)
    if len(keys):
        done.evaluated = len(keys)
        _evaluate(conn, keys, _Sync(conn, now, park_timeout, worker, done.changed))
    _DELETE_QUEUE_ROWS.execute(conn, surveyed.ids)
    return done


# A queue row names its keys by table, a dead letter its entity by kind.
_QUEUED_AS = {"user": "users", "order": "orders", "payment": "payments"}


def queue_entities(conn: Connection, letters: Iterable[DeadLetter], at: datetime) -> None:
    """Queue the dead letters' entities for the next round, as a batch that wrote them
    would."""
    keys: dict[str, set[str]] = {}
    for letter in letters:
        if letter.entity_kind in _QUEUED_AS and letter.entity_key:
            keys.setdefault(_QUEUED_AS[letter.entity_kind], set()).add(letter.entity_key)
    upserts.queue_keys(conn, keys, at)


def _take_queue(conn: Connection, round_keys: int) -> tuple[list[int], Keys, bool]:
    """The oldest queue rows, up to about `round_keys` keys; and whether rows were left."""
    keys = Keys()
    ids: list[int] = []
    query = select(reconcile_queue.c.id, reconcile_queue.c["keys"]).order_by(
        reconcile_queue.c.id).limit(QUEUE_ROWS)
    rows = conn.execute(query).all()
    for row in rows:
        ids.append(row.id)
        written = json.loads(row.keys)
        keys.users.update(written.get("users", ()))
        keys.orders.update(written.get("orders", ()))
        keys.payments.update(written.get("payments", ()))
        if len(keys) >= round_keys:
            break
    return ids, keys, len(ids) < len(rows) or len(rows) == QUEUE_ROWS


class _Visit(Protocol):
    def entities(self, kind: str, rows: Mapping[str, readmodel.Facts],
                 standings: dict[str, Standing]) -> set[str]:
        """Visit the entities evaluated; the keys of those that left the read model just now
        (held, with no live dead letter yet)."""


def _evaluate(conn: Connection, keys: Keys, sync: _Visit) -> None:
    """Evaluate every entity `keys` can affect, a kind at a time, and visit them with
    `sync`."""
    lookup = readmodel.Lookup(conn)

    written_users = lookup.users(keys.users)
    user_ids = set(keys.users) | readmodel.users_claiming(
        conn, sorted({row.email for row in written_users.values()}))
    user_ids |= _held_because_of(conn, "user", keys.users).users
    users = lookup.users(user_ids)
    went_down = sync.entities("user", users, readmodel.user_standings(users))

    held_by_users = _held_because_of(conn, "user", users)
    order_ids = keys.orders | held_by_users.orders | readmodel.orders_of_users(conn, went_down)
    orders = lookup.orders(order_ids)
    orders_down = sync.entities("order", orders, lookup.order_standings(orders))

    held_by_orders = _held_because_of(conn, "order", orders)
    payment_ids = (keys.payments | held_by_orders.payments
                   | readmodel.payments_of_orders(conn, keys.orders | orders_down))
    payments = lookup.payments(payment_ids)
    sync.entities("payment", payments, lookup.payment_standings(payments))


def _held_because_of(conn: Connection, parent_kind: str, parents: Collection[str]) -> Keys:
    found = Keys()
    for kind, key in records.waiting_on(conn, parent_kind, parents):
        found.add(kind, key)
    return found


@dataclass(slots=True)
class _Look:
    """The survey's visit: notes the entities that need a look (held, or with a live dead
    letter), writes nothing."""

    conn: Connection
    needed: Keys

    def entities(self, kind: str, rows: Mapping[str, readmodel.Facts],
                 standings: dict[str, Standing]) -> set[str]:
        live = records.by_entity(self.conn, kind, rows, lock=False)
        for key in rows:
            if standings[key] is not None or key in live:
                self.needed.add(kind, key)
        return {key for key in rows if standings[key] is not None and key not in live}


@dataclass(slots=True)
class _Sync:
    """Makes the live dead letters of evaluated entities match their standing: decides each
    entity's changes, then writes those of a kind together."""

    conn: Connection
    now: datetime
    park_timeout: timedelta
    worker: str
    changed: list[DeadLetter]

    def entities(self, kind: str, rows: Mapping[str, readmodel.Facts],
                 standings: dict[str, Standing]) -> set[str]:
        """Sync each entity; the keys of those that left the read model just now."""
        live = records.by_entity(self.conn, kind, rows)
        # Only a held entity's current event is needed (its dead letter is about it).
        current = _current_events(self.conn, {row.event_id for key, row in rows.items()
                                              if standings[key] is not None})
        went_down = set()
        resolved: list[DeadLetter] = []
        created: list[DeadLetter] = []
        updated: list[tuple[DeadLetter, DeadLetter]] = []
        for key, row in rows.items():
            standing = standings[key]
            letters = live.get(key, [])
            if standing is not None and not letters:
                went_down.add(key)
            event = current.get(row.event_id)
            wanted = event_key(event.fingerprint) if standing is not None and event else None
            # Visible now, or its event superseded by a newer version of the entity.
            resolved += [letter for letter in letters if letter.dlq_key != wanted]
            if wanted is None or event is None or standing is None:
                continue
            mine = next((letter for letter in letters if letter.dlq_key == wanted), None)
            if mine is None:
                created.append(self._new(kind, key, event, standing))
            elif (change := self._held(mine, standing)) is not None:
                updated.append((mine, change))
        self.changed += records.resolve(self.conn, resolved, self.now)
        self.changed += records.create_or_reopen(self.conn, created, self.park_timeout)
        self.changed += records.save_all(self.conn, updated)
        return went_down

    def _new(self, kind: str, key: str, event: _Current, held: Held) -> DeadLetter:
        return DeadLetter(
            dlq_key=event_key(event.fingerprint), error_class=held.error_class,
            reason=held.reason, first_failure_at=self.now, last_failure_at=self.now,
            worker=event.worker or self.worker, event_id=event.event_id,
            event_type=event.event_type, position=event.position,
            state=WAITING if held.waits else OPEN, entity_kind=kind, entity_key=key,
            parent_kind=held.parent_kind, parent_key=held.parent_key,
            deadline=self.now + self.park_timeout if held.waits else None)

    def _held(self, letter: DeadLetter, held: Held) -> DeadLetter | None:
        """The letter still held, as it should now read; None when it reads so already."""
        state = letter.state
        if state == WAITING and (not held.waits or (letter.deadline or self.now) <= self.now):
            state = OPEN
        if (state, held.error_class, held.reason, held.parent_key) == (
                letter.state, letter.error_class, letter.reason, letter.parent_key):
            return None
        return replace(
            letter, state=state, error_class=held.error_class, reason=held.reason,
            parent_kind=held.parent_kind, parent_key=held.parent_key,
            last_failure_at=self.now if state != letter.state else letter.last_failure_at)


@dataclass(frozen=True, slots=True)
class _Current:
    """What `applied_events` says of an entity's current event."""

    event_id: str
    event_type: str
    fingerprint: str
    position: Position
    worker: str | None


_APPLIED = Keyed(select(applied_events), applied_events.c.event_id)


def _current_events(conn: Connection, event_ids: Collection[str]) -> dict[str, _Current]:
    rows = _APPLIED.rows(conn, event_ids)
    return {row.event_id: _Current(row.event_id, row.event_type, row.fingerprint or "",
                                   Position(row.kafka_topic, row.kafka_partition,
                                            row.kafka_offset), row.worker)
            for row in rows}


def reconcile(engine: Engine, now: Callable[[], datetime], park_timeout: timedelta,
              *, max_rounds: int = 20,
              said: Callable[[list[DeadLetter]], object] = lambda changed: None,
              ) -> list[DeadLetter]:
    """Run rounds until the queue is empty (or `max_rounds`), each surveyed then run; skips
    at once when another reconciler holds the lock. The dead letters changed, each round's
    also handed to `said` as it commits (a later round that fails takes none of them)."""
    changed: list[DeadLetter] = []
    # On SQLite the round's lock is the write lock every batch waits for: the survey reads
    # before it, in a snapshot of its own, and batches go on meanwhile. A round there reads
    # and writes under that lock, so nothing it writes comes from data older than a survey's;
    # and a file lock keeps rounds, which span two transactions there, from overlapping (a
    # second survey could take queue rows the first round deletes, and their ids, reused,
    # name new rows by the time the second round deletes them). Elsewhere batches commit
    # while a round reads, and a round could write a dead letter from data older than a
    # survey read before its lock: the survey is read under the lock.
    apart = engine.dialect.name == "sqlite"
    with alone(engine, "reconciler") as mine:
        if not mine:
            return changed
        for _ in range(max_rounds):
            found = None
            if apart:
                with reading(engine) as conn:
                    found = survey(conn)
            with engine.begin() as conn:
                if not try_lock(conn):
                    return changed
                done = run_round(conn, now(), park_timeout,
                                 found if found is not None else survey(conn))
            changed += done.changed
            said(done.changed)
            if not done.more:
                break
    if changed:
        log.info("reconciled", extra={"deadLettersChanged": len(changed)})
    return changed
