"""`eventpipe verify`: prove, at any time, that nothing was lost and nothing applied twice.

1. Read the topic from its first offset up to the consumer group's committed offsets: the
   messages the pipeline has declared done.
2. Fold them with the contract's rules (`eventpipe.canonical`, written independently of the
   apply path) into the read model and the dead letters they must give.
3. Compare with what the database holds:
   - the read model (`eventpipe.readmodel.whole`): every user, order (with its items),
     payment and stock level, field by field;
   - fates: every event below the commit is recorded (`applied_events`, or a dead letter of
     it), and so is every message that is not an event;
   - the dead letters: the live ones are exactly those the rules predict (plus what only the
     pipeline can know: values the database refused, messages that killed a worker), and the
     operators' Redis stream shows every open one.
Each difference names the positions of the messages concerned. Exit status 1 on any.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
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
from sqlalchemy import Engine, select

from eventpipe import readmodel, upserts
from eventpipe.canonical import (
    ErrorClass,
    Expected,
    PartitionOffset,
    TopicMessage,
    fold,
)
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
from eventpipe.settings import Settings
from eventpipe.tables import applied_events, dead_letters
from eventpipe.terminal import printable
from eventpipe.times import from_kafka_millis, utc_iso

Progress = Callable[[int], None]
_PREDICTABLE = frozenset(error.value for error in ErrorClass)


@dataclass(frozen=True, slots=True)
class Difference:
    what: str  # e.g. "user u-1", "dead letter e:…", "fate of event e-7"
    expected: str
    found: str
    positions: tuple[PartitionOffset, ...] = ()


@dataclass(slots=True)
class Report:
    committed: dict[int, int] = field(default_factory=dict)
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


def read_topic(settings: Settings, committed: Mapping[int, int], report: Report,
               progress: Progress | None = None, poll_s: float = 10.0) -> Iterator[TopicMessage]:
    """Every message below the committed offsets, partition by partition, without joining
    the group (nothing of the group's is touched). Those of a record batch Kafka cannot hand
    over come without bytes, as the bridge sends them on (`eventpipe.kafka.UNREADABLE`)."""
    topic = settings.kafka_topic
    consumer = Consumer(reader_config(settings, **{
        "group.id": f"{settings.kafka_group_id}.verify", "enable.auto.commit": False,
        "enable.auto.offset.store": False, "auto.offset.reset": "earliest",
        "enable.partition.eof": True}))
    reader: MessageReader | None = None
    topic_id: str | None = None  # asked for once a batch Kafka cannot hand over is met
    try:
        for partition, end in sorted(committed.items()):
            if end <= 0:
                continue
            consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)])
            next_read = failed = 0
            while next_read < end:
                record = consumer.poll(poll_s)
                error = None if record is None else record.error()
                if record is None or (error is not None
                                      and error.code() == KafkaError._PARTITION_EOF):
                    # The offsets left below the committed one may hold no message: a
                    # transaction's markers (a transactional producer's every commit), or an
                    # aborted transaction's messages, which the reading passes as the bridge's.
                    if (at := _position(consumer, topic, partition)) >= end:
                        if at > 0:  # nothing read: what is left of the log starts there
                            report.first_offsets.setdefault(partition, at)
                        break
                    if record is None:
                        raise KafkaException(f"partition {partition}: nothing read for "
                                             f"{poll_s}s before the committed offset {end}")
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
                                             f"{failed} times in a row before the committed "
                                             f"offset {end}")
                    continue
                failed = 0
                offset = next_read = record.offset() or 0
                report.first_offsets.setdefault(partition, offset)
                if offset >= end:
                    break
                kind, millis = record.timestamp()
                yield TopicMessage(
                    partition, offset, record.key(), record.value(),
                    None if kind == TIMESTAMP_NOT_AVAILABLE else from_kafka_millis(millis))
                next_read = offset + 1
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
           committed: Mapping[int, int] | None = None) -> Report:
    """`committed`: the group's committed offsets, when the caller read them already."""
    report = Report(committed=dict(committed) if committed is not None
                    else committed_offsets(settings))
    expected = fold(read_topic(settings, report.committed, report, progress),
                    max_future=timedelta(seconds=settings.max_future_skew_s),
                    arrived_first=lambda ids: _recorded_fingerprints(engine, ids))
    report.messages = expected.counts.messages
    report.events = expected.counts.events
    report.dead_lettered = len(expected.dead_letters)
    report.ambiguous = [ambiguous.event_id for ambiguous in expected.ambiguous]
    with engine.connect() as conn:
        model = readmodel.whole(conn)
        recorded = {row.event_id for row in conn.execute(select(applied_events.c.event_id))}
        letters = {row.dlq_key: row for row in conn.execute(select(
            dead_letters.c.dlq_key, dead_letters.c.state, dead_letters.c.error_class,
            dead_letters.c.reason, dead_letters.c.event_id, dead_letters.c.in_stream))}
    _compare_read_model(expected, model, report)
    _compare_fates(expected, recorded, letters, report)
    _compare_stream(letters, stream.keys(), stream.refusing(), report)
    return report


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
                   report: Report) -> None:
    live = {key for key, row in letters.items() if row.state != RESOLVED}
    held = {key for key, letter in expected.dead_letters.items()
            if letter.error_class not in (ErrorClass.INVALID_EVENT, ErrorClass.ID_REUSED,
                                          ErrorClass.UNREADABLE_MESSAGE)}
    by_event_key = {letter.event_id: key for key, letter in expected.dead_letters.items()
                    if key in held}
    for event_id in sorted(expected.fates):
        if event_id not in recorded and by_event_key.get(event_id) not in letters:
            _differ(report, f"fate of event {event_id}", "recorded", "no record",
                    expected.positions.get(event_id, ()))
    for key, letter in sorted(expected.dead_letters.items()):
        if key not in live:
            _differ(report, f"dead letter {key}",
                    f"{letter.error_class.value}: {letter.reason}",
                    "resolved" if key in letters else "not dead-lettered", letter.positions)
        elif letters[key].state in (OPEN, WAITING, REPLAYING) \
                and letters[key].error_class != letter.error_class.value:
            # Its reason is said in words of the pipeline's own: the class is what must agree.
            # A letter an operator took out (replayed, purged) keeps the class it had then.
            _differ(report, f"dead letter {key}",
                    f"{letter.error_class.value}: {letter.reason}",
                    f"{letters[key].error_class}: {letters[key].reason}", letter.positions)
    for key in sorted(live - set(expected.dead_letters)):
        row = letters[key]
        if row.state in (REPLAYED, PURGED):
            # Taken out of the DLQ by an operator while its event was held; the condition
            # cleared since and the event applied: the letter keeps that history.
            report.closed_since_cleared += 1
        elif row.error_class in _PREDICTABLE:
            _differ(report, f"dead letter {key}", "not dead-lettered",
                    f"{row.state} {row.error_class} (event {row.event_id})")
        else:
            report.pipeline_only.append(f"{key} {row.error_class} (event {row.event_id})")


def _compare_stream(letters: Mapping[str, Any], shown: set[str], full: bool,
                    report: Report) -> None:
    open_keys = {key for key, row in letters.items() if row.state == OPEN}
    for key in sorted(open_keys - shown):
        if full and not letters[key].in_stream:  # never shown, not lost: kept out, it waits
            report.waiting_to_be_shown += 1
            continue
        _differ(report, f"DLQ stream entry {key}", "shown (it is open in SQL)",
                "missing: run `eventpipe dlq restore`")
    for key in sorted(shown - open_keys):
        _differ(report, f"DLQ stream entry {key}", "absent (not open in SQL)", "shown")


def render(report: Report, limit: int = 50) -> str:
    partitions = ", ".join(f"p{p}<{o}" for p, o in sorted(report.committed.items()))
    lines = [f"verified {report.messages} messages below the committed offsets ({partitions}): "
             f"{report.events} events, {report.dead_lettered} dead letters expected"]
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
