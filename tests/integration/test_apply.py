"""The effect contract, run live on every database: SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, func, select

from eventpipe.apply import apply_batch
from eventpipe.effects import Status
from eventpipe.samples import (
    Document,
    inventory_adjusted,
    order_placed,
    payment_settled,
    user_created,
)
from eventpipe.tables import applied_events, inventory, order_items, orders, payments, users
from tests.factories import at, deliveries


def apply(engine: Engine, *messages: tuple[str, Document]) -> list[Status]:
    return [outcome.status for outcome in apply_batch(engine, deliveries(*messages))]


def rows(engine: Engine, table: Any, *order_by: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(table).order_by(*order_by))]


def scalar(engine: Engine, query: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(query).scalar_one()


def ledger_count(engine: Engine) -> int:
    return int(scalar(engine, select(func.count()).select_from(applied_events)))


def user_names(engine: Engine) -> dict[str, str]:
    return {r["user_id"]: r["name"] for r in rows(engine, users, users.c.user_id)}


def test_new_entities_of_every_type_apply(engine: Engine) -> None:
    statuses = apply(
        engine,
        user_created("u1", email="Ada@Example.com", name="Ada", occurred_at=at(0)),
        order_placed("o1", "u1", items=[("SKU-1", 2, "9.99"), ("SKU-2", 1, "0.02")],
                     currency="EUR", occurred_at=at(1)),
        payment_settled("p1", "o1", "20.00", currency="EUR", occurred_at=at(2)),
        inventory_adjusted("SKU-1", -2, occurred_at=at(3)),
    )
    assert statuses == [Status.APPLIED] * 4
    [user] = rows(engine, users)
    assert (user["user_id"], user["email"], user["name"]) == ("u1", "ada@example.com", "Ada")
    assert user["created_at"] == at(0) and user["version_at"] == at(0)
    [order] = rows(engine, orders)
    assert (order["user_id"], order["total_amount"], order["currency"]) == (
        "u1", Decimal("20.00"), "EUR")
    assert order["placed_at"] == at(1)
    items = rows(engine, order_items, order_items.c.line_no)
    assert [(i["line_no"], i["sku"], i["quantity"], i["unit_price"]) for i in items] == [
        (1, "SKU-1", 2, Decimal("9.99")), (2, "SKU-2", 1, Decimal("0.02"))]
    [payment] = rows(engine, payments)
    assert (payment["order_id"], payment["amount"], payment["settled_at"]) == (
        "o1", Decimal("20.00"), at(2))
    [stock] = rows(engine, inventory)
    assert (stock["sku"], stock["quantity"], stock["updated_at"]) == ("SKU-1", -2, at(3))
    ledger = rows(engine, applied_events, applied_events.c.kafka_offset)
    assert [r["outcome"] for r in ledger] == ["applied"] * 4
    assert {r["kafka_topic"] for r in ledger} == {"events"}
    assert {r["kafka_partition"] for r in ledger} == {3}


def test_duplicate_is_a_no_op_across_and_within_batches(engine: Engine) -> None:
    message = user_created("u1", name="First", occurred_at=at(0), event_id="e-1")
    assert apply(engine, message, message) == [Status.APPLIED, Status.DUPLICATE]
    assert apply(engine, message) == [Status.DUPLICATE]
    assert user_names(engine) == {"u1": "First"}
    assert ledger_count(engine) == 1


def test_older_version_changes_nothing(engine: Engine) -> None:
    assert apply(engine, user_created("u1", name="New", occurred_at=at(10))) == [Status.APPLIED]
    assert apply(engine, user_created("u1", name="Old", occurred_at=at(5))) == [Status.STALE]
    assert user_names(engine) == {"u1": "New"}
    # A stale event is done with: it is in the ledger, so its redelivery is a duplicate.
    assert ledger_count(engine) == 2


def test_newer_version_wins_and_ties_break_by_event_id(engine: Engine) -> None:
    apply(engine, user_created("u1", name="v1", occurred_at=at(0), event_id="e-b"))
    assert apply(engine, user_created("u1", name="v2", occurred_at=at(1), event_id="e-a")) == [
        Status.APPLIED]
    assert apply(engine, user_created("u1", name="tie-low", occurred_at=at(1),
                                      event_id="e-0")) == [Status.STALE]
    assert apply(engine, user_created("u1", name="tie-high", occurred_at=at(1),
                                      event_id="e-z")) == [Status.APPLIED]
    assert user_names(engine) == {"u1": "tie-high"}


def test_newer_order_replaces_its_items(engine: Engine) -> None:
    apply(engine, user_created("u1", occurred_at=at(0)),
          order_placed("o1", "u1", items=[("A", 1, "1.00"), ("B", 1, "2.00")], occurred_at=at(1)))
    assert apply(engine, order_placed("o1", "u1", items=[("C", 3, "5.00")],
                                      occurred_at=at(2))) == [Status.APPLIED]
    items = rows(engine, order_items)
    assert [(i["sku"], i["quantity"]) for i in items] == [("C", 3)]
    assert rows(engine, orders)[0]["total_amount"] == Decimal("15.00")


def test_inventory_delta_applies_once_per_event_id(engine: Engine) -> None:
    plus = inventory_adjusted("SKU-9", 5, occurred_at=at(2), event_id="d-1")
    minus = inventory_adjusted("SKU-9", -2, occurred_at=at(1), event_id="d-2")
    assert apply(engine, plus, minus, plus) == [Status.APPLIED, Status.APPLIED, Status.DUPLICATE]
    assert apply(engine, minus, inventory_adjusted("SKU-9", 10, occurred_at=at(0))) == [
        Status.DUPLICATE, Status.APPLIED]
    [stock] = rows(engine, inventory)
    assert stock["quantity"] == 13
    assert stock["updated_at"] == at(2)  # the latest adjustment, whatever the arrival order


def test_missing_parent_is_isolated_to_its_event(engine: Engine) -> None:
    outcomes = apply_batch(engine, deliveries(
        order_placed("o1", "ghost", occurred_at=at(1)),
        user_created("u1", occurred_at=at(0)),
        payment_settled("p1", "o-none", "1.00", occurred_at=at(2)),
        order_placed("o2", "u1", occurred_at=at(3)),
    ))
    assert [o.status for o in outcomes] == [
        Status.MISSING_PARENT, Status.APPLIED, Status.MISSING_PARENT, Status.APPLIED]
    assert outcomes[0].reason == "user 'ghost' not found"
    assert outcomes[2].reason == "order 'o-none' not found"
    assert [r["order_id"] for r in rows(engine, orders)] == ["o2"]
    # Nothing is recorded for an event that has not applied: it can still apply later.
    assert ledger_count(engine) == 2
    retried = order_placed("o1", "ghost", occurred_at=at(1))
    assert apply(engine, user_created("ghost", occurred_at=at(5)), retried) == [
        Status.APPLIED, Status.APPLIED]


def test_email_clash_is_rejected_and_isolated(engine: Engine) -> None:
    apply(engine, user_created("u1", email="same@example.com", occurred_at=at(0)))
    outcomes = apply_batch(engine, deliveries(
        user_created("u2", email="SAME@example.com", occurred_at=at(1)),
        user_created("u3", email="other@example.com", occurred_at=at(1)),
    ))
    assert [o.status for o in outcomes] == [Status.REJECTED, Status.APPLIED]
    assert outcomes[0].reason == "email 'same@example.com' already belongs to user 'u1'"
    assert sorted(user_names(engine)) == ["u1", "u3"]


def test_emails_can_move_between_users_within_a_batch(engine: Engine) -> None:
    apply(engine, user_created("a", email="a@x.io", occurred_at=at(0)),
          user_created("b", email="b@x.io", occurred_at=at(0)))
    # a's row is written first, taking b's address before b has released it: the batch
    # violates the unique index as a whole and is narrowed down to single events.
    statuses = apply(
        engine,
        user_created("a", email="tmp@x.io", occurred_at=at(1)),
        user_created("b", email="c@x.io", occurred_at=at(1)),
        user_created("a", email="b@x.io", occurred_at=at(2)),
    )
    assert statuses == [Status.APPLIED] * 3
    assert {r["user_id"]: r["email"] for r in rows(engine, users)} == {
        "a": "b@x.io", "b": "c@x.io"}


def test_payment_in_another_currency_is_rejected(engine: Engine) -> None:
    apply(engine, user_created("u1", occurred_at=at(0)),
          order_placed("o1", "u1", currency="EUR", occurred_at=at(1)))
    outcomes = apply_batch(engine, deliveries(
        payment_settled("p1", "o1", "10.00", currency="USD", occurred_at=at(2))))
    assert outcomes[0].status is Status.REJECTED
    assert outcomes[0].reason == "payment currency USD differs from order currency EUR"
    assert rows(engine, payments) == []


def test_money_is_exact(engine: Engine) -> None:
    amounts = ["99999999999999.9999", "0.1", "0.0001", "12345.6789"]
    apply(engine, user_created("u1", occurred_at=at(0)),
          *(order_placed(f"o{i}", "u1", items=[("S", 1, a)], occurred_at=at(1))
            for i, a in enumerate(amounts)))
    stored = {r["order_id"]: r["total_amount"] for r in rows(engine, orders)}
    assert stored == {f"o{i}": Decimal(a) for i, a in enumerate(amounts)}
    assert all(isinstance(v, Decimal) for v in stored.values())


def test_mixed_batch_matches_one_by_one_application(engine: Engine) -> None:
    messages = [
        user_created("u1", occurred_at=at(0), event_id="m-1"),
        order_placed("o1", "u1", occurred_at=at(1), event_id="m-2"),
        order_placed("o1", "u1", items=[("X", 2, "3.50")], occurred_at=at(0.5), event_id="m-3"),
        payment_settled("p1", "o1", "10.00", occurred_at=at(2), event_id="m-4"),
        inventory_adjusted("X", 7, occurred_at=at(3), event_id="m-5"),
        user_created("u2", email="u1@example.com", occurred_at=at(4), event_id="m-6"),
        payment_settled("p2", "o9", "1.00", occurred_at=at(5), event_id="m-7"),
        inventory_adjusted("X", 7, occurred_at=at(3), event_id="m-5"),
    ]
    batched = apply(engine, *messages)
    assert batched == [Status.APPLIED, Status.APPLIED, Status.STALE, Status.APPLIED,
                       Status.APPLIED, Status.REJECTED, Status.MISSING_PARENT, Status.DUPLICATE]
    state = _state(engine)
    with engine.begin() as conn:
        for table in (applied_events, inventory, payments, order_items, orders, users):
            conn.execute(table.delete())
    singly = [s for m in messages for s in apply(engine, m)]
    assert singly == batched
    assert _state(engine) == state


def _state(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    volatile = ("updated_at", "applied_at", "kafka_offset")

    def strip(table: Any, skip: Iterable[str] = volatile) -> list[Any]:
        keys = [c for c in table.columns if c.name not in skip]
        return sorted(tuple(r[c.name] for c in keys) for r in rows(engine, table))
    return {t.name: strip(t) for t in (users, orders, order_items, payments, applied_events)} | {
        "inventory": strip(inventory, ())}
