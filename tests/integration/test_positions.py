"""What the database holds of each partition (`eventpipe.positions`), on each database the
project supports live: positions only move forward within a topic, and the partitions to read
again are those whose committed offset in Kafka is past what the database holds."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, delete, event, select, update
from sqlalchemy.exc import IntegrityError

from eventpipe import positions
from eventpipe.apply import apply_batch
from eventpipe.dlq import records
from eventpipe.effects import Position
from eventpipe.samples import user_created
from eventpipe.tables import applied_events, kafka_done_ranges, kafka_positions
from tests.support.factories import T0, dead_letter, received

TOPIC = "events"
NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def _read(engine: Engine, topic: str = TOPIC) -> dict[int, positions.Position]:
    with engine.connect() as conn:
        return positions.read(conn, topic, range(12))


def test_a_position_moves_only_forward_within_a_topic(engine: Engine) -> None:
    positions.save(engine, TOPIC, "id-1", {0: 10, 1: 4}, NOW)
    # A bridge that has lost the partitions still commits what it knew: 7 after 10.
    positions.save(engine, TOPIC, "id-1", {0: 7, 1: 6}, NOW)
    assert _read(engine) == {0: positions.Position("id-1", 10), 1: positions.Position("id-1", 6)}
    # A topic made again under the name starts from its own first commit.
    positions.save(engine, TOPIC, "id-2", {0: 3}, NOW)
    assert _read(engine)[0] == positions.Position("id-2", 3)
    positions.save(engine, "other", "id-9", {0: 1}, NOW)
    assert _read(engine, "other") == {0: positions.Position("id-9", 1)}
    assert _read(engine)[0] == positions.Position("id-2", 3)


def test_a_partition_is_read_again_where_the_database_holds_less_than_kafka_says(
        engine: Engine) -> None:
    positions.save(engine, TOPIC, "id-1", {0: 5, 1: 20, 2: 8}, NOW)
    positions.save(engine, TOPIC, "id-0", {3: 5}, NOW)  # an earlier topic of the name
    positions.save(engine, TOPIC, "", {5: 1}, NOW)  # from a broker that gave no ids
    with engine.begin() as conn:
        for partition, offset in ((3, 1), (5, 2)):
            conn.execute(applied_events.insert().values(
                event_id=f"e-{partition}", event_type="UserCreated", outcome="applied",
                kafka_topic=TOPIC, kafka_partition=partition, kafka_offset=offset,
                occurred_at=T0, applied_at=T0))
        # Partition 6 holds only a dead letter.
        records.record_failures(conn, [replace(dead_letter(3).letter,
                                               position=Position(TOPIC, 6, 3))])
    committed = {0: 8, 1: 10, 2: 8, 3: 8, 4: 8, 5: 8, 6: 8, 7: 0}
    found, kept = positions.rewinds(engine, TOPIC, "id-1", committed)
    assert {p: rewind.offset for p, rewind in found.items()} == {0: 5, 3: 0, 4: 0}
    assert found[0].why == "the database holds its messages up to offset 5, Kafka's " \
        "committed offset is 8"
    # 3's fates and position are the earlier topic's, and so is Kafka's offset: committed by a
    # bridge that had not seen the topic made again, on a broker that keeps no commit's
    # metadata (Tansu), and taken for this topic's, it skipped the new topic's first events.
    assert found[3].why == "the database's position of it is of an earlier topic of the " \
        "name (id id-0): Kafka's committed offset 8 is that topic's"
    assert found[4].why == "the database holds none of its messages, Kafka's committed " \
        "offset is 8"
    assert kept == {0: 5, 1: 20, 2: 8}  # the positions of this topic, to check at commits
    # A database made with positions (migration 0005 on one that held no fate) holds
    # nothing of a partition it has no position of, whatever fates tasks left behind wrote.
    with engine.begin() as conn:
        conn.execute(kafka_positions.insert().values(
            kafka_topic="", kafka_partition=-1, topic_id="", next_offset=0, committed_at=NOW))
    found, _ = positions.rewinds(engine, TOPIC, "id-1", committed)
    # Not 5, whose row is of a broker that gave no ids (this one began to): there the marker
    # does not decide, its fates do.
    assert {p: rewind.offset for p, rewind in found.items()} == {0: 5, 3: 0, 4: 0, 6: 0}



def test_a_position_behind_what_the_bridge_recorded_is_lost_unless_another_topic_wrote_it(
        engine: Engine) -> None:
    positions.save(engine, TOPIC, "id-1", {0: 10, 1: 10, 2: 10}, NOW)
    with engine.begin() as conn:  # a failover that lost the last write of 0, and all of 1
        conn.execute(update(kafka_positions).where(kafka_positions.c.kafka_partition == 0)
                     .values(next_offset=6))
        conn.execute(delete(kafka_positions).where(kafka_positions.c.kafka_partition == 1))
    # The bridge of the topic before it was made again, not stopped yet.
    positions.save(engine, TOPIC, "id-0", {2: 3}, NOW)
    lost = positions.save(engine, TOPIC, "id-1", {0: 12, 1: 12, 2: 12, 3: 1}, NOW,
                          written={0: 10, 1: 10, 2: 10})
    assert set(lost) == {0, 1}
    # The row gone is made again at 0: whoever reads it next reads the partition again.
    assert _read(engine) == {0: positions.Position("id-1", 6), 1: positions.Position("id-1", 0),
                             2: positions.Position("id-1", 12), 3: positions.Position("id-1", 1)}


def test_a_partition_taken_again_is_read_from_the_lower_of_the_two_offsets(
        engine: Engine) -> None:
    positions.save(engine, TOPIC, "id-1", {0: 5, 1: 20, 3: 4}, NOW)
    found, _ = positions.rewinds(engine, TOPIC, "id-1", {0: 8, 1: 10}, again=[1, 2, 3])
    assert {p: rewind.offset for p, rewind in found.items()} == {0: 5, 1: 10, 2: 0, 3: 4}


def _ranges(engine: Engine) -> list[tuple[int, str, int, int]]:
    with engine.connect() as conn:
        return sorted((row.kafka_partition, row.topic_id, row.first_offset, row.last_offset)
                      for row in conn.execute(select(kafka_done_ranges)))


def _record(engine: Engine, partition: int, offsets: list[int], topic_id: str = "id-1") -> None:
    with engine.begin() as conn:
        positions.record_done(conn, positions.Done(TOPIC, topic_id, partition, offsets))


def test_offsets_taken_for_done_whose_ranges_the_database_lost_are_lost(engine: Engine) -> None:
    """A failover, or a restore under a running bridge, that kept the last position but lost
    work done since: the ledger in Redis still says done, the database holds no range of it.
    (Before: nothing but the position was looked at, and the bridge committed past the loss.)"""
    positions.save(engine, TOPIC, "id-1", {0: 10, 1: 10, 2: 10, 3: 10}, NOW)
    _record(engine, 0, [10, 11, 12, 14, 15])  # 13: a gap in the log (a transaction's marker)
    _record(engine, 1, [10, 11])  # the failover kept 10 and 11 of partition 1, not 12–19
    _record(engine, 2, [10, 11, 12, 13], topic_id="id-0")  # a task of the topic before
    _record(engine, 3, [5, 6, 10, 11])  # 5 and 6 again: below the position, as a redelivery
    lost = positions.save(
        engine, TOPIC, "id-1", {0: 16, 1: 20, 2: 14, 3: 12}, NOW, written={p: 10 for p in range(4)},
        # What the ledger said done since: 3's 5–6 are below the position, which vouches for them.
        settled={0: [(10, 12), (14, 15)], 1: [(10, 19)], 2: [(10, 13)], 3: [(5, 6), (10, 11)]})
    assert {p: loss.offsets for p, loss in lost.items()} == {1: 8, 2: 4}
    assert "lacks 8 message(s)" in lost[1].why
    # The partitions whose work is held move on, and their ranges below it go; the others
    # keep theirs, and their positions, for the partition read again.
    assert _read(engine) == {0: positions.Position("id-1", 16), 1: positions.Position("id-1", 10),
                             2: positions.Position("id-1", 10), 3: positions.Position("id-1", 12)}
    assert _ranges(engine) == [(1, "id-1", 10, 11), (2, "id-0", 10, 13)]


def test_a_first_position_is_held_to_ranges_too_nor_are_another_topics_ranges_deleted(
        engine: Engine) -> None:
    """A partition with no position of the topic yet: its first position vouches for what it
    passes too (before, unchecked, it passed the whole log of a SQLite file made anew under
    workers that wrote on to the file they had open: the adversarial tester's finding). The
    ranges of an earlier topic of the name are its bridge's to delete (a review's finding:
    one not yet stopped deleted the new topic's, and hid a loss)."""
    _record(engine, 0, [0, 1, 2], topic_id="id-0")
    lost = positions.save(engine, TOPIC, "id-1", {0: 40}, NOW, settled={0: [(3, 39)]})
    assert list(lost) == [0] and lost[0].offsets == 37
    assert _read(engine) == {0: positions.Position("id-1", 0)}  # read from the start
    _record(engine, 0, list(range(3, 40)))
    assert positions.save(engine, TOPIC, "id-1", {0: 40}, NOW, settled={0: [(3, 39)]}) == {}
    assert _ranges(engine) == [(0, "id-0", 0, 2)]
    assert _read(engine) == {0: positions.Position("id-1", 40)}


def test_a_backlog_of_ranges_goes_a_bounded_number_at_a_time_the_work_since_all_at_once(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reviews' findings: a backlog that bridges of a version before the ranges left was
    deleted in one statement, which passed the bridge's statement timeout at every save, and
    nothing was committed again; bounded alone, the deletes fell behind a partition that
    records more ranges than the bound between two saves (a topic whose offsets leave gaps)."""
    monkeypatch.setattr(positions, "PRUNE_BACKLOG_ROWS", 2)
    for offset in range(0, 10, 2):
        _record(engine, 0, [offset])
    left = []
    for _ in range(3):
        positions.save(engine, TOPIC, "id-1", {0: 10}, NOW)
        left.append(len(_ranges(engine)))
    assert left == [3, 1, 0]
    for offset in range(10, 2010, 2):  # a thousand ranges between two saves
        _record(engine, 0, [offset])
    _record(engine, 0, [2010, 2011])
    settled = [(offset, offset) for offset in range(10, 2010, 2)]
    assert positions.save(engine, TOPIC, "id-1", {0: 2010}, NOW, written={0: 10},
                          settled={0: settled}) == {}
    assert _ranges(engine) == [(0, "id-1", 2010, 2011)]


def test_a_batch_records_the_offsets_it_gives_their_fates_in_its_transaction(
        engine: Engine) -> None:
    done = positions.Done(TOPIC, "id-1", 4, [7, 8, 9, 11])
    apply_batch(engine, received(user_created("u-1", event_id="e-1")), [], done=done)
    assert _ranges(engine) == [(4, "id-1", 7, 9), (4, "id-1", 11, 11)]
    # Ranges the database refuses take the batch's fates with them: neither is without the other.
    refused = positions.Done(TOPIC, None, 4, [12])  # type: ignore[arg-type]  # NOT NULL
    with pytest.raises(IntegrityError):
        apply_batch(engine, received(user_created("u-2", event_id="e-2")), [], done=refused)
    with engine.connect() as conn:
        assert conn.execute(select(applied_events.c.event_id)).scalars().all() == ["e-1"]
    assert _ranges(engine) == [(4, "id-1", 7, 9), (4, "id-1", 11, 11)]


# The most parameters a statement may have on every database the project supports: SQLite
# before 3.32 (999; SQL Server's bound is 2,100).
PARAMETERS_MAX = 999


def test_a_topic_of_thousands_of_partitions_is_read_and_saved_in_statements_every_database_takes(
        engine: Engine) -> None:
    """One bridge holding 3,000 partitions: every statement of `save` and `rewinds` stays under
    the parameters every database takes, and what they find is the same as for a few
    partitions.
    (Before: a parameter per partition in the positions' read, two and an `OR` per partition
    in the check of the ranges. Past about a thousand partitions SQL Server would have refused
    every save, and SQLite, the embedded default, did: "Expression tree is too large (maximum
    depth 1000)". The bridge committed nothing again.)"""
    partitions = range(3000)
    widest: list[int] = []

    def count(_conn: object, _cursor: object, _statement: str, parameters: Any,
              _context: object, executemany: bool) -> None:
        rows = parameters if executemany else [parameters]
        widest.append(max((len(row) for row in rows), default=0))

    event.listen(engine, "before_cursor_execute", count)
    try:
        assert positions.save(engine, TOPIC, "id-1", dict.fromkeys(partitions, 10), NOW) == {}
        for partition in partitions:
            if partition != 2999:  # the last partition's work since its position is lost
                _record(engine, partition, [10, 11])
        lost = positions.save(engine, TOPIC, "id-1", dict.fromkeys(partitions, 12), NOW,
                              written=dict.fromkeys(partitions, 10),
                              settled={partition: [(10, 11)] for partition in partitions})
        behind, kept = positions.rewinds(engine, TOPIC, "id-1", dict.fromkeys(partitions, 12))
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert {p: loss.offsets for p, loss in lost.items()} == {2999: 2}
    assert kept == {**dict.fromkeys(partitions, 12), 2999: 10}
    assert set(behind) == {2999} and behind[2999].offset == 10
    assert _ranges(engine) == []  # the positions vouch for the work below them now
    assert max(widest) <= PARAMETERS_MAX
