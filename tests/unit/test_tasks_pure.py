"""Pure pieces of the workers: partition specs, the wire format of a message."""

from __future__ import annotations

import socket
from typing import Any

import kombu.transport
import msgpack
import pytest
from kombu.connection import Connection
from kombu.transport import redis as kombu_redis

from eventpipe.kafka import client_config, consumer_config, reader_config
from eventpipe.messages import read_headers
from eventpipe.queues import TaskMessage, queue_name, task_summary
from eventpipe.settings import Settings
from launcher.workers import parse_partitions, share
from tasks import transport
from tasks.app import flowers_port_free, role


def test_partition_specs() -> None:
    assert parse_partitions("0-5") == [0, 1, 2, 3, 4, 5]
    assert parse_partitions("0,2,4") == [0, 2, 4]
    assert parse_partitions("7, 0-2,2") == [0, 1, 2, 7]
    for bad in ("", "a-b", "5-2", "-1"):
        with pytest.raises(ValueError):
            parse_partitions(bad)
    assert parse_partitions("0-11", 12) == list(range(12))
    with pytest.raises(ValueError, match="partition 99 does not exist: the topic has 12"):
        parse_partitions("0-99", 12)


def test_partitions_are_dealt_over_processes_without_overlap() -> None:
    groups = share(list(range(6)), 4)
    assert groups == [[0, 4], [1, 5], [2], [3]]
    assert share([3], 4) == [[3]]


def test_one_queue_per_partition() -> None:
    assert queue_name(7) == "events.p7"


def test_messages_carry_any_bytes_and_the_kafka_timestamp() -> None:
    message = TaskMessage(42, None, b"\xff\x00not utf-8", 1_764_000_000_000, 3)
    assert TaskMessage.from_wire(message.to_wire()) == message
    assert message.size == len(b"\xff\x00not utf-8")


def test_a_tombstone_and_headers_travel_as_they_came() -> None:
    """A null value stays null; headers (a repeated name, a null value, bytes that are not
    UTF-8) travel in order, through msgpack as Celery sends them, and count in the size. A
    message without headers keeps the five parts an older worker reads."""
    headers = (("trace", b"\xff\x00"), ("empty", None), ("trace", b"again"))
    tombstone = TaskMessage(7, b"k", None, None, 0, headers)
    wire = msgpack.unpackb(msgpack.packb(tombstone.to_wire()))
    assert TaskMessage.from_wire(wire) == tombstone
    assert tombstone.size == len(b"k") + len("trace") * 2 + len(b"\xff\x00again") + len("empty")
    assert len(TaskMessage(8, b"k", b"{}").to_wire()) == 5


@pytest.mark.parametrize("wire", [
    [-1000000, b"k", b"{}", None, 0],  # its offsets' range would be "-1000000--1000000"
    [True, b"k", b"{}", None, 0],
    ["7", b"k", b"{}", None, 0],
    [7, "k", b"{}", None, 0],
    [7, b"k", 5, None, 0],
    [7, b"k", b"{}", "yesterday", 0],
    [7, b"k", b"{}", None, -1],
    [7, b"k", b"{}", None, 0, [[b"\xff", b"v"]]],
    [7, b"k", b"{}", None, 0, [], 3],
    [7, b"k"],
])
def test_what_no_bridge_sends_is_no_message(wire: list[Any]) -> None:
    """Before: any list of five parts was taken, `int()` of whatever came: a task sent by
    hand with a negative offset wrote a ledger mark the bridge could not read back, and it
    stopped at each start (a review's finding)."""
    with pytest.raises(ValueError, match="not a message of a bridge's task"):
        TaskMessage.from_wire(wire)
    # What a bridge may send: any timestamp a producer set, an offset of 0.
    assert TaskMessage.from_wire([0, None, None, -62_000_000_000_000, 0]).timestamp_ms == \
        -62_000_000_000_000
    # A part a later bridge adds: not this worker's to judge (a review's finding).
    assert TaskMessage.from_wire([3, b"k", b"{}", None, 0, [], None, "later"]).offset == 3


def test_a_message_kafka_could_not_hand_over_travels_with_why() -> None:
    unreadable = TaskMessage(9, None, None, unreadable="its record batch cannot be read")
    wire = msgpack.unpackb(msgpack.packb(unreadable.to_wire()))
    assert TaskMessage.from_wire(wire) == unreadable
    assert TaskMessage.from_wire(TaskMessage(9, None, None).to_wire()).unreadable is None


def test_headers_the_kafka_client_cannot_decode_leave_the_message_without_them() -> None:
    class Record:  # the client's message, whose headers' names are not UTF-8
        def headers(self) -> None:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

        def topic(self) -> str:
            return "events"

        def partition(self) -> int:
            return 0

        def offset(self) -> int:
            return 5

    assert read_headers(Record()) == ()


def test_flower_sees_where_the_messages_are_not_what_they_say() -> None:
    messages = [TaskMessage(o, b"k", b'{"email": "ada@example.com"}') for o in (100, 101, 599)]
    summary = task_summary("events", 3, messages)
    assert summary == "events p3 offsets 100–599, 3 events"
    assert "ada" not in summary
    assert task_summary("events", 0, messages[:1]) == "events p0 offset 100, 1 events"


def test_every_consumer_reads_only_committed_transactions() -> None:
    """An aborted transaction's events are never applied, nor expected by `verify`: said, not
    left to the client's default."""
    settings = Settings()
    assert consumer_config(settings)["isolation.level"] == "read_committed"
    assert reader_config(settings, **{"group.id": "g"})["isolation.level"] == "read_committed"
    assert "isolation.level" not in client_config(settings)  # producers and admins: not theirs


def test_a_worker_reads_every_form_of_redis_broker_url_through_its_checking_transport(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: only `redis://` and `rediss://` in lower case took the checking transport;
    `REDIS://…`, `redis+socket://…` and `sentinel://…` stopped the worker on an item no bridge
    wrote, as did any URL resolved once before the worker installed it (kombu's cache)."""
    for scheme in ("redis", "rediss", "sentinel"):
        monkeypatch.setitem(kombu.transport.TRANSPORT_ALIASES, scheme,
                            kombu.transport.TRANSPORT_ALIASES[scheme])
    monkeypatch.setattr(kombu.transport, "_transport_cache", {})
    assert _transport_of("redis://127.0.0.1/1") is kombu_redis.Transport  # cached now
    transport.read_redis_brokers_here()
    for url in ("redis://127.0.0.1/1", "REDIS://127.0.0.1/1", "rediss://127.0.0.1/1",
                "redis+socket:///tmp/redis.sock"):
        assert _transport_of(url) is transport.Transport, url
    assert _transport_of("sentinel://127.0.0.1:26379") is transport.SentinelTransport
    assert issubclass(transport.SentinelTransport.Channel, kombu_redis.SentinelChannel)
    assert _transport_of("amqp://127.0.0.1//") is not transport.Transport


def _transport_of(url: str) -> Any:
    return Connection(url).get_transport_cls()  # type: ignore[no-untyped-call]


@pytest.mark.parametrize(("argv", "expected"), [
    (["-A", "tasks", "flower", "--port=5555"], "flower"),
    (["-A", "tasks", "worker", "-n", "flower"], "worker"),  # a review's finding
    (["-A", "tasks", "inspect", "ping"], "worker"),
])
def test_what_celery_s_command_line_runs_is_its_command_not_an_option_s_value(
        argv: list[str], expected: str) -> None:
    assert role(argv) == expected


def test_flower_on_a_unix_socket_takes_no_port_nor_asks_for_one() -> None:
    """A review's finding: Flower told to listen on a Unix socket was refused when another
    process held the port it does not listen on."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        flowers_port_free(["--unix-socket=/tmp/f.sock", f"--port={port}",
                           "--address=127.0.0.1"])
        with pytest.raises(SystemExit):
            flowers_port_free([f"--port={port}", "--address=127.0.0.1"])
