"""The read API on every database: users, orders, inventory, their errors, their cost.

The read model is filled the way the pipeline fills it (`apply_batch` on parsed events), so
these tests read what the workers write. The contract test runs schemathesis against the app
served over real HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, event, select, text

from eventpipe.apply import apply_batch
from eventpipe.effects import Fate
from eventpipe.readmodel import recent_orders_query
from eventpipe.samples import (
    Document,
    inventory_adjusted,
    order_placed,
    payment_settled,
    user_created,
)
from eventpipe.settings import Settings
from eventpipe.tables import users
from tests.support.factories import at, received
from tests.support.http import fuzz, serving
from tests.support.services import REDIS_URL
from web import create_app, services


def apply(engine: Engine, *messages: tuple[str, Document]) -> None:
    fates = apply_batch(engine, received(*messages, partition=0)).fates
    assert fates == [Fate.APPLIED] * len(messages)


@pytest.fixture
def app(engine: Engine, database_url: str) -> Iterator[Flask]:
    app = create_app(Settings(database_url=database_url, redis_url=REDIS_URL))
    yield app
    services.of(app).close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def get_json(client: FlaskClient, path: str, status: int = 200) -> Any:
    response = client.get(path)
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    return response.get_json()


def test_a_user_with_every_field_and_the_latest_five_orders_newest_first(
    engine: Engine, client: FlaskClient
) -> None:
    apply(engine, user_created("u1", email="Ada@Example.com", name="Ada", occurred_at=at(0)))
    # Placed out of order, one more than the API shows.
    placed = {f"o{n}": at(10 * n) for n in (3, 1, 6, 2, 5, 4)}
    apply(engine, *(order_placed(order_id, "u1", items=[("SKU-1", 2, "9.99")],
                                 currency="EUR", occurred_at=moment)
                    for order_id, moment in placed.items()))
    apply(engine, payment_settled("p5", "o5", "19.98", currency="EUR", occurred_at=at(100)))

    body = get_json(client, "/users/u1")

    assert list(body) == ["userId", "email", "name", "createdAt", "updatedAt", "orders"]
    assert body["userId"] == "u1"
    assert body["email"] == "ada@example.com"
    assert body["name"] == "Ada"
    assert body["createdAt"] == "2026-11-24T10:00:00.000Z"
    with engine.connect() as conn:  # when the pipeline applied it, to the microsecond
        applied = conn.execute(select(users.c.updated_at)).scalar_one()
    assert body["updatedAt"].endswith("Z")
    assert datetime.fromisoformat(body["updatedAt"]) == applied
    assert [o["orderId"] for o in body["orders"]] == ["o6", "o5", "o4", "o3", "o2"]
    first = body["orders"][0]
    assert first == {"orderId": "o6", "totalAmount": "19.98", "currency": "EUR",
                     "placedAt": "2026-11-24T10:01:00.000Z", "paymentStatus": "pending"}
    assert {o["orderId"]: o["paymentStatus"] for o in body["orders"]} == {
        "o6": "pending", "o5": "settled", "o4": "pending", "o3": "pending", "o2": "pending"}


def test_a_user_without_orders_has_an_empty_list(engine: Engine, client: FlaskClient) -> None:
    apply(engine, user_created("u2", occurred_at=at(0)))
    assert get_json(client, "/users/u2")["orders"] == []


def test_a_pending_order_has_its_items_and_no_payment(engine: Engine, client: FlaskClient) -> None:
    apply(engine, user_created("u1", occurred_at=at(0)),
          order_placed("o1", "u1", items=[("SKU-1", 2, "9.99"), ("SKU-2", 1, "0.02")],
                       currency="USD", occurred_at=at(1.5)))

    body = get_json(client, "/orders/o1")

    assert body == {
        "orderId": "o1", "userId": "u1",
        "items": [{"sku": "SKU-1", "quantity": 2, "unitPrice": "9.99"},
                  {"sku": "SKU-2", "quantity": 1, "unitPrice": "0.02"}],
        "totalAmount": "20.00", "currency": "USD", "placedAt": "2026-11-24T10:00:01.500Z",
        "paymentStatus": "pending", "payment": None,
    }


def test_a_settled_order_shows_its_latest_payment(engine: Engine, client: FlaskClient) -> None:
    apply(engine, user_created("u1", occurred_at=at(0)),
          order_placed("o1", "u1", items=[("SKU-1", 1, "12345.6789")], occurred_at=at(1)))
    # Two partial payments, the later one arriving first.
    apply(engine, payment_settled("p-late", "o1", "0.0001", occurred_at=at(30)),
          payment_settled("p-early", "o1", "12345.6788", occurred_at=at(20)))

    body = get_json(client, "/orders/o1")

    assert body["totalAmount"] == "12345.6789"
    assert body["paymentStatus"] == "settled"
    assert body["payment"] == {"paymentId": "p-late", "amount": "0.0001", "currency": "EUR",
                               "settledAt": "2026-11-24T10:00:30.000Z"}


def test_inventory_has_its_quantity_and_last_change(engine: Engine, client: FlaskClient) -> None:
    apply(engine, inventory_adjusted("SKU-9", 5, occurred_at=at(2)),
          inventory_adjusted("SKU-9", -7, occurred_at=at(1)))
    assert get_json(client, "/inventory/SKU-9") == {
        "sku": "SKU-9", "quantity": -2, "updatedAt": "2026-11-24T10:00:02.000Z"}


@pytest.mark.parametrize(("path", "message"), [
    ("/users/nobody", "no user 'nobody'"),
    ("/orders/none", "no order 'none'"),
    ("/inventory/SKU-0", "no inventory for SKU 'SKU-0'"),
])
def test_unknown_ids_are_404(client: FlaskClient, path: str, message: str) -> None:
    assert get_json(client, path, 404) == {
        "code": 404, "status": "Not Found", "message": message, "errors": {}}


@pytest.mark.parametrize("resource", ["users", "orders", "inventory"])
@pytest.mark.parametrize("bad_id", ["", "x" * 65, "%20%20", "%0A", "%0D%0A"])
def test_invalid_ids_are_422_naming_the_parameter(
    client: FlaskClient, resource: str, bad_id: str
) -> None:
    body = get_json(client, f"/{resource}/{bad_id}", 422)
    name = {"users": "userId", "orders": "orderId", "inventory": "sku"}[resource]
    assert body["code"] == 422 and body["status"] == "Unprocessable Entity"
    assert body["message"] == "invalid parameters: see errors"
    assert list(body["errors"]["path"]) == [name]


def test_an_id_holding_a_slash_is_served_at_its_encoded_path(
        engine: Engine, client: FlaskClient) -> None:
    """The contract lets an id hold '/' (`tenant/42`): its entity is in the read model, and
    the API serves it at the id percent-encoded (`/users/tenant%2F42`), as a client encodes a
    path segment. (Before: a 404 saying no such URL, where the docs promised a 422.)"""
    apply(engine, user_created("tenant/42", occurred_at=at(0)),
          order_placed("order/7", "tenant/42", items=[("SKU/9", 1, "1.00")], occurred_at=at(1)),
          inventory_adjusted("SKU/9", 3, occurred_at=at(2)))
    user = get_json(client, "/users/tenant%2F42")
    assert user["userId"] == "tenant/42" and user["orders"][0]["orderId"] == "order/7"
    assert get_json(client, "/orders/order%2F7")["items"][0]["sku"] == "SKU/9"
    assert get_json(client, "/inventory/SKU%2F9")["quantity"] == 3
    assert get_json(client, "/users/tenant%2F43", 404)["message"] == "no user 'tenant/43'"


def test_an_id_holding_a_line_break_is_served_at_its_encoded_path(
        engine: Engine, client: FlaskClient) -> None:
    """A review's finding: the contract lets an id hold a line feed, and the pipeline applies
    its events, but the API answered 404 "the requested URL was not found" (the keys' route
    matched no line break)."""
    apply(engine, user_created("a\nb", email="ab@example.com", occurred_at=at(0)),
          order_placed("ord\r\n1", "a\nb", items=[("line\nfeed", 1, "1.00")],
                       occurred_at=at(1)),
          inventory_adjusted("line\nfeed", 4, occurred_at=at(2)))
    assert get_json(client, "/users/a%0Ab")["orders"][0]["orderId"] == "ord\r\n1"
    assert get_json(client, "/orders/ord%0D%0A1")["items"][0]["sku"] == "line\nfeed"
    assert get_json(client, "/inventory/line%0Afeed")["quantity"] == 4


def test_an_id_of_64_characters_is_valid(client: FlaskClient) -> None:
    assert get_json(client, "/users/" + "x" * 64, 404)["code"] == 404


def test_get_user_takes_at_most_two_statements(
    engine: Engine, app: Flask, client: FlaskClient
) -> None:
    apply(engine, user_created("u1", occurred_at=at(0)),
          *(order_placed(f"o{n}", "u1", occurred_at=at(n)) for n in range(8)))
    apply(engine, payment_settled("p1", "o7", "10.00", occurred_at=at(9)))
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    app_engine = services.of(app).engine
    event.listen(app_engine, "before_cursor_execute", record)
    try:
        assert len(get_json(client, "/users/u1")["orders"]) == 5
    finally:
        event.remove(app_engine, "before_cursor_execute", record)
    # SQLite's reader engine opens its transaction with an explicit BEGIN: not a query.
    queries = [s for s in statements if s.strip().upper() != "BEGIN"]
    assert len(queries) <= 2, queries


def test_latest_orders_use_the_user_and_time_index(engine: Engine) -> None:
    query = recent_orders_query("u1", 5)
    compiled = query.compile(engine, compile_kwargs={"literal_binds": True})
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            # The tables are tiny here: forbid the sequential scan the planner would prefer,
            # so the plan shows which index the query can use.
            conn.execute(text("SET LOCAL enable_seqscan = off"))
            plan = "\n".join(row[0] for row in conn.execute(text(f"EXPLAIN {compiled}")))
        else:
            plan = "\n".join(str(row[-1]) for row in
                             conn.execute(text(f"EXPLAIN QUERY PLAN {compiled}")))
    assert "ix_orders_user_id_placed_at" in plan, plan


def test_a_database_that_is_down_is_a_503(database_url: str, tmp_path: Path) -> None:
    # Nothing listens on port 1: the connection is refused at once. A directory is no
    # SQLite database file: opening it fails.
    down = ("postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=2"
            if database_url.startswith("postgresql") else f"sqlite:///{tmp_path}")
    app = create_app(Settings(database_url=down, redis_url=REDIS_URL))
    try:
        response = app.test_client().get("/users/u1")
    finally:
        services.of(app).close()
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert response.get_json() == {
        "code": 503, "status": "Service Unavailable",
        "message": "the database is unavailable; retry later", "errors": {}}


def test_a_file_that_is_not_a_sqlite_database_is_a_503_saying_so(tmp_path: Path) -> None:
    """A review's finding: SQLite's "file is not a database" (or "database disk image is
    malformed") was an unexpected error and a bare 500 on every read."""
    (tmp_path / "notdb.db").write_bytes(b"garbage, not SQLite")
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'notdb.db'}",
                              redis_url=REDIS_URL))
    try:
        for path in ("/users/u1", "/orders/o1", "/inventory/SKU-1", "/status"):
            response = app.test_client().get(path)
            assert response.status_code == 503, (path, response.get_data(as_text=True))
            assert response.get_json()["message"] == (
                "DATABASE_URL names a file that is not a SQLite database, or is damaged")
    finally:
        services.of(app).close()
    assert (tmp_path / "notdb.db").read_bytes() == b"garbage, not SQLite"


@pytest.fixture
def live_server(app: Flask) -> Iterator[str]:
    with serving(app) as base_url:
        yield base_url


def test_the_read_endpoints_honour_their_openapi_document(
    engine: Engine, live_server: str
) -> None:
    apply(engine, user_created("user-1", occurred_at=at(0)),
          order_placed("order-1", "user-1", occurred_at=at(1)),
          order_placed("order-2", "user-1", occurred_at=at(2)),
          payment_settled("pay-1", "order-1", "10.00", occurred_at=at(3)),
          inventory_adjusted("SKU-1", 3, occurred_at=at(4)))
    schema = schemathesis.openapi.from_url(f"{live_server}/openapi.json").include(
        path_regex=r"^/(users|orders|inventory)/\{|^/health$")
    # Rows that exist: generated ids almost never hit one, so their 200s are checked here.
    for path, parameters in [("/users/{userId}", {"userId": "user-1"}),
                             ("/orders/{orderId}", {"orderId": "order-1"}),
                             ("/orders/{orderId}", {"orderId": "order-2"}),
                             ("/inventory/{sku}", {"sku": "SKU-1"})]:
        case = schema[path]["GET"].Case(path_parameters=parameters)
        assert case.call_and_validate(base_url=live_server).status_code == 200
    # Generated ids, valid (404s) and invalid (422s).
    fuzz(schema, live_server)
