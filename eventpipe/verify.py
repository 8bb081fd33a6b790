"""`eventpipe verify`: prove, at any time, that nothing was lost and nothing applied twice.

1. Read the database in one snapshot (`_snapshot`): what it records as done of each partition
   of the topic (its position, `eventpipe.positions`, and the ranges of offsets done past
   it), the read model, the fates, the dead letters and the reconciler's queue.
2. Read the topic's messages the snapshot records as done, and fold them with the contract's
   rules (`eventpipe.canonical`, written independently of the apply path) into the read
   model and the dead letters they must give. Under traffic the database is past Kafka's
   committed offsets, and changes as it is read: one snapshot, and the messages it says are
   done, are what agree. A database made before positions, with none yet, is read up to
   the group's committed offsets, as it was.
3. Compare with the snapshot:
   - nothing lost: Kafka's committed offsets, read before the snapshot, are nowhere past
     what the database holds as done;
   - the read model (`eventpipe.readmodel.whole`): every user, order (with its items),
     payment and stock level, field by field;
   - fates: every event done is recorded (`applied_events`, or a dead letter of it), and
     so is every message that is not an event;
   - the dead letters: the live ones are exactly those the rules predict (plus what only the
     pipeline can know: values the database refused, messages that killed a worker), and the
     operators' Redis stream shows every open one. The reconciler writes held events' dead
     letters after their batches commit: those of entities whose keys still wait in its
     queue are its next rounds' to decide, and counted, not compared (none once it is idle);
     so are stream entries whose dead letter changed while verify ran.
Each difference names the positions of the messages concerned. Exit status 1 on any.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from sqlalchemy import Connection, Engine, select, text

from eventpipe import positions, readmodel, upserts
from eventpipe.canonical import (
    ErrorClass,
    Expected,
    PartitionOffset,
    TopicMessage,
    fold,
)
from eventpipe.database import reading
from eventpipe.dlq import records
from eventpipe.dlq.letter import OPEN, PURGED, REPLAYED, REPLAYING, RESOLVED, WAITING
from eventpipe.dlq.stream import DeadLetterStream
from eventpipe.events import position_fingerprint
from eventpipe.kafka import (
    MessageReader,
    client_config,
    read_topic_id,
    reader_config,
    said,
    unreadable,
    unreadable_end,
)
from eventpipe.keysets import Keyed
from eventpipe.settings import Settings
from eventpipe.spans import Span, merged
from eventpipe.tables import (
    applied_events,
    dead_letters,
    kafka_done_ranges,
    kafka_positions,
    reconcile_queue,
)
from eventpipe.terminal import printable
from eventpipe.times import from_kafka_millis, utc_iso

Progress = Callable[[int], None]
_PREDICTABLE = frozenset(error.value for error in ErrorClass)
# The dead letters a reconciler round writes, after the batch that held the event commits;
# the others are written in that batch's transaction.
_HELD = frozenset(error.value for error in ErrorClass) - {
    ErrorClass.INVALID_EVENT.value, ErrorClass.ID_REUSED.value,
    ErrorClass.UNREADABLE_MESSAGE.value}

# Where a partition's offsets to verify come from.
POSITION = "position"  # the database's position and ranges (`eventpipe.positions`)
COMMITTED = "committed"  # the group's committed offset: a database from before positions


@dataclass(frozen=True, slots=True)
class DoneOffsets:
    """The offsets of one partition verify folds: every one below `below`, and those of
    `spans` (merged, past `below`), which the database records as done."""

    below: int
    spans: tuple[Span, ...] = ()
    source: str = POSITION

    @classmethod
    def of(cls, below: int, held: Collection[Span] = (), source: str = POSITION) -> DoneOffsets:
        return cls(below, tuple((max(first, below), last) for first, last in merged(held)
                                if last >= below), source)

    @property
    def end(self) -> int:
        """The offset past the last one done."""
        return max(self.below, self.spans[-1][1] + 1) if self.spans else self.below

    @property
    def past(self) -> int:
        """How many offsets past `below` are done."""
        return sum(last - first + 1 for first, last in self.spans)

    @property
    def frontier(self) -> int:
        """The first offset not done: `below`, or past the ranges that follow on from it."""
        at = self.below
        for first, last in self.spans:
            if first > at:
                break
            at = max(at, last + 1)
        return at

    def __contains__(self, offset: object) -> bool:
        if not isinstance(offset, int):
            return False
        if offset < self.below:
            return True
        # The spans are apart and in order: only the last to start at or before it can hold it.
        at = bisect.bisect_right(self.spans, offset, key=lambda span: span[0]) - 1
        return at >= 0 and offset <= self.spans[at][1]


@dataclass(frozen=True, slots=True)
class Difference:
    what: str  # e.g. "user u-1", "dead letter e:…", "fate of event e-7"
    expected: str
    found: str
    positions: tuple[PartitionOffset, ...] = ()


@dataclass(slots=True)
class Report:
    # The group's committed offsets, read before the database's snapshot.
    committed: dict[int, int] = field(default_factory=dict)
    # What was folded of each partition: what the snapshot records as done.
    done: dict[int, DoneOffsets] = field(default_factory=dict)
    first_offsets: dict[int, int] = field(default_factory=dict)  # >0: retention removed some
    messages: int = 0
    events: int = 0
    dead_lettered: int = 0
    differences: list[Difference] = field(default_factory=list)
    # Dead letters the rules cannot predict (the database refused a value, a worker died).
    pipeline_only: list[str] = field(default_factory=list)
    # Ids reused with another payload where which copy was applied first was timing (across
    # partitions, or a partition applied out of order after a redelivery): the comparison
    # takes the copy the pipeline applied.
    ambiguous: list[str] = field(default_factory=list)
    # Open dead letters the DLQ stream, at its bounds, has never shown (SQL says so): they
    # wait in SQL, as they should, and are shown as room is made.
    waiting_to_be_shown: int = 0
    # Letters an operator replayed or purged whose event the rules no longer hold (its
    # condition cleared since): history, not a difference.
    closed_since_cleared: int = 0
    # Dead letters that differ, of entities whose keys wait in the reconciler's queue: its
    # next rounds decide them (a batch committed, its round has not yet).
    awaiting_reconciler: int = 0
    # DLQ stream entries that differ whose dead letter changed after the snapshot: the
    # stream, read after it, may show either.
    changed_meanwhile: int = 0

    @property
    def clean(self) -> bool:
        return not self.differences

    @property
    def truncated(self) -> bool:
        return any(offset > 0 for offset in self.first_offsets.values())


def committed_offsets(settings: Settings, timeout_s: float = 10.0) -> dict[int, int]:
    """The group's committed offset of every partition of the topic that has one."""
    consumer = Consumer(reader_config(settings, **{
        "group.id": settings.kafka_group_id, "enable.auto.commit": False}))
    try:
        metadata = consumer.list_topics(settings.kafka_topic, timeout=timeout_s)
        topic = metadata.topics.get(settings.kafka_topic)
        if topic is None or topic.error is not None:
            raise KafkaException(f"topic {settings.kafka_topic!r} not found")
        asked = [TopicPartition(settings.kafka_topic, p) for p in sorted(topic.partitions)]
        found = consumer.committed(asked, timeout=timeout_s)
    finally:
        consumer.close()
    return {tp.partition: tp.offset for tp in found if tp.offset >= 0}


# A partition's reading gives up after this many errors of the Kafka client in a row (other
# than its end, or a batch it cannot hand over), rather than loop on one that will not pass.
ERRORS_IN_A_ROW = 100


def _position(consumer: Consumer, topic: str, partition: int) -> int:
    """The offset the reading of `partition` is at: past the last message handed over, and
    past the markers and aborted messages after it."""
    [at] = consumer.position([TopicPartition(topic, partition)])
    return max(at.offset, 0)  # OFFSET_INVALID (-1001) before anything was read


def read_topic(settings: Settings, done: Mapping[int, DoneOffsets], report: Report,
               progress: Progress | None = None, poll_s: float = 10.0) -> Iterator[TopicMessage]:
    """Every message at an offset `done`, partition by partition, without joining the group
    (nothing of the group's is touched). Those of a record batch Kafka cannot hand over come
    without bytes, as the bridge sends them on (`eventpipe.kafka.UNREADABLE`)."""
    topic = settings.kafka_topic
    consumer = Consumer(reader_config(settings, **{
        "group.id": f"{settings.kafka_group_id}.verify", "enable.auto.commit": False,
        "enable.auto.offset.store": False, "auto.offset.reset": "earliest",
        "enable.partition.eof": True}))
    reader: MessageReader | None = None
    topic_id: str | None = None  # asked for once a batch Kafka cannot hand over is met
    try:
        for partition, offsets in sorted(done.items()):
            end = offsets.end
            if end <= 0:
                continue
            consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)])
            next_read = failed = 0
            while next_read < end:
                record = consumer.poll(poll_s)
                error = None if record is None else record.error()
                if record is None or (error is not None
                                      and error.code() == KafkaError._PARTITION_EOF):
                    # The offsets left below the last one done may hold no message: a
                    # transaction's markers (a transactional producer's every commit), or an
                    # aborted transaction's messages, which the reading passes as the bridge's.
                    if (at := _position(consumer, topic, partition)) >= end:
                        if at > 0:  # nothing read: what is left of the log starts there
                            report.first_offsets.setdefault(partition, at)
                        break
                    if record is None:
                        raise KafkaException(f"partition {partition}: nothing read for "
                                             f"{poll_s}s before offset {end}, the end of "
                                             "what verify reads")
                    continue
                if error is not None and unreadable(error):
                    reader = reader or MessageReader(settings)
                    batch, start = record.offset() or 0, max(record.offset() or 0, next_read)
                    past = unreadable_end(reader, topic, partition, batch, start)
                    if past is None:
                        continue  # said again by a fetch from before the seek past it
                    report.first_offsets.setdefault(partition, start)
                    topic_id = _topic_id(settings) if topic_id is None else topic_id
                    for offset in range(start, min(past, end)):
                        if offset not in offsets:
                            continue
                        yield TopicMessage(partition, offset, None, None, None, (
                            position_fingerprint(topic, topic_id, partition, offset),
                            said(error)))
                        if progress is not None:
                            progress(1)
                    next_read = past
                    consumer.seek(TopicPartition(topic, partition, past))
                    continue
                if error is not None:
                    failed += 1
                    if failed >= ERRORS_IN_A_ROW:
                        raise KafkaException(f"partition {partition}: Kafka said {error} "
                                             f"{failed} times in a row before offset {end}, "
                                             "the end of what verify reads")
                    continue
                failed = 0
                offset = next_read = record.offset() or 0
                report.first_offsets.setdefault(partition, offset)
                if offset >= end:
                    break
                next_read = offset + 1
                if offset not in offsets:  # not done in the snapshot: not expected yet
                    continue
                kind, millis = record.timestamp()
                yield TopicMessage(
                    partition, offset, record.key(), record.value(),
                    None if kind == TIMESTAMP_NOT_AVAILABLE else from_kafka_millis(millis))
                if progress is not None:
                    progress(1)
    finally:
        consumer.close()
        if reader is not None:
            reader.close()


def _topic_id(settings: Settings) -> str:
    """Kafka's id of the topic, as the bridge files its tasks under it ("" if it has none)."""
    found = read_topic_id(AdminClient(client_config(settings)), settings.kafka_topic, 10.0)
    if found is None:
        raise KafkaException(f"Kafka did not say the id of topic {settings.kafka_topic}")
    return found


def verify(settings: Settings, engine: Engine, stream: DeadLetterStream,
           progress: Progress | None = None,
           committed: Mapping[int, int] | None = None,
           planned: Callable[[int], None] | None = None) -> Report:
    """`committed`: the group's committed offsets, when the caller read them already; read
    before the database's snapshot either way (a bridge records a position before it commits
    it, so a commit read later may be past the snapshot with nothing lost). `planned`: told
    how many messages at most are to be read, once the snapshot says."""
    report = Report(committed=dict(committed) if committed is not None
                    else committed_offsets(settings))
    topic_id = _topic_id(settings)
    held = _read_snapshot(engine, settings.kafka_topic, topic_id)
    report.done = _done_offsets(held, report.committed, topic_id)
    _compare_commits(report)
    if planned is not None:
        planned(sum(done.below + done.past for done in report.done.values()))
    # Asked of the database as it is now, not of the snapshot: a claim's fingerprint never
    # changes once written, and an id of which copies are done was claimed in the snapshot.
    expected = fold(read_topic(settings, report.done, report, progress),
                    max_future=timedelta(seconds=settings.max_future_skew_s),
                    arrived_first=lambda ids: _recorded_fingerprints(engine, ids))
    report.messages = expected.counts.messages
    report.events = expected.counts.events
    report.dead_lettered = len(expected.dead_letters)
    report.ambiguous = [ambiguous.event_id for ambiguous in expected.ambiguous]
    _compare_read_model(expected, held.model, report)
    _compare_fates(expected, held.recorded, held.letters, held.reached, report)
    _compare_stream(held.letters, stream.keys(), stream.refusing(), report,
                    lambda keys: _letters(engine, keys))
    return report


@dataclass(slots=True)
class _Snapshot:
    """What verify reads of the database, all of it in one snapshot."""

    made_with_positions: bool
    kept: dict[int, positions.Position]  # the topic's positions, whatever their topic id
    ranges: dict[int, list[Span]]  # recorded done, of the topic as it is now
    model: readmodel.ReadModel
    recorded: set[str]
    letters: dict[str, Any]
    # The entities a reconciler round evaluates for the keys queued: (kind, key).
    reached: set[tuple[str, str]]


@contextmanager
def _snapshot(engine: Engine) -> Iterator[Connection]:
    """A transaction that only reads and sees one snapshot of the database. SQLite's reading
    transaction does (`reading`); PostgreSQL's REPEATABLE READ does, and waits on no writer.
    On SQL Server, SNAPSHOT isolation where the database allows it (ALLOW_SNAPSHOT_ISOLATION);
    else READ COMMITTED, which takes no lock a batch waits on, but each statement sees the
    commits before it: under traffic, the tables read last may hold work the positions
    read first do not count, which shows as differences (an idle pipeline's are exact)."""
    dialect = engine.dialect.name
    if dialect == "sqlite":
        with reading(engine) as conn:
            yield conn
        return
    options: dict[str, Any] = {}
    if dialect == "postgresql":
        options = {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}
    elif dialect == "mssql":
        with engine.connect() as probe:  # its own database's row is always visible to it
            allowed = probe.execute(text(
                "SELECT snapshot_isolation_state FROM sys.databases "
                "WHERE database_id = DB_ID()")).scalar()
        if allowed == 1:
            options = {"isolation_level": "SNAPSHOT"}
    with engine.connect() as conn:
        if options:
            conn.execution_options(**options)
        with conn.begin():
            yield conn


def _read_snapshot(engine: Engine, topic: str, topic_id: str) -> _Snapshot:
    with _snapshot(engine) as conn:
        kept = {row.kafka_partition: positions.Position(row.topic_id, row.next_offset)
                for row in conn.execute(select(
                    kafka_positions.c.kafka_partition, kafka_positions.c.topic_id,
                    kafka_positions.c.next_offset).where(kafka_positions.c.kafka_topic == topic))}
        ranges: dict[int, list[Span]] = {}
        for row in conn.execute(select(
                kafka_done_ranges.c.kafka_partition, kafka_done_ranges.c.first_offset,
                kafka_done_ranges.c.last_offset).where(
                kafka_done_ranges.c.kafka_topic == topic,
                kafka_done_ranges.c.topic_id == topic_id)):
            ranges.setdefault(row.kafka_partition, []).append((row.first_offset,
                                                                row.last_offset))
        return _Snapshot(
            made_with_positions=positions.made_with_positions(conn), kept=kept,
            ranges=ranges, model=readmodel.whole(conn),
            recorded={row.event_id for row in conn.execute(select(applied_events.c.event_id))},
            letters={row.dlq_key: row for row in conn.execute(select(*_LETTER))},
            reached=_reached(conn, _queued(conn)))


_LETTER = (dead_letters.c.dlq_key, dead_letters.c.state, dead_letters.c.error_class,
           dead_letters.c.reason, dead_letters.c.event_id, dead_letters.c.in_stream,
           dead_letters.c.revision, dead_letters.c.entity_kind, dead_letters.c.entity_key)


_LETTERS_BY_KEY = Keyed(select(*_LETTER), dead_letters.c.dlq_key)


def _letters(engine: Engine, keys: Collection[str]) -> dict[str, Any]:
    """These dead letters as the database holds them now."""
    if not keys:
        return {}
    with engine.connect() as conn:
        return {row.dlq_key: row for row in _LETTERS_BY_KEY.rows(conn, keys)}


def _done_offsets(held: _Snapshot, committed: Mapping[int, int],
                  topic_id: str) -> dict[int, DoneOffsets]:
    """What the snapshot records as done of each partition: below its position of this topic
    (one of another id, the topic's before it was made again, counts nothing), and the
    ranges recorded past it. A partition with no position in a database made before
    positions is one its bridge has not committed since: Kafka's committed offset stands,
    as for the bridge (`positions.rewinds`)."""
    done: dict[int, DoneOffsets] = {}
    for partition in sorted({*committed, *held.kept, *held.ranges}):
        position = held.kept.get(partition)
        ranges = held.ranges.get(partition, [])
        if position is None and not held.made_with_positions:
            done[partition] = DoneOffsets.of(committed.get(partition, 0), ranges, COMMITTED)
        else:
            below = position.next_offset if position and position.topic_id == topic_id else 0
            done[partition] = DoneOffsets.of(below, ranges)
    return done


def _compare_commits(report: Report) -> None:
    """Nothing lost: no partition's committed offset in Kafka, read before the snapshot, is
    past what the database holds as done (a commit follows the position it reports)."""
    for partition, done in sorted(report.done.items()):
        offset = report.committed.get(partition, 0)
        if done.source != POSITION or offset <= (frontier := done.frontier):
            continue
        missing = tuple(PartitionOffset(partition, at)
                        for at in range(frontier, min(offset, frontier + 5)) if at not in done)
        _differ(report, f"partition {partition}",
                f"done below Kafka's committed offset {offset}",
                f"Kafka's committed offset {offset} is past what the database holds as "
                f"done ({frontier})", missing)


def _queued(conn: Connection) -> dict[str, set[str]]:
    """The keys waiting in the reconciler's queue, by table."""
    keys: dict[str, set[str]] = {"users": set(), "orders": set(), "payments": set()}
    for row in conn.execute(select(reconcile_queue.c["keys"])):
        for table, written in json.loads(row.keys).items():
            keys.setdefault(table, set()).update(written)
    return keys


def _reached(conn: Connection, queued: Mapping[str, set[str]]) -> set[tuple[str, str]]:
    """The entities a round evaluates for the queued keys (`eventpipe.reconcile`), and a
    few more: the users written, those claiming their emails and those held because of
    them; the orders written, those of the users evaluated and those held because of them;
    the payments written, those of the orders evaluated and those held because of them."""
    if not any(queued.values()):
        return set()
    users, orders, payments = (set(queued["users"]), set(queued["orders"]),
                               set(queued["payments"]))
    emails = {row.email for row in readmodel.Lookup(conn).users(sorted(users)).values()}
    users |= readmodel.users_claiming(conn, sorted(emails))
    reached = records.waiting_on(conn, "user", sorted(users))
    orders |= readmodel.orders_of_users(conn, sorted(users))
    orders |= {key for kind, key in reached if kind == "order"}
    reached |= records.waiting_on(conn, "order", sorted(orders))
    payments |= readmodel.payments_of_orders(conn, sorted(orders))
    return reached | {("user", key) for key in users} | {("order", key) for key in orders} \
        | {("payment", key) for key in payments}


def _recorded_fingerprints(engine: Engine, event_ids: Collection[str]) -> dict[str, str]:
    """Which payload of each reused eventId the pipeline took as the event."""
    with engine.connect() as conn:
        return {event_id: fingerprint
                for event_id, fingerprint in upserts.recorded(conn, event_ids).items()
                if fingerprint}


def _differ(report: Report, what: str, expected: Any, found: Any,
            positions: tuple[PartitionOffset, ...] = ()) -> None:
    report.differences.append(Difference(what, _shown(expected), _shown(found), positions))


def _shown(value: Any) -> str:
    """A value as an operator reads it: times in ISO-8601 UTC, rows in parentheses, no
    Python reprs (`datetime.datetime(…)`, `Decimal('1.00')`)."""
    if value is None:
        return "nothing"
    if isinstance(value, datetime):
        return utc_iso(value)
    if isinstance(value, tuple | list):
        return "(" + ", ".join(_shown(item) for item in value) + ")"
    return str(value)


def holds_events(engine: Engine) -> bool:
    """Whether the database records any event applied or dead-lettered."""
    with engine.connect() as conn:
        return any(conn.execute(select(table.c.event_id).limit(1)).first() is not None
                   for table in (applied_events, dead_letters))


def _compare_read_model(expected: Expected, model: readmodel.ReadModel, report: Report) -> None:
    where = _positions_by_entity(expected)
    for user_id in sorted(set(expected.users) | set(model.users)):
        want = expected.users.get(user_id)
        row = model.users.get(user_id)
        wanted_u = None if want is None else (want.email, want.name, want.created_at)
        got = None if row is None else (row.email, row.name, row.created_at)
        if wanted_u != got:
            _differ(report, f"user {user_id}", wanted_u, got, where.get(("user", user_id), ()))
    for order_id in sorted(set(expected.orders) | set(model.orders)):
        want_order = expected.orders.get(order_id)
        order = model.orders.get(order_id)
        wanted = None if want_order is None else (
            want_order.user_id, want_order.total_amount, want_order.currency,
            want_order.placed_at, tuple(tuple(item) for item in want_order.items))
        got_order = None if order is None else (
            order.user_id, order.total_amount, order.currency, order.placed_at,
            tuple(model.items.get(order_id, ())))
        if wanted != got_order:
            _differ(report, f"order {order_id}", wanted, got_order,
                    where.get(("order", order_id), ()))
    for payment_id in sorted(set(expected.payments) | set(model.payments)):
        want_payment = expected.payments.get(payment_id)
        payment = model.payments.get(payment_id)
        wanted_p = None if want_payment is None else (
            want_payment.order_id, want_payment.amount, want_payment.currency,
            want_payment.settled_at)
        got_p = None if payment is None else (
            payment.order_id, payment.amount, payment.currency, payment.settled_at)
        if wanted_p != got_p:
            _differ(report, f"payment {payment_id}", wanted_p, got_p,
                    where.get(("payment", payment_id), ()))
    for sku in sorted(set(expected.inventory) | set(model.inventory)):
        want_stock = expected.inventory.get(sku)
        wanted_s = None if want_stock is None else (want_stock.quantity, want_stock.updated_at)
        if wanted_s != model.inventory.get(sku):
            _differ(report, f"inventory {sku}", wanted_s, model.inventory.get(sku))


def _positions_by_entity(expected: Expected) -> dict[tuple[str, str], tuple[PartitionOffset,
                                                                            ...]]:
    return {(entity.kind.value, entity.id): expected.positions.get(event_id, ())
            for entity, event_id in expected.current.items()}


def _compare_fates(expected: Expected, recorded: set[str], letters: Mapping[str, Any],
                   reached: set[tuple[str, str]], report: Report) -> None:
    live = {key for key, row in letters.items() if row.state != RESOLVED}
    held = {key for key, letter in expected.dead_letters.items()
            if letter.error_class not in (ErrorClass.INVALID_EVENT, ErrorClass.ID_REUSED,
                                          ErrorClass.UNREADABLE_MESSAGE)}
    by_event_key = {letter.event_id: key for key, letter in expected.dead_letters.items()
                    if key in held}
    entity_of: dict[str, tuple[str, str]] = {event_id: (entity.kind.value, entity.id)
                 for entity, event_id in expected.current.items()} if reached else {}

    def awaiting(key: str) -> bool:
        """A held event's dead letter whose entity a queued round is still to decide."""
        row, letter = letters.get(key), expected.dead_letters.get(key)
        if letter is not None and key in held and letter.event_id is not None \
                and entity_of.get(letter.event_id) in reached:
            return True
        return row is not None and row.error_class in _HELD \
            and (row.entity_kind, row.entity_key) in reached

    def differ(key: str, *args: Any) -> None:
        if reached and awaiting(key):
            report.awaiting_reconciler += 1
        else:
            _differ(report, f"dead letter {key}", *args)

    for event_id in sorted(expected.fates):
        if event_id not in recorded and by_event_key.get(event_id) not in letters:
            _differ(report, f"fate of event {event_id}", "recorded", "no record",
                    expected.positions.get(event_id, ()))
    for key, letter in sorted(expected.dead_letters.items()):
        if key not in live:
            differ(key, f"{letter.error_class.value}: {letter.reason}",
                   "resolved" if key in letters else "not dead-lettered", letter.positions)
        elif letters[key].state in (OPEN, WAITING, REPLAYING) \
                and letters[key].error_class != letter.error_class.value:
            # Its reason is said in words of the pipeline's own: the class is what must agree.
            # A letter an operator took out (replayed, purged) keeps the class it had then.
            differ(key, f"{letter.error_class.value}: {letter.reason}",
                   f"{letters[key].error_class}: {letters[key].reason}", letter.positions)
    for key in sorted(live - set(expected.dead_letters)):
        row = letters[key]
        if row.state in (REPLAYED, PURGED):
            # Taken out of the DLQ by an operator while its event was held; the condition
            # cleared since and the event applied: the letter keeps that history.
            report.closed_since_cleared += 1
        elif row.error_class in _PREDICTABLE:
            differ(key, "not dead-lettered",
                   f"{row.state} {row.error_class} (event {row.event_id})")
        else:
            report.pipeline_only.append(f"{key} {row.error_class} (event {row.event_id})")


def _compare_stream(letters: Mapping[str, Any], shown: set[str], full: bool, report: Report,
                    now: Callable[[Collection[str]], Mapping[str, Any]]) -> None:
    """The stream, read after the snapshot, against the snapshot's letters. An entry that
    differs is one the stream lost or shows wrongly only if its letter is as it was then
    (`now` reads it again): the projection puts or removes an entry only for a new
    revision, which a letter changed under traffic may have had since."""
    open_keys = {key for key, row in letters.items() if row.state == OPEN}
    missing = sorted(open_keys - shown)
    extra = sorted(shown - open_keys)
    again = now([*missing, *extra])

    def changed(key: str) -> bool:
        before, after = letters.get(key), again.get(key)
        moved = (before is None) != (after is None) or (
            before is not None and after is not None
            and (before.revision, before.state, before.in_stream)
            != (after.revision, after.state, after.in_stream))
        if moved:
            report.changed_meanwhile += 1
        return moved

    for key in missing:
        if full and not letters[key].in_stream:  # never shown, not lost: kept out, it waits
            report.waiting_to_be_shown += 1
            continue
        if not changed(key):
            _differ(report, f"DLQ stream entry {key}", "shown (it is open in SQL)",
                    "missing: run `eventpipe dlq restore`")
    for key in extra:
        if not changed(key):
            _differ(report, f"DLQ stream entry {key}", "absent (not open in SQL)", "shown")


def _offsets(report: Report) -> str:
    """Which offsets of each partition were verified, as the summary says them."""
    def listed(source: str) -> list[str]:
        return [f"p{p}<{done.below}" + (f"+{done.past}" if done.past else "")
                for p, done in sorted(report.done.items()) if done.source == source]

    by_position, by_commit = listed(POSITION), listed(COMMITTED)
    if by_position and by_commit:
        return (f"below the database's positions ({', '.join(by_position)}) and, where it "
                f"holds none, the committed offsets ({', '.join(by_commit)})")
    if by_commit:
        return f"below the committed offsets ({', '.join(by_commit)})"
    return f"below the database's positions ({', '.join(by_position)})"


def render(report: Report, limit: int = 50) -> str:
    lines = [f"verified {report.messages} messages {_offsets(report)}: "
             f"{report.events} events, {report.dead_lettered} dead letters expected"]
    if any(done.past for done in report.done.values()):
        lines.append("  +N: offsets past a partition's position that the database records as "
                     "done (kafka_done_ranges), verified too")
    if report.truncated:
        cut = {p: o for p, o in report.first_offsets.items() if o > 0}
        lines.append(f"  history before these offsets is gone (retention): {cut}; the "
                     "comparison covers what remains")
    if report.pipeline_only:
        lines.append(f"  {len(report.pipeline_only)} dead letter(s) only the pipeline could "
                     "know (refused by the database, or crashed a worker):")
        lines.extend(f"    {line}" for line in report.pipeline_only[:limit])
    if report.waiting_to_be_shown:
        lines.append(f"  {report.waiting_to_be_shown} open dead letter(s) wait in SQL to be "
                     "shown in the DLQ stream, which is full (DLQ_MAX_ENTRIES / DLQ_MAX_BYTES): "
                     "replay or purge entries")
    if report.closed_since_cleared:
        lines.append(f"  {report.closed_since_cleared} dead letter(s) replayed or purged whose "
                     "event applied since (its condition cleared): their history is kept")
    if report.awaiting_reconciler:
        lines.append(f"  {report.awaiting_reconciler} dead letter(s) of entities whose keys "
                     "wait in the reconciler's queue: its next rounds decide them, not "
                     "compared")
    if report.changed_meanwhile:
        lines.append(f"  {report.changed_meanwhile} DLQ stream entr(y/ies) whose dead letter "
                     "changed while verify ran: not compared")
    if report.ambiguous:
        lines.append(f"  eventIds reused with different payloads, where which copy was applied "
                     f"first was a matter of timing (the pipeline's choice is taken): "
                     f"{', '.join(report.ambiguous[:limit])}")
    if report.clean:
        lines.append("clean: the database holds exactly what the topic says")
        return printable("\n".join(lines))
    lines.append(f"{len(report.differences)} difference(s):")
    for difference in report.differences[:limit]:
        where = ", ".join(f"p{p.partition}@{p.offset}" for p in difference.positions[:5])
        lines.append(f"  {difference.what}: expected {difference.expected}; found "
                     f"{difference.found}" + (f"  [{where}]" if where else ""))
    if len(report.differences) > limit:
        lines.append(f"  … and {len(report.differences) - limit} more")
    return printable("\n".join(lines))
