"""Fixtures for integration tests that need a Kafka-protocol broker (embedded Tansu)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import TopicFactory, create_topic, running_kafka
from tests.support.pipeline import Pipeline


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The bootstrap address of one Tansu shared by the session; tests keep apart by using
    their own topics and consumer groups. Its log is kept in the session's tmp dir."""
    with running_kafka(log_path=tmp_path_factory.mktemp("tansu") / "tansu.log") as bootstrap:
        yield bootstrap


@pytest.fixture
def kafka_topic(kafka_broker: str) -> TopicFactory:
    """Call it to create a fresh, uniquely named topic: `kafka_topic(partitions=3)`."""

    def make(partitions: int = 12) -> str:
        return create_topic(kafka_broker, partitions)

    return make


@pytest.fixture
def make_pipeline(kafka_broker: str, tmp_path: Path) -> Iterator[Any]:
    """Call it for a pipeline of real processes on a topic, a Redis and a database of its
    own (`tests.support.pipeline.Pipeline`); each is closed after the test."""
    made: list[Pipeline] = []

    def make(**overrides: Any) -> Pipeline:
        pipeline = Pipeline(kafka_broker, tmp_path, **overrides)
        made.append(pipeline)
        return pipeline

    yield make
    for pipeline in made:
        pipeline.close()
