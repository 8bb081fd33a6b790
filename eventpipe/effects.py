"""What a batch of events does to the read model, decided without touching a database.

`decide` walks the batch in order against a `Snapshot` of the rows it touches, exactly as if
the events were applied one by one, and returns a `Plan`: each event's outcome and the rows
to write. The I/O around it (`eventpipe.apply`) loads the snapshot, writes the plan and
records the ledger in one transaction.

Rules (MISSION, "Effects"):
- an event id already in the ledger, or seen earlier in the batch, is a duplicate;
- entities change only for a newer version (`occurredAt`, then `eventId`); older is stale;
- an order needs its user, a payment its order: otherwise the event waits (missing parent);
- a second user with the same email, or a payment in another currency than its order, is
  rejected for good;
- inventory deltas add up, once per event id.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from eventpipe.events import (
    Event,
    InventoryAdjusted,
    OrderPlaced,
    PaymentSettled,
    UserCreated,
)

Version = tuple[datetime, str]


class Status(StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    STALE = "stale"
    MISSING_PARENT = "missing_parent"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class Outcome:
    event_id: str
    status: Status
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Position:
    """Where an event was read from; `None` fields for events that did not come from Kafka."""

    topic: str | None = None
    partition: int | None = None
    offset: int | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    event: Event
    position: Position = field(default_factory=Position)


@dataclass(frozen=True, slots=True)
class UserState:
    email: str
    version: Version


@dataclass(frozen=True, slots=True)
class OrderState:
    currency: str
    version: Version


@dataclass(slots=True)
class Snapshot:
    """The stored state a batch depends on; ids absent from a map do not exist."""

    applied_ids: set[str] = field(default_factory=set)
    users: dict[str, UserState] = field(default_factory=dict)
    email_owners: dict[str, str] = field(default_factory=dict)
    orders: dict[str, OrderState] = field(default_factory=dict)
    payment_versions: dict[str, Version] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Keys:
    """The ids whose stored rows a batch needs to be decided."""

    event_ids: frozenset[str]
    user_ids: frozenset[str]
    emails: frozenset[str]
    order_ids: frozenset[str]
    payment_ids: frozenset[str]


@dataclass(frozen=True, slots=True)
class InventoryChange:
    delta: int
    adjusted_at: datetime


@dataclass(slots=True)
class Plan:
    outcomes: list[Outcome]
    users: dict[str, Event] = field(default_factory=dict)
    orders: dict[str, Event] = field(default_factory=dict)
    payments: dict[str, Event] = field(default_factory=dict)
    inventory: dict[str, InventoryChange] = field(default_factory=dict)
    # Applied and stale events: both are done with, so both go in the ledger.
    ledger: list[tuple[Delivery, Status]] = field(default_factory=list)


def keys_of(batch: Iterable[Delivery]) -> Keys:
    event_ids, user_ids, emails, order_ids, payment_ids = set(), set(), set(), set(), set()
    for delivery in batch:
        event_ids.add(delivery.event.event_id)
        data = delivery.event.data
        if isinstance(data, UserCreated):
            user_ids.add(data.user_id)
            emails.add(data.email)
        elif isinstance(data, OrderPlaced):
            order_ids.add(data.order_id)
            user_ids.add(data.user_id)
        elif isinstance(data, PaymentSettled):
            payment_ids.add(data.payment_id)
            order_ids.add(data.order_id)
    return Keys(
        frozenset(event_ids), frozenset(user_ids), frozenset(emails),
        frozenset(order_ids), frozenset(payment_ids),
    )


def decide(batch: Sequence[Delivery], snapshot: Snapshot) -> Plan:
    """Outcomes in batch order and the rows to write. `snapshot` is updated as events apply."""
    plan = Plan(outcomes=[])
    seen: set[str] = set()
    for delivery in batch:
        event = delivery.event
        if event.event_id in snapshot.applied_ids or event.event_id in seen:
            plan.outcomes.append(Outcome(event.event_id, Status.DUPLICATE))
            continue
        outcome = _decide_one(event, snapshot, plan)
        plan.outcomes.append(outcome)
        if outcome.status in (Status.APPLIED, Status.STALE):
            seen.add(event.event_id)
            plan.ledger.append((delivery, outcome.status))
    return plan


def _decide_one(event: Event, snapshot: Snapshot, plan: Plan) -> Outcome:
    data = event.data
    if isinstance(data, UserCreated):
        return _user(event, data, snapshot, plan)
    if isinstance(data, OrderPlaced):
        return _order(event, data, snapshot, plan)
    if isinstance(data, PaymentSettled):
        return _payment(event, data, snapshot, plan)
    return _inventory(event, data, plan)


def _user(event: Event, data: UserCreated, snapshot: Snapshot, plan: Plan) -> Outcome:
    current = snapshot.users.get(data.user_id)
    if current is not None and event.version <= current.version:
        return Outcome(event.event_id, Status.STALE)
    owner = snapshot.email_owners.get(data.email)
    if owner is not None and owner != data.user_id:
        return Outcome(
            event.event_id, Status.REJECTED,
            f"email {data.email!r} already belongs to user {owner!r}",
        )
    if current is not None and snapshot.email_owners.get(current.email) == data.user_id:
        del snapshot.email_owners[current.email]
    snapshot.email_owners[data.email] = data.user_id
    snapshot.users[data.user_id] = UserState(data.email, event.version)
    plan.users[data.user_id] = event
    return Outcome(event.event_id, Status.APPLIED)


def _order(event: Event, data: OrderPlaced, snapshot: Snapshot, plan: Plan) -> Outcome:
    current = snapshot.orders.get(data.order_id)
    if current is not None and event.version <= current.version:
        return Outcome(event.event_id, Status.STALE)
    if data.user_id not in snapshot.users:
        return Outcome(event.event_id, Status.MISSING_PARENT, f"user {data.user_id!r} not found")
    snapshot.orders[data.order_id] = OrderState(data.currency, event.version)
    plan.orders[data.order_id] = event
    return Outcome(event.event_id, Status.APPLIED)


def _payment(event: Event, data: PaymentSettled, snapshot: Snapshot, plan: Plan) -> Outcome:
    current = snapshot.payment_versions.get(data.payment_id)
    if current is not None and event.version <= current:
        return Outcome(event.event_id, Status.STALE)
    order = snapshot.orders.get(data.order_id)
    if order is None:
        return Outcome(
            event.event_id, Status.MISSING_PARENT, f"order {data.order_id!r} not found"
        )
    if order.currency != data.currency:
        return Outcome(
            event.event_id, Status.REJECTED,
            f"payment currency {data.currency} differs from order currency {order.currency}",
        )
    snapshot.payment_versions[data.payment_id] = event.version
    plan.payments[data.payment_id] = event
    return Outcome(event.event_id, Status.APPLIED)


def _inventory(event: Event, data: InventoryAdjusted, plan: Plan) -> Outcome:
    previous = plan.inventory.get(data.sku)
    if previous is None:
        plan.inventory[data.sku] = InventoryChange(data.delta, data.adjusted_at)
    else:
        plan.inventory[data.sku] = InventoryChange(
            previous.delta + data.delta, max(previous.adjusted_at, data.adjusted_at)
        )
    return Outcome(event.event_id, Status.APPLIED)
