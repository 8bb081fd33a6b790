"""The status view from what the processes said (`eventpipe.status.assemble`), the problems it
names, its terminal rendering, and what a worker says (`tasks.heartbeat`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from eventpipe.status import BRIDGE, WORKER, DlqStatus, Member, assemble, render, spans
from tasks.heartbeat import Heartbeat

AT = datetime(2026, 12, 4, 1, 0, tzinfo=UTC)
NO_DLQ = DlqStatus(open=0, in_stream=0, by_error_class={}, by_event_type={})


def bridge(name: str, age_s: float, **partitions: dict[str, Any]) -> Member:
    return Member(BRIDGE, name, age_s, {"partitions": {k.removeprefix("p"): v
                                                       for k, v in partitions.items()}})


def worker(name: str, queues: list[int], served: dict[str, float] | None = None,
           rates: dict[str, float] | None = None, age_s: float = 0.5) -> Member:
    return Member(WORKER, name, age_s, {"queues": queues, "served": served or {},
                                        "rates": rates or {}})


def test_each_partition_joins_the_bridges_word_the_workers_and_the_queue_measured() -> None:
    members = [
        bridge("b:1", 0.2, p0={"committed": 90, "highWatermark": 100, "inFlight": 10,
                               "paused": False, "queued": 3},
               p1={"committed": 5, "highWatermark": 5, "inFlight": 0, "paused": True,
                   "queued": 0}),
        worker("w:1", [0], served={"0": 1.5}, rates={"OrderPlaced": 10.0}),
        worker("w:2", [1], served={"0": 0.1, "1": 4.0},
               rates={"OrderPlaced": 2.5, "UserCreated": 1.0}, age_s=2.0),
    ]
    status = assemble(AT, "events", "g", 2, members, {0: 7}, NO_DLQ)
    first, second = status.partitions
    assert (first.committed, first.high_watermark, first.lag, first.in_flight) == (90, 100, 10, 10)
    assert first.queued == 7  # measured now, rather than the bridge's last look (3)
    assert second.queued == 0 and second.paused is True and second.lag == 0
    assert first.workers == ["w:1"] and second.workers == ["w:2"]
    # The latest batch wins, ages counted from now: w:1 1.5+0.5 s ago, w:2 0.1+2.0 s ago.
    assert (first.last_batch_by, first.last_batch_ago_s) == ("w:1", 2.0)
    assert (second.last_batch_by, second.last_batch_ago_s) == ("w:2", 6.0)
    assert status.events_per_second == {"OrderPlaced": 12.5, "UserCreated": 1.0}
    assert [(w.name, w.events_per_second) for w in status.workers] == [("w:1", 10.0),
                                                                       ("w:2", 3.5)]
    assert status.bridges[0].partitions == [0, 1] and status.problems == []


def test_the_freshest_bridge_speaks_for_a_partition_two_bridges_report() -> None:
    members = [bridge("old:1", 8.0, p0={"committed": 1}),
               bridge("new:2", 0.5, p0={"committed": 2})]
    status = assemble(AT, "events", "g", 1, [*members, worker("w:1", [0])], {}, NO_DLQ)
    assert (status.partitions[0].bridge, status.partitions[0].committed) == ("new:2", 2)


def test_the_problems_an_operator_must_act_on_are_named() -> None:
    assert assemble(AT, "t", "g", 3, [], {}, NO_DLQ).problems == [
        "no bridge is running: nothing is read from Kafka",
        "no worker is running: no event is applied"]
    members = [bridge("b:1", 0.1, p0={}, p1={}),
               worker("w:1", [0, 1]), worker("w:2", [1])]
    assert assemble(AT, "t", "g", 4, members, {}, NO_DLQ).problems == [
        "partitions 2-3 are read by no bridge",
        "partitions 2-3 are consumed by no worker: their events wait in the queue",
        "partition 1 is consumed by 2 workers (w:1, w:2): its batches may be applied out of "
        "order"]


def test_why_a_partition_is_paused_and_what_retention_took_are_shown_and_named() -> None:
    """Before: a paused partition said only "paused" (backpressure, draining an earlier
    reading's tasks, a refused batch and a new assignment looked alike), and events lost to
    Kafka's retention were in the bridge's log and metrics alone."""
    members = [bridge("b:1", 0.5,
                      p0={"paused": True, "pausedFor": "draining", "lost": 0, "skipped": 0},
                      p1={"paused": True, "pausedFor": "broker"},
                      p2={"paused": True, "pausedFor": "broker", "lost": 1200,
                          "lostAgoS": 3599.0, "skipped": 0},
                      p3={"paused": False, "lost": 7, "lostAgoS": 3600.0, "skipped": 4},
                      p4={"paused": True, "pausedFor": "assigning", "pausedS": 59.5},
                      p5={"paused": True, "pausedFor": "assigning", "pausedS": 60.0},
                      p6={"paused": True, "pausedFor": "assigning", "pausedS": 80.0}),
               worker("w:1", [0, 1, 2, 3, 4, 5, 6])]
    status = assemble(AT, "t", "g", 7, members, {}, NO_DLQ)
    assert [(p.paused_for, p.lost, p.lost_ago_s, p.skipped) for p in status.partitions[:4]] == [
        ("draining", 0, None, 0), ("broker", None, None, None), ("broker", 1200, 3599.5, 0),
        (None, 7, 3600.5, 4)]
    assert [p.paused_s for p in status.partitions[4:]] == [60.0, 60.5, 80.5]
    assert status.problems == [
        # Still being assigned after a minute: something the bridge asks does not answer.
        "partitions 5-6 are not read for over 60 s since assigned: the bridge cannot learn the "
        "committed offsets or the topic's id from Kafka, what the database holds of them, or "
        "clear the offset ledger in Redis (its log says which)",
        "partitions 1-2 are paused: the Celery broker refused their batches (is it up, or "
        "full?)",
        "partition 2: 1,200 event(s) lost, the last within the hour: Kafka's retention deleted "
        "them before the bridge read them, and no task applied them (the bridge's log line "
        "'events lost' names their offsets)",
        # Lost over an hour ago: left to the alert's history, not a problem for ever.
        "partition 3: 4 offset(s) skipped below the start of Kafka's log (deleted by its "
        "retention): lost unless a task sent before applies them, counted once none can"]
    rows = {line.split()[0]: line for line in render(status).splitlines()
            if line[:1].isdigit()}
    assert "draining" in rows["0"] and "broker" in rows["1"]
    assert "paused" not in rows["3"]


def test_spans_spell_partitions_as_the_partitions_option_reads_them() -> None:
    assert spans([7, 0, 1, 2, 2, 4, 5]) == "0-2,4-5,7"
    assert spans([]) == "" and spans([3]) == "3"


def test_the_terminal_view_shows_every_partition_and_the_problems() -> None:
    dlq = DlqStatus(open=2, in_stream=2, by_error_class={"InvalidEvent": 2},
                    by_event_type={"unknown": 2})
    status = assemble(AT, "events", "g", 2, [bridge("b:1", 0.2, p0={"committed": 1200})],
                      {}, dlq)
    text = render(status)
    assert "problem: no worker is running: no event is applied" in text
    assert "problem: partition 1 is read by no bridge" in text
    assert "1,200" in text and "dead letters: 2 open (2 in the stream): InvalidEvent 2" in text
    rows = [line for line in text.splitlines() if line.lstrip()[:1].isdigit()]
    assert [row.split()[0] for row in rows] == ["0", "1"]


def test_the_terminal_view_forges_no_line_and_acts_on_no_escape_from_the_board() -> None:
    """Before: names and error classes read from Redis (the status board, the DLQ) were
    printed as they were: a newline forged a line of `eventpipe status`, an escape sequence
    acted on the operator's terminal (a review's finding)."""
    forged = "w:1\nproblem: none\x1b[2J"
    dlq = DlqStatus(open=1, in_stream=1, by_error_class={"Bad\nclass": 1},
                    by_event_type={"unknown": 1})
    members = [bridge(forged, 0.2, p0={"committed": 1}),
               worker(forged, [0], served={"0": 1.0}, rates={"Odd\ntype": 1.0})]
    text = render(assemble(AT, "events", "g", 1, members, {}, dlq))
    assert "\x1b" not in text and "\nproblem: none" not in text and "\nclass" not in text
    assert text.count("\n") == render(assemble(AT, "events", "g", 1, [
        bridge("b:1", 0.2, p0={"committed": 1}),
        worker("w:1", [0], served={"0": 1.0}, rates={"T": 1.0})], {}, dlq)).count("\n")
    assert "w:1\\nproblem: none\\x1b[2J" in text


def test_a_worker_says_what_it_consumes_and_how_long_ago_it_served_each_partition() -> None:
    now = [100.0]
    heartbeat = Heartbeat(board=None, name="w:1",  # type: ignore[arg-type]  # not published
                          queues=lambda: ["events.p3", "celery", "events.p1"],
                          rates=lambda: {"OrderPlaced": 4.0, "UserCreated": 0.0},
                          clock=lambda: now[0])
    heartbeat.served(3)
    now[0] = 102.5
    heartbeat.served(1)
    now[0] = 103.0
    assert heartbeat.said() == {"queues": [1, 3], "served": {"1": 0.5, "3": 3.0},
                                "rates": {"OrderPlaced": 4.0}}


def test_a_worker_with_tasks_waiting_and_no_batch_for_minutes_is_named() -> None:
    members = [bridge("b:1", 0.1, p0={"committed": 5, "queued": 3}),
               worker("w:1", [0], served={"0": 300.0})]
    [problem] = assemble(AT, "t", "g", 1, members, {}, NO_DLQ).problems
    assert problem == "partition 0 has 3 task(s) queued and no batch for 300 s: is w:1 stuck?"


def test_entries_no_version_of_the_code_wrote_are_dropped_field_by_field() -> None:
    from eventpipe.status import _member

    now = 1000.0
    assert _member("worker w:1", "not-a-time {}", now) is None
    assert _member("worker w:1", "999 [1, 2]", now) is None
    assert _member("gardener g:1", "999 {}", now) is None
    odd = _member("worker w:1", '999.5 {"queues": null, "served": {"0": "x", "1": 2.5}, '
                  '"rates": {"OrderPlaced": -1, "UserCreated": 3}}', now)
    assert odd == Member(WORKER, "w:1", 0.5, {"queues": [], "served": {"1": 2.5},
                                              "rates": {"UserCreated": 3}})
    skewed = _member("bridge b:1", '999 {"partitions": {"0": {"committed": "5", '
                     '"highWatermark": 9, "paused": "no", "pausedFor": "tired", "lost": -1, '
                     '"extra": 1}, "1": {"pausedFor": [], "lostAgoS": Infinity, '
                     f'"inFlight": {10**400}, "queued": NaN, "unreadableWhy": "{"x" * 501}", '
                     '"unreadableAt": -5, "stuckS": -1}, "x": {}}}', now)
    assert skewed is not None and skewed.said == {"partitions": {"0": {"highWatermark": 9},
                                                                 "1": {}}}
    # What is left is enough for the view, never a crash.
    assemble(AT, "t", "g", 2, [odd, skewed], {}, NO_DLQ)


def test_a_partition_kafka_hands_nothing_of_while_holding_more_is_named() -> None:
    """A review's finding: a record batch the Kafka client cannot read and says nothing of
    (a record cut short: it grows its fetches, silently) stalled its partition with no word
    in the status; one it cannot hand over, whose end the bridge cannot find, likewise."""
    why = "Decompression (codec 0x1) of message at 5 failed (_BAD_COMPRESSION)"
    members = [bridge("b:1", 0.5,
                      p0={"committed": 3, "highWatermark": 9, "stuckS": 130.0},
                      p1={"committed": 5, "highWatermark": 9, "stuckS": 121.0,
                          "unreadableAt": 5, "unreadableWhy": why},
                      p2={"committed": 5, "highWatermark": 9, "stuckS": 100.0}),
               worker("w:1", [0, 1, 2])]
    status = assemble(AT, "t", "g", 3, members, {}, NO_DLQ)
    assert [(p.stuck_s, p.unreadable_at) for p in status.partitions] == [
        (130.5, None), (121.5, 5), (100.5, None)]
    assert status.problems == [
        "partition 0: Kafka holds messages up to offset 8 but has handed none over for 130 s: "
        "a message larger than the consumer may fetch, or a record batch the Kafka client "
        "cannot read? (docs/operations.md)",
        "partition 1: Kafka holds messages up to offset 8 but has handed none over for 122 s: "
        f"it cannot hand over the record batch at offset 5 ({why}), whose end it does not say"]


def test_a_partition_whose_events_in_flight_none_of_which_is_done_is_named() -> None:
    """A review's finding: one key of the offset ledger of another kind (a hand edit) kept
    every partition's commits still while `eventpipe status` said there was no problem; so
    does a database that fails every batch. Whatever the cause, events in flight of which
    none was done for so long is the operator's to look at."""
    members = [bridge("b:1", 0.5,
                      p0={"committed": 3, "highWatermark": 90, "inFlight": 40, "stalledS": 130.0},
                      p1={"committed": 5, "highWatermark": 9, "inFlight": 4, "stalledS": 100.0}),
               worker("w:1", [0, 1])]
    status = assemble(AT, "t", "g", 2, members, {}, NO_DLQ)
    assert [p.stalled_s for p in status.partitions] == [130.5, 100.5]
    assert status.problems == [
        "partition 0: 40 event(s) in flight and none done for 130 s: their batches fail again "
        "and again (the database?), or the offset ledger in Redis cannot be read (the workers' "
        "and the bridge's logs say which)"]


def test_what_the_bridges_read_beyond_this_hosts_settings_is_shown_and_named() -> None:
    """A review's finding: `eventpipe status` with KAFKA_PARTITIONS=2 (a stale `.env`) showed
    2 of the 4 partitions a bridge read, and with another KAFKA_TOPIC labelled the bridge's
    figures with that topic, saying "no problems" both times."""
    reading = Member(BRIDGE, "b:1", 0.5, {"topic": "orders", "partitions": {
        str(p): {"committed": 5, "highWatermark": 5} for p in range(4)}})
    status = assemble(AT, "orders", "g", 2, [reading, worker("w:1", [0, 1, 2, 3])], {},
                      NO_DLQ)
    assert [p.partition for p in status.partitions] == [0, 1, 2, 3]
    assert status.problems == [
        "bridge b:1 reads partitions 2-3, beyond KAFKA_PARTITIONS=2 here: set it to the "
        "topic's count"]
    elsewhere = assemble(AT, "events", "g", 4, [reading, worker("w:1", [0, 1, 2, 3])], {},
                         NO_DLQ)
    assert elsewhere.problems == [
        "bridge b:1 reads topic 'orders', not KAFKA_TOPIC='events' as here: the figures are "
        "its topic's"]
    from eventpipe.status import _member

    one = Member(BRIDGE, "b:2", 0.5, {"partitions": {"2": {"committed": 5}}})
    assert assemble(AT, "orders", "g", 2, [one], {}, NO_DLQ).problems[0].startswith(
        "bridge b:2 reads partition 2, beyond KAFKA_PARTITIONS=2 here")
    said = _member("bridge b:2", '999 {"topic": "orders", "partitions": {}}', 1000.0)
    assert said is not None and said.said["topic"] == "orders"
    assert _member("bridge b:3", '999 {"topic": 5, "partitions": {}}', 1000.0) == Member(
        BRIDGE, "b:3", 1.0, {"partitions": {}})
