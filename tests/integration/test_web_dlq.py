"""The DLQ endpoints, readiness and metrics on the real Redis, and Kafka (Tansu) for replay.

Each test has its own DLQ stream (`test:dlq:<uuid>`), deleted afterwards.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import schemathesis
from confluent_kafka import Consumer, KafkaError, TopicPartition
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, select
from werkzeug.test import TestResponse

from cli.main import _parser
from eventpipe.apply import apply_batch
from eventpipe.database import make_engine
from eventpipe.dlq import actions, projection, records
from eventpipe.dlq.stream import DeadLetterStream, StreamEntry
from eventpipe.effects import Position
from eventpipe.errors import KEY_OF_ANOTHER_KIND
from eventpipe.kafka import make_producer
from eventpipe.messages import RawMessage
from eventpipe.settings import Settings, SettingsError
from eventpipe.tables import dead_letters, reconcile_queue
from launcher.embedded import start_redis
from tests.support.broker import TopicFactory
from tests.support.databases import drop_database, new_database
from tests.support.factories import T0, dead_letter
from tests.support.http import fuzz, serving
from tests.support.pipeline import wait_until
from tests.support.services import REDIS_URL
from web import create_app, services
from web.resources.dlq import routes

TOKEN = "s3cret-token"
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
    redis_client.delete(name, f"{name}:index", f"{name}:totals")


@pytest.fixture
def sqlite_engine(sqlite_url: str) -> Iterator[Engine]:
    engine = make_engine(Settings(database_url=sqlite_url))
    with engine.begin() as conn:
        conn.execute(dead_letters.delete())
    yield engine
    engine.dispose()


class Queue:
    """Dead letters as the pipeline makes them: recorded in SQL, projected to the stream."""

    def __init__(self, engine: Engine, stream: DeadLetterStream) -> None:
        self.engine = engine
        self.stream = stream

    def add(self, entry: StreamEntry) -> str:
        [saved] = apply_batch(self.engine, [], [entry.letter]).dead_letters
        message = entry.raw or RawMessage(entry.key, b"")
        projection.project(self.engine, self.stream, None, {saved.dlq_key: message})
        found = self.stream.get_key(saved.dlq_key)
        assert found is not None and found.entry_id is not None
        return found.entry_id

    def offsets(self) -> list[int | None]:
        return [entry.letter.position.offset for entry in self.stream.scan()]

    def state(self, entry: StreamEntry) -> str:
        with self.engine.connect() as conn:
            return str(conn.execute(select(dead_letters.c.state).where(
                dead_letters.c.dlq_key == entry.letter.dlq_key)).scalar_one())


@pytest.fixture
def queue(redis_client: redis.Redis, stream: str, sqlite_engine: Engine) -> Queue:
    return Queue(sqlite_engine, DeadLetterStream(redis_client, stream, 100, 10**7))


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


def test_listing_pages_with_a_cursor(client: FlaskClient, queue: Queue) -> None:
    ids = [queue.add(dead_letter(n)) for n in range(5)]
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
    client: FlaskClient, queue: Queue
) -> None:
    queue.add(dead_letter(1, "OrderPlaced", "InvalidEvent"))
    queue.add(dead_letter(2, "UserCreated", "EmailTaken"))
    queue.add(dead_letter(3, "OrderPlaced", "MissingParent"))

    def offsets(**query: Any) -> list[int]:
        page = ok(call(client, "GET", "/dlq/entries", query_string=query))
        return [item["offset"] for item in page["items"]]

    assert offsets(eventType="OrderPlaced") == [1, 3]
    assert offsets(errorClass="EmailTaken") == [2]
    assert offsets(eventType="OrderPlaced", errorClass="MissingParent") == [3]
    # Times are the letters' last failures (T0 + 1 s here), not when they entered the stream.
    failed = T0 + timedelta(seconds=1)
    assert offsets(since=failed.isoformat()) == [1, 2, 3]
    assert offsets(since=(failed + timedelta(milliseconds=1)).isoformat()) == []
    assert offsets(until=(failed - timedelta(milliseconds=1)).isoformat()) == []
    assert offsets(until=failed.isoformat()) == [1, 2, 3]
    assert offsets(since=(datetime.now(UTC) - timedelta(minutes=5)).isoformat()) == []
    # Bounds before 1970 and empty ranges are just that, not errors.
    assert offsets(since="0001-01-01T00:00:00Z") == [1, 2, 3]
    assert offsets(until="1900-01-01T00:00:00Z") == []
    assert offsets(since=failed.isoformat(), until=(failed - timedelta(days=1)).isoformat()) == []


@pytest.mark.parametrize("query", [
    {"limit": 0}, {"limit": 501}, {"limit": "x"}, {"after": "abc"},
    {"after": "99999999999999999999-0"}, {"since": "yesterday"}, {"until": "2026-13-01"},
    {"evenType": "OrderPlaced"},
])
def test_invalid_list_parameters_are_422(client: FlaskClient, query: dict[str, Any]) -> None:
    body = ok(call(client, "GET", "/dlq/entries", query_string=query), 422)
    assert body["errors"]["query"]


def test_an_entry_is_shown_in_full(client: FlaskClient, queue: Queue) -> None:
    entry_id = queue.add(dead_letter(7))
    body = ok(call(client, "GET", f"/dlq/entries/{entry_id}"))
    assert body == {
        "id": entry_id, "dlqKey": dead_letter(7).letter.dlq_key, "eventId": "e-7",
        "eventType": "OrderPlaced", "topic": "events", "partition": 0, "offset": 7,
        "key": {"text": "k-7"}, "value": {"text": '{"n": 7}'}, "tombstone": False,
        "headers": [], "errorClass": "InvalidEvent",
        "errorMessage": "data.x: is required", "traceback": "Traceback …", "attempts": 1,
        "firstFailureAt": "2026-11-24T10:00:00.000Z",
        "lastFailureAt": "2026-11-24T10:00:01.000Z", "worker": "host:1", "history": []}


@pytest.mark.parametrize(("entry_id", "status"), [
    ("0-1", 404), ("abc", 422), ("1-2-3", 422), ("18446744073709551616-0", 422)])
def test_unknown_and_invalid_entry_ids(client: FlaskClient, entry_id: str, status: int) -> None:
    for method in ("GET", "DELETE"):
        body = ok(call(client, method, f"/dlq/entries/{entry_id}"), status)
        assert body["code"] == status


def test_delete_removes_one_entry(client: FlaskClient, queue: Queue) -> None:
    keep = queue.add(dead_letter(1))
    gone = queue.add(dead_letter(2))
    response = call(client, "DELETE", f"/dlq/entries/{gone}")
    assert response.status_code == 204 and response.data == b""
    assert ok(call(client, "DELETE", f"/dlq/entries/{gone}"), 404)["code"] == 404
    assert queue.stream.get(gone) is None and queue.stream.get(keep) is not None
    assert queue.state(dead_letter(2)) == "purged"  # the fate stays recorded
    # The same message sent again (at another offset) is a dead letter again, its purge kept
    # in its history.
    resent = dead_letter(2)
    resent = replace(resent, letter=replace(resent.letter, position=Position("events", 0, 9)))
    again = queue.stream.get(queue.add(resent))
    assert again is not None and [e.ended for e in again.letter.history] == ["purged"]


def test_deletes_succeed_while_workers_write_to_sqlite(
    client: FlaskClient, queue: Queue, sqlite_engine: Engine,
) -> None:
    """The API reads SQLite without its write lock; a DLQ change reads, then writes. Begun as
    a reader, its transaction could not write once a worker had committed since it read
    (SQLite refuses the upgrade at once, whatever the busy timeout): every change was a 503
    while the pipeline ran."""
    ids = [queue.add(dead_letter(n)) for n in range(6)]
    stop = threading.Event()
    commits = [0]

    def worker() -> None:  # small transactions, one after the other, as batches are
        while not stop.is_set():
            with sqlite_engine.begin() as conn:
                conn.execute(reconcile_queue.insert().values(keys="{}", created_at=T0))
                conn.execute(reconcile_queue.delete())
            commits[0] += 1

    writing = threading.Thread(target=worker)
    writing.start()
    try:
        wait_until(lambda: commits[0] > 20, 10, "the worker writing")
        for entry_id in ids[:5]:
            response = call(client, "DELETE", f"/dlq/entries/{entry_id}")
            assert response.status_code == 204, response.get_data(as_text=True)
        assert ok(call(client, "POST", "/dlq/purge", {"all": True})) == {
            "deleted": 1, "replaying": 0}
        started = commits[0]
        wait_until(lambda: commits[0] > started, 10, "the worker writing still")
    finally:
        stop.set()
        writing.join()


def test_an_entry_a_replay_has_is_not_deleted_but_said_so(
    client: FlaskClient, queue: Queue,
) -> None:
    held = queue.add(dead_letter(1))
    queue.add(dead_letter(2))
    with queue.engine.begin() as conn:
        assert records.claim_for_replay(conn, [dead_letter(1).letter.dlq_key],
                                        datetime.now(UTC) + timedelta(minutes=5))
    assert ok(call(client, "DELETE", f"/dlq/entries/{held}"), 409)["message"].startswith(
        "a replay in progress has this entry")
    assert ok(call(client, "POST", "/dlq/purge", {"all": True})) == {"deleted": 1,
                                                                      "replaying": 1}
    assert queue.offsets() == [1]


def test_purge_by_filter(client: FlaskClient, queue: Queue) -> None:
    queue.add(dead_letter(1, error="InvalidEvent"))
    queue.add(dead_letter(2, error="EmailTaken"))
    queue.add(dead_letter(3, error="InvalidEvent"))
    assert ok(call(client, "POST", "/dlq/purge", {"errorClass": "InvalidEvent"})) == {
        "deleted": 2, "replaying": 0}
    assert queue.offsets() == [2]
    assert ok(call(client, "POST", "/dlq/purge", {"all": True})) == {"deleted": 1,
                                                                      "replaying": 0}
    assert queue.stream.depth() == 0


@pytest.mark.parametrize("body", [{}, {"all": False}, {"eventType": ""}, {"bogus": 1},
                                  {"all": 1}, {"all": "true"}, {"all": 0}])
def test_an_empty_or_invalid_selection_is_422(
    client: FlaskClient, queue: Queue, body: dict[str, Any]
) -> None:
    queue.add(dead_letter(1))
    for path in ("/dlq/purge", "/dlq/replay"):
        assert ok(call(client, "POST", path, body), 422)["errors"]["json"]
    assert queue.stream.depth() == 1


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


def test_replay_one_publishes_it_and_it_leaves_the_dlq(
    make_app: Any, queue: Queue, kafka_broker: str, kafka_topic: TopicFactory
) -> None:
    topic = kafka_topic(partitions=1)
    client = make_app(kafka_bootstrap_servers=kafka_broker, kafka_topic=topic)
    entry_id = queue.add(dead_letter(4, topic=topic))
    other = queue.add(dead_letter(5, topic=topic))

    assert ok(call(client, "POST", f"/dlq/entries/{entry_id}/replay")) == {
        "replayed": 1, "refused": 0, "rejected": 0, "whyRejected": None, "skipped": 0,
        "noBytes": 0}

    [message] = read_topic(kafka_broker, topic, 1)
    assert (message.key(), message.value()) == (b"k-4", b'{"n": 4}')
    # No header carries the history (nothing a producer could forge): the SQL record does.
    assert not message.headers()
    assert queue.state(dead_letter(4)) == "replayed"
    assert queue.stream.get(entry_id) is None and queue.stream.get(other) is not None
    assert ok(call(client, "POST", f"/dlq/entries/{entry_id}/replay"), 404)["code"] == 404


def test_replay_by_filter_publishes_only_what_matches_and_was_there(
    make_app: Any, queue: Queue, kafka_broker: str, kafka_topic: TopicFactory,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(actions, "CHUNK", 2)  # several chunks
    chunks: list[int] = []
    real_chunk = actions._replay_chunk

    def counting_chunk(engine: Engine, stream: DeadLetterStream, chunk: list[StreamEntry],
                       *args: Any, **kwargs: Any) -> None:
        chunks.append(len(chunk))
        real_chunk(engine, stream, chunk, *args, **kwargs)
        # As if a replayed message failed again at once: it is back, and must wait for the
        # next replay rather than be replayed again and again by this one.
        queue.add(dead_letter(100 + len(chunks), "OrderPlaced", topic=topic))

    monkeypatch.setattr(actions, "_replay_chunk", counting_chunk)
    topic = kafka_topic(partitions=1)
    client = make_app(kafka_bootstrap_servers=kafka_broker, kafka_topic=topic)
    for n in range(6):
        queue.add(dead_letter(n, "OrderPlaced" if n % 3 else "UserCreated", topic=topic))

    assert ok(call(client, "POST", "/dlq/replay", {"eventType": "OrderPlaced"}))[
        "replayed"] == 4

    assert sorted(m.value() for m in read_topic(kafka_broker, topic, 4)) == [
        b'{"n": 1}', b'{"n": 2}', b'{"n": 4}', b'{"n": 5}']
    assert queue.offsets() == [0, 3, 101, 102]
    assert chunks == [2, 2]


def test_a_replay_by_filter_goes_on_from_its_cursor_until_it_is_done(
    make_app: Any, queue: Queue, kafka_broker: str, kafka_topic: TopicFactory,
    redis_client: redis.Redis, stream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: one call replayed every entry that matched, however many, past the HTTP
    server's 60 s timeout on a large DLQ or a slow Kafka (the server killed it halfway, the
    client told nothing). A call takes at most `limit` entries, and none after its deadline
    but the first; the client goes on with the cursor it is given. Reviews' findings: calls
    begun again from the head took the same entries that could not be replayed for ever, and
    a cursor by place in the stream ended a replay early once the stream was rebuilt (new
    ids): the replay holds the keys it has left, past those taken whatever became of them."""
    monkeypatch.setattr(actions, "CHUNK", 2)
    replay_chunk = actions._replay_chunk
    topic = kafka_topic(partitions=1)
    client = make_app(kafka_bootstrap_servers=kafka_broker, kafka_topic=topic)
    for n in range(8):
        queue.add(dead_letter(n, topic=topic))
    with queue.engine.begin() as conn:  # another replay has the oldest
        records.claim_for_replay(conn, [dead_letter(0).letter.dlq_key],
                                 datetime.now(UTC) + timedelta(hours=1))
    cursor: dict[str, str] = {}

    def replay(**body: Any) -> tuple[int, int, bool]:
        result = ok(call(client, "POST", "/dlq/replay", {"all": True, **cursor, **body}))
        assert result["more"] is (result["cursor"] is not None)
        cursor.clear()
        if result["more"]:
            cursor["cursor"] = result["cursor"]
        return result["replayed"], result["skipped"], result["more"]

    assert replay(limit=1) == (0, 1, True)
    queue.add(dead_letter(100, topic=topic))  # failed after the replay began
    assert replay(limit=2) == (2, 0, True)  # on past the first: 1, 2
    queue.stream.remove(dead_letter(5).letter.dlq_key)  # put back at the end, as a rebuild
    queue.add(dead_letter(5, topic=topic))  # would, with a new id
    again = dead_letter(6, topic=topic)  # replayed by another, and failed again since
    queue.add(replace(again, letter=replace(again.letter, last_failure_at=datetime.now(UTC))))
    monkeypatch.setattr(routes, "REPLAY_REQUEST_S", 0.0)  # past it at once: one entry
    # 3, and 6 passed over: it failed again since the replay began (left for a later one).
    assert replay() == (1, 1, True)
    monkeypatch.setattr(routes, "REPLAY_REQUEST_S", 30.0)

    def cut_off(*_args: Any, **_kwargs: Any) -> None:  # as gunicorn's timeout ends a call
        raise SystemExit(1)

    monkeypatch.setattr(actions, "_replay_chunk", cut_off)
    with pytest.raises(SystemExit):
        call(client, "POST", "/dlq/replay", {"all": True, **cursor})
    monkeypatch.setattr(actions, "_replay_chunk", replay_chunk)
    assert ok(call(client, "POST", "/dlq/replay", {"all": True, **cursor}), 409)["message"] \
        == "another call of this replay is running, or was cut off less than 6 min ago " \
        "(its claims lapse then): retry later"
    redis_client.delete(f"{stream}:replay:{cursor['cursor']}:held")  # 6 min later

    publish = actions.Publisher.publish
    monkeypatch.setattr(actions.Publisher, "publish",
                        lambda _self, _entry, done: done(  # Kafka does not acknowledge them
                            KafkaError(KafkaError._MSG_TIMED_OUT)))
    assert ok(call(client, "POST", "/dlq/replay", {"all": True, **cursor, "limit": 1}), 503)[
        "message"] == "Kafka did not acknowledge the 1 message(s) this call replayed; they " \
        "stay in the dead-letter queue. The same cursor goes on past them"
    monkeypatch.setattr(actions.Publisher, "publish", publish)
    assert replay() == (2, 0, False)  # 5, 7
    assert queue.offsets() == [0, 4, 100, 6]
    assert len(read_topic(kafka_broker, topic, 5)) == 5


def test_a_replay_cursor_that_is_not_one_or_not_of_this_selection_is_refused(
    make_app: Any, queue: Queue, kafka_broker: str, kafka_topic: TopicFactory
) -> None:
    topic = kafka_topic(partitions=1)
    client = make_app(kafka_bootstrap_servers=kafka_broker, kafka_topic=topic)
    for n in range(2):
        queue.add(dead_letter(n, "OrderPlaced", topic=topic))
    first = ok(call(client, "POST", "/dlq/replay", {
        "eventType": "OrderPlaced", "since": "2020-01-01T01:00:00+01:00", "limit": 1}))
    assert first["more"] and first["replayed"] == 1
    # The same time, spelt otherwise, is the same selection.
    replay = {"eventType": "OrderPlaced", "since": "2020-01-01T00:00:00Z",
              "cursor": first["cursor"]}
    assert ok(call(client, "POST", "/dlq/replay", {**replay, "eventType": "UserCreated"}),
              409)["message"].startswith("the cursor is of a replay of another selection")
    assert ok(call(client, "POST", "/dlq/replay", {**replay, "cursor": "A" * 22}), 404)[
        "message"].startswith("no replay 'AAAAAAAAAAAAAAAAAAAAAA': it ended")
    assert call(client, "POST", "/dlq/replay", {**replay, "cursor": "A" * 22 + "\n"}
                ).status_code == 422
    assert ok(call(client, "POST", "/dlq/replay", replay)) == {
        "replayed": 1, "refused": 0, "rejected": 0, "whyRejected": None, "skipped": 0,
        "noBytes": 0, "more": False, "cursor": None}
    assert ok(call(client, "POST", "/dlq/replay", replay), 404)  # ended


def test_a_replay_redis_has_no_room_to_note_is_refused_and_leaves_nothing(
    client: FlaskClient, queue: Queue, redis_client: redis.Redis, stream: str,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review's finding: at Redis's memory bound, some of the keys were noted before the
    rest were refused, and stayed for an hour, and the client got a 500."""
    queue.add(dead_letter(1))

    def full(_pipe: Any, *_args: Any, **_kwargs: Any) -> None:
        redis_client.zadd(f"{stream}:replay:partly", {"k": 1})
        # As redis-py says it of a pipeline's command (a first try matched the bare text).
        raise redis.exceptions.OutOfMemoryError(
            "Command # 2 (ZADD …) of pipeline caused error: OOM command not allowed when used "
            "memory > 'maxmemory'.")

    monkeypatch.setattr(secrets, "token_urlsafe", lambda _n: "partly")
    monkeypatch.setattr(redis.client.Pipeline, "execute", full)
    response = ok(call(client, "POST", "/dlq/replay", {"all": True}), 503)
    assert response["message"].startswith("Redis is at its memory bound: the replay could not "
                                          "be noted")
    monkeypatch.undo()
    assert redis_client.keys(f"{stream}:replay:*") == []
    assert queue.state(dead_letter(1)) == "open"


def test_the_command_line_replays_at_most_its_limit_and_says_more_are_left(
    queue: Queue, sqlite_url: str, stream: str, kafka_broker: str, kafka_topic: TopicFactory,
    capsys: pytest.CaptureFixture[str]
) -> None:
    topic = kafka_topic(partitions=1)
    settings = settings_for(sqlite_url, stream, kafka_bootstrap_servers=kafka_broker,
                            kafka_topic=topic)
    for n in range(3):
        queue.add(dead_letter(n, topic=topic))

    def replay(*options: str) -> int:
        args = _parser().parse_args(["dlq", "replay", "--all", *options])
        return int(args.handler(args, settings))

    assert replay("--limit", "2", "--dry-run") == 0
    assert capsys.readouterr().out.count("would replay") == 2
    assert replay("--limit", "2") == 0 and queue.offsets() == [2]
    assert "replayed 2; refused by Kafka 0; skipped 0; without bytes 0; more match" \
        in capsys.readouterr().err
    assert replay("--limit", "2") == 0 and queue.offsets() == []
    assert "without bytes 0\n" in capsys.readouterr().err


def test_a_message_kafka_refuses_itself_is_said_with_its_reason_not_as_a_wait(
    make_app: Any, queue: Queue, kafka_broker: str, kafka_topic: TopicFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: a dead letter whose message Kafka's client refused for its size (librdkafka's
    bound of 1,000,000 bytes, under an event's 1 MiB) answered 503 with Retry-After at every
    call, for ever: a client that obeys it loops. Refused for the message itself, it is a
    409 with Kafka's reason, and a replay of many counts it apart, with no 503."""
    topic = kafka_topic(partitions=1)
    client = make_app(kafka_bootstrap_servers=kafka_broker, kafka_topic=topic)

    def refusing_above_2000_bytes() -> actions.Publisher:
        publisher = actions.Publisher(services.current().settings)
        publisher.producer = make_producer(services.current().settings,
                                           **{"message.max.bytes": 2000})
        return publisher

    monkeypatch.setattr(routes, "_publisher", refusing_above_2000_bytes)
    large = queue.add(dead_letter(1, topic=topic, value=b"{" + b"x" * 5000))
    answer = ok(call(client, "POST", f"/dlq/entries/{large}/replay"), 409)
    assert answer["message"].startswith("Kafka refuses this entry's message: ")
    assert "Message size too large" in answer["message"]
    small = queue.add(dead_letter(2, topic=topic))
    assert ok(call(client, "POST", "/dlq/replay", {"all": True})) == {
        "replayed": 1, "refused": 0, "rejected": 1, "whyRejected": answer["message"].split(
            ": ", 1)[1].split("; it stays")[0], "skipped": 0, "noBytes": 0, "more": False,
        "cursor": None}
    assert queue.stream.get(large) is not None and queue.stream.get(small) is None
    assert queue.state(dead_letter(1, topic=topic)) == "open"


def test_replay_while_kafka_does_not_answer_claims_nothing(
    client: FlaskClient, queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Said before any letter is claimed, rather than after each chunk waited out Kafka's
    timeout (past the HTTP server's own, on a large DLQ), its letters claimed meanwhile."""
    # A wait of 1 s for Kafka, not 10 (a default argument: patching the constant is too late).
    monkeypatch.setattr(routes, "_publisher", lambda: actions.Publisher(
        services.current().settings, timeout_s=1.0))
    entry_id = queue.add(dead_letter(1))
    with queue.engine.connect() as conn:
        revision = conn.execute(select(dead_letters.c.revision)).scalar_one()
    for method_path, body in ((f"/dlq/entries/{entry_id}/replay", None),
                              ("/dlq/replay", {"all": True})):
        response = call(client, "POST", method_path, body)
        assert response.status_code == 503
        assert response.get_json()["message"] == (
            "Kafka does not answer at KAFKA_BOOTSTRAP_SERVERS: nothing was replayed; retry "
            "once it does")
    assert queue.stream.get(entry_id) is not None and queue.state(dead_letter(1)) == "open"
    with queue.engine.connect() as conn:  # never claimed
        assert conn.execute(select(dead_letters.c.revision)).scalar_one() == revision


def test_a_deeply_nested_body_is_a_400_not_a_500(client: FlaskClient) -> None:
    """Issue 9, item 12: an authenticated client sending nested JSON gets a clear error."""
    nested = b"[" * 100_000
    for path in ("/dlq/replay", "/dlq/purge"):
        response = client.post(path, data=nested, content_type="application/json",
                               headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code in (400, 413), response.get_data(as_text=True)
    shallow_but_deep = b"[" * 5000 + b"]" * 5000
    response = client.post("/dlq/replay", data=shallow_but_deep,
                           content_type="application/json",
                           headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code in (400, 422) and response.get_json()["code"] in (400, 422)


def metric(client: FlaskClient, name: str) -> list[str]:
    text = client.get("/metrics").get_data(as_text=True)
    return [line for line in text.splitlines() if line.startswith(name)]


def test_metrics_report_requests_and_the_dlq_depth_at_each_scrape(
    client: FlaskClient, queue: Queue
) -> None:
    for n in range(3):
        queue.add(dead_letter(n))
    assert client.get("/health").status_code == 200
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert metric(client, "dlq_depth ") == ["dlq_depth 3.0"]
    # The other bound, which large messages reach first: its alert reads both.
    [held] = metric(client, "dlq_bytes ")
    assert float(held.split()[1]) == queue.stream.size_bytes() > 0
    [bound] = metric(client, "dlq_max_bytes ")
    assert float(bound.split()[1]) == Settings().dlq_max_bytes
    assert any('url_rule="/health"' in line
               for line in metric(client, "flask_http_request_duration_seconds_count"))
    actions.purge(queue.engine, queue.stream, queue.stream.scan())
    assert metric(client, "dlq_depth ") == ["dlq_depth 0.0"]
    assert metric(client, "dlq_bytes ") == ["dlq_bytes 0.0"]


def test_metrics_named_in_the_request_are_the_ones_served(
    client: FlaskClient, queue: Queue
) -> None:
    """`name[]`, as Prometheus's federation asks: the exporter's own choice found none of the
    pipeline's series in one process (an empty answer)."""
    queue.add(dead_letter(1))
    assert client.get("/health").status_code == 200
    text = client.get("/metrics?name[]=dlq_depth&name[]=flask_http_request_total"
                      ).get_data(as_text=True)
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert "dlq_depth 1.0" in lines
    assert any(line.startswith("flask_http_request_total{") for line in lines)
    assert {line.partition("{")[0].partition(" ")[0] for line in lines} == {
        "dlq_depth", "flask_http_request_total"}
    # A scrape, chosen or not, is none of the API's traffic.
    assert not [line for line in metric(client, "flask_http_request")
                if 'url_rule="/metrics"' in line]


def test_metrics_still_answer_when_redis_is_down(make_app: Any) -> None:
    client = make_app(redis_url=f"redis://{NOWHERE}/0")
    assert client.get("/metrics").status_code == 200


def test_metrics_answer_within_a_scrape_when_redis_answers_nothing(make_app: Any) -> None:
    """A review's finding: with a Redis that takes connections and answers nothing, each
    scrape waited 10 s on the DLQ's fill, Prometheus' whole scrape timeout: the scrape failed,
    and the alert named the API down. The fill is read in one round trip, given a second."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # never accepts: nothing answers
        client = make_app(redis_url=f"redis://127.0.0.1:{silent.getsockname()[1]}/0")
        started = time.monotonic()
        assert client.get("/metrics").status_code == 200
        assert time.monotonic() - started < 3.0


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


def test_not_ready_while_the_database_has_no_schema(
    make_app: Any, kafka_broker: str, tmp_path: Path
) -> None:
    """Every read would fail: `/ready` says so, and what to run, rather than 200."""
    (tmp_path / "never-migrated.db").touch()
    client = make_app(kafka_bootstrap_servers=kafka_broker,
                      database_url=f"sqlite:///{tmp_path / 'never-migrated.db'}")
    body = ok(client.get("/ready"), 503)
    assert body["failed"] == ["database"]
    assert body["checks"][0]["error"] == \
        "the database has no schema yet: run `eventpipe migrate`"


def test_the_api_makes_no_database_where_none_is(make_app: Any, tmp_path: Path) -> None:
    """Run from another directory than the pipeline's, the API made an empty SQLite file
    there, and said to migrate it: an API of nothing."""
    missing = tmp_path / "elsewhere" / "eventpipe.db"
    with pytest.raises(SettingsError, match=rf"names no database here: {missing} does not"):
        make_app(database_url=f"sqlite:///{missing}")
    assert not missing.parent.exists()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_read_of_a_database_without_schema_says_what_to_run(
    make_app: Any, tmp_path: Path, kind: str,
) -> None:
    """Not a bare 500 (PostgreSQL's missing table is no transient failure), nor a 503 that
    says to retry (SQLite's is taken for one): a 503 naming the command that fixes it."""
    (tmp_path / "never-migrated.db").touch()
    url = new_database("eventpipe_test") if kind == "postgresql" else \
        f"sqlite:///{tmp_path / 'never-migrated.db'}"
    try:
        body = ok(make_app(database_url=url).get("/users/u1"), 503)
        assert body["message"] == "the database has no schema yet: run `eventpipe migrate`"
    finally:
        if kind == "postgresql":
            drop_database(url)


def test_a_dlq_key_another_program_holds_is_named_not_a_500(
    client: FlaskClient, redis_client: redis.Redis, stream: str,
) -> None:
    """DLQ_STREAM names a key of another kind (another program's string): a 503 saying what
    holds it, not an "unexpected error" with Redis's WRONGTYPE in the log only."""
    redis_client.set(stream, "another program's value")
    for method, path, body in ENDPOINTS:
        answer = call(client, method, path, body)
        assert answer.status_code == 503, (method, path, answer.get_data(as_text=True))
        assert answer.get_json()["message"] == KEY_OF_ANOTHER_KIND
    assert redis_client.get(stream) == b"another program's value"  # left as it was


@pytest.mark.parametrize(("method", "path", "body"), [("GET", "/status", None), *ENDPOINTS])
def test_a_redis_database_the_server_does_not_have_is_a_503_naming_the_setting(
    make_app: Any, method: str, path: str, body: dict[str, Any] | None,
) -> None:
    """A review's finding: Redis's "DB index is out of range", said as the client selects the
    database, was an "unexpected error" and a bare 500 on every request that used Redis."""
    answer = call(make_app(redis_url=f"{REDIS_URL}/99"), method, path, body)
    assert ok(answer, 503)["message"] == ("Redis has no database 99: REDIS_URL names one the "
                                          "server does not have")
    assert "Retry-After" not in answer.headers  # an operator's to fix: retrying cannot help


def test_a_redis_that_cannot_save_its_snapshot_is_a_503_saying_so(make_app: Any) -> None:
    """A review's finding: a Redis refusing writes after a failed snapshot (MISCONF) was a
    bare 500; at its memory bound it was "unavailable" without saying why."""
    with start_redis() as server, redis.Redis.from_url(server.url) as client:
        assert server.scratch_dir is not None
        shutil.rmtree(server.scratch_dir)  # its directory gone, a snapshot fails
        client.config_set("save", "3600 1")
        client.bgsave()
        wait_until(lambda: client.info("persistence")["rdb_last_bgsave_status"] == "err",
                   10, "the snapshot failed")
        answer = call(make_app(redis_url=f"{server.url}/0"), "POST", "/dlq/replay",
                      {"all": True})
    assert ok(answer, 503)["message"] == ("Redis refuses writes: it cannot save its snapshot "
                                          "to disk (MISCONF): see its log")
    assert answer.headers["Retry-After"] == "5"


def test_the_status_names_a_broker_that_does_not_answer_not_where_it_is(
    make_app: Any,
) -> None:
    """`GET /status` asks no token: the broker's host, port or password, which the driver's
    error names, stay in the log."""
    client = make_app(celery_broker_url="redis://:s3cret@127.0.0.1:1/1")
    [problem, *_] = ok(client.get("/status"))["problems"]
    assert problem == ("the Celery broker does not answer (ConnectionError): queue depths "
                       "are the bridge's last measure")


def test_the_dlq_reads_honour_their_openapi_document(
    sqlite_url: str, stream: str, queue: Queue
) -> None:
    ids = [queue.add(dead_letter(n, error=("InvalidEvent", "MissingParent")[n % 2]))
           for n in range(3)]
    # A message that was not even an event: raw bytes, no key, nothing could be read.
    raw = dead_letter(9, value=b"\xff not utf-8")
    ids.append(queue.add(replace(raw, key=None, letter=replace(
        raw.letter, position=Position(), event_id=None, event_type=None, traceback=None))))
    # A tombstone with headers, one of them null, one not UTF-8.
    ids.append(queue.add(replace(dead_letter(10, value=b""), tombstone=True, headers=(
        ("traceparent", b"00-01"), ("empty", None), ("raw", b"\xff")))))
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
