"""The read API without services: formats, validation, error shapes, the OpenAPI document,
the readiness runner and the T-SQL of the read queries. Nothing here opens a connection.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlglot
from flask import Flask
from flask.testing import FlaskClient
from jsonschema import Draft4Validator
from marshmallow import ValidationError
from openapi_spec_validator import validate
from sqlalchemy.dialects.mssql import pyodbc

from eventpipe.readmodel import recent_orders_query, settled_payment_query
from eventpipe.schemas import schemas
from eventpipe.settings import Settings
from eventpipe.times import utc_iso
from web import create_app, services
from web.resources.dlq.schemas import (
    EntryPathSchema,
    ListArgsSchema,
    ReplaySelectionSchema,
    SelectionSchema,
)
from web.resources.health.checks import run_checks
from web.resources.users.schemas import UserPathSchema
from web.schemas import ID_PATTERN, camel_case, money


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    # Engines and Redis clients connect lazily: building the app touches nothing.
    app = create_app(Settings(database_url="sqlite://",
                              redis_url="redis://127.0.0.1:1/0"))
    yield app
    services.of(app).close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def document(client: FlaskClient) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    spec: dict[str, Any] = response.get_json()
    return spec


@pytest.mark.parametrize(("value", "text"), [
    ("20.0000", "20.00"), ("20", "20.00"), ("9.9900", "9.99"), ("0.0001", "0.0001"),
    ("12345.6789", "12345.6789"), ("99999999999999.9999", "99999999999999.9999"),
    ("1E+2", "100.00"), ("0", "0.00"), ("0.1", "0.10"),
])
def test_money_has_one_spelling_whatever_the_database_returns(value: str, text: str) -> None:
    assert money(Decimal(value)) == text
    assert re.fullmatch(r"(0|[1-9][0-9]*)\.[0-9]{2,4}", text)


def test_times_are_utc_with_a_z() -> None:
    paris = timezone(timedelta(hours=1))
    assert utc_iso(datetime(2026, 11, 24, 11, 15, tzinfo=paris)) == "2026-11-24T10:15:00.000Z"
    assert utc_iso(datetime(2026, 11, 24, 10, 15, 0, 123000, tzinfo=UTC)) == (
        "2026-11-24T10:15:00.123Z")
    assert utc_iso(datetime(2026, 11, 24, 10, 15, 0, 123456, tzinfo=UTC)) == (
        "2026-11-24T10:15:00.123456Z")


def test_camel_case() -> None:
    assert [camel_case(n) for n in ("user_id", "placed_at", "sku", "next_cursor")] == [
        "userId", "placedAt", "sku", "nextCursor"]


@pytest.mark.parametrize("user_id", ["u1", "x" * 64, " a", "a\t", "ünï-cødé", "a.b", "..",
                                     "a\nb", "\U0001f600" * 32, "a/b", "/"])
def test_valid_ids(user_id: str) -> None:
    assert UserPathSchema().load({"userId": user_id}) == {"user_id": user_id}


@pytest.mark.parametrize("user_id", ["", "x" * 65, "   ", "\t\n", "\x1c", "\u3000",
                                     "a\x00b", " a ",
                                     # 33 characters, 66 UTF-16 code units: no event has it
                                     "\U0001f600" * 33, "a\ud800b"])
def test_invalid_ids(user_id: str) -> None:
    with pytest.raises(ValidationError) as caught:
        UserPathSchema().load({"userId": user_id})
    assert list(caught.value.messages) == ["userId"]


def test_blank_means_what_the_event_contract_strips() -> None:
    pattern = re.compile(ID_PATTERN)
    disagree = [hex(point) for point in range(0x110000) if not 0xD800 <= point <= 0xDFFF
                if (pattern.match(chr(point)) is None)
                != (chr(point).isspace() or chr(point) == "\x00")]
    assert disagree == []


@pytest.mark.parametrize(("entry_id", "valid"), [
    ("1764000000000-0", True), ("0-1", True), ("9999999999999999999-9999999999999999999", True),
    ("18446744073709551615-0", False), ("18446744073709551616-0", False), ("1-2-3", False),
    ("abc", False), ("1-", False), ("1-2\n", False), ("１-2", False), ("", False),
])
def test_entry_ids_are_what_redis_accepts(entry_id: str, valid: bool) -> None:
    errors = EntryPathSchema().validate({"entryId": entry_id})
    assert (errors == {}) is valid, errors


def test_list_arguments_have_defaults_and_bounds() -> None:
    assert ListArgsSchema().load({}) == {"limit": 50}
    assert ListArgsSchema().validate({"limit": "0"}) and ListArgsSchema().validate({"limit": 501})
    since = ListArgsSchema().load({"since": "2026-11-24T10:00:00"})["since"]
    assert since == datetime(2026, 11, 24, 10, tzinfo=UTC)  # a naive time is UTC


@pytest.mark.parametrize("moment", ["0001-01-01T00:00:00+05:00", "9999-12-31T23:00:00-05:00"])
def test_a_time_that_leaves_the_calendar_in_utc_is_refused_by_name(moment: str) -> None:
    """Taken as it came, such a time broke the replay's selection (a 500) and nothing else."""
    assert ListArgsSchema().validate({"since": moment}) == {
        "since": ["not a time in UTC: it leaves the calendar there"]}
    assert SelectionSchema().validate({"until": moment}) == {
        "until": ["not a time in UTC: it leaves the calendar there"]}
    in_utc = ListArgsSchema().load({"since": "2026-11-24T10:00:00+05:00"})["since"]
    assert (in_utc, in_utc.tzinfo) == (datetime(2026, 11, 24, 5, tzinfo=UTC), UTC)


def test_a_replays_limit_is_an_integer_as_the_document_says() -> None:
    """1.9 was taken for 1, and "1" for 1."""
    for limit in (1.9, "1", True):
        assert ReplaySelectionSchema().validate({"all": True, "limit": limit}) == {
            "limit": ["Not a valid integer."]}, limit
    assert ReplaySelectionSchema().load({"all": True, "limit": 2})["limit"] == 2


def test_a_selection_must_name_something() -> None:
    assert SelectionSchema().validate({}) == {
        "_schema": ["name a filter (eventType, errorClass, since, until) or set all to true"]}
    assert SelectionSchema().validate({"all": True}) == {}
    assert SelectionSchema().validate({"errorClass": "InvalidEvent"}) == {}


@pytest.mark.parametrize("body", [
    {}, {"all": False}, {"all": True}, {"errorClass": "InvalidEvent"},
    {"since": "2026-11-24T10:00:00Z", "all": False}, {"until": "2026-11-24T10:00:00Z"}])
def test_the_document_refuses_the_selections_the_server_refuses(
    document: dict[str, Any], body: dict[str, Any],
) -> None:
    """A client (or a fuzzer) that follows the document sends no selection the server
    refuses, nor is refused one the server takes."""
    selection = document["components"]["schemas"]["Selection"]
    assert Draft4Validator(selection).is_valid(body) is (SelectionSchema().validate(body) == {})


def test_the_openapi_document_is_valid_and_complete(document: dict[str, Any]) -> None:
    validate(document)
    assert document["openapi"] == "3.0.3"
    assert {path: sorted(ops) for path, ops in document["paths"].items()} == {
        "/users/{userId}": ["get", "parameters"],
        "/orders/{orderId}": ["get", "parameters"],
        "/inventory/{sku}": ["get", "parameters"],
        "/health": ["get"], "/ready": ["get"], "/status": ["get"], "/metrics": ["get"],
        "/dlq/entries": ["get"],
        "/dlq/entries/{entryId}": ["delete", "get", "parameters"],
        "/dlq/entries/{entryId}/replay": ["parameters", "post"],
        "/dlq/replay": ["post"], "/dlq/purge": ["post"],
        "/contract": ["get"], "/contract/{name}": ["get", "parameters"],
    }
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if method == "parameters":
                continue
            secured = operation.get("security") == [{"bearerAuth": []}]
            assert secured is path.startswith("/dlq"), (path, method)
            if secured:
                assert {"401", "403"} <= set(operation["responses"]), (path, method)


def test_every_operation_has_an_id_and_every_schema_a_use(document: dict[str, Any]) -> None:
    """Generated clients get names like `getUser`, not `usersUserIdGet`."""
    ids = [operation.get("operationId") for operations in document["paths"].values()
           for method, operation in operations.items() if method != "parameters"]
    assert all(ids) and len(set(ids)) == len(ids), ids
    referenced = json.dumps([document["paths"], document["components"]])
    used = set(re.findall(r"#/components/schemas/(\w+)", referenced))
    assert set(document["components"]["schemas"]) <= used


def test_the_contract_is_served_as_json_schema(client: FlaskClient) -> None:
    index = client.get("/contract").get_json()["schemas"]
    assert set(index) == set(schemas())
    for name, path in index.items():
        assert client.get(path).get_json() == schemas()[name]
    missing = client.get("/contract/OrderShipped")
    assert missing.status_code == 404 and "UserCreated" in missing.get_json()["message"]


def test_every_json_property_is_camel_case(document: dict[str, Any]) -> None:
    names = [name for schema in document["components"]["schemas"].values()
             if schema.get("type") == "object" for name in schema.get("properties", {})]
    assert "placedAt" in names and "nextCursor" in names
    pagination = {"total_pages", "first_page", "last_page", "previous_page", "next_page"}
    wrong = [n for n in names if not re.fullmatch(r"[a-z][a-zA-Z0-9]*", n) and
             n not in pagination]  # flask-smorest's own, unused here
    assert wrong == []


def test_path_ids_are_documented_with_their_limits(document: dict[str, Any]) -> None:
    [parameter] = document["paths"]["/users/{userId}"]["get"]["parameters"]
    assert parameter["name"] == "userId" and parameter["in"] == "path"
    assert parameter["schema"]["minLength"] == 1 and parameter["schema"]["maxLength"] == 64


def test_interactive_docs_are_served(client: FlaskClient) -> None:
    response = client.get("/docs")
    assert response.status_code == 200
    assert b"swagger-ui" in response.data and b"/openapi.json" in response.data
    # Its assets come from the app itself, not from a CDN.
    assert b'src="/docs/assets/swagger-ui-bundle.js"' in response.data
    for asset in ("swagger-ui-bundle.js", "swagger-ui-standalone-preset.js", "swagger-ui.css"):
        served = client.get(f"/docs/assets/{asset}")
        assert served.status_code == 200 and len(served.data) > 1000, asset


def test_health_calls_nothing(client: FlaskClient) -> None:
    # The Redis URL points nowhere and the database file does not exist.
    response = client.get("/health")
    assert response.status_code == 200 and response.get_json() == {"status": "ok"}


def test_errors_are_json_with_status_message_and_field_errors(client: FlaskClient) -> None:
    missing = client.get("/no/such/path")
    assert missing.status_code == 404
    assert set(missing.get_json()) == {"code", "status", "message", "errors"}
    wrong_method = client.post("/users/u1")
    assert wrong_method.status_code == 405
    assert set(wrong_method.headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS"}
    assert wrong_method.get_json()["status"] == "Method Not Allowed"
    invalid = client.get("/orders/" + "o" * 65)
    assert invalid.status_code == 422
    assert invalid.get_json() == {
        "code": 422, "status": "Unprocessable Entity",
        "message": "invalid parameters: see errors",
        "errors": {"path": {"orderId": ["Length must be between 1 and 64."]}}}
    # No event can hold it (SQL Server would find `u1` for it): a bad id, not an unknown one.
    spaced = client.get("/users/u1%20")
    assert spaced.status_code == 422
    assert spaced.get_json()["errors"] == {"path": {"userId": [
        "must hold a character other than whitespace, not end with a space, and hold no NUL"]}}


def test_a_method_http_does_not_define_is_a_501_and_no_metric_label(
    client: FlaskClient,
) -> None:
    for made_up in ("XAAA1", "XBBB2"):
        response = client.open("/health", method=made_up)
        assert response.status_code == 501, response.get_data(as_text=True)
        assert response.get_json()["status"] == "Not Implemented"
    assert client.open("/health", method="PATCH").status_code == 405
    scraped = client.get("/metrics").get_data(as_text=True)
    assert 'method="PATCH"' in scraped and "XAAA1" not in scraped and "XBBB2" not in scraped


def ok(response: Any, status: int) -> Any:
    assert response.status_code == status, response.get_data(as_text=True)
    return response.get_json()


def test_requests_of_the_wrong_shape_are_refused_before_any_view(tmp_path: Path) -> None:
    app = create_app(Settings(database_url="sqlite://",
                              redis_url="redis://127.0.0.1:1/0", dlq_api_token="t"))
    client = app.test_client()
    token = {"Authorization": "Bearer t"}
    try:
        # Not the id "\ufffd", which a valid escape names, and is looked up.
        assert ok(client.get("/users/%FF"), 400)["message"] == (
            "the path is not UTF-8 once its %-escapes are decoded")
        assert client.get("/users/%EF%BF%BD").status_code != 400
        assert ok(client.get("/users/u1?a=1&a=2&b=1"), 422)["errors"] == {
            "query": {"a": ["given more than once"]}}
        # The exporter's own filter, repeated by design.
        assert client.get("/metrics?name[]=dlq_depth&name[]=up").status_code == 200
        # Not read, then answered as if no selection had been sent.
        assert ok(client.post("/dlq/purge", data='{"all": true}', headers=token,
                              content_type="text/plain"), 415)["message"] == (
            "send the body as application/json")
        chunked = client.post("/dlq/purge", input_stream=io.BytesIO(b'{"all": true}'),
                              headers={**token, "Transfer-Encoding": "chunked"},
                              content_type="text/plain")
        assert chunked.status_code == 415
        assert ok(client.post("/dlq/purge", data="{oops", headers=token,
                              content_type="application/json"), 400)["errors"] == {
            "json": {"_schema": ["Invalid JSON body."]}}  # by location, then field
    finally:
        services.of(app).close()


def test_an_unforeseen_error_is_a_bare_500(app: Flask, client: FlaskClient) -> None:
    def explode() -> str:
        raise RuntimeError("secret detail /etc/passwd")

    app.add_url_rule("/explode", view_func=explode)
    response = client.get("/explode")
    assert response.status_code == 500
    body = response.get_json()
    assert body["status"] == "Internal Server Error" and body["errors"] == {}
    assert "secret" not in response.get_data(as_text=True)
    assert "Traceback" not in response.get_data(as_text=True)


def test_readiness_runs_checks_side_by_side_within_the_timeout() -> None:
    release = threading.Event()

    def fine() -> None:
        pass

    def broken() -> None:
        raise ConnectionRefusedError("nope")

    def hangs() -> None:
        release.wait(10)

    started = time.monotonic()
    try:
        results = run_checks({"database": fine, "redis": broken, "kafka": hangs},
                             timeout_s=0.3)
    finally:
        release.set()
    assert time.monotonic() - started < 1.0
    assert [(r.name, r.ok, r.error) for r in results] == [
        ("database", True, None), ("redis", False, "ConnectionRefusedError"),
        ("kafka", False, "no answer within 0.3 s")]


MSSQL = pyodbc.dialect(paramstyle="qmark")  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("query", [settled_payment_query("o1", "EUR"),
                                   recent_orders_query("u1", 5)])
def test_the_read_queries_are_valid_t_sql(query: Any) -> None:
    sql = str(query.compile(dialect=MSSQL, compile_kwargs={"literal_binds": True}))
    [parsed] = sqlglot.parse(sql, read="tsql", error_level=sqlglot.ErrorLevel.RAISE)
    assert parsed is not None
    assert "LIMIT" not in sql and "TOP" in sql
