"""`eventpipe produce generate` against a real broker: what it says it sent is in the topic."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import uuid
from datetime import datetime, timedelta

import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition

from eventpipe.errors import InvalidEvent
from eventpipe.events import parse_event
from eventpipe.times import from_kafka_millis
from tests.support.pipeline import BIN, wait_until


def test_generate_sends_the_stream_it_reports(kafka_broker: str) -> None:
    topic = f"produce-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "EVENTPIPE_ENV_FILE": "/nonexistent", "KAFKA_TOPIC": topic,
           "KAFKA_PARTITIONS": "3", "KAFKA_BOOTSTRAP_SERVERS": kafka_broker}
    done = subprocess.run(
        [str(BIN / "eventpipe"), "produce", "generate", "--count", "300", "--rate", "2000",
         "--duplicates", "0.1", "--out-of-order", "0.1", "--poison", "0.05", "--seed", "4"],
        env=env, capture_output=True, timeout=120, check=True)
    stdout = done.stdout.decode()
    assert re.search(r"sent 300 of 300 messages to " + topic, stdout), stdout
    poison_reported = sum(int(n) for n in re.findall(r"poison:\S+\s+(\d+)", stdout))
    # Valid events that the rules between keys reject, rather than the contract.
    cross_key = sum(int(n) for n in re.findall(
        r"poison:(?:orphan-order|email-clash|reused-id)\s+(\d+)", stdout))
    assert poison_reported > 0 and "produce latency: p50" in stdout
    # Output to a pipe: no progress frames (they are for terminals).
    assert b"\r" not in done.stderr and b"\r" not in done.stdout

    consumer = Consumer({"bootstrap.servers": kafka_broker, "group.id": f"{topic}-check",
                         "auto.offset.reset": "earliest", "enable.partition.eof": True,
                         "session.timeout.ms": 6000})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(3)])
    values: list[tuple[bytes | None, bytes, datetime | None]] = []
    finished: set[int | None] = set()
    while len(finished) < 3:
        record = consumer.poll(10)
        assert record is not None, "the topic ended early"
        if record.error() is not None:
            finished.add(record.partition())
            continue
        values.append((record.key(), record.value() or b"",
                       from_kafka_millis(record.timestamp()[1])))
    consumer.close()
    assert len(values) == 300
    invalid = 0
    for key, value, timestamp in values:
        try:
            parse_event(value, key, received_at=timestamp, max_future=timedelta(minutes=5))
        except InvalidEvent:
            invalid += 1
    assert invalid == poison_reported - cross_key


def _in_topic(bootstrap: str, topic: str, partitions: int) -> int:
    """The messages in the topic; 0 before the command made it."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{topic}-count"})
    try:
        return sum(high for _low, high in (
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            for p in range(partitions)))
    except KafkaException:  # Unknown partition
        return 0
    finally:
        consumer.close()


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_paced_generate_says_what_it_sent_and_exits_128_and_the_signal(
        kafka_broker: str, stop: signal.Signals) -> None:
    """A review's finding: Ctrl-C during a paced run gave a SystemError traceback (the Kafka
    client's poll returned NULL on the pending signal), or ended it without a word; a later
    one's, SIGTERM (an orchestrator's stop, `timeout`'s) ended it at once, with nothing said
    and the messages the client held dropped."""
    topic = f"produce-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "EVENTPIPE_ENV_FILE": "/nonexistent", "KAFKA_TOPIC": topic,
           "KAFKA_PARTITIONS": "2", "KAFKA_BOOTSTRAP_SERVERS": kafka_broker}
    run = subprocess.Popen(
        [str(BIN / "eventpipe"), "produce", "generate", "--count", "1000", "--rate", "5",
         "--seed", "4"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Sending, paced: the signal lands while it waits in the client's poll.
        wait_until(lambda: run.poll() is None and _in_topic(kafka_broker, topic, 2) >= 2, 60,
                   "the first messages in the topic")
        run.send_signal(stop)
        stdout, stderr = run.communicate(timeout=30)
    finally:
        run.kill()
    assert run.returncode == 128 + stop, stderr
    assert "Traceback" not in stderr and "Error" not in stderr, stderr
    said = re.search(r"^interrupted after handing (\d+) of 1000 messages to Kafka's client: "
                     rf"sent (\d+) of 1000 messages to {topic} in ", stdout, re.MULTILINE)
    assert said is not None, stdout
    handed, sent = int(said[1]), int(said[2])
    assert 2 <= handed < 1000 and sent == handed == _in_topic(kafka_broker, topic, 2)
    assert "produce latency: p50" in stdout
