"""Pure pieces of the workers: backoff, partition specs, the wire format of a message."""

from __future__ import annotations

import random

import pytest

from eventpipe.queues import Message, partition_of, queue_name
from tasks.retry import backoff_delay
from tasks.workers import parse_partitions, share


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    rng = random.Random(1)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (7, 60.0), (30, 60.0)]:
        delays = [backoff_delay(attempt, 1.0, 60.0, rng) for _ in range(200)]
        assert min(delays) >= ceiling / 2 and max(delays) <= ceiling
        assert max(delays) - min(delays) > ceiling / 10  # jittered, not constant


def test_partition_specs() -> None:
    assert parse_partitions("0-5") == [0, 1, 2, 3, 4, 5]
    assert parse_partitions("0,2,4") == [0, 2, 4]
    assert parse_partitions("7, 0-2,2") == [0, 1, 2, 7]
    for bad in ("", "a-b", "5-2", "-1"):
        with pytest.raises(ValueError):
            parse_partitions(bad)


def test_partitions_are_dealt_over_processes_without_overlap() -> None:
    groups = share(list(range(6)), 4)
    assert groups == [[0, 4], [1, 5], [2], [3]]
    assert share([3], 4) == [[3]]


def test_queue_names_round_trip() -> None:
    assert queue_name(7) == "events.p7" and partition_of("events.p7") == 7
    assert partition_of("celery") is None


def test_messages_carry_any_bytes_through_json() -> None:
    message = Message(42, None, b"\xff\x00not utf-8", b"[]", 3, "2026-01-01T00:00:00+00:00")
    assert Message.from_wire(message.to_wire()) == message
