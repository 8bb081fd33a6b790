"""`plan_batch` alone: duplicates, reused ids and the newest version per entity, no database."""

from __future__ import annotations

from eventpipe.effects import Fate, Received, plan_batch, sum_deltas
from eventpipe.samples import inventory_adjusted, order_placed, payment_settled, user_created
from tests.support.factories import at, received


def one(message: tuple[str, dict[str, object]]) -> Received:
    [item] = received(message)
    return item


def test_copies_of_an_event_are_duplicates_and_another_payload_is_a_reused_id() -> None:
    first = one(user_created("u", name="Ada", occurred_at=at(0), event_id="e-1"))
    copy = one(user_created("u", name="Ada", occurred_at=at(0), event_id="e-1"))
    other = one(user_created("u", name="Eve", occurred_at=at(0), event_id="e-1"))
    plan = plan_batch([first, copy, other], {})
    assert plan.fates == [None, Fate.DUPLICATE, Fate.ID_REUSED]
    assert plan.reused_from == {2: first.fingerprint}
    recorded = plan_batch([copy, other], {"e-1": first.fingerprint})
    assert recorded.fates == [Fate.DUPLICATE, Fate.ID_REUSED]
    # A row recorded before fingerprints were kept cannot tell: a copy, not a failure.
    assert plan_batch([other], {"e-1": None}).fates == [Fate.DUPLICATE]


def test_only_the_newest_version_of_an_entity_is_written() -> None:
    old = one(user_created("u", name="old", occurred_at=at(0)))
    new = one(user_created("u", name="new", occurred_at=at(1)))
    for batch in ([old, new], [new, old]):
        plan = plan_batch(batch, {})
        assert plan.users == {"u": batch.index(new)}
        assert plan.fates[batch.index(old)] is Fate.STALE


def test_every_kind_of_entity_is_planned_on_its_own_key() -> None:
    batch = [one(user_created("u", occurred_at=at(0))),
             one(order_placed("o", "u", occurred_at=at(1))),
             one(payment_settled("p", "o", "10.00", occurred_at=at(2))),
             one(inventory_adjusted("S", 2, occurred_at=at(3)))]
    plan = plan_batch(batch, {})
    assert (plan.users, plan.orders, plan.payments, plan.inventory) == (
        {"u": 0}, {"o": 1}, {"p": 2}, [3])
    assert plan.fates == [None] * 4


def test_inventory_deltas_are_summed_per_sku_with_the_latest_time() -> None:
    events = [one(inventory_adjusted(sku, delta, occurred_at=at(t))).event
              for sku, delta, t in (("A", 5, 2), ("A", -2, 9), ("B", 1, 1))]
    changes = sum_deltas(events)
    assert {sku: (c.delta, c.adjusted_at) for sku, c in changes.items()} == {
        "A": (3, at(9)), "B": (1, at(1))}
