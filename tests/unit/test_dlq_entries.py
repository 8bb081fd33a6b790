"""A DLQ entry's fields as Redis holds them, and back: what `redis-cli XRANGE` shows and what
a replay sends must be the message as it came."""

from __future__ import annotations

import json

import pytest
from confluent_kafka import KafkaError, KafkaException

from eventpipe.dlq.actions import ANSWER_TIMEOUT_S, Publisher
from eventpipe.dlq.stream import StreamEntry, _dead_letter
from eventpipe.errors import TransientError
from eventpipe.messages import RawMessage
from eventpipe.settings import Settings
from tests.support.factories import dead_letter

# An episode as `eventpipe.dlq.letter.history_json` writes one.
EPISODE = {"error_class": "InvalidEvent", "reason": "r", "attempts": 1,
           "first_failure_at": "2024-01-01T00:00:00Z", "last_failure_at": "2024-01-01T00:00:00Z",
           "worker": "w", "ended": "replayed", "ended_at": "2024-01-01T00:00:01Z"}


def _fields(entry: StreamEntry) -> dict[bytes, bytes]:
    """As Redis gives the fields back: names and values as bytes."""
    return {name.encode(): value.encode() if isinstance(value, str) else value
            for name, value in entry.fields().items()}


def _through_redis(entry: StreamEntry) -> StreamEntry:
    return StreamEntry.from_fields("1-0", _fields(entry))


def test_a_tombstone_and_its_headers_come_back_as_they_were_kept() -> None:
    headers = (("trace", b"\xff\x00"), ("empty", None), ("trace", b"again"))
    entry = StreamEntry.of(dead_letter(3).letter, RawMessage(b"k", None, headers))
    back = _through_redis(entry)
    assert back.raw == RawMessage(b"k", None, headers)
    assert (back.tombstone, back.value) == (True, b"")
    plain = _through_redis(dead_letter(4))
    assert plain.raw == RawMessage(b"k-4", b'{"n": 4}') and not plain.tombstone


def test_headers_an_entry_keeps_but_that_cannot_be_read_leave_its_value() -> None:
    """Once Kafka's retention has passed, the entry's value is the only copy: headers that
    cannot be read are dropped, not the value with them."""
    entry = StreamEntry.of(dead_letter(5).letter, RawMessage(b"k", b"{bad", (("h", b"v"),)))
    fields = _fields(entry)
    fields[b"headers"] = b"[not json"
    back = StreamEntry.from_fields("1-0", fields)
    assert back.raw == RawMessage(b"k", b"{bad")


def test_an_entry_shown_without_its_bytes_is_no_tombstone() -> None:
    back = _through_redis(StreamEntry.of(dead_letter(6).letter, None))
    assert back.raw is None and not back.tombstone


@pytest.mark.parametrize("name", ["first_failure_at", "last_failure_at"])
def test_an_entry_added_by_hand_with_a_time_of_no_offset_is_none(name: str) -> None:
    """Before: such an entry failed `dlq list --since` and `GET /dlq/entries?since=` (500)
    as its time was compared, where docs/operations.md says an entry no worker writes is
    left out (a review's finding)."""
    fields = {**_fields(dead_letter(5)), name.encode(): b"2024-01-01T00:00:00"}
    assert _dead_letter("1-0", fields) is None
    assert _dead_letter("1-0", _fields(dead_letter(5))) is not None


@pytest.mark.parametrize("history", [json.dumps([{**EPISODE, "attempts": 1e400}]).encode(),
                                     b"[" * 100_000 + b"]" * 100_000])
def test_a_history_added_by_hand_that_no_worker_writes_is_none(history: bytes) -> None:
    """Before: attempts of 1e400 (an overflow), or a history nested past the interpreter's
    bound, failed every listing of the DLQ, `dlq list` and `GET /dlq/entries` (500)."""
    entry = _dead_letter("1-0", {**_fields(dead_letter(5)), b"history": history})
    assert entry is not None and entry.letter.history == ()


def test_a_replay_asks_kafka_for_the_topic_no_longer_than_ten_seconds() -> None:
    """Before: `eventpipe dlq replay`, whose publisher waits 30 s for Kafka's acknowledgements,
    waited as long for Kafka to tell the topic's partitions before it said that Kafka does not
    answer (and for as long ignored Ctrl-C); the docs say 10 s."""
    asked: list[float] = []

    class Silent:
        def list_topics(self, topic: str, timeout: float) -> None:
            asked.append(timeout)
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))

    publisher = Publisher(Settings(kafka_bootstrap_servers="127.0.0.1:9"), timeout_s=30.0)
    publisher.producer = Silent()  # type: ignore[assignment]
    with pytest.raises(TransientError, match="Kafka does not answer"):
        publisher.answers("events")
    assert asked == [ANSWER_TIMEOUT_S] and ANSWER_TIMEOUT_S <= 10
