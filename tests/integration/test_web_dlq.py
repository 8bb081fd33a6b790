"""The DLQ endpoints, readiness and metrics on the real Redis, and Kafka (Tansu) for replay.

Each test has its own DLQ stream (`test:dlq:<uuid>`), deleted afterwards.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
import schemathesis
from confluent_kafka import Consumer, TopicPartition
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from eventpipe import replay
from eventpipe.dlq import HISTORY_HEADER, DeadLetter, DeadLetterQueue
from eventpipe.settings import Settings
from tests.broker import TopicFactory
from tests.integration.test_web_reads import fuzz, serving
from tests.services import REDIS_URL
from web import create_app, services

TOKEN = "s3cret-token"
T0 = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
# Nothing listens on port 1 of the loopback: connections are refused at once.
NOWHERE = "127.0.0.1:1"

ENDPOINTS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/dlq/entries", None),
    ("GET", "/dlq/entries/0-1", None),
    ("DELETE", "/dlq/entries/0-1", None),
    ("POST", "/dlq/entries/0-1/replay", None),
    ("POST", "/dlq/replay", {"all": True}),
    ("POST", "/dlq/purge", {"all": True}),
]


@pytest.fixture
def stream(redis_client: redis.Redis) -> Iterator[str]:
    name = f"test:dlq:{uuid.uuid4().hex}"
    yield name
    redis_client.delete(name, f"{name}:index")


@pytest.fixture
def queue(redis_client: redis.Redis, stream: str) -> DeadLetterQueue:
    return DeadLetterQueue(redis_client, stream, max_entries=100)


def settings_for(sqlite_url: str, stream: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"database_url": sqlite_url, "redis_url": REDIS_URL,
                              "dlq_stream": stream, "dlq_api_token": TOKEN,
                              "kafka_bootstrap_servers": NOWHERE, **overrides}
    return Settings(**values)


@pytest.fixture
def make_app(sqlite_url: str, stream: str) -> Iterator[Any]:
    made: list[Flask] = []

    def make(**overrides: Any) -> FlaskClient:
        app = create_app(settings_for(sqlite_url, stream, **overrides))
        made.append(app)
        return app.test_client()

    yield make
    for app in made:
        services.of(app).close()


@pytest.fixture
def client(make_app: Any) -> FlaskClient:
    client: FlaskClient = make_app()
    return client


def letter(offset: int, event_type: str = "OrderPlaced", error: str = "InvalidEvent",
           topic: str = "events") -> DeadLetter:
    return DeadLetter(
        value=f'{{"n": {offset}}}'.encode(), key=f"k-{offset}".encode(), topic=topic,
        partition=0, offset=offset, event_id=f"e-{offset}", event_type=event_type,
        error_class=error, error_message="data.x: is required", traceback="Traceback …",
        attempts=1, first_failure_at=T0, last_failure_at=T0 + timedelta(seconds=1),
        worker="host:1",
    )


def call(client: FlaskClient, method: str, path: str, body: Any = None,
         token: str | None = TOKEN, **kwargs: Any) -> TestResponse:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return client.open(path, method=method, json=body, headers=headers, **kwargs)


def ok(response: TestResponse, status: int = 200) -> Any:
    assert response.status_code == status, response.get_data(as_text=True)
    return response.get_json()


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
def test_without_a_configured_token_the_endpoints_are_disabled(
    make_app: Any, method: str, path: str, body: Any
) -> None:
    client = make_app(dlq_api_token="")
    response = call(client, method, path, body)
    assert response.status_code == 403
    assert "set DLQ_API_TOKEN" in response.get_json()["message"]


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
@pytest.mark.parametrize("header", [
    None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}",
    # UTF-8 bytes as they arrive over HTTP (WSGI gives them latin-1 decoded): not a 500.
    "Bearer " + "sécret".encode().decode("latin-1"),
])
def test_a_missing_or_wrong_token_is_401(
    client: FlaskClient, method: str, path: str, body: Any, header: str | None
) -> None:
    headers = {} if header is None else {"Authorization": header}
    response = client.open(path, method=method, json=body, headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="eventpipe-dlq"'
    assert response.get_json()["errors"] == {}


def test_the_right_token_is_accepted_even_when_not_ascii(make_app: Any) -> None:
    assert ok(call(make_app(), "GET", "/dlq/entries"))["items"] == []
    token = "sécret"
    client = make_app(dlq_api_token=token)
    assert ok(call(client, "GET", "/dlq/entries", token=token.encode().decode("latin-1")))[
        "depth"] == 0


def test_listing_pages_with_a_cursor(client: FlaskClient, queue: DeadLetterQueue) -> None:
    ids = [queue.add(letter(n))[0] for n in range(5)]
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = {"limit": 2} | ({"after": cursor} if cursor else {})
        page = ok(call(client, "GET", "/dlq/entries", query_string=query))
        assert page["depth"] == 5
        seen += [item["id"] for item in page["items"]]
        pages += 1
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert seen == ids and pages == 3


def test_listing_filters_by_type_error_and_time(
    client: FlaskClient, queue: DeadLetterQueue
) -> None:
    queue.add(letter(1, "OrderPlaced", "InvalidEvent"))
    queue.add(letter(2, "UserCreated", "RejectedEvent"))
    queue.add(letter(3, "OrderPlaced", "MissingParent"))

    def offsets(**query: Any) -> list[int]:
        page = ok(call(client, "GET", "/dlq/entries", query_string=query))
        return [item["offset"] for item in page["items"]]

    assert offsets(eventType="OrderPlaced") == [1, 3]
    assert offsets(errorClass="RejectedEvent") == [2]
    assert offsets(eventType="OrderPlaced", errorClass="MissingParent") == [3]
    # Times are when entries were dead-lettered (now), not the failures' own times.
    now = datetime.now(UTC)
    assert offsets(since=(now - timedelta(minutes=5)).isoformat()) == [1, 2, 3]
    assert offsets(since=(now + timedelta(minutes=5)).isoformat()) == []
    assert offsets(until=(now - timedelta(minutes=5)).isoformat()) == []
    # Bounds before stream ids begin (1970) and empty ranges are just that, not errors.
    assert offsets(since="0001-01-01T00:00:00Z") == [1, 2, 3]
    assert offsets(until="1900-01-01T00:00:00Z") == []
    assert offsets(since=now.isoformat(), until=(now - timedelta(days=1)).isoformat()) == []


@pytest.mark.parametrize("query", [
    {"limit": 0}, {"limit": 501}, {"limit": "x"}, {"after": "abc"},
    {"after": "99999999999999999999-0"}, {"since": "yesterday"}, {"until": "2026-13-01"},
    {"evenType": "OrderPlaced"},
])
def test_invalid_list_parameters_are_422(client: FlaskClient, query: dict[str, Any]) -> None:
    body = ok(call(client, "GET", "/dlq/entries", query_string=query), 422)
    assert body["errors"]["query"]


def test_an_entry_is_shown_in_full(client: FlaskClient, queue: DeadLetterQueue) -> None:
    entry_id, _ = queue.add(letter(7))
    stored = queue.get(entry_id)
    assert stored is not None
    body = ok(call(client, "GET", f"/dlq/entries/{entry_id}"))
    assert body == stored.as_json()
    assert body["value"] == {"text": '{"n": 7}'} and body["key"] == {"text": "k-7"}
    assert body["firstFailureAt"] == "2026-11-24T10:00:00Z"


@pytest.mark.parametrize(("entry_id", "status"), [
    ("0-1", 404), ("abc", 422), ("1-2-3", 422), ("18446744073709551616-0", 422)])
def test_unknown_and_invalid_entry_ids(client: FlaskClient, entry_id: str, status: int) -> None:
    for method in ("GET", "DELETE"):
        body = ok(call(client, method, f"/dlq/entries/{entry_id}"), status)
        assert body["code"] == status


def test_delete_removes_one_entry(client: FlaskClient, queue: DeadLetterQueue) -> None:
    keep, _ = queue.add(letter(1))
    gone, _ = queue.add(letter(2))
    response = call(client, "DELETE", f"/dlq/entries/{gone}")
    assert response.status_code == 204 and response.data == b""
    assert ok(call(client, "DELETE", f"/dlq/entries/{gone}"), 404)["code"] == 404
    assert queue.get(gone) is None and queue.get(keep) is not None
    # The position is free again: the same Kafka message could be dead-lettered anew.
    assert queue.add(letter(2))[1]


def test_purge_by_filter(client: FlaskClient, queue: DeadLetterQueue) -> None:
    queue.add(letter(1, error="InvalidEvent"))
    queue.add(letter(2, error="RejectedEvent"))
    queue.add(letter(3, error="InvalidEvent"))
    assert ok(call(client, "POST", "/dlq/purge", {"errorClass": "InvalidEvent"})) == {
        "deleted": 2}
    assert [e.offset for e in queue.scan()] == [2]
    assert ok(call(client, "POST", "/dlq/purge", {"all": True})) == {"deleted": 1}
    assert queue.depth() == 0


@pytest.mark.parametrize("body", [{}, {"all": False}, {"eventType": ""}, {"bogus": 1}])
def test_an_empty_or_invalid_selection_is_422(
    client: FlaskClient, queue: DeadLetterQueue, body: dict[str, Any]
) -> None:
    queue.add(letter(1))
    for path in ("/dlq/purge", "/dlq/replay"):
        assert ok(call(client, "POST", path, body), 422)["errors"]["json"]
    assert queue.depth() == 1


def read_topic(bootstrap: str, topic: str, count: int, timeout_s: float = 20.0) -> list[Any]:
    """The first `count` messages of partition 0, read without joining a group."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"web-{uuid.uuid4().hex}",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, 0, 0)])
    messages: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(messages) < count:
            assert time.monotonic() < deadline, f"got {len(messages)} of {count} messages"
            message = consumer.poll(0.2)
            if message is not None and message.error() is None:
                messages.append(message)
    finally:
        consumer.close()
    return messages


def test_replay_one_publishes_it_with_its_history_and_deletes_it(
    make_app: Any, queue: DeadLetterQueue, kafka_broker: str, kafka_topic: TopicFactory
) -> None:
    topic = kafka_topic(partitions=1)
    client = make_app(kafka_bootstrap_servers=kafka_broker, kafka_topic=topic)
    entry_id, _ = queue.add(letter(4, topic=topic))
    other, _ = queue.add(letter(5, topic=topic))

    assert ok(call(client, "POST", f"/dlq/entries/{entry_id}/replay")) == {"replayed": 1}

    [message] = read_topic(kafka_broker, topic, 1)
    assert (message.key(), message.value()) == (b"k-4", b'{"n": 4}')
    headers = dict(message.headers())
    [failure] = json.loads(headers[HISTORY_HEADER])
    assert failure["error_class"] == "InvalidEvent" and failure["replayed_at"]
    assert queue.get(entry_id) is None and queue.get(other) is not None
    assert ok(call(client, "POST", f"/dlq/entries/{entry_id}/replay"), 404)["code"] == 404


def test_replay_by_filter_publishes_only_what_matches(
    make_app: Any, queue: DeadLetterQueue, kafka_broker: str, kafka_topic: TopicFactory,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replay, "CHUNK", 2)  # several chunks
    chunks: list[int] = []
    real_replay = DeadLetterQueue.replay

    def counting_replay(self: DeadLetterQueue, entries: list[DeadLetter], *args: Any) -> int:
        chunks.append(len(entries))
        replayed = real_replay(self, entries, *args)
        # As if a replayed message failed again at once: it is back, and must wait for the
        # next replay rather than be replayed again and again by this one.
        self.add(letter(100 + len(chunks), "OrderPlaced", topic=topic))
        return replayed

    monkeypatch.setattr(DeadLetterQueue, "replay", counting_replay)
    topic = kafka_topic(partitions=1)
    client = make_app(kafka_bootstrap_servers=kafka_broker, kafka_topic=topic)
    for n in range(6):
        queue.add(letter(n, "OrderPlaced" if n % 3 else "UserCreated", topic=topic))

    assert ok(call(client, "POST", "/dlq/replay", {"eventType": "OrderPlaced"})) == {
        "replayed": 4}

    assert sorted(m.value() for m in read_topic(kafka_broker, topic, 4)) == [
        b'{"n": 1}', b'{"n": 2}', b'{"n": 4}', b'{"n": 5}']
    assert [e.offset for e in queue.scan()] == [0, 3, 101, 102]
    assert chunks == [2, 2]


def test_replay_that_kafka_does_not_take_keeps_the_entries(
    client: FlaskClient, queue: DeadLetterQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replay, "FLUSH_TIMEOUT_S", 1.0)
    entry_id, _ = queue.add(letter(1))
    for method_path, body in ((f"/dlq/entries/{entry_id}/replay", None),
                              ("/dlq/replay", {"all": True})):
        response = call(client, "POST", method_path, body)
        assert response.status_code == 503
        assert "not acknowledged by Kafka" in response.get_json()["message"]
    assert queue.get(entry_id) is not None


def metric(client: FlaskClient, name: str) -> list[str]:
    text = client.get("/metrics").get_data(as_text=True)
    return [line for line in text.splitlines() if line.startswith(name)]


def test_metrics_report_requests_and_the_dlq_depth_at_each_scrape(
    client: FlaskClient, queue: DeadLetterQueue
) -> None:
    for n in range(3):
        queue.add(letter(n))
    assert client.get("/health").status_code == 200
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert metric(client, "dlq_depth ") == ["dlq_depth 3.0"]
    assert any('url_rule="/health"' in line
               for line in metric(client, "flask_http_request_duration_seconds_count"))
    queue.purge()
    assert metric(client, "dlq_depth ") == ["dlq_depth 0.0"]


def test_metrics_still_answer_when_redis_is_down(make_app: Any) -> None:
    client = make_app(redis_url=f"redis://{NOWHERE}/0")
    assert client.get("/metrics").status_code == 200


def test_ready_when_every_dependency_answers(make_app: Any, kafka_broker: str) -> None:
    body = ok(make_app(kafka_bootstrap_servers=kafka_broker).get("/ready"))
    assert body["ready"] is True and body["failed"] == []
    assert [(c["name"], c["ok"], c["error"]) for c in body["checks"]] == [
        ("database", True, None), ("redis", True, None), ("kafka", True, None)]
    assert all(c["durationMs"] >= 0 for c in body["checks"])


def test_not_ready_names_what_failed(make_app: Any) -> None:
    client = make_app(redis_url=f"redis://{NOWHERE}/0", kafka_bootstrap_servers=NOWHERE)
    started = time.monotonic()
    response = client.get("/ready")
    elapsed = time.monotonic() - started
    body = ok(response, 503)
    assert body["ready"] is False and body["failed"] == ["redis", "kafka"]
    checks = {c["name"]: c for c in body["checks"]}
    assert checks["database"]["ok"] is True
    assert checks["redis"]["error"] == "ConnectionError"
    assert checks["kafka"]["error"] == "no broker answered within 1.5 s"
    assert elapsed < 4.0  # each check is bounded; they run side by side
    # Liveness calls nothing: still fine.
    assert ok(client.get("/health")) == {"status": "ok"}


def test_the_dlq_reads_honour_their_openapi_document(
    sqlite_url: str, stream: str, queue: DeadLetterQueue
) -> None:
    ids = [queue.add(letter(n, error=("InvalidEvent", "MissingParent")[n % 2]))[0]
           for n in range(3)]
    # A message that was not even an event: raw bytes, no key, nothing could be read.
    ids.append(queue.add(replace(letter(9), value=b"\xff not utf-8", key=None, topic=None,
                                 partition=None, offset=None, event_id=None,
                                 event_type=None))[0])
    app = create_app(settings_for(sqlite_url, stream))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with serving(app) as base_url:
            schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json").include(
                path_regex=r"^/dlq/entries", method="GET")
            for entry_id in ids:
                case = schema["/dlq/entries/{entryId}"]["GET"].Case(
                    path_parameters={"entryId": entry_id})
                assert case.call_and_validate(base_url=base_url, headers=auth).status_code == 200
            page = schema["/dlq/entries"]["GET"].Case(query={"limit": 2})
            assert page.call_and_validate(base_url=base_url, headers=auth).status_code == 200
            fuzz(schema, base_url, auth)
    finally:
        services.of(app).close()
