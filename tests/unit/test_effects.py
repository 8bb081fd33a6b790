"""`decide` alone: the batch semantics without a database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from eventpipe.effects import Delivery, OrderState, Snapshot, Status, UserState, decide, keys_of
from eventpipe.events import parse_event
from eventpipe.samples import (
    encode,
    inventory_adjusted,
    order_placed,
    payment_settled,
    user_created,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def d(message: tuple[str, dict[str, object]]) -> Delivery:
    return Delivery(parse_event(encode(message[1])))


def test_a_user_created_earlier_in_the_batch_is_a_parent() -> None:
    plan = decide([d(user_created("u", occurred_at=T0)), d(order_placed("o", "u"))], Snapshot())
    assert [o.status for o in plan.outcomes] == [Status.APPLIED, Status.APPLIED]
    assert set(plan.users) == {"u"} and set(plan.orders) == {"o"}


def test_only_the_newest_version_of_an_entity_is_written() -> None:
    old = d(user_created("u", name="old", occurred_at=T0))
    new = d(user_created("u", name="new", occurred_at=T0 + timedelta(seconds=1)))
    plan = decide([old, new], Snapshot())
    assert [o.status for o in plan.outcomes] == [Status.APPLIED, Status.APPLIED]
    assert plan.users["u"] is new.event
    plan = decide([new, old], Snapshot())
    assert [o.status for o in plan.outcomes] == [Status.APPLIED, Status.STALE]
    assert [status for _, status in plan.ledger] == [Status.APPLIED, Status.STALE]


def test_stored_state_decides_staleness_and_parents() -> None:
    snapshot = Snapshot(
        applied_ids={"seen"},
        users={"u": UserState("u@example.com", (T0, "z"))},
        email_owners={"u@example.com": "u"},
        orders={"o": OrderState("EUR", (T0, "z"))},
    )
    batch = [
        d(user_created("u", occurred_at=T0 - timedelta(days=1))),
        d(user_created("v", email="u@example.com", occurred_at=T0)),
        d(payment_settled("p", "o", "1.00", currency="GBP")),
        d(payment_settled("p2", "o", "1.00", currency="EUR")),
        d(order_placed("o2", "nobody")),
        d(inventory_adjusted("S", 2, event_id="seen")),
    ]
    assert [o.status for o in decide(batch, snapshot).outcomes] == [
        Status.STALE, Status.REJECTED, Status.REJECTED, Status.APPLIED,
        Status.MISSING_PARENT, Status.DUPLICATE]


def test_inventory_deltas_are_summed_per_sku() -> None:
    batch = [d(inventory_adjusted("S", 2, occurred_at=T0 + timedelta(seconds=5))),
             d(inventory_adjusted("S", -7, occurred_at=T0)),
             d(inventory_adjusted("R", 1, occurred_at=T0))]
    plan = decide(batch, Snapshot())
    assert {sku: (c.delta, c.adjusted_at) for sku, c in plan.inventory.items()} == {
        "S": (-5, T0 + timedelta(seconds=5)), "R": (1, T0)}


def test_keys_cover_every_row_a_batch_reads() -> None:
    keys = keys_of([d(user_created("u", email="e@x.io")), d(order_placed("o", "u2")),
                    d(payment_settled("p", "o3", "1.00"))])
    assert keys.user_ids == {"u", "u2"} and keys.emails == {"e@x.io"}
    assert keys.order_ids == {"o", "o3"} and keys.payment_ids == {"p"}
