"""A database that lost work Kafka counts as done: restored from a backup, or lost and made
anew. Kafka's committed offsets are past messages the database no longer holds; the bridge
reads them again (`eventpipe.positions`), and the database ends as if it had lost nothing.
Real parts: Tansu, the bridge and worker processes, Redis, SQLite and PostgreSQL.
"""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path
from typing import Any

from eventpipe.migrations import create_database_if_missing, upgrade
from eventpipe.samples import Document
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
