"""The dead-letter queue on a real Redis: context kept, once per message, bounded, filtered."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis

from eventpipe.dlq import DeadLetter, DeadLetterQueue, DeadLetterQueueFull, Filter
from eventpipe.errors import TransientError

T0 = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)


@pytest.fixture
def queue(redis_client: redis.Redis) -> Iterator[DeadLetterQueue]:
    stream = f"test:dlq:{uuid.uuid4().hex}"
    yield DeadLetterQueue(redis_client, stream, max_entries=5)
    redis_client.delete(stream, f"{stream}:index")


def letter(offset: int, event_type: str = "OrderPlaced", error: str = "InvalidEvent",
           value: bytes = b'{"x": 1}') -> DeadLetter:
    return DeadLetter(
        value=value, key=b"k-1", topic="events", partition=3, offset=offset,
        event_id=f"e-{offset}", event_type=event_type, error_class=error,
        error_message="data.x: is required", traceback="Traceback …", attempts=1,
        first_failure_at=T0, last_failure_at=T0 + timedelta(seconds=1), worker="host:1",
    )


def test_an_entry_keeps_all_its_context(queue: DeadLetterQueue) -> None:
    entry_id, added = queue.add(letter(7, value=b"\xff raw"))
    assert added
    stored = queue.get(entry_id)
    assert stored == letter(7, value=b"\xff raw") and stored.entry_id == entry_id
    view = stored.as_json()
    assert view["value"] == {"base64": "/yByYXc="} and view["key"] == {"text": "k-1"}
    assert view["firstFailureAt"] == "2026-11-24T10:00:00Z"
    assert queue.get("0-1") is None


def test_the_same_kafka_message_is_dead_lettered_once(queue: DeadLetterQueue) -> None:
    first, added = queue.add(letter(1))
    again, added_again = queue.add(letter(1))
    assert added and not added_again and again == first
    assert queue.depth() == 1


def test_the_bound_refuses_loudly_and_drops_nothing(
    queue: DeadLetterQueue, caplog: pytest.LogCaptureFixture
) -> None:
    for offset in range(5):
        queue.add(letter(offset))
    assert "near its bound" in caplog.text
    with pytest.raises(DeadLetterQueueFull) as caught:
        queue.add(letter(99))
    assert isinstance(caught.value, TransientError)  # the work waits and retries
    assert queue.depth() == 5


def test_filters_pagination_and_purge(queue: DeadLetterQueue) -> None:
    queue.add(letter(1, "OrderPlaced", "InvalidEvent"))
    queue.add(letter(2, "UserCreated", "RejectedEvent"))
    queue.add(letter(3, "OrderPlaced", "MissingParent"))
    assert [e.offset for e in queue.page(Filter(event_type="OrderPlaced"))] == [1, 3]
    assert [e.offset for e in queue.page(Filter(error_class="RejectedEvent"))] == [2]
    first = queue.page(limit=2)
    assert [e.offset for e in first] == [1, 2]
    assert [e.offset for e in queue.page(after=first[-1].entry_id)] == [3]
    assert queue.page(Filter(since=datetime.now(UTC) + timedelta(hours=1))) == []
    assert queue.purge(Filter(event_type="OrderPlaced")) == 2
    assert [e.offset for e in queue.scan()] == [2]
    # A purged position may be dead-lettered again (e.g. after a replay that fails).
    assert queue.add(letter(1))[1]


def test_replay_deletes_only_what_kafka_acknowledged(queue: DeadLetterQueue) -> None:
    queue.add(letter(1))
    queue.add(letter(2))
    published: list[tuple[int | None, bytes]] = []
    entries = list(queue.scan())
    with pytest.raises(TransientError):
        queue.replay(entries, lambda e, h: published.append((e.offset, h)), lambda: 1)
    assert queue.depth() == 2  # nothing acknowledged, nothing deleted
    assert queue.replay(entries, lambda e, h: published.append((e.offset, h)), lambda: 0) == 2
    assert queue.depth() == 0
    offset, header = published[-1]
    assert offset == 2 and b'"error_class": "InvalidEvent"' in header and b"replayed_at" in header


def test_another_message_at_a_known_position_is_a_new_dead_letter(
    queue: DeadLetterQueue,
) -> None:
    # A topic recreated from offset 0 puts other messages at positions seen before.
    first, _ = queue.add(letter(1, value=b"first life"))
    second, added = queue.add(letter(1, value=b"second life"))
    assert added and second != first
    assert queue.add(letter(1, value=b"second life")) == (second, False)
    old = queue.get(first)
    assert old is not None and queue.delete(old)  # leaves the newer entry's index alone
    assert queue.add(letter(1, value=b"second life")) == (second, False)
    assert queue.depth() == 1
