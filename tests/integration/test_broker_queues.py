"""Queue depths read from the Celery broker, Redis or RabbitMQ (`eventpipe.broker_queues`).

The bridge leans on them: a partition whose tasks still wait in its queue is never read again
from Kafka, however long they wait. A broker that cannot be asked says so (`Unanswered`).
"""

from __future__ import annotations

import socket
import uuid

import pytest
import redis
from celery import Celery

from eventpipe import redis_clients
from eventpipe.broker_queues import AmqpDepths, Unanswered, depth_reader
from eventpipe.queues import make_celery, queue_name
from eventpipe.settings import Settings
from tests.support.rabbitmq import rabbitmq_vhost
from tests.support.services import REDIS_URL


def send(app: Celery, partition: int, tasks: int) -> None:
    for _ in range(tasks):
        app.send_task("anything", args=[], queue=queue_name(partition))


def test_rabbitmq_queue_depths_are_read_as_redis_ones_are() -> None:
    with rabbitmq_vhost() as url:
        app = make_celery(Settings(celery_broker_url=url), main="depths")
        reader = depth_reader(Settings(celery_broker_url=url), redis_clients.operator)
        assert reader is not None
        try:
            for _ in range(50):  # none declared yet: the broker closes the channel that asks
                assert reader.read(range(3)) == {0: 0, 1: 0, 2: 0}
            assert isinstance(reader, AmqpDepths)
            assert len(reader.connection.connection.channels) <= 2  # reopened, never piled up
            send(app, 1, 3)
            send(app, 2, 1)
            assert reader.read(range(3)) == {0: 0, 1: 3, 2: 1}
        finally:
            reader.close()
            app.close()


def test_redis_queue_depths(redis_client: redis.Redis) -> None:
    db = f"{REDIS_URL}/5"
    app = make_celery(Settings(celery_broker_url=db), main="depths")
    reader = depth_reader(Settings(celery_broker_url=db), redis_clients.operator)
    assert reader is not None
    broker = redis.Redis.from_url(db)
    broker.delete(*(queue_name(p) for p in range(3)))
    try:
        send(app, 0, 2)
        assert reader.read(range(3)) == {0: 2, 1: 0, 2: 0}
    finally:
        broker.delete(*(queue_name(p) for p in range(3)))
        reader.close()
        app.close()


@pytest.mark.parametrize("scheme", ["amqp", "redis"])
def test_a_broker_that_does_not_answer_says_so_at_once(scheme: str) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = (f"amqp://guest:guest@127.0.0.1:{port}/{uuid.uuid4().hex}" if scheme == "amqp"
           else f"redis://127.0.0.1:{port}/1")
    reader = depth_reader(Settings(celery_broker_url=url), redis_clients.operator)
    assert reader is not None
    with pytest.raises(Unanswered, match="refused"):
        reader.read(range(2))
    reader.close()


def test_a_broker_it_cannot_ask_is_none() -> None:
    assert depth_reader(Settings(celery_broker_url="sqs://"), redis_clients.operator) is None
