"""The dead-letter queue: the SQL record, its Redis stream, restore, replay and purge.

Real Redis (the machine's, keys of its own per test), real SQLite and PostgreSQL, a real
Kafka for replays and for fetching lost bytes.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import pytest
import redis
import sqlalchemy.exc
from confluent_kafka import KafkaError
from prometheus_client import REGISTRY
from sqlalchemy import Engine, delete, select

import tasks.reconciler
from cli.dlq import left_out, not_shown
from eventpipe import metrics, trace
from eventpipe.apply import apply_batch
from eventpipe.dlq import actions, projection, records
from eventpipe.dlq.letter import INVALID_EVENT, OPEN, REPLAYED, REPLAYING, DeadLetter, message_key
from eventpipe.dlq.stream import DeadLetterQueueFull, DeadLetterStream, Filter, StreamEntry
from eventpipe.effects import Position
from eventpipe.errors import TransientError
from eventpipe.events import MAX_MESSAGE_BYTES
from eventpipe.kafka import MessageReader
from eventpipe.messages import RawMessage
from eventpipe.samples import user_created
from eventpipe.settings import Settings
from eventpipe.tables import dead_letter_messages, dead_letters
from tasks.reconciler import Reconciler
from tests.support.broker import TopicFactory, consume, make_consumer, produce, settings_for
from tests.support.factories import T0, dead_letter, received


@pytest.fixture
def stream(redis_client: redis.Redis) -> Iterator[DeadLetterStream]:
    name = f"test:dlq:{uuid.uuid4().hex}"
    yield DeadLetterStream(redis_client, name, max_entries=5, max_bytes=10_000)
    redis_client.delete(name, f"{name}:index", f"{name}:totals", f"{name}:intact")


def failure(offset: int, value: bytes, topic: str = "events") -> DeadLetter:
    return DeadLetter(dlq_key=message_key(b"k", value), error_class=INVALID_EVENT,
                      reason="value: malformed JSON", first_failure_at=T0, last_failure_at=T0,
                      worker="host:1", position=Position(topic, 0, offset))


def record(engine: Engine, *letters: DeadLetter) -> list[DeadLetter]:
    return apply_batch(engine, [], letters).dead_letters


# -- the stream --------------------------------------------------------------------------------


def test_an_entry_keeps_all_its_context(stream: DeadLetterStream) -> None:
    entry_id = stream.put(dead_letter(7, value=b"\xff raw"))
    stored = stream.get(entry_id)
    assert stored == dead_letter(7, value=b"\xff raw") and stored.entry_id == entry_id
    assert stream.get("0-1") is None and stream.get("not an id") is None


def test_one_entry_per_dlq_key_the_latest_failure_replaces_it(stream: DeadLetterStream) -> None:
    first = stream.put(dead_letter(1))
    entry = dead_letter(1)
    again = stream.put(replace(entry, letter=replace(entry.letter, attempts=2)))
    assert again != first and stream.depth() == 1
    moved = stream.get(again)
    assert moved is not None and moved.letter.attempts == 2 and stream.get(first) is None


def test_the_bounds_in_entries_and_bytes_refuse_loudly_and_drop_nothing(
    stream: DeadLetterStream, caplog: pytest.LogCaptureFixture,
) -> None:
    for offset in range(5):
        stream.put(dead_letter(offset))
    assert "near its bound" in caplog.text
    with pytest.raises(DeadLetterQueueFull) as caught:
        stream.put(dead_letter(99))
    assert isinstance(caught.value, TransientError)
    assert stream.depth() == 5
    # The entry refused is counted as what it would make, not as what the stream holds.
    assert "is full: this entry would make it 6 entries" in str(caught.value)
    stream.put(dead_letter(4))  # replacing an entry adds none
    for offset in range(5):
        stream.remove(dead_letter(offset).letter.dlq_key)
    assert stream.depth() == 0 and stream.size_bytes() == 0


def test_a_message_larger_than_the_whole_dlq_enters_without_its_bytes(
    engine: Engine, stream: DeadLetterStream,
) -> None:
    """It could never enter with them, and the dead letters after it would wait behind it
    for good: it is shown (and can be purged) without them; the next ones follow."""
    huge = b"{" + b"x" * 20_000
    saved = record(engine, failure(0, huge), *(failure(n, f"{{bad {n}".encode())
                                               for n in (1, 2)))
    payloads = {letter.dlq_key: RawMessage(b"k", huge if letter.position.offset == 0 else
                                 f"{{bad {letter.position.offset}".encode()) for letter in saved}
    assert projection.project(engine, stream, None, payloads).put == 3
    entries = {entry.letter.position.offset: entry for entry in stream.scan()}
    assert entries[0].value is None and entries[0].key == b"k"
    assert (entries[1].value, entries[2].value) == (b"{bad 1", b"{bad 2")
    assert stream.size_bytes() < 10_000
    assert actions.purge(engine, stream, [entries[0]]).deleted == 1


def test_the_byte_bound_counts_text_in_bytes(stream: DeadLetterStream) -> None:
    """A reason of 3,300 three-byte characters is 9,900 bytes of the 10,000 the stream takes:
    with the rest of the entry, more than the bound."""
    entry = dead_letter(1)
    wide = replace(entry, letter=replace(entry.letter, reason="鍵" * 3300))
    with pytest.raises(DeadLetterQueueFull):
        stream.put(wide)
    entry_id = stream.put(replace(entry, letter=replace(entry.letter, reason="鍵" * 1000)))
    [(_, fields)] = cast(Any, stream.client.xrange(stream.stream, entry_id, entry_id))
    assert stream.size_bytes() == sum(len(name) + len(value) for name, value in fields.items())


def test_filters_and_pagination(stream: DeadLetterStream) -> None:
    stream.put(dead_letter(1, "OrderPlaced", "InvalidEvent"))
    stream.put(dead_letter(2, "UserCreated", "EmailTaken"))
    stream.put(dead_letter(3, "OrderPlaced", "MissingParent"))
    assert [e.letter.position.offset
            for e in stream.page(Filter(event_type="OrderPlaced")).entries] == [1, 3]
    assert [e.letter.position.offset
            for e in stream.page(Filter(error_class="EmailTaken")).entries] == [2]
    first = stream.page(limit=2)
    rest = stream.page(after=first.entries[-1].entry_id)
    assert first.more and not rest.more
    assert [e.letter.position.offset for e in first.entries + rest.entries] == [1, 2, 3]


def test_a_page_of_large_messages_stops_at_its_bytes_and_says_more_follow(
    stream: DeadLetterStream,
) -> None:
    """A review's finding: a page was bounded by its count alone, and 50 large poison
    messages made a listing of 32 MB. Past `max_bytes` the page ends; the next goes on."""
    for offset in range(4):
        stream.put(dead_letter(offset, value=b"x" * 1000))
    page = stream.page(limit=10, max_bytes=2500)
    assert [e.letter.position.offset for e in page.entries] == [0, 1] and page.more
    alone = stream.page(limit=10, max_bytes=10)  # the first whatever its size
    assert len(alone.entries) == 1 and alone.more
    rest = stream.page(after=page.entries[-1].entry_id, limit=10, max_bytes=2500)
    assert [e.letter.position.offset for e in rest.entries] == [2, 3] and not rest.more


@pytest.mark.parametrize("fresh_only", [False, True])
def test_a_selection_takes_each_letter_that_was_in_the_dlq_when_it_began_once(
    stream: DeadLetterStream, fresh_only: bool,
) -> None:
    """A replay or a purge of a filter or `--all` reads the stream as it goes, chunk by
    chunk, for minutes on a large DLQ. A letter in the DLQ when it began and put in the
    stream again meanwhile (a rebuild; a claim given back, its revision changed and its last
    failure not) enters it anew at its end: it is still selected, once. So is one that failed
    again meanwhile, but by a replay (a review's finding: two replays at once published it
    twice, the second its copy that failed after the first's): a replay passes it over and
    counts it, left for a later replay, as the API's replays leave it. One that failed only
    after the call began is not selected, nor one it already took that came back."""
    stream.max_entries = 2_000
    stream.max_bytes = 10**7
    offsets = range(1, 1_201)  # more than the stream is read at once
    for offset in offsets:
        stream.put(dead_letter(offset))
    selection = actions.UntilNow(stream, Filter(), fresh_only=fresh_only)
    selected = iter(selection)
    taken = [next(selected)]

    def changed(offset: int, *, failed: bool) -> StreamEntry:
        entry = dead_letter(offset)
        when = datetime.now(UTC) + timedelta(seconds=1) if failed else \
            entry.letter.last_failure_at
        return replace(entry, letter=replace(entry.letter, last_failure_at=when,
                                             attempts=2 if failed else 1, revision=2))

    stream.put(dead_letter(1_100))  # put again as it was, before the call came to it
    stream.put(changed(1_050, failed=False))  # a claim given back
    stream.put(changed(1_000, failed=True))  # failed again before the call came to it
    stream.put(changed(1, failed=True))  # taken already, and failed again after its replay
    stream.put(dead_letter(5_000))  # failed for the first time after the call began
    taken += list(selected)
    left = [1_000] if fresh_only else []
    assert sorted(entry.letter.position.offset or 0 for entry in taken) == [
        offset for offset in offsets if offset not in left]
    assert selection.passed_over == len(left)


def test_since_and_until_select_by_when_the_letter_failed_whenever_it_entered_the_stream(
    engine: Engine, stream: DeadLetterStream,
) -> None:
    """Entries put in the stream now, as a rebuild after Redis lost it puts them, of letters
    that failed a week ago: a filter on the last hour picks none of them, one until
    yesterday all, and a purge of the last hour deletes nothing."""
    week_ago = datetime.now(UTC) - timedelta(days=7)
    saved = record(engine, *(replace(failure(n, f"{{bad {n}".encode()), first_failure_at=week_ago,
                                     last_failure_at=week_ago + timedelta(seconds=n))
                             for n in range(3)))
    projection.restore(engine, stream, lambda position: RawMessage(b"k", b"{bad"))
    assert stream.depth() == 3
    last_hour = Filter(since=datetime.now(UTC) - timedelta(hours=1))
    assert list(stream.scan(last_hour)) == []
    until_yesterday = Filter(until=datetime.now(UTC) - timedelta(days=1))
    assert sorted(e.letter.dlq_key for e in stream.scan(until_yesterday)) == sorted(
        letter.dlq_key for letter in saved)
    middle = Filter(since=week_ago + timedelta(seconds=1), until=week_ago + timedelta(seconds=1))
    assert [e.letter.position.offset for e in stream.scan(middle)] == [1]
    assert actions.purge(engine, stream, actions.UntilNow(stream, last_hour)).deleted == 0
    assert stream.depth() == 3


def test_a_rebuilt_stream_lists_the_oldest_failure_first_whatever_failed_again(
    engine: Engine, stream: DeadLetterStream,
) -> None:
    """A review's finding: `eventpipe dlq restore` put the letters that had failed again
    before the others, so the stream, which lists in its own order, no longer showed the
    oldest failure first."""
    hour_ago = datetime.now(UTC) - timedelta(hours=1)

    def failed(offset: int, seconds: int) -> DeadLetter:
        return replace(failure(offset, f"{{bad {offset}".encode()), first_failure_at=hour_ago,
                       last_failure_at=hour_ago + timedelta(seconds=seconds))

    record(engine, failed(0, 0), failed(1, 1), failed(2, 10))
    [again] = record(engine, failed(0, 5))  # the first fails again, between the others
    assert again.revision > 1
    projection.restore(engine, stream, lambda position: RawMessage(b"k", b"{bad"))
    assert [e.letter.position.offset for e in stream.scan()] == [1, 0, 2]


# -- the SQL record is the truth, the stream its projection -------------------------------------


def test_a_failure_is_recorded_in_sql_and_projected_with_its_bytes(
    engine: Engine, stream: DeadLetterStream,
) -> None:
    [saved] = record(engine, failure(4, b"{oops"))
    assert saved.state == OPEN and saved.revision == 1
    done = projection.project(engine, stream, None, {saved.dlq_key: RawMessage(b"k", b"{oops")})
    assert done.put == 1
    [entry] = list(stream.scan())
    assert entry.value == b"{oops" and entry.letter.dlq_key == saved.dlq_key
    with engine.connect() as conn:
        assert records.unprojected(conn, 10) == []


def test_a_workers_projection_says_nothing_of_how_full_the_dlq_is(
    engine: Engine, stream: DeadLetterStream,
) -> None:
    """The API says it, read at each scrape: a worker's figure, set as it last projected,
    stayed after the DLQ emptied, and kept the nearly-full alert on."""
    metrics.DLQ_DEPTH.set(-1)
    metrics.DLQ_BYTES.set(-1)
    [saved] = record(engine, failure(4, b"{oops"))
    assert projection.project(engine, stream, None, {
        saved.dlq_key: RawMessage(b"k", b"{oops")}).put == 1
    assert [REGISTRY.get_sample_value(name) for name in ("dlq_depth", "dlq_bytes")] == [-1, -1]


def test_the_same_message_failing_again_updates_its_dead_letter(engine: Engine) -> None:
    record(engine, failure(4, b"{oops"))
    [again] = record(engine, replace(failure(9, b"{oops"), last_failure_at=T0 + timedelta(1)))
    assert again.attempts == 2 and again.position.offset == 9
    assert again.first_failure_at == T0
    with engine.connect() as conn:
        assert len(conn.execute(select(dead_letters)).all()) == 1


def test_restore_rebuilds_a_lost_stream_from_sql_and_kafka(
    engine: Engine, stream: DeadLetterStream, kafka_broker: str, kafka_topic: TopicFactory,
) -> None:
    """Redis lost its data (issue 9, item 2): the dead letters come back, bytes and all."""
    topic = kafka_topic(partitions=1)
    [at_zero, at_one] = produce(kafka_broker, topic, [(b"k", b"{first", []),
                                                      (b"k", b"{second", [])])
    saved = record(engine, failure(at_zero.offset or 0, b"{first", topic),
                   failure(at_one.offset or 0, b"{second", topic))
    projection.project(engine, stream, None, {letter.dlq_key: RawMessage(b"k", v) for letter, v in
                                              zip(saved, (b"{first", b"{second"), strict=True)})
    stream.client.delete(stream.stream, stream.index, stream.totals)  # FLUSHALL, in effect
    stream.put(dead_letter(77))  # a stray the SQL record does not know
    reader = MessageReader(settings_for(kafka_broker, topic))
    try:
        report = projection.restore(engine, stream, reader.fetch)
    finally:
        reader.close()
    assert (report.put, report.removed, report.missing_bytes) == (2, 1, [])
    assert sorted(e.value or b"" for e in stream.scan()) == [b"{first", b"{second"]


def test_a_listing_says_what_the_stream_lacks_of_the_sql_record(
    engine: Engine, database_url: str, stream: DeadLetterStream,
) -> None:
    """Before: with the stream lost (Redis restarted empty, flushed) and no worker to rebuild
    it, `eventpipe dlq list` said "0 shown, 0 in the queue" over dead letters SQL holds."""
    settings = Settings(database_url=database_url)
    saved = record(engine, failure(0, b"{first"), failure(1, b"{second"))
    assert not_shown(settings, stream).startswith("2 of the 2 open dead letter(s)")
    projection.project(engine, stream, None, {saved[0].dlq_key: RawMessage(b"k", b"{first")})
    assert not_shown(settings, stream).startswith("1 of the 2 open dead letter(s)")
    projection.project(engine, stream, None, {saved[1].dlq_key: RawMessage(b"k", b"{second")})
    assert not_shown(settings, stream) == ""
    with socket.socket() as held:  # a port no server listens on
        held.bind(("127.0.0.1", 0))
        down = f"postgresql+psycopg://postgres@127.0.0.1:{held.getsockname()[1]}/x"
        assert not_shown(replace(settings, database_url=down), stream).startswith(
            "not compared with the SQL record of dead letters: ")


def test_a_lost_stream_comes_back_with_its_bytes_after_kafkas_retention_passed(
    engine: Engine, stream: DeadLetterStream, kafka_topic: TopicFactory,
) -> None:
    """A review's finding: the SQL record of a dead letter held no bytes. Once Kafka's
    retention had passed its offset, a Redis that lost the stream lost the only copy: the
    letter came back without its message, and could not be replayed. SQL keeps the message
    the stream first showed; a rebuild and a replay read it there before Kafka."""
    topic = kafka_topic(partitions=1)
    headers = (("trace", b"\xff\x00"), ("empty", None))
    first, tombstone = failure(1, b"{first", topic), failure(0, b"", topic)
    record(engine, first, tombstone)
    payloads = {first.dlq_key: RawMessage(b"k", b"{first", headers),
                tombstone.dlq_key: RawMessage(b"k", None)}
    projection.project(engine, stream, None, payloads)
    stream.client.delete(stream.stream, stream.index, stream.totals)  # Redis lost it

    def retention_passed(_position: Position) -> RawMessage | None:
        return None  # Kafka no longer has anything at these offsets

    report = projection.restore(engine, stream, retention_passed)
    assert (report.put, report.missing_bytes) == (2, [])
    assert {entry.letter.dlq_key: entry.raw for entry in stream.scan()} == payloads
    entries = sorted(stream.scan(), key=lambda entry: entry.letter.position.offset or 0)
    stream.client.delete(stream.stream, stream.index, stream.totals)  # lost again, and
    for entry in entries:  # shown without bytes, as a rebuild while Kafka was away shows it
        stream.put(StreamEntry.of(entry.letter, None))
    published: list[RawMessage | None] = []

    class Kafka(_Kafka):
        def publish(self, entry: StreamEntry,
                    done: Callable[[KafkaError | None], None]) -> None:
            published.append(entry.raw)
            done(None)  # Kafka took it

    result = actions.replay(engine, stream, list(stream.scan()), Kafka())  # type: ignore[arg-type]
    assert result.replayed == 2 and result.no_bytes == 0
    assert sorted(published, key=lambda m: m.value or b"") == [  # type: ignore[union-attr]
        RawMessage(b"k", None), RawMessage(b"k", b"{first", headers)]


def test_the_messages_handed_over_are_kept_in_sql_whatever_the_stream_does(
    engine: Engine, redis_client: redis.Redis,
) -> None:
    """A review's finding: SQL kept a letter's message only once the stream took the letter:
    those a full stream held back, or all of them while Redis was away, had no copy but
    Kafka's, lost with its retention."""
    letters = [failure(n, b"{bad %d" % n) for n in range(3)]
    record(engine, *letters)
    payloads = {letter.dlq_key: RawMessage(b"k", b"{bad %d" % n)
                for n, letter in enumerate(letters)}
    full = DeadLetterStream(redis_client, f"test:dlq:{uuid.uuid4().hex}", 1, 10**6)
    try:
        projection.project(engine, full, None, payloads)
        assert full.depth() == 1
    finally:
        redis_client.delete(full.stream, full.index, full.totals)
    with engine.connect() as conn:
        assert records.kept_messages(conn, list(payloads)) == payloads
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]  # closed below: nothing listens there
    away = DeadLetterStream(redis.Redis(port=port, socket_connect_timeout=1), "dlq", 10, 10**6)
    other = failure(9, b"{other")
    record(engine, other)
    with pytest.raises(redis.ConnectionError):
        projection.project(engine, away, None, {other.dlq_key: RawMessage(b"k", b"{other")})
    with engine.connect() as conn:
        assert records.kept_messages(conn, [other.dlq_key]) == {
            other.dlq_key: RawMessage(b"k", b"{other")}


def test_a_rebuild_whose_fetches_outlast_its_lease_keeps_its_claim_to_the_end(
    engine: Engine, redis_client: redis.Redis,
) -> None:
    """A step's fetches each wait for Kafka (seconds where the position holds nothing): with
    the claim extended only between steps, a step longer than the lease lost it, and every
    restore stopped after its first step, blaming a Redis restart."""
    stream = DeadLetterStream(redis_client, f"test:dlq:{uuid.uuid4().hex}", 100, 10**7)
    values = [f"{{bad {n}".encode() for n in range(6)]
    record(engine, *(failure(offset, value) for offset, value in enumerate(values)))

    def slow_kafka(position: Position) -> RawMessage | None:
        time.sleep(0.4)  # Kafka's answer, slow: six of them outlast the lease of 1 s
        return RawMessage(b"k", values[position.offset or 0])

    try:
        report = projection.restore(engine, stream, slow_kafka, lease_s=1)
        assert (report.put, report.stopped) == (6, False)
        assert stream.intact()
    finally:
        redis_client.delete(stream.stream, stream.index, stream.totals, stream.marker)


def test_a_rebuild_overtaken_in_its_last_step_says_it_stopped(
    engine: Engine, stream: DeadLetterStream,
) -> None:
    """Its end found the claim gone, said so in a log line, and `dlq restore` exited 0."""
    record(engine, failure(0, b"{bad"))

    def overtaken(_position: Position) -> RawMessage | None:
        stream.begin_rebuild()  # another operator's restore begins meanwhile
        return RawMessage(b"k", b"{bad")

    try:
        report = projection.restore(engine, stream, overtaken)
        assert (report.put, report.stopped) == (1, True)
    finally:
        stream.client.delete(stream.marker)


def test_a_trace_kafka_does_not_answer_for_still_tells_what_sql_holds(
    engine: Engine, stream: DeadLetterStream,
) -> None:
    """`eventpipe trace` with Kafka away failed whole (exit 3), where the event's fate and
    dead letters were there to tell."""
    [event] = received(user_created("u1", event_id="e-traced"))
    apply_batch(engine, [event])

    def away(position: Position) -> RawMessage | None:
        raise TransientError(f"Kafka did not answer for {position.topic}")

    traced = trace.gather("e-traced", engine, stream, away)
    assert traced.found and traced.unfetched == "Kafka did not answer for events"
    assert trace.render(traced).splitlines()[-1] == (
        "  message:  not fetched: Kafka did not answer for events (`--no-kafka` does without)")


def test_a_trace_names_the_dlq_entry_and_tells_what_sql_holds_with_redis_away(
    engine: Engine, stream: DeadLetterStream,
) -> None:
    """A review's finding: `eventpipe trace` said a dead letter was "in the DLQ" without its
    entry id, which `dlq show` and `dlq replay` take; and with Redis away it failed whole
    (exit 3), where SQL held the event's story."""
    [saved] = record(engine, replace(failure(0, b"{bad"), event_id="e-dead"))
    projection.project(engine, stream, None, {saved.dlq_key: RawMessage(b"k", b"{bad")})
    [entry] = stream.scan()
    shown = trace.render(trace.gather("e-dead", engine, stream))
    assert f"in the DLQ as entry {entry.entry_id}" in shown, shown
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # no server listens there
        away = DeadLetterStream(redis.Redis(port=closed.getsockname()[1],
                                            socket_connect_timeout=1), "dlq", 10, 10**6)
        traced = trace.gather("e-dead", engine, away)
    assert traced.found and traced.in_stream is None
    assert "the DLQ stream did not answer" in trace.render(traced)


def test_bytes_read_back_by_position_are_the_dead_letters_own_or_none(
    engine: Engine, stream: DeadLetterStream, kafka_broker: str, kafka_topic: TopicFactory,
) -> None:
    """A topic made anew (a fresh broker, `make run` again on the same database) holds other
    messages at the dead letters' offsets: those are not their bytes, and a replay must not
    publish them in place of the poison it was about."""
    topic = kafka_topic(partitions=1)
    [here, beyond] = produce(kafka_broker, topic, [(b"k", b"{bad 0", []),
                                                   (b"k", b"{someone else", [])])
    saved = record(engine, failure(here.offset or 0, b"{bad 0", topic),
                   failure(beyond.offset or 0, b"{bad 1", topic))
    reader = MessageReader(settings_for(kafka_broker, topic))
    try:
        report = projection.project(engine, stream, reader.fetch)
    finally:
        reader.close()
    assert report.put == 2 and report.missing_bytes == [saved[1].dlq_key]
    assert {entry.letter.position.offset: entry.value for entry in stream.scan()} == {
        here.offset: b"{bad 0", beyond.offset: None}


def test_a_restore_kafka_does_not_answer_fails_and_strips_no_bytes(
    engine: Engine, stream: DeadLetterStream,
) -> None:
    """Kafka down is not Kafka without the messages: the rebuild stops with an error where
    it needs Kafka (an entry shown without its bytes), and the entries keep the bytes they
    have."""
    kept, bare = _open_entries(engine, stream, "events", 2)
    stream.put(replace(bare, value=None))
    with engine.begin() as conn:  # shown before SQL kept the messages of dead letters
        conn.execute(delete(dead_letter_messages)
                     .where(dead_letter_messages.c.dlq_key == bare.letter.dlq_key))
    reader = MessageReader(settings_for("127.0.0.1:1", "events"), timeout_s=1)
    try:
        with pytest.raises(TransientError):
            projection.restore(engine, stream, reader.fetch)
    finally:
        reader.close()
    assert {e.letter.dlq_key: e.value for e in stream.scan()} == {
        kept.letter.dlq_key: kept.value, bare.letter.dlq_key: None}


def test_a_dead_letter_shown_again_keeps_its_bytes_once_kafka_no_longer_has_them(
    engine: Engine, stream: DeadLetterStream, kafka_broker: str, kafka_topic: TopicFactory,
) -> None:
    """Past Kafka's retention the entry holds the only copy of the message. Shown again (a
    restore asked of a healthy stream, as here; a replay Kafka refused; a reconciler's new
    reason), it keeps its bytes rather than taking Kafka's none."""
    topic = kafka_topic(partitions=1)  # holds nothing: the messages are past its retention
    [entry] = _open_entries(engine, stream, topic, 1)
    reader = MessageReader(settings_for(kafka_broker, topic), timeout_s=2)
    try:
        report = projection.restore(engine, stream, reader.fetch)
    finally:
        reader.close()
    assert (report.put, report.missing_bytes) == (1, [])
    assert [(e.key, e.value) for e in stream.scan()] == [(b"k", b"{bad 0")] \
        == [(entry.key, entry.value)]


def test_an_entry_deleted_by_hand_costs_the_others_none_of_their_bytes(
    engine: Engine, stream: DeadLetterStream, kafka_broker: str, kafka_topic: TopicFactory,
) -> None:
    """An operator deletes one entry with redis-cli's XDEL, and adds two with XADD: the
    stream and its index disagree and the stream is rebuilt. The other entries keep the bytes
    they show; the one deleted comes back with those SQL keeps (past Kafka's retention), and
    the ones added, of no dead letter SQL holds, go."""
    topic = kafka_topic(partitions=1)  # holds nothing: the messages are past its retention
    deleted, kept = _open_entries(engine, stream, topic, 2)
    assert deleted.entry_id is not None
    stream.client.xdel(stream.stream, deleted.entry_id)
    for offset in (77, 78):
        stream.client.xadd(stream.stream, cast(Any, dead_letter(offset).fields()))
    reader = MessageReader(settings_for(kafka_broker, topic), timeout_s=2)
    try:
        report = projection.restore(engine, stream, reader.fetch)
    finally:
        reader.close()
    assert report.missing_bytes == []
    assert {e.letter.dlq_key: e.value for e in stream.scan()} == {
        deleted.letter.dlq_key: deleted.value, kept.letter.dlq_key: kept.value}
    assert stream.sizes() == (2, 2)
    assert stream.size_bytes() == _bytes_of(stream)


def test_an_index_lost_by_hand_costs_no_entry_its_bytes_nor_the_dlq_its_room(
    engine: Engine, stream: DeadLetterStream,
) -> None:
    """An operator deletes the stream's index (DEL, or one line with HDEL): the rebuild
    indexes the entries again, bytes kept, and counts their bytes again, so the bound is
    not taken by entries counted twice."""
    first, second = _open_entries(engine, stream, "events", 2)
    stream.client.hdel(stream.index, first.letter.dlq_key)
    stream.client.delete(stream.index)
    projection.restore(engine, stream, lambda position: None)
    assert {e.letter.dlq_key: e.value for e in stream.scan()} == {
        first.letter.dlq_key: first.value, second.letter.dlq_key: second.value}
    assert stream.sizes() == (2, 2)
    assert stream.size_bytes() == _bytes_of(stream)
    # Two entries of one key, neither named (one more added by hand, then the index lost
    # again): the later one is kept.
    stream.client.xadd(stream.stream, cast(Any, replace(first, value=b"{later").fields()))
    stream.client.delete(stream.index)
    assert stream.mend() > 0
    assert {e.letter.dlq_key: e.value for e in stream.scan()} == {
        first.letter.dlq_key: b"{later", second.letter.dlq_key: second.value}
    assert stream.size_bytes() == _bytes_of(stream)


def test_a_total_or_an_index_line_edited_by_hand_is_counted_again_not_an_error(
    engine: Engine, stream: DeadLetterStream,
) -> None:
    """Before: a total of bytes that was no number (`HSET …:totals bytes abc`) stopped every
    new dead letter from reaching the stream, and `/metrics` answered 500; an index line
    that was none (`HSET …:index <key> garbage`) failed each put of its key and `eventpipe
    dlq restore`, the repair, with a Lua error (a review's finding)."""
    first, second = _open_entries(engine, stream, "events", 2)
    for edited in ("abc", "1.5", "nan", "0x10"):  # Lua's tonumber takes the last three
        stream.client.hset(stream.totals, "bytes", edited)
        assert stream.fill() == (2, _bytes_of(stream))  # counted again from the index
        stream.client.hset(stream.totals, "bytes", edited)
        assert stream.remove("m:no-such-key") == 0  # HINCRBY given a number again
    stream.client.hset(stream.index, first.letter.dlq_key, "garbage")
    stream.client.hset(stream.totals, "bytes", "abc")
    stream.put(dead_letter(3))
    stream.put(replace(second, value=b"{again"))
    stream.put(first)  # the line that was none is taken for none: the key is put anew
    assert stream.sizes() == (4, 3)  # first's earlier entry is named by no line now
    projection.restore(engine, stream, lambda position: None)  # what SQL holds: two
    assert stream.sizes() == (2, 2)
    assert stream.size_bytes() == _bytes_of(stream)
    stream.client.hset(stream.index, second.letter.dlq_key, "garbage")
    assert stream.remove(second.letter.dlq_key) == 0  # only the line that was none goes
    stream.mend()  # its entry indexed again
    assert stream.sizes() == (2, 2) and stream.size_bytes() == _bytes_of(stream)


def test_a_turn_kept_for_ever_by_a_hand_edit_is_taken_all_the_same(
    stream: DeadLetterStream,
) -> None:
    """Before: `SET …:turn:reconcile 1` with no expiry (by hand, or a copy of the keys
    without their times) gave no worker that turn again: held events were never parked,
    opened nor resolved, and nothing said so (a review's finding)."""
    turn = f"{stream.stream}:turn:reconcile"
    stream.client.set(turn, "1")
    assert stream.take_turn("reconcile", 5.0)
    assert not stream.take_turn("reconcile", 5.0)
    assert 0 < stream.client.pttl(turn) <= 5000
    stream.client.delete(turn)
    stream.client.hset(turn, "a", "b")  # of another kind
    assert stream.take_turn("reconcile", 5.0)
    stream.client.delete(turn)


def _bytes_of(stream: DeadLetterStream) -> int:
    """The stream's entries' bytes, as `put` counts them."""
    return sum(len(name) + len(value.encode() if isinstance(value, str) else value)
               for entry in stream.scan() for name, value in entry.fields().items())


def test_an_entry_added_by_hand_that_is_no_dead_letter_is_left_out_then_mended_away(
    engine: Engine, stream: DeadLetterStream,
) -> None:
    """redis-cli's XADD can put anything in the stream (here in place of an entry deleted
    by hand, so that the counts still agree): listing leaves it out rather than fail on it,
    and has the stream rebuilt, which takes it out."""
    deleted, kept = _open_entries(engine, stream, "events", 2)
    stream.mark_intact(stream.begin_rebuild())
    assert deleted.entry_id is not None
    stream.client.xdel(stream.stream, deleted.entry_id)
    added = stream.client.xadd(stream.stream, {"dlq_key": "m:by-hand", "note": "hello"})
    assert [entry.letter.dlq_key for entry in stream.scan()] == [kept.letter.dlq_key]
    assert stream.get(_decoded_id(added)) is None
    assert not stream.intact()
    projection.restore(engine, stream, lambda position: None)
    assert sorted(entry.letter.dlq_key for entry in stream.scan()) == sorted(
        (deleted.letter.dlq_key, kept.letter.dlq_key))
    assert stream.sizes() == (2, 2)


def _decoded_id(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def test_the_reader_fetches_nothing_more_once_it_has_its_message(
    kafka_broker: str, kafka_topic: TopicFactory,
) -> None:
    """A read leaves no partition assigned: librdkafka would fetch an assigned one on in
    the background, the rest of the partition into memory and then again and again."""
    topic = kafka_topic(partitions=1)
    sent = produce(kafka_broker, topic, [(b"k", b"{m%d" % n, []) for n in range(3)])
    reader = MessageReader(settings_for(kafka_broker, topic))
    try:
        assert reader.fetch(Position(topic, 0, sent[1].offset or 0)) == RawMessage(b"k", b"{m1")
        assert reader.consumer.assignment() == []
        assert reader.fetch(Position(topic, 0, sent[2].offset or 0)) == RawMessage(b"k", b"{m2")
        assert reader.consumer.assignment() == []
    finally:
        reader.close()


def test_a_lost_stream_is_noticed_and_rebuilt_without_an_operator(
    engine: Engine, stream: DeadLetterStream, kafka_broker: str, kafka_topic: TopicFactory,
) -> None:
    """Redis restarted without persistence: the worker's reconciler rebuilds the stream by
    itself (the marker went with the data); an intact stream is left alone."""
    topic = kafka_topic(partitions=1)
    [message] = produce(kafka_broker, topic, [(b"k", b"{lost", [])])
    [saved] = record(engine, failure(message.offset or 0, b"{lost", topic))
    reader = MessageReader(settings_for(kafka_broker, topic))
    try:
        projection.project(engine, stream, None, {saved.dlq_key: RawMessage(b"k", b"{lost")})
        assert projection.repair_if_lost(engine, stream, reader.fetch) is not None  # first run
        assert projection.repair_if_lost(engine, stream, reader.fetch) is None
        stream.client.delete(stream.stream, stream.index, stream.totals, stream.marker)
        report = projection.repair_if_lost(engine, stream, reader.fetch)
    finally:
        reader.close()
    assert report is not None and report.put == 1
    assert [e.value for e in stream.scan()] == [b"{lost"]
    assert stream.intact()


def test_a_rebuild_redis_loses_midway_is_not_taken_for_intact(
    engine: Engine, stream: DeadLetterStream, kafka_broker: str, kafka_topic: TopicFactory,
) -> None:
    """Redis restarted again while the stream was being rebuilt, and the client reconnected
    by itself: what was put before the restart is gone, so the rebuild must not mark the new,
    empty Redis intact; the next round rebuilds it whole."""
    topic = kafka_topic(partitions=1)
    values = (b"{first", b"{second")
    produced = produce(kafka_broker, topic, [(b"k", value, []) for value in values])
    record(engine, *(failure(message.offset or 0, value, topic)
                     for message, value in zip(produced, values, strict=True)))
    reader = MessageReader(settings_for(kafka_broker, topic))
    fetched: list[Position] = []

    def fetch_losing_redis_after_the_first(position: Position) -> RawMessage | None:
        fetched.append(position)
        if len(fetched) == 2:
            stream.client.delete(stream.stream, stream.index, stream.totals, stream.marker)
        return reader.fetch(position)

    try:
        projection.repair_if_lost(engine, stream, fetch_losing_redis_after_the_first)
        assert not stream.intact()
        projection.repair_if_lost(engine, stream, reader.fetch)
    finally:
        reader.close()
    assert stream.intact()
    assert sorted(entry.value or b"" for entry in stream.scan()) == sorted(values)


def test_a_rebuild_that_fails_midway_is_taken_up_again_at_once(
    engine: Engine, stream: DeadLetterStream, kafka_broker: str, kafka_topic: TopicFactory,
) -> None:
    """The database or Kafka went away during a rebuild: the next round starts another, and
    does not wait for the failed one's lease to end."""
    topic = kafka_topic(partitions=1)
    [message] = produce(kafka_broker, topic, [(b"k", b"{lost", [])])
    record(engine, failure(message.offset or 0, b"{lost", topic))

    def kafka_gone(_position: Position) -> RawMessage | None:
        raise TransientError("Kafka does not answer")

    with pytest.raises(TransientError):
        projection.repair_if_lost(engine, stream, kafka_gone)
    reader = MessageReader(settings_for(kafka_broker, topic))
    try:
        report = projection.repair_if_lost(engine, stream, reader.fetch)
    finally:
        reader.close()
    assert report is not None and report.put == 1 and stream.intact()


def test_entries_lost_behind_the_markers_back_are_found_and_put_back(
    engine: Engine, stream: DeadLetterStream, kafka_broker: str, kafka_topic: TopicFactory,
) -> None:
    """The marker survived but entries did not: a replica promoted before it had the last
    writes, an operator's XDEL, a projection that marked its write just after a rebuild had
    cleared the marks. The worker's reconciler finds the open dead letters SQL says the stream
    shows and it lacks, and puts them back."""
    topic = kafka_topic(partitions=1)
    values = (b"{first", b"{second", b"{third")
    produced = produce(kafka_broker, topic, [(b"k", value, []) for value in values])
    saved = record(engine, *(failure(message.offset or 0, value, topic)
                             for message, value in zip(produced, values, strict=True)))
    reader = MessageReader(settings_for(kafka_broker, topic))
    reconciler = Reconciler(engine, stream, lambda: reader.fetch, timedelta(hours=1),
                            heal_every_s=0)
    try:
        reconciler.run_once()
        assert stream.intact() and stream.depth() == 3
        by_value = {entry.value: entry for entry in stream.scan()}
        stream.remove(by_value[b"{first"].letter.dlq_key)  # the index lost it too
        reconciler.run_once()
        assert sorted(entry.value or b"" for entry in stream.scan()) == sorted(values)
        # By hand, the index keeps it: the two disagree, and the stream is rebuilt whole.
        stream.client.xdel(stream.stream, by_value[b"{second"].entry_id or "")
        reconciler.run_once()
        reconciler.run_once()
    finally:
        reader.close()
    assert sorted(entry.value or b"" for entry in stream.scan()) == sorted(values)
    assert stream.keys() == {letter.dlq_key for letter in saved} and stream.intact()
    assert stream.sizes() == (3, 3)


def test_a_stale_entry_does_not_hide_a_lost_one_nor_an_old_revision_a_new_one(
    engine: Engine, stream: DeadLetterStream, kafka_broker: str, kafka_topic: TopicFactory,
) -> None:
    """Equal counts, different contents: a promoted replica still shows a purged dead letter
    and lacks a new one; a slow projection put an older revision after the newer one."""
    topic = kafka_topic(partitions=1)
    values = (b"{purged", b"{kept", b"{new", b"{again")
    produced = produce(kafka_broker, topic, [(b"k", value, []) for value in values])
    letters = [failure(message.offset or 0, value, topic)
               for message, value in zip(produced, values, strict=True)]
    reader = MessageReader(settings_for(kafka_broker, topic))
    reconciler = Reconciler(engine, stream, lambda: reader.fetch, timedelta(hours=1),
                            heal_every_s=0)
    try:
        record(engine, *letters[:2], letters[3])
        reconciler.run_once()
        old = {entry.value: entry for entry in stream.scan()}
        assert actions.purge(engine, stream, [old[b"{purged"]]).deleted == 1
        record(engine, letters[2], letters[3])  # a new one; "again" fails a second time
        reconciler.run_once()
        assert {e.value: e.letter.attempts for e in stream.scan()} == {
            b"{kept": 1, b"{new": 1, b"{again": 2}
        # What a replica promoted too early holds: the purged entry, no new one, the old
        # revision of the one that failed again. As many entries as SQL shows.
        stream.remove(*(e.letter.dlq_key for e in stream.scan()
                        if e.value in (b"{new", b"{again")))
        stream.put(old[b"{purged"])
        stream.put(old[b"{again"])
        assert stream.depth() == 3
        reconciler.run_once()
    finally:
        reader.close()
    assert {e.value: e.letter.attempts for e in stream.scan()} == {
        b"{kept": 1, b"{new": 1, b"{again": 2}


# -- replay and purge --------------------------------------------------------------------------


def _open_entries(engine: Engine, stream: DeadLetterStream, topic: str,
                  count: int) -> list[StreamEntry]:
    saved = record(engine, *(failure(n, f"{{bad {n}".encode(), topic) for n in range(count)))
    projection.project(engine, stream, None,
                       {letter.dlq_key: RawMessage(b"k", f"{{bad {n}".encode())
                        for n, letter in enumerate(sorted(saved, key=lambda x: x.position.offset
                                                          or 0))})
    return list(stream.scan())


class _Kafka:
    """A replay's publisher that answers, and has every entry's bytes; `publish` is the
    test's."""

    def answers(self, topic: str | None) -> None:
        pass

    def with_bytes(self, entry: StreamEntry) -> StreamEntry:
        return entry

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_what_kafka_took_is_marked_replayed_even_if_the_refused_cannot_be_given_back(
    engine: Engine, stream: DeadLetterStream, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A chunk's claims end in two transactions, what Kafka took first: should the second
    fail (the database busy), the published letters are replayed and out of the stream all
    the same, rather than reopened by the reconciler once their claims lapse, their copies
    out (an operator replaying again would publish them twice); the others' claims lapse
    back to the DLQ."""
    taken, refused = _open_entries(engine, stream, "events", 2)
    real = records.finish_replay

    def busy_for_the_refused(conn: Any, keys: Any, now: Any, *, published: bool,
                             claim: datetime) -> Any:
        if not published:
            raise sqlalchemy.exc.OperationalError("UPDATE", {}, Exception("database is locked"))
        return real(conn, keys, now, published=published, claim=claim)

    class HalfTaken(_Kafka):
        def publish(self, entry: StreamEntry,
                    done: Callable[[KafkaError | None], None]) -> None:
            done(None if entry.letter.dlq_key == taken.letter.dlq_key
                 else KafkaError(KafkaError._MSG_TIMED_OUT))

    monkeypatch.setattr(records, "finish_replay", busy_for_the_refused)
    result = actions.replay(engine, stream, [taken, refused], cast(actions.Publisher, HalfTaken()))
    assert (result.replayed, result.refused) == (1, 1)
    with engine.connect() as conn:
        states = {key: letter.state for key, letter in records.load(
            conn, [taken.letter.dlq_key, refused.letter.dlq_key]).items()}
    assert states == {taken.letter.dlq_key: REPLAYED, refused.letter.dlq_key: REPLAYING}
    assert [entry.letter.dlq_key for entry in stream.scan()] == [refused.letter.dlq_key]


def test_messages_refused_as_a_batch_too_large_are_sent_again_one_at_a_time(
    engine: Engine, stream: DeadLetterStream,
) -> None:
    """A review's finding: Kafka refuses a record batch larger than the topic takes whole,
    and librdkafka batches a replay's messages: each small message of it was counted
    rejected for good. Sent again alone, only one too large on its own is."""
    entries = _open_entries(engine, stream, "events", 3)
    too_large = entries[2].letter.dlq_key

    class BatchingKafka(_Kafka):  # takes a message sent alone, unless it is the large one
        def __init__(self) -> None:
            self.waiting: list[tuple[str, Callable[[KafkaError | None], None]]] = []

        def publish(self, entry: StreamEntry,
                    done: Callable[[KafkaError | None], None]) -> None:
            self.waiting.append((entry.letter.dlq_key, done))

        def flush(self) -> None:
            batch, self.waiting = self.waiting, []
            for key, done in batch:
                done(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
                     if len(batch) > 1 or key == too_large else None)

    result = actions.replay(engine, stream, entries, cast(actions.Publisher, BatchingKafka()))
    assert (result.replayed, result.rejected, result.refused) == (2, 1, 0)
    assert [entry.letter.dlq_key for entry in stream.scan()] == [too_large]


def test_a_purge_leaves_an_entry_a_replay_holds_to_the_replay(
    engine: Engine, stream: DeadLetterStream,
) -> None:
    """A purge that meets an entry a replay has claimed neither counts it deleted nor takes
    it out of the stream: should Kafka refuse the replay, the letter goes back to the DLQ,
    and its entry must still be there, not come back after a purge that said it was gone."""
    [entry] = _open_entries(engine, stream, "events", 1)
    key = entry.letter.dlq_key
    claim = datetime.now(UTC) + timedelta(minutes=5)
    with engine.begin() as conn:
        assert key in records.claim_for_replay(conn, [key], claim)
    assert actions.purge(engine, stream, [entry]) == actions.Purged(deleted=0, replaying=1)
    assert [e.letter.dlq_key for e in stream.scan()] == [key]
    with engine.begin() as conn:
        assert key in records.finish_replay(conn, [key], datetime.now(UTC), published=False,
                                            claim=claim)
        assert records.load(conn, [key])[key].state == OPEN


def test_replay_publishes_each_entry_once_and_removes_what_kafka_took(
    engine: Engine, stream: DeadLetterStream, kafka_broker: str, kafka_topic: TopicFactory,
) -> None:
    topic = kafka_topic(partitions=1)
    entries = _open_entries(engine, stream, topic, 3)
    publisher = actions.Publisher(settings_for(kafka_broker, topic))
    # Two replays at once (issue 9, item 11): every entry is published exactly once.
    results: list[actions.Replayed] = []
    threads = [threading.Thread(target=lambda: results.append(actions.replay(
        engine, stream, entries, publisher))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sum(r.replayed for r in results) == 3 and sum(r.skipped for r in results) == 3
    assert stream.depth() == 0
    consumer = make_consumer(kafka_broker, f"check-{uuid.uuid4().hex}")
    consumer.subscribe([topic])
    values = sorted(m.value() or b"" for m in consume(consumer, 3))
    consumer.close()
    assert values == [b"{bad 0", b"{bad 1", b"{bad 2"]
    with engine.connect() as conn:
        assert {r.state for r in conn.execute(select(dead_letters))} == {REPLAYED}


def test_a_replayed_message_goes_back_to_the_partition_it_was_read_from(
    engine: Engine, stream: DeadLetterStream, kafka_broker: str, kafka_topic: TopicFactory,
) -> None:
    """The replay is the original message at its original place: a keyless message (a
    partitioner would pick any partition) and a keyed one whose producer partitioned by
    another hash than librdkafka's go back where they were read."""
    topic = kafka_topic(partitions=3)
    letters = [replace(failure(0, b"{bad", topic), dlq_key=message_key(None, b"{bad"),
                       position=Position(topic, 1, 0)),
               # librdkafka's hash of b"k" picks partition 1 of 3.
               replace(failure(0, b"{worse", topic), position=Position(topic, 2, 0))]
    record(engine, *letters)
    projection.project(engine, stream, None, {letters[0].dlq_key: RawMessage(None, b"{bad"),
                                              letters[1].dlq_key: RawMessage(b"k", b"{worse")})
    result = actions.replay(engine, stream, list(stream.scan()),
                            actions.Publisher(settings_for(kafka_broker, topic)))
    assert result.replayed == 2
    consumer = make_consumer(kafka_broker, f"check-{uuid.uuid4().hex}")
    consumer.subscribe([topic])
    placed = {m.value(): m.partition() for m in consume(consumer, 2)}
    consumer.close()
    assert placed == {b"{bad": 1, b"{worse": 2}


def test_a_message_from_a_partition_the_topic_no_longer_has_is_replayed_all_the_same(
    engine: Engine, stream: DeadLetterStream, kafka_broker: str, kafka_topic: TopicFactory,
) -> None:
    """The topic was made anew with fewer partitions (an embedded broker restarted with a
    lower KAFKA_PARTITIONS, on the same database): the partitioner places the replay."""
    topic = kafka_topic(partitions=2)
    [letter] = record(engine, replace(failure(0, b"{bad", topic), position=Position(topic, 5, 0)))
    projection.project(engine, stream, None, {letter.dlq_key: RawMessage(b"k", b"{bad")})
    result = actions.replay(engine, stream, list(stream.scan()),
                            actions.Publisher(settings_for(kafka_broker, topic)))
    assert (result.replayed, result.refused) == (1, 0)
    consumer = make_consumer(kafka_broker, f"check-{uuid.uuid4().hex}")
    consumer.subscribe([topic])
    assert [m.value() for m in consume(consumer, 1)] == [b"{bad"]
    consumer.close()


def test_a_message_as_large_as_an_event_may_be_is_replayed(
    engine: Engine, stream: DeadLetterStream, kafka_broker: str, kafka_topic: TopicFactory,
) -> None:
    """Up to 1 MiB of value is an event's (`MAX_MESSAGE_BYTES`), with a key and headers
    besides: Kafka took it once, and its replay must not be refused before it leaves, by a
    client's bound below Kafka's (librdkafka's default, 1,000,000 bytes)."""
    topic = kafka_topic(partitions=1)
    value = b"{" + b"x" * (MAX_MESSAGE_BYTES - 1)
    message = RawMessage(b"k" * 20_000, value, (("h", b"v" * 20_000),))
    [letter] = record(engine, replace(failure(0, value, topic),
                                      dlq_key=message_key(message.key, value)))
    projection.project(engine, stream, None, {letter.dlq_key: message})
    result = actions.replay(engine, stream, list(stream.scan()),
                            actions.Publisher(settings_for(kafka_broker, topic), timeout_s=20))
    assert (result.replayed, result.refused) == (1, 0)
    consumer = make_consumer(kafka_broker, f"check-{uuid.uuid4().hex}")
    consumer.subscribe([topic])
    [copy] = consume(consumer, 1)
    consumer.close()
    assert (copy.key(), copy.value(), copy.headers()) == (message.key, value, list(message.headers))


def test_an_entry_kafka_refuses_stays_and_its_neighbours_still_leave(
    engine: Engine, stream: DeadLetterStream, kafka_broker: str, kafka_topic: TopicFactory,
) -> None:
    topic = kafka_topic(partitions=1)
    entries = _open_entries(engine, stream, topic, 3)
    # The middle one names a topic Kafka refuses.
    broken = replace(entries[1], letter=replace(entries[1].letter,
                                                position=Position("bad topic!", 0, 1)))
    result = actions.replay(engine, stream, [entries[0], broken, entries[2]],
                            actions.Publisher(settings_for(kafka_broker, topic), timeout_s=5))
    # Refused for good, at once, with Kafka's reason (before: a wait of the whole timeout,
    # then a 503 to retry, at every call again: a review's finding).
    assert (result.replayed, result.refused, result.rejected) == (2, 0, 1)
    assert result.why_rejected == "Kafka has no topic 'bad topic!'"
    assert [e.letter.dlq_key for e in stream.scan()] == [entries[1].letter.dlq_key]
    with engine.connect() as conn:
        states = {r.dlq_key: r.state for r in conn.execute(select(dead_letters))}
    assert states[entries[1].letter.dlq_key] == OPEN


def test_purge_removes_the_entry_and_keeps_the_fate(
    engine: Engine, stream: DeadLetterStream, kafka_topic: TopicFactory,
) -> None:
    [entry] = _open_entries(engine, stream, "events", 1)
    assert actions.purge(engine, stream, [entry]).deleted == 1
    assert stream.depth() == 0
    with engine.connect() as conn:
        [row] = conn.execute(select(dead_letters)).all()
    assert row.state == "purged"


def test_a_run_over_the_whole_stream_says_what_it_could_not_reach(
    engine: Engine, stream: DeadLetterStream, redis_client: redis.Redis,
) -> None:
    """A review's finding: `dlq purge --all` (or replay) acts on the stream's entries; with
    the stream full, the letters waiting in SQL were left with a summary that said nothing of
    them, and a stream Redis lost during the run ended it early, silently."""
    stream.mark_intact(stream.begin_rebuild())
    entries = _open_entries(engine, stream, "events", 8)  # the stream holds 5
    assert len(entries) == 5
    assert left_out(engine, stream, stream.intact()) == (False, [
        "3 more open dead letter(s) wait in SQL, not in the stream yet (it is full, was "
        "rebuilt, or they failed again just now): the workers show them as they can; run "
        "again once they have"])
    actions.purge(engine, stream, entries)
    redis_client.delete(stream.marker)  # Redis lost the stream meanwhile
    lost, said = left_out(engine, stream, True)
    assert lost and said == [
        "the DLQ stream was lost during the run (Redis restarted or flushed?): the workers "
        "rebuild it from SQL; run again once `eventpipe dlq list` shows it"]
    assert left_out(engine, stream, False)[0] is False  # not whole at its start: not this run's


def test_a_redelivery_of_a_purged_message_leaves_it_purged_a_new_copy_reopens_it(
    engine: Engine, stream: DeadLetterStream,
) -> None:
    """Kafka hands the same message over again (a worker died before marking it done, a
    rebalance): the letter an operator purged stays purged. The same bytes sent again, at
    another offset, are a new failure: the letter reopens."""
    [entry] = _open_entries(engine, stream, "events", 1)
    assert actions.purge(engine, stream, [entry]).deleted == 1
    redelivered = failure(0, b"{bad 0")
    record(engine, redelivered)
    projection.project(engine, stream, None, {entry.letter.dlq_key: RawMessage(b"k", b"{bad 0")})
    assert stream.depth() == 0
    with engine.connect() as conn:
        [row] = conn.execute(select(dead_letters)).all()
    assert (row.state, row.kafka_offset, row.attempts) == ("purged", 0, 1)
    [again] = record(engine, replace(redelivered, position=Position("events", 0, 9)))
    assert (again.state, again.position.offset, len(again.history)) == (OPEN, 9, 1)


def test_a_replayed_copy_failing_before_its_replay_is_marked_starts_a_new_life(
    engine: Engine, stream: DeadLetterStream,
) -> None:
    """The pipeline reads the replayed copy back and fails it again before the replayer
    marks the letter replayed: the replay is still an episode of its history, and the new
    failure a life of its own."""
    [entry] = _open_entries(engine, stream, "events", 1)

    class FastPipeline(_Kafka):
        def publish(self, entry: StreamEntry,
                    done: Callable[[KafkaError | None], None]) -> None:
            record(engine, replace(failure(0, b"{bad 0"), position=Position("events", 0, 9)))
            done(None)  # Kafka took it

    result = actions.replay(engine, stream, [entry], cast(actions.Publisher, FastPipeline()))
    assert result.replayed == 1
    with engine.connect() as conn:
        [row] = conn.execute(select(dead_letters)).all()
    letter = records.letter_of(row)
    assert (letter.state, letter.attempts, letter.position.offset) == (OPEN, 1, 9)
    assert [episode.ended for episode in letter.history] == [REPLAYED]


def test_a_replay_publishes_the_failure_it_was_shown_not_one_that_came_after(
    engine: Engine, stream: DeadLetterStream,
) -> None:
    """A letter that fails again between a replay reading its entry and claiming it (two
    replays at once: the first's copy failed again; or a duplicate of its message) is left
    open, counted as skipped, for a later replay to take as it is then: claimed, its stored
    message would be published once more though the entry read showed an earlier failure
    (a review's finding, the window left by the selection's own check)."""
    [entry] = _open_entries(engine, stream, "events", 1)
    again = T0 + timedelta(minutes=1)
    record(engine, replace(failure(0, b"{bad 0"), position=Position("events", 0, 9),
                           first_failure_at=again, last_failure_at=again))
    published: list[str] = []

    class Counting(_Kafka):
        def publish(self, entry: StreamEntry,
                    done: Callable[[KafkaError | None], None]) -> None:
            published.append(entry.letter.dlq_key)
            done(None)  # Kafka took it

    result = actions.replay(engine, stream, [entry], cast(actions.Publisher, Counting()))
    assert (result.replayed, result.skipped, published) == (0, 1, [])
    with engine.connect() as conn:
        letter = records.load(conn, [entry.letter.dlq_key])[entry.letter.dlq_key]
    assert (letter.state, letter.last_failure_at) == (OPEN, again)
    # Shown as it is now, it is replayed.
    projection.project(engine, stream, None, {letter.dlq_key: RawMessage(b"k", b"{bad 0")})
    [now] = stream.scan()
    assert now.letter.last_failure_at == again
    assert actions.replay(engine, stream, [now], cast(actions.Publisher, Counting())).replayed == 1


def test_an_entry_a_replay_holds_keeps_its_bytes_through_projections_and_rebuilds(
    engine: Engine, stream: DeadLetterStream, kafka_broker: str, kafka_topic: TopicFactory,
) -> None:
    """Past Kafka's retention an entry holds the only copy of its message. While a replay has
    its letter (claimed, not yet published), the reconciler's projections, sweeps and a
    rebuild leave the entry as it is: should Kafka refuse the replay, or its replayer die,
    the letter goes back to the DLQ with its bytes, not shown without them for good."""
    topic = kafka_topic(partitions=1)  # holds nothing: the message is past its retention
    [entry] = _open_entries(engine, stream, topic, 1)
    key = entry.letter.dlq_key
    claim = datetime.now(UTC) + timedelta(minutes=5)
    with engine.begin() as conn:
        assert key in records.claim_for_replay(conn, [key], claim)
    reader = MessageReader(settings_for(kafka_broker, topic), timeout_s=2)
    reconciler = Reconciler(engine, stream, lambda: reader.fetch, timedelta(hours=1),
                            heal_every_s=0)
    try:
        reconciler.run_once()
        assert projection.heal(engine, stream, every_s=0) == 0
        assert [(e.letter.dlq_key, e.value) for e in stream.scan()] == [(key, entry.value)]
        projection.restore(engine, stream, reader.fetch)
        assert [(e.letter.dlq_key, e.value) for e in stream.scan()] == [(key, entry.value)]
        with engine.begin() as conn:  # Kafka refused it: back to the DLQ
            assert key in records.finish_replay(conn, [key], datetime.now(UTC),
                                                published=False, claim=claim)
        reconciler.run_once()
    finally:
        reader.close()
    [shown] = stream.scan()
    assert (shown.letter.dlq_key, shown.letter.state, shown.value) == (key, OPEN, entry.value)


def test_a_full_dlq_still_lets_out_what_left_it_and_updates_what_it_shows(
    engine: Engine, stream: DeadLetterStream,
) -> None:
    """The DLQ at its bound, and more dead letters waiting in SQL for room, older than the
    changes to letters it shows: those changes need no room (one frees some) and are made,
    rather than wait behind the new letters for ever."""
    shown = _open_entries(engine, stream, "events", 5)  # the bound of `stream`
    waiting = record(engine, *(replace(failure(n, f"{{wait {n}".encode()),
                                       first_failure_at=T0 - timedelta(days=1),
                                       last_failure_at=T0 - timedelta(days=1))
                               for n in range(10, 13)))
    kafka = {letter.position.offset: RawMessage(b"k", f"{{wait {n}".encode())
             for n, letter in zip(range(10, 13), waiting, strict=True)}
    gone, again = shown[0].letter.dlq_key, shown[1]
    with engine.begin() as conn:
        records.resolve(conn, list(records.load(conn, [gone]).values()), T0 + timedelta(1))
    record(engine, replace(failure(again.letter.position.offset or 0, again.value or b""),
                           last_failure_at=T0 + timedelta(1)))
    report = projection.project(engine, stream, lambda at: kafka.get(at.offset), limit=4)
    assert report.full
    by_key = {e.letter.dlq_key: e for e in stream.scan()}
    assert gone not in by_key and by_key[again.letter.dlq_key].letter.attempts == 2
    assert stream.depth() == 5  # one waiting letter took the room the resolved one left
    with engine.connect() as conn:
        assert len(records.unprojected(conn, 10)) == 2


def test_letters_that_waited_for_room_take_it_before_replayed_copies_failing_again(
    engine: Engine, stream: DeadLetterStream,
) -> None:
    """Before (the adversarial tester's finding): the DLQ full, more letters waiting in SQL,
    a replay of all freed the room, the copies failed again at once and took it back, as
    changes to letters the DLQ showed: every replay replayed the same entries, and the
    letters waiting never entered the DLQ, to be shown or replayed. A letter the stream does
    not show takes room in the order the letters began to fail, whatever its revision."""
    shown = _open_entries(engine, stream, "events", 5)  # the bound of `stream`
    waiting = record(engine, *(failure(n, f"{{wait {n}".encode()) for n in range(10, 13)))
    kafka = {n: RawMessage(b"k", f"{{wait {n}".encode()) for n in range(10, 13)}
    assert projection.project(engine, stream, lambda at: kafka.get(at.offset or 0)).full

    class Taken(_Kafka):
        def publish(self, entry: StreamEntry,
                    done: Callable[[KafkaError | None], None]) -> None:
            done(None)

    assert actions.replay(engine, stream, shown, cast(actions.Publisher, Taken())).replayed == 5
    assert stream.depth() == 0
    # Each copy, at its own offset, fails again, later than the letters waiting failed.
    copies = {100 + n: entry.value or b"" for n, entry in enumerate(shown)}
    again = record(engine, *(replace(failure(offset, value), first_failure_at=T0 + timedelta(1),
                                     last_failure_at=T0 + timedelta(1))
                             for offset, value in copies.items()))
    assert {letter.state for letter in again} == {OPEN}
    # A waiting letter's message handed over again, later still: it keeps its place (a
    # review's finding: by its last failure, it went behind the copies).
    [handed_again] = record(engine, replace(failure(10, b"{wait 10"),
                                            last_failure_at=T0 + timedelta(2)))
    assert handed_again.last_failure_at == T0 + timedelta(2)
    with engine.connect() as conn:  # however few it reads, the letters that waited longest
        read = {letter.dlq_key for letter in records.unprojected(conn, 2)}
    assert len(read & {letter.dlq_key for letter in waiting}) == 2
    projection.project(engine, stream, None, {
        letter.dlq_key: RawMessage(b"k", copies[letter.position.offset or 0])
        for letter in again})  # as the worker projects its batch's letters
    projection.project(engine, stream, lambda at: kafka.get(at.offset or 0))  # as rounds do
    in_stream = {e.letter.dlq_key for e in stream.scan()}
    assert {letter.dlq_key for letter in waiting} <= in_stream
    assert len(in_stream) == 5


def test_a_rebuild_check_redis_refuses_still_lets_the_projection_free_room(
    engine: Engine, stream: DeadLetterStream, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis at its `maxmemory` refuses the rebuild marker's write (`SET NX` is refused even
    when the key exists) but not deletions: the round goes on, and the entries of letters
    that left the DLQ go, which is what frees memory."""
    [entry] = _open_entries(engine, stream, "events", 1)
    with engine.begin() as conn:
        records.resolve(conn, list(records.load(conn, [entry.letter.dlq_key]).values()), T0)

    def out_of_memory(*_args: Any) -> None:
        raise redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'.")

    monkeypatch.setattr("tasks.reconciler.repair_if_lost", out_of_memory)
    Reconciler(engine, stream, lambda: lambda _at: None, timedelta(hours=1),
               heal_every_s=0).run_once()
    assert stream.depth() == 0


def test_an_entry_shown_without_its_bytes_is_replayed_with_kafkas(
    engine: Engine, stream: DeadLetterStream, kafka_broker: str, kafka_topic: TopicFactory,
) -> None:
    """A letter larger than DLQ_MAX_BYTES is shown without its bytes, as is one rebuilt
    while Kafka was away; Kafka still has the message at its position, and the replay takes
    it from there (before: `noBytes`, every time). A message at that position that is not
    the letter's (a topic made anew) is not published in its place."""
    topic = kafka_topic(partitions=1)
    [here, other] = produce(kafka_broker, topic, [(b"k", b"{bad 0", []),
                                                  (b"k", b"{someone else", [])])
    saved = record(engine, failure(here.offset or 0, b"{bad 0", topic),
                   failure(other.offset or 0, b"{bad 1", topic))
    for letter in saved:
        stream.put(StreamEntry(letter, None, b"k"))
    result = actions.replay(engine, stream, list(stream.scan()),
                            actions.Publisher(settings_for(kafka_broker, topic)))
    assert (result.replayed, result.no_bytes) == (1, 1)
    consumer = make_consumer(kafka_broker, f"check-{uuid.uuid4().hex}")
    consumer.subscribe([topic])
    assert [m.value() for m in consume(consumer, 3)][2:] == [b"{bad 0"]
    consumer.close()
    assert [e.letter.position.offset for e in stream.scan()] == [other.offset]


@pytest.mark.parametrize("passed", ["reading the first's bytes", "claiming the chunk"])
def test_a_replay_past_its_deadline_leaves_the_letters_whose_bytes_kafka_has(
    engine: Engine, stream: DeadLetterStream, kafka_broker: str, kafka_topic: TopicFactory,
    monkeypatch: pytest.MonkeyPatch, passed: str,
) -> None:
    """A review's finding: a chunk begun just before an HTTP call's deadline read each
    letter's missing bytes from Kafka, each read waiting up to its timeout, past the HTTP
    server's own. Past the deadline it reads none but the first letter's (a call makes
    progress, whenever the deadline passed); the others are left in the DLQ, open, for the
    next call."""
    topic = kafka_topic(partitions=1)
    values = [b"{bad 0", b"{bad 1"]
    messages = produce(kafka_broker, topic, [(b"k", value, []) for value in values])
    saved = record(engine, *(failure(m.offset or 0, value, topic)
                             for m, value in zip(messages, values, strict=True)))
    for letter in saved:
        stream.put(StreamEntry(letter, None, b"k"))
    clock = [0.0]
    slow = actions.Publisher.with_bytes if passed.startswith("reading") \
        else records.claim_for_replay

    def slowly(*args: Any) -> Any:
        found = slow(*args)
        clock[0] = 100.0  # it took long: the deadline passed meanwhile
        return found

    if passed.startswith("reading"):
        monkeypatch.setattr(actions.Publisher, "with_bytes", slowly)
    else:
        monkeypatch.setattr(records, "claim_for_replay", slowly)
    monkeypatch.setattr(actions, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    done: list[list[StreamEntry]] = []
    result = actions.replay(engine, stream, list(stream.scan()),
                            actions.Publisher(settings_for(kafka_broker, topic)),
                            deadline=50.0, done=done.append)
    assert (result.replayed, result.no_bytes, result.more) == (1, 0, True)
    assert [[e.letter.position.offset for e in chunk] for chunk in done] == [
        [messages[0].offset]]
    [left] = stream.scan()
    assert left.letter.position.offset == messages[1].offset
    with engine.connect() as conn:
        assert records.load(conn, [left.letter.dlq_key])[left.letter.dlq_key].state == "open"


def test_a_dlq_short_of_bytes_for_one_letter_still_takes_smaller_ones(
    engine: Engine, stream: DeadLetterStream,
) -> None:
    """The byte bound refuses a large letter: the smaller ones behind it, which fit, go in
    (only the entry bound leaves no room for any new letter)."""
    _open_entries(engine, stream, "events", 2)
    big, small = b"{" + b"x" * 9_500, b"{small"
    saved = {letter.position.offset: letter for letter in record(
        engine, replace(failure(10, big), last_failure_at=T0),
        replace(failure(11, small), last_failure_at=T0 + timedelta(1)))}
    large, little = saved[10], saved[11]
    report = projection.project(engine, stream, None,
                                {large.dlq_key: RawMessage(b"k", big),
                                 little.dlq_key: RawMessage(b"k", small)})
    assert report.full and report.put == 1
    shown = stream.keys()
    assert little.dlq_key in shown and large.dlq_key not in shown


def test_a_replayer_whose_claim_was_taken_by_another_replay_ends_none_of_it(
    engine: Engine, stream: DeadLetterStream,
) -> None:
    """A replayer stopped for longer than its claim (Ctrl-Z, a frozen VM): the claim lapses,
    the letter goes back to the DLQ, a second replay claims it. The first, resumed, must not
    end the second's claim: it would mark the letter replayed (or open) under it, and the
    letter could be published twice."""
    [entry] = _open_entries(engine, stream, "events", 1)
    key, now = entry.letter.dlq_key, datetime.now(UTC)
    first, second = now + timedelta(minutes=5), now + timedelta(minutes=11)
    with engine.begin() as conn:
        assert key in records.claim_for_replay(conn, [key], first)
    with engine.begin() as conn:  # lapsed: the reconciler gives it back to the DLQ
        [claimed] = records.load(conn, [key]).values()
        records.transition(conn, claimed, OPEN, first, deadline=None)
    with engine.begin() as conn:
        assert key in records.claim_for_replay(conn, [key], second)
    with engine.begin() as conn:
        assert records.finish_replay(conn, [key], now, published=True, claim=first) == {}
        assert records.load(conn, [key])[key].state == REPLAYING
        assert key in records.finish_replay(conn, [key], now, published=True, claim=second)
        assert records.load(conn, [key])[key].state == REPLAYED


def test_a_reconciler_round_that_fails_leaves_the_stream_s_steps_to_run(
    engine: Engine, stream: DeadLetterStream, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker's loop runs the rules' round, then keeps the DLQ stream in step: a round that
    fails each time (a bug, a row it cannot read) must not keep new dead letters out of the
    stream, nor the stream from being rebuilt. (Before: the first failure ended the loop's
    turn, every time.)"""
    def failing(*_args: object, **_kwargs: object) -> list[DeadLetter]:
        raise ValueError("a round that fails every time")

    monkeypatch.setattr(tasks.reconciler, "reconcile", failing)
    record(engine, failure(0, b"{first"))
    reconciler = Reconciler(engine, stream, lambda: lambda position: None, timedelta(hours=1),
                            min_gap_s=0)
    reconciler.run_once()
    assert stream.depth() == 1 and stream.intact()
