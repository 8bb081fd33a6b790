"""What the database holds of each partition: the offset below which the fate of every message
is recorded in it, written by the bridge before it commits the same offset to Kafka, and the
ranges of offsets whose fates were recorded since.

Kafka's committed offsets say what the pipeline did; they cannot say what the database kept.
A database restored from a backup, or lost and made anew, lacks work Kafka counts as done, and
nothing would bring it back: the bridge would read on from Kafka's offsets. A position is
written only once the work below it is durable in the database, and before Kafka hears of it,
so a snapshot of the database holds no position past its own work. As a partition is
assigned, the bridge reads it again from here where Kafka's committed offset is further
(`rewinds`).

The marks that tell the bridge what is done live in Redis, which does not roll back with the
database. So each transaction that records fates records the ranges of their offsets too
(`record_done`), and the bridge, as it records a position (`save`), checks that the database
holds every offset it takes for done since the one before: a failover, or a restore under a
running bridge, that lost a position or only work done since, is seen at the next commit,
and the partition read again.

A position moves only forward for the topic it names: a bridge that lost a partition may
still write an older position after the new owner wrote a newer one. A topic deleted and made
again has a new id in Kafka, and its first position overwrites the earlier topic's.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from functools import cache
from typing import Any, NamedTuple

from sqlalchemy import (
    Connection,
    Delete,
    Engine,
    Select,
    TextClause,
    and_,
    bindparam,
    case,
    delete,
    literal,
    or_,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql import Executable

from eventpipe.database import PREPARED, reading
from eventpipe.keysets import chunked
from eventpipe.spans import Span, merged, spans, uncovered
from eventpipe.sqltypes import UtcDateTime
from eventpipe.tables import applied_events, dead_letters, kafka_done_ranges, kafka_positions

_MERGE_TSQL = (
    "MERGE INTO kafka_positions WITH (HOLDLOCK) AS target USING (SELECT :kafka_topic AS "
    "kafka_topic, :kafka_partition AS kafka_partition, :topic_id AS topic_id, :next_offset AS "
    "next_offset, :committed_at AS committed_at) AS source ON target.kafka_topic = "
    "source.kafka_topic AND target.kafka_partition = source.kafka_partition "
    "WHEN MATCHED THEN UPDATE SET next_offset = CASE WHEN target.topic_id = source.topic_id "
    "AND target.next_offset > source.next_offset THEN target.next_offset ELSE "
    "source.next_offset END, topic_id = source.topic_id, committed_at = source.committed_at "
    "WHEN NOT MATCHED THEN INSERT (kafka_topic, kafka_partition, topic_id, next_offset, "
    "committed_at) VALUES (source.kafka_topic, source.kafka_partition, source.topic_id, "
    "source.next_offset, source.committed_at);")


class Position(NamedTuple):
    """A partition's row: the id of the topic it is of, and the next offset to read."""

    topic_id: str
    next_offset: int


# The partitions a statement names at most: a topic may have thousands, and one bridge hold
# them all. The ranges' check binds two parameters a partition and joins them with `OR`s:
# SQLite takes an expression at most 1,000 deep, and before 3.32 at most 999 parameters a
# statement; SQL Server 2,100.
PARTITIONS_AT_ONCE = 400

# The row migration 0005 adds to a database it makes the table in while the database holds
# no fate: no topic has this name. There, a partition with no position holds nothing, whatever
# fates tasks left in the queues wrote into it before a bridge came (`rewinds`).
MADE_WITH_POSITIONS = ("", -1)


def saving(dialect: str) -> Executable:
    """The statement that records one partition's position, forward only within a topic."""
    if dialect == "mssql":
        return text(_MERGE_TSQL).bindparams(bindparam("committed_at", type_=UtcDateTime()))
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(kafka_positions)
    stored, given = kafka_positions.c, statement.excluded
    return statement.on_conflict_do_update(
        index_elements=[stored.kafka_topic, stored.kafka_partition],
        set_={"next_offset": case((and_(stored.topic_id == given.topic_id,
                                        stored.next_offset > given.next_offset),
                                   stored.next_offset), else_=given.next_offset),
              "topic_id": given.topic_id, "committed_at": given.committed_at})


class Lost(NamedTuple):
    """A partition whose position `save` found the database lost, or work below the offset to
    record: why, and how many offsets the bridge took for done that it lacks (0: the lost
    position says, as the partition is read again, `rewinds`)."""

    why: str
    offsets: int = 0


def save(engine: Engine, topic: str, topic_id: str, offsets: Mapping[int, int],
         at: datetime, *, written: Mapping[int, int] | None = None,
         settled: Mapping[int, Sequence[Span]] | None = None) -> dict[int, Lost]:
    """Record, in one transaction, the positions the bridge is about to commit to Kafka, but
    those of partitions where the database lost work: a position behind what the same
    bridge had `written` there, or offsets `settled` (taken for done since) past its position
    whose ranges it does not hold (a failover, a restore under a running bridge). Those
    partitions are returned, and recorded no further; one whose row is gone gets a position
    at 0, so that whoever reads it next reads it again from the start. The topic's ranges
    below the positions recorded are deleted (`pruning`, `pruning_backlog`): the positions
    vouch for them now."""
    written, settled = written or {}, settled or {}
    with engine.begin() as conn:
        kept = read(conn, topic, {*offsets, *written}, lock=True)
        # Another id there is another topic's writer (a bridge of the topic before it was
        # made again, not yet stopped): not a loss of this one's.
        lost = {partition: Lost("the database lost the position this bridge recorded")
                for partition, offset in written.items()
                if (position := kept.get(partition)) is None
                or (position.topic_id == topic_id and position.next_offset < offset)}
        lost.update(_unheld(conn, topic, topic_id, {
            p: spans for p, spans in settled.items() if p in offsets and p not in lost}, kept))
        chosen = {**{p: o for p, o in offsets.items() if p not in lost},
                  **{p: 0 for p in lost if p not in kept}}
        if (lost or not set(offsets) <= set(written)) and engine.dialect.name == "postgresql":
            # The bridge's connections do not wait on the disk (`make_engine`'s `synced`),
            # but a first position, or one made again at 0, is what tells whoever reads next
            # where to read from: lost in a crash, the partition would be read from the start
            # of its log, or Kafka's offset trusted.
            conn.execute(text("SET LOCAL synchronous_commit = on"))
        rows: list[dict[str, Any]] = [
            {"kafka_topic": topic, "kafka_partition": partition, "topic_id": topic_id,
             "next_offset": offset, "committed_at": at}
            for partition, offset in sorted(chosen.items())]
        if rows:
            conn.execute(saving(engine.dialect.name), rows)
            pruned = [{"topic": topic, "partition": partition, "topic_id": topic_id,
                       "floor": _floor(kept.get(partition), topic_id, offset), "below": offset}
                      for partition, offset in sorted(chosen.items())]
            conn.execute(pruning(), pruned)
            conn.execute(pruning_backlog(engine.dialect.name), pruned)
    return lost


def _floor(position: Position | None, topic_id: str, below: int) -> int:
    """Where the ranges a save deletes of a partition begin: its last position of this topic,
    if any; else everything below goes as backlog."""
    if position is None or position.topic_id != topic_id:
        return below
    return min(position.next_offset, below)


class Done(NamedTuple):
    """The offsets of one partition's messages a transaction gave their fates, as the task
    that carried them names the topic (its id in Kafka: `eventpipe.offset_ledger.filed_under`)."""

    topic: str
    topic_id: str
    partition: int
    offsets: Sequence[int]


def record_done(conn: Connection, done: Done) -> None:
    """In the transaction that records their fates: the offsets whose fates it records, which
    the bridge looks for before it records a position past them (`save`)."""
    rows = [(done.topic, done.topic_id, done.partition, first, last)
            for first, last in spans(done.offsets)]
    if rows:
        conn.exec_driver_sql(_recording(conn.dialect.paramstyle),
                             rows[0] if len(rows) == 1 else rows, execution_options=PREPARED)


@cache
def _recording(paramstyle: str) -> str:
    """The driver's own statement: SQLAlchemy's insert cost a batch of a few events on
    PostgreSQL a fifth more of the worker's CPU (it asks for the new row's id back)."""
    marker = "%s" if paramstyle in ("format", "pyformat") else "?"
    return (f"INSERT INTO kafka_done_ranges (kafka_topic, topic_id, kafka_partition, "
            f"first_offset, last_offset) VALUES ({', '.join([marker] * 5)})")


def _unheld(conn: Connection, topic: str, topic_id: str, settled: Mapping[int, Sequence[Span]],
            kept: Mapping[int, Position]) -> dict[int, Lost]:
    """The partitions some of whose `settled` offsets past their position the database holds
    no range of. With no position of this topic yet, every offset settled is looked for: the
    first position must vouch for what it passes too. (Before, it went unchecked, as a
    partition taken again with no position is read from its log's start: but a database
    made anew under workers that still wrote to the file they had open, a SQLite file
    replaced, got its first position past every event, none of which it held, and was never
    read again.)"""
    needed: dict[int, list[Span]] = {}
    own = {p: position for p, position in kept.items() if position.topic_id == topic_id}
    for partition, taken in settled.items():
        # The position vouches for what is below it: the ranges there are deleted.
        floor = own[partition].next_offset if partition in own else 0
        if clipped := merged((max(first, floor), last) for first, last in taken
                             if last >= floor):
            needed[partition] = clipped
    if not needed:
        return {}
    held: dict[int, list[Span]] = {}
    for chosen in chunked(needed, PARTITIONS_AT_ONCE):
        floors = {partition: needed[partition][0][0] for partition in chosen}
        for row in conn.execute(ranges_query(topic, topic_id, floors)):
            held.setdefault(row.kafka_partition, []).append((row.first_offset, row.last_offset))
    lost: dict[int, Lost] = {}
    for partition, wanted in needed.items():
        if missing := uncovered(wanted, held.get(partition, [])):
            since = " since its position" if partition in own else ", and holds no position of it"
            lost[partition] = Lost(f"the database lacks {missing} message(s) the workers "
                                   f"recorded as done{since}", missing)
    return lost


def ranges_query(topic: str, topic_id: str, floors: Mapping[int, int]) -> Select[Any]:
    """The ranges of offsets recorded done of these partitions of the topic that end at or
    past each one's floor: an index range each, so that rows below it not deleted yet (those
    bridges of a version before left) are not read."""
    ranges = kafka_done_ranges.c
    return select(ranges.kafka_partition, ranges.first_offset, ranges.last_offset).where(
        ranges.kafka_topic == topic, ranges.topic_id == topic_id,
        or_(*(and_(ranges.kafka_partition == partition, ranges.last_offset >= floor)
              for partition, floor in sorted(floors.items()))))


# The ranges below a partition's last position deleted at each save, at most: a backlog that
# bridges of a version before the ranges left (they delete none) goes over a few saves, each
# brief, rather than in one that passes the bridge's statement timeout, or on SQL Server takes
# the table's lock (past 5,000 rows) and holds every batch's insert.
PRUNE_BACKLOG_ROWS = 1000
_BACKLOG = ("kafka_topic = :topic AND kafka_partition = :partition AND topic_id = :topic_id "
            "AND last_offset < :floor")


def pruning() -> Delete:
    """Delete a partition's ranges of this topic id from its last position (`floor`) to its
    new one (`below`): the work since, which the check just read. Those of another id (an
    earlier topic of the name) are left: its bridge, not yet stopped, may still write, and
    deleting the new topic's ranges would hide a loss."""
    ranges = kafka_done_ranges.c
    return delete(kafka_done_ranges).where(
        ranges.kafka_topic == bindparam("topic"), ranges.kafka_partition == bindparam("partition"),
        ranges.topic_id == bindparam("topic_id"), ranges.last_offset >= bindparam("floor"),
        ranges.last_offset < bindparam("below"))


def pruning_backlog(dialect: str) -> TextClause:
    """Delete up to PRUNE_BACKLOG_ROWS of a partition's ranges of this topic id below its last
    position (`floor`). The count is in the text: SQLAlchemy's bound `LIMIT` is rendered into
    SQL Server's `TOP` as the statement runs, which it refuses for a statement run with rows
    of parameters."""
    if dialect == "mssql":
        return text(f"DELETE TOP ({PRUNE_BACKLOG_ROWS}) FROM kafka_done_ranges WHERE {_BACKLOG}")
    return text(f"DELETE FROM kafka_done_ranges WHERE id IN (SELECT id FROM kafka_done_ranges "
                f"WHERE {_BACKLOG} LIMIT {PRUNE_BACKLOG_ROWS})")


def reading_query(topic: str, partitions: Collection[int], *, lock: bool = False) -> Select[Any]:
    """The positions of these partitions; `lock`: held until the transaction ends, as by one
    that will write them (no other writer changes them between this read and its write)."""
    query = select(kafka_positions.c.kafka_partition, kafka_positions.c.topic_id,
                   kafka_positions.c.next_offset).where(
        kafka_positions.c.kafka_topic == topic,
        kafka_positions.c.kafka_partition.in_(sorted(partitions)))
    if lock:  # SQL Server renders no FOR UPDATE: its hint instead
        query = query.order_by(kafka_positions.c.kafka_partition).with_for_update().with_hint(
            kafka_positions, "WITH (UPDLOCK, HOLDLOCK, ROWLOCK)", "mssql")
    return query


def read(conn: Connection, topic: str, partitions: Collection[int], *,
         lock: bool = False) -> dict[int, Position]:
    """A statement per PARTITIONS_AT_ONCE partitions, in order: locked, as one statement
    locks them (two writers wait on each other's first lock, never in a cycle)."""
    return {row.kafka_partition: Position(row.topic_id, row.next_offset)
            for chosen in chunked(partitions, PARTITIONS_AT_ONCE)
            for row in conn.execute(reading_query(topic, chosen, lock=lock))}


def made_with_positions(conn: Connection) -> bool:
    """Whether migration 0005 made the table in this database while it held no fate
    (`MADE_WITH_POSITIONS`): there, a partition with no position holds nothing."""
    return _made_with_positions(conn)


def _made_with_positions(conn: Connection) -> bool:
    topic, partition = MADE_WITH_POSITIONS
    query = select(literal(1)).select_from(kafka_positions).where(
        kafka_positions.c.kafka_topic == topic, kafka_positions.c.kafka_partition == partition)
    return conn.execute(query).first() is not None


def holding(conn: Connection, topic: str, partitions: Collection[int]) -> set[int]:
    """Those of the partitions of whose messages the database records any fate. Neither table
    has an index for it (this is asked only of a database from before positions, once a
    partition): the dead letters, far fewer, are read once for them all, so that a partition
    whose messages were all dead-lettered is not a scan of every event applied; then the
    events applied, a partition at a time, each scan ending at its first row."""
    if not partitions:
        return set()
    lettered = dead_letters.c
    held = set(conn.execute(select(lettered.kafka_partition).distinct().where(
        lettered.kafka_topic == topic)).scalars()) & set(partitions)
    applied = applied_events.c
    for partition in sorted(set(partitions) - held):
        query = select(literal(1)).select_from(applied_events).where(
            applied.kafka_topic == topic, applied.kafka_partition == partition).limit(1)
        if conn.execute(query).first() is not None:
            held.add(partition)
    return held


class Rewind(NamedTuple):
    """A partition to read again from `offset`, and why."""

    offset: int
    why: str


def rewinds(engine: Engine, topic: str, topic_id: str, committed: Mapping[int, int],
            again: Collection[int] = ()) -> tuple[dict[int, Rewind], dict[int, int]]:
    """The partitions to read again, and from where: those whose committed offset in Kafka
    is past what the database holds, and those of `again` (taken again by a bridge that found
    its position lost) in any case; and the positions of this topic the database holds.

    A partition whose position names this topic is read from its position when Kafka's is
    further. One whose position names another topic id is read from the start: a bridge
    records a topic's position before it commits, so the commit is the earlier topic's of the
    name, sent by a bridge that had not seen the topic made again (on a broker that keeps no
    commit's metadata, `_vouch` cannot tell), and the fates recorded under the name are that
    topic's too. One with no position (a database that holds no positions yet, or one of a
    topic from a broker that gave no ids) is read from the start when the database was made
    with positions (`MADE_WITH_POSITIONS`) and holds no row of the partition at all, or holds
    no fate of any of its messages: lost, and made anew, while Kafka says its messages are
    done. With fates recorded in a database from before positions, it is its first run with
    them, and Kafka's offset stands. A partition of `again` is read from its position or
    Kafka's offset, the lower, and from the start where it has no position: the bridge
    recorded one, and the database went back to before it."""
    found: dict[int, Rewind] = {}
    with reading(engine) as conn:
        rows = read(conn, topic, {*committed, *again})
        kept = {p: position.next_offset for p, position in rows.items()
                if position.topic_id == topic_id}
        earlier = {p: position.topic_id for p, position in rows.items()
                   if topic_id and position.topic_id and position.topic_id != topic_id}
        # Where only the row of a broker that began or ceased to give ids is, the database
        # held positions of the name: the marker does not decide.
        fresh = _made_with_positions(conn)
        # Asked only where a partition's fate rests on it: no position, not to be read again
        # anyway, a committed offset, and a database that may hold its messages.
        held = holding(conn, topic, [
            partition for partition, offset in committed.items()
            if offset and partition not in kept and partition not in again
            and partition not in earlier and not (fresh and partition not in rows)])
        for partition in sorted({*committed, *again}):
            position, offset = kept.get(partition), committed.get(partition)
            if position is not None and offset is not None and position < offset:
                found[partition] = Rewind(
                    position, f"the database holds its messages up to offset {position}, "
                              f"Kafka's committed offset is {offset}")
            elif position is None and offset and partition in earlier \
                    and partition not in again:
                found[partition] = Rewind(
                    0, f"the database's position of it is of an earlier topic of the name "
                       f"(id {earlier[partition]}): Kafka's committed offset {offset} is that "
                       "topic's")
            elif position is None and (partition in again or (offset and (
                    (fresh and partition not in rows) or partition not in held))):
                found[partition] = Rewind(
                    0, "the database holds none of its messages"
                       + (f", Kafka's committed offset is {offset}" if offset else ""))
            elif partition in again and position is not None:
                found[partition] = Rewind(
                    position if offset is None else min(position, offset),
                    "the database lost the position the bridge recorded")
    return found, kept
