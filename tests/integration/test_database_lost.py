"""A database that lost work Kafka counts as done: restored from a backup, lost and made
anew, or failed over under running bridges. Kafka's committed offsets, or the ledger's marks,
are past messages the database no longer holds; the bridge reads them again
(`eventpipe.positions`), and the database ends as if it had lost nothing.
Real parts: Tansu, the bridge and worker processes, Redis, SQLite and PostgreSQL.
"""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import text

from eventpipe.migrations import create_database_if_missing, upgrade
from eventpipe.samples import Document
from eventpipe.tables import kafka_positions, metadata
from tests.support.databases import drop_database
from tests.support.model import expected_state, stored_state
from tests.support.pipeline import Pipeline, assert_state, drained, stream, wait_until

POISON: list[tuple[str | bytes | None, bytes | Document]] = [
    (b"junk-1", b"{not json"), (b"junk-2", b'{"eventType": "Nope"}')]


def caught_up(pipeline: Pipeline, documents: list[Document], sent: int) -> None:
    """Wait until the database holds what the events make and every offset is committed."""
    expected = expected_state(documents)
    ends = pipeline.end_offsets()
    assert sum(ends.values()) == sent
    wait_until(lambda: pipeline.committed_offsets() == ends
               and stored_state(pipeline.engine) == expected, 120,
               "the database to hold every event again")


def test_a_database_restored_from_a_backup_gets_back_what_it_lost(
        make_pipeline: Any, tmp_path: Path) -> None:
    database = tmp_path / "pipeline.db"
    pipeline: Pipeline = make_pipeline(database_url=f"sqlite:///{database}")
    messages = stream(3000, seed=131)
    worker, bridge = pipeline.start_worker(), pipeline.start_bridge()
    sent = pipeline.send(messages[:2000])
    wait_until(lambda: pipeline.applied_count() > 600, 60, "some events applied")
    # Online, while batches commit: a consistent snapshot, as a backup tool takes one.
    backup = tmp_path / "backup.db"
    with sqlite3.connect(database) as live, sqlite3.connect(backup) as copy:
        live.backup(copy)
    sent += pipeline.send([*messages[2000:], *POISON])
    drained(pipeline, sent)
    assert len(pipeline.dead_letters()) == len(POISON)

    for process in (bridge, worker):
        assert pipeline.stop(process) == 0
    pipeline.engine.dispose()
    for leftover in (Path(f"{database}-wal"), Path(f"{database}-shm")):
        leftover.unlink(missing_ok=True)
    backup.replace(database)
    assert pipeline.applied_count() < len(messages)  # the restored database lacks events

    pipeline.start_worker(name="worker-2")
    pipeline.start_bridge(name="bridge-2")
    caught_up(pipeline, [doc for _, doc in messages], sent)
    assert_state(pipeline, [doc for _, doc in messages])
    assert len(pipeline.dead_letters()) == len(POISON)
    said = pipeline.log_of("bridge-2").read_text()
    assert "the database lacks messages Kafka counts as done" in said


def test_a_database_lost_and_made_anew_gets_the_whole_topic_again(make_pipeline: Any) -> None:
    pipeline: Pipeline = make_pipeline()
    messages = stream(1500, seed=137)
    worker, bridge = pipeline.start_worker(), pipeline.start_bridge()
    sent = pipeline.send(messages)
    drained(pipeline, sent)

    for process in (bridge, worker):
        assert pipeline.stop(process) == 0
    pipeline.engine.dispose()
    drop_database(pipeline.database_url)
    create_database_if_missing(pipeline.database_url)
    upgrade(pipeline.database_url)  # `eventpipe migrate`: an empty database
    assert pipeline.applied_count() == 0

    pipeline.start_worker(name="worker-2")
    pipeline.start_bridge(name="bridge-2")
    caught_up(pipeline, [doc for _, doc in messages], sent)
    assert_state(pipeline, [doc for _, doc in messages])
    said = pipeline.log_of("bridge-2").read_text()
    assert "the database holds none of its messages" in said


def test_a_sqlite_file_replaced_under_a_worker_stops_it_and_loses_nothing(
        make_pipeline: Any, tmp_path: Path) -> None:
    """The adversarial tester's finding: under `eventpipe up`, the SQLite file replaced by a
    new one (deleted, `eventpipe migrate`), the bridge stopped as it should and was started
    again, read the topic again into the new file, but the workers applied it into the file
    they had open, and marked it done: the new file's first position passed every event,
    none of which it held. A worker now looks at the file before each batch: another in its
    place, it stops (exit 70) and its successor applies into the new file. (The bridge's
    first position is checked too: `test_bridge_reading`.)"""
    database = tmp_path / "pipeline.db"
    pipeline: Pipeline = make_pipeline(database_url=f"sqlite:///{database}")
    messages = stream(400, seed=139)
    worker, bridge = pipeline.start_worker(), pipeline.start_bridge()
    # One that takes no batch, and runs reconciler rounds all the same (a review's finding).
    idle = pipeline.start_worker([pipeline.partitions], name="idle-worker")
    sent = pipeline.send(messages[:200])
    drained(pipeline, sent)
    wait_until(lambda: " ready." in pipeline.log_of("idle-worker").read_text(), 60,
               "the idle worker to start")
    assert pipeline.stop(bridge) == 0  # as it stops by itself on the file replaced
    pipeline.engine.dispose()
    fresh = tmp_path / "fresh.db"
    upgrade(f"sqlite:///{fresh}")  # `eventpipe migrate` of a new file
    for leftover in (Path(f"{database}-wal"), Path(f"{database}-shm")):
        leftover.unlink(missing_ok=True)
    fresh.replace(database)

    pipeline.start_bridge(name="bridge-2")
    sent += pipeline.send(messages[200:])
    wait_until(lambda: worker.poll() is not None and idle.poll() is not None, 60,
               "the workers to stop")
    assert (worker.returncode, idle.returncode) == (70, 70)
    for name in ("worker", "idle-worker"):
        assert f"the database file {database} was deleted or replaced while this worker ran" \
            in pipeline.log_of(name).read_text()
    pipeline.start_worker(name="worker-2")
    caught_up(pipeline, [doc for _, doc in messages], sent)
    assert_state(pipeline, [doc for _, doc in messages])


def test_a_bridge_stopped_and_started_again_reads_nothing_again(make_pipeline: Any) -> None:
    """The positions follow Kafka's commits: a database that lost nothing is never taken for
    one that did."""
    pipeline: Pipeline = make_pipeline()
    messages = stream(1000, seed=139)
    worker, bridge = pipeline.start_worker(), pipeline.start_bridge()
    sent = pipeline.send(messages)
    drained(pipeline, sent)
    assert pipeline.stop(bridge, signal.SIGKILL) == -signal.SIGKILL
    pipeline.start_bridge(name="bridge-2")
    wait_until(lambda: "partitions assigned" in pipeline.log_of("bridge-2").read_text(), 60,
               "the second bridge given the partitions")
    sent += pipeline.send(messages[:10])  # duplicates: the bridge is reading
    drained(pipeline, sent)
    said = pipeline.log_of("bridge-2").read_text()
    assert "the database lacks messages" not in said
    assert "the database holds none" not in said
    pipeline.stop(worker)


def test_a_failover_that_lost_only_work_since_the_last_position_is_read_again(
        make_pipeline: Any) -> None:
    """A failover promotes a replica that holds the bridge's last position and the work below
    it, not the batches the workers committed since, which the offset ledger in Redis still
    says done. (Before: the running bridge found its position where it had left it, and
    committed past those batches: the database never held them.) The ranges of offsets each
    batch records with its fates are missing: the bridge reads them again.

    PostgreSQL. The bridge cannot record a position while the test holds `kafka_positions`
    locked: the database at the lock is the replica, what workers commit after it is what
    the failover loses, and its end (every other table put back as it was) is the failover."""
    pipeline: Pipeline = make_pipeline()
    messages = stream(2000, seed=149)
    worker, bridge = pipeline.start_worker(), pipeline.start_bridge()
    sent = pipeline.send(messages[:1000])
    drained(pipeline, sent)
    held = pipeline.applied_count()
    tables = [table.name for table in metadata.sorted_tables if table is not kafka_positions]
    with pipeline.engine.connect() as replica:
        replica.execute(text("LOCK TABLE kafka_positions IN EXCLUSIVE MODE"))
        for name in tables:
            replica.execute(text(f"CREATE TABLE replica_{name} AS TABLE {name}"))
        sent += pipeline.send(messages[1000:])
        everything = len({doc["eventId"] for _, doc in messages})
        wait_until(lambda: pipeline.applied_count() == everything, 60,
                   "the rest applied, on the primary")
        replica.execute(text(f"TRUNCATE {', '.join(tables)}"))
        for name in tables:
            replica.execute(text(f"INSERT INTO {name} SELECT * FROM replica_{name}"))
            replica.execute(text(f"DROP TABLE replica_{name}"))
        replica.commit()
    assert pipeline.applied_count() == held  # the database lacks what came after the lock

    caught_up(pipeline, [doc for _, doc in messages], sent)
    assert_state(pipeline, [doc for _, doc in messages])
    said = pipeline.log_of("bridge").read_text()
    assert "the database lost work this bridge took for done" in said
    assert "the workers recorded as done since its position" in said
    for process in (bridge, worker):
        assert pipeline.stop(process) == 0
