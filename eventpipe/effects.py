"""What a batch of events writes, decided without touching a database.

`plan_batch` takes the batch in order and the fingerprints the database already holds for its
event ids, and says what each event is and what to write:

- an event id seen before (in the database or earlier in the batch) with the same fingerprint
  is a duplicate; with another fingerprint it is an id reused for another payload, which is a
  failure of the message (`IdReused`), never a silent duplicate;
- of the events of one entity (user, order, payment) in the batch only the newest version is
  written; the older ones are stale whatever the database holds. Whether the newest is newer
  than what is stored is decided by the version guard of the write itself (see
  `eventpipe.upserts`), so two writers racing on an entity can never move it backwards;
- inventory deltas are written once per event id: the caller adds only the deltas of the
  events its transaction claimed (`applied_events`), and `sum_deltas` adds them up per SKU.

Rules that span keys (an order needs its user, a payment its order, an email belongs to its
earliest claimant) are not decided here: entities are written on their own key whatever the
others hold, and `eventpipe.visibility` derives the read model from what is stored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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


class Fate(StrEnum):
    """What became of one event of a batch."""

    APPLIED = "applied"  # the entity's newest version, or a delta, was written
    STALE = "stale"  # older than what its entity holds: changed nothing
    DUPLICATE = "duplicate"  # the same event was recorded before
    ID_REUSED = "id_reused"  # its id was recorded for another payload: dead-lettered


@dataclass(frozen=True, slots=True)
class Position:
    """Where an event was read from; `None` fields for events that did not come from Kafka."""

    topic: str | None = None
    partition: int | None = None
    offset: int | None = None


@dataclass(frozen=True, slots=True)
class Received:
    """A valid event as a worker received it: where it was read, and its fingerprint."""

    event: Event
    position: Position = field(default_factory=Position)
    fingerprint: str = ""

    @classmethod
    def of(cls, event: Event, position: Position | None = None) -> Received:
        return cls(event, position or Position(), event.fingerprint)


@dataclass(slots=True)
class Plan:
    """Per event of the batch, in order: its fate if already known (duplicates, reused ids)
    or None until the writes tell; and the rows to write."""

    fates: list[Fate | None]
    # The id's first fingerprint, for events whose id was reused (the reason names it).
    reused_from: dict[int, str] = field(default_factory=dict)
    # Entity key → index in the batch of its newest event.
    users: dict[str, int] = field(default_factory=dict)
    orders: dict[str, int] = field(default_factory=dict)
    payments: dict[str, int] = field(default_factory=dict)
    inventory: list[int] = field(default_factory=list)


def plan_batch(batch: Sequence[Received], known: Mapping[str, str | None]) -> Plan:
    """`known`: event id → stored fingerprint (None for rows recorded before fingerprints)."""
    plan = Plan(fates=[None] * len(batch))
    seen: dict[str, str | None] = dict(known)
    newest: dict[tuple[str, str], int] = {}
    for index, received in enumerate(batch):
        event = received.event
        if event.event_id in seen:
            first = seen[event.event_id]
            # A row from before fingerprints were kept cannot tell: it counts as the same.
            if first is None or first == received.fingerprint:
                plan.fates[index] = Fate.DUPLICATE
            else:
                plan.fates[index] = Fate.ID_REUSED
                plan.reused_from[index] = first
            continue
        seen[event.event_id] = received.fingerprint
        slot = entity_of(event)
        if slot is None:
            plan.inventory.append(index)
            continue
        previous = newest.get(slot)
        if previous is None:
            newest[slot] = index
        elif batch[previous].event.version < event.version:
            plan.fates[previous] = Fate.STALE
            newest[slot] = index
        else:
            plan.fates[index] = Fate.STALE
    by_kind = {"user": plan.users, "order": plan.orders, "payment": plan.payments}
    for (kind, key), index in newest.items():
        by_kind[kind][key] = index
    return plan


def entity_of(event: Event) -> tuple[str, str] | None:
    """(kind, key) of the entity an event versions; None for inventory deltas."""
    data = event.data
    if isinstance(data, UserCreated):
        return "user", data.user_id
    if isinstance(data, OrderPlaced):
        return "order", data.order_id
    if isinstance(data, PaymentSettled):
        return "payment", data.payment_id
    return None


@dataclass(frozen=True, slots=True)
class InventoryChange:
    delta: int
    adjusted_at: datetime


def sum_deltas(events: Iterable[Event]) -> dict[str, InventoryChange]:
    """Per SKU: the sum of the deltas and the latest `adjustedAt`."""
    changes: dict[str, InventoryChange] = {}
    for event in events:
        data = event.data
        assert isinstance(data, InventoryAdjusted)
        previous = changes.get(data.sku)
        changes[data.sku] = InventoryChange(data.delta, data.adjusted_at) if previous is None \
            else InventoryChange(previous.delta + data.delta,
                                 max(previous.adjusted_at, data.adjusted_at))
    return changes
