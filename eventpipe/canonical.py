"""The canonical fold: the read model and dead letters a topic's messages must end in.

This is the reference semantics of the pipeline, the oracle of `eventpipe verify` and of the
determinism tests. It is written from the contract rules alone and shares no code with the
apply path (only the contract parser `parse_event`, its types and its fingerprints), so a bug
there cannot hide by being copied here. Pure: no I/O, no clock, no randomness.

The rules it implements (DESIGN.md, "The contract rules"):

1. Parse. Every message is parsed with `parse_event(value, key, received_at=<its Kafka
   timestamp>, max_future=...)`. One that does not parse is poison: dead letter `InvalidEvent`
   under `m:<message_fingerprint(key, value)>`. Any exception counts, not only `InvalidEvent`,
   as it does in the pipeline. A message Kafka cannot hand over (its record batch cannot be
   decoded) has no bytes: dead letter `UnreadableMessage` under `u:<position_fingerprint>`.
2. Event identity. Valid messages are grouped by `eventId`; copies with one fingerprint are one
   event (the rest are duplicates). The first copy is the one at the lowest offset of its
   partition; every copy whose fingerprint differs from the first's is dead-lettered `IdReused`
   under `e:<its fingerprint>`. Across partitions "first" is arrival order: when the first
   copies of several partitions disagree, and under faults (a partition's batches applied out
   of order after a redelivery) whatever copy was applied first, the fold takes the copy
   `arrived_first` names (verify asks the database which one the pipeline applied), if it is
   one of the copies; otherwise the lowest-numbered partition's first copy, so the fold itself
   stays a function of the set of messages. Such ids are reported in `ambiguous`.
3. Inventory. Per sku, `quantity` is the sum of `delta` over its distinct InventoryAdjusted
   events and `updated_at` the latest `adjustedAt` among them.
4. Entities (user by userId, order by orderId, payment by paymentId). The current event is the
   newest by version `(occurredAt, eventId)`, eventIds compared by code point; every other
   event of the entity is stale (done, never dead-lettered).
5. Visibility, from current events only:
   - a user is visible iff no other user's current event claims its email (lower-cased by
     the contract) with an earlier version; otherwise it is held `EmailTaken`, naming the
     earliest claimant;
   - an order is visible iff its user is visible; otherwise it is held `MissingParent`, also
     when the user exists but lost its email: a displaced user's orders wait like orphans;
   - a payment is visible iff its order is visible (else `MissingParent`) and the order's
     current currency is the payment's (else `CurrencyMismatch`).
   A held event's dead letter is `e:<its fingerprint>`. A held `MissingParent` only reaches the
   operator's DLQ after the parking time; `ExpectedDeadLetter.parks` says which ones may still
   be waiting.
6. The dead letters are the InvalidEvent, IdReused and held keys. Database refusals and
   messages that crash workers cannot be predicted from the messages and are not here.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import NamedTuple

from eventpipe.errors import InvalidEvent
from eventpipe.events import (
    Event,
    InventoryAdjusted,
    OrderPlaced,
    PaymentSettled,
    UserCreated,
    message_fingerprint,
    parse_event,
)
from eventpipe.times import utc_iso


class PartitionOffset(NamedTuple):
    """Where a message sits on the topic."""

    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class TopicMessage:
    """One message as read from the topic.

    `timestamp` is its Kafka timestamp, the reference of the future bound: without one (or
    without `max_future`) no `occurredAt` is judged too far ahead.
    """

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None  # None: a tombstone
    timestamp: datetime | None
    # For a message Kafka cannot hand over: its position's fingerprint, and why.
    unreadable: tuple[str, str] | None = None

    @property
    def position(self) -> PartitionOffset:
        return PartitionOffset(self.partition, self.offset)


class ErrorClass(StrEnum):
    INVALID_EVENT = "InvalidEvent"
    ID_REUSED = "IdReused"
    UNREADABLE_MESSAGE = "UnreadableMessage"
    EMAIL_TAKEN = "EmailTaken"
    MISSING_PARENT = "MissingParent"
    CURRENCY_MISMATCH = "CurrencyMismatch"


class EntityKind(StrEnum):
    USER = "user"
    ORDER = "order"
    PAYMENT = "payment"


class Entity(NamedTuple):
    kind: EntityKind
    id: str


class Fate(StrEnum):
    """What became of a distinct valid event (IdReused copies are dead letters instead)."""

    APPLIED = "applied"  # an inventory change, or the current event of a visible entity
    STALE = "stale"  # an older version of its entity
    HELD = "held"  # the current event of an entity that is not visible: see `dead_letters`


@dataclass(frozen=True, slots=True)
class UserRow:
    email: str
    name: str
    created_at: datetime


class ItemRow(NamedTuple):
    sku: str
    quantity: int
    unit_price: Decimal


@dataclass(frozen=True, slots=True)
class OrderRow:
    user_id: str
    total_amount: Decimal
    currency: str
    placed_at: datetime
    items: tuple[ItemRow, ...]  # in the order the message lists them


@dataclass(frozen=True, slots=True)
class PaymentRow:
    order_id: str
    amount: Decimal
    currency: str
    settled_at: datetime


@dataclass(frozen=True, slots=True)
class InventoryRow:
    quantity: int
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class ExpectedDeadLetter:
    key: str  # "e:<event fingerprint>", "m:<message fingerprint>" or "u:<position fingerprint>"
    error_class: ErrorClass
    event_id: str | None  # None for poison: nothing valid can be said about it
    positions: tuple[PartitionOffset, ...]  # every message carrying it, sorted
    reason: str

    @property
    def parks(self) -> bool:
        """True when the pipeline may still show it as waiting (before the parking time)."""
        return self.error_class is ErrorClass.MISSING_PARENT


# Given eventIds, the fingerprint of the copy of each that arrived first, where known.
ArrivedFirst = Callable[[Collection[str]], Mapping[str, str]]


@dataclass(frozen=True, slots=True)
class AmbiguousId:
    """An eventId whose first copy depends on which partition arrives first (rule 2)."""

    event_id: str
    chosen: str  # the fingerprint the fold took as the event
    candidates: tuple[str, ...]  # fingerprints of the partitions' first copies, sorted
    positions: tuple[PartitionOffset, ...]  # every valid message carrying the id, sorted


@dataclass(frozen=True, slots=True)
class Counts:
    """Messages: messages = invalid + valid; valid = events + duplicates + id_reused.

    Events: every distinct event is applied, stale or held (`stale` and `held` count them).
    """

    messages: int = 0
    invalid: int = 0  # did not parse
    valid: int = 0  # parsed
    events: int = 0  # distinct events, after rule 2
    duplicates: int = 0  # further copies of those events
    id_reused: int = 0  # dead-lettered IdReused
    stale: int = 0
    held: int = 0


@dataclass(frozen=True, slots=True)
class Expected:
    users: dict[str, UserRow]
    orders: dict[str, OrderRow]
    payments: dict[str, PaymentRow]
    inventory: dict[str, InventoryRow]
    dead_letters: dict[str, ExpectedDeadLetter]  # by DLQ key
    current: dict[Entity, str]  # the current event id of every entity, visible or held
    fates: dict[str, Fate]  # by event id
    positions: dict[str, tuple[PartitionOffset, ...]]  # by event id: where its copies are
    ambiguous: tuple[AmbiguousId, ...]  # sorted by event id
    counts: Counts


@dataclass(slots=True)
class _Copies:
    """The valid messages carrying one fingerprint of an eventId (its first parse is kept)."""

    event: Event
    positions: list[PartitionOffset]


@dataclass(slots=True)
class _Poison:
    positions: list[PartitionOffset]
    first: PartitionOffset
    reason: str  # the first position's, so the result does not depend on reading order
    error_class: ErrorClass = ErrorClass.INVALID_EVENT


@dataclass(slots=True)
class _Tally:
    messages: int = 0
    invalid: int = 0
    duplicates: int = 0
    id_reused: int = 0


@dataclass(slots=True)
class _Entities:
    """Every distinct event of every entity, keyed by entity id."""

    users: dict[str, list[Event]] = field(default_factory=dict)
    orders: dict[str, list[Event]] = field(default_factory=dict)
    payments: dict[str, list[Event]] = field(default_factory=dict)


def fold(messages: Iterable[TopicMessage], *, max_future: timedelta | None = None,
         arrived_first: ArrivedFirst | None = None) -> Expected:
    """The read model and dead letters the pipeline must reach from `messages` (rules 1–6).

    `arrived_first`: given the eventIds whose winning copy is a matter of arrival order, the
    fingerprint that arrived first of each, where known (rule 2).

    One pass groups the messages by eventId; the decisions are then taken per event id and per
    entity, so the result does not depend on the order of `messages`.
    """
    tally = _Tally()
    poison: dict[str, _Poison] = {}
    # Almost every id has one payload: a list of one is the lean way to hold that at 1M ids.
    by_id: dict[str, list[_Copies]] = {}
    for message in messages:
        tally.messages += 1
        _group(message, max_future, poison, by_id, tally)

    dead_letters: dict[str, ExpectedDeadLetter] = {
        key: ExpectedDeadLetter(key, p.error_class, None, tuple(sorted(p.positions)), p.reason)
        for key, p in poison.items()
    }
    events, ambiguous = _identify(by_id, dead_letters, tally, arrived_first)
    positions = {event_id: tuple(sorted(copies.positions))
                 for event_id, copies in events.items()}
    del by_id  # the losing copies are dead letters now; let them go before the next step

    inventory: dict[str, InventoryRow] = {}
    entities = _Entities()
    fates: dict[str, Fate] = {}
    for copies in events.values():
        event = copies.event
        match event.data:
            case InventoryAdjusted() as adjusted:
                _adjust(inventory, adjusted)
                fates[event.event_id] = Fate.APPLIED
            case UserCreated() as user:
                entities.users.setdefault(user.user_id, []).append(event)
            case OrderPlaced() as order:
                entities.orders.setdefault(order.order_id, []).append(event)
            case PaymentSettled() as payment:
                entities.payments.setdefault(payment.payment_id, []).append(event)

    current: dict[Entity, str] = {}
    newest_users = _current(EntityKind.USER, entities.users, current, fates)
    newest_orders = _current(EntityKind.ORDER, entities.orders, current, fates)
    newest_payments = _current(EntityKind.PAYMENT, entities.payments, current, fates)
    stale = sum(1 for fate in fates.values() if fate is Fate.STALE)

    held: dict[str, tuple[ErrorClass, str]] = {}  # event id -> why it is held
    users = _visible_users(newest_users, held)
    orders = _visible_orders(newest_orders, newest_users, users, held)
    payments = _visible_payments(newest_payments, newest_orders, orders, held)
    for event_id, (error_class, reason) in held.items():
        fates[event_id] = Fate.HELD
        copies = events[event_id]
        key = "e:" + copies.event.fingerprint
        dead_letters[key] = ExpectedDeadLetter(
            key, error_class, event_id, tuple(sorted(copies.positions)), reason
        )

    counts = Counts(
        messages=tally.messages, invalid=tally.invalid, valid=tally.messages - tally.invalid,
        events=len(events), duplicates=tally.duplicates, id_reused=tally.id_reused,
        stale=stale, held=len(held),
    )
    return Expected(users, orders, payments, inventory, dead_letters, current, fates, positions,
                    tuple(sorted(ambiguous, key=lambda a: a.event_id)), counts)


def _group(
    message: TopicMessage, max_future: timedelta | None, poison: dict[str, _Poison],
    by_id: dict[str, list[_Copies]], tally: _Tally,
) -> None:
    """Rule 1, and the grouping half of rule 2."""
    position = message.position
    if message.unreadable is not None:
        fingerprint, why = message.unreadable
        tally.invalid += 1
        poison["u:" + fingerprint] = _Poison([position], position, why,
                                             ErrorClass.UNREADABLE_MESSAGE)
        return
    try:
        event = parse_event(message.value, message.key, received_at=message.timestamp,
                            max_future=max_future)
    except Exception as exc:
        # The contract promises InvalidEvent only; should it break that promise, the pipeline
        # still treats any failure to turn bytes into an event as permanent, and so does the
        # oracle rather than stop in the middle of a topic.
        reason = str(exc) if isinstance(exc, InvalidEvent) else f"{type(exc).__name__}: {exc}"
        tally.invalid += 1
        key = "m:" + message_fingerprint(message.key, message.value)
        found = poison.get(key)
        if found is None:
            poison[key] = _Poison([position], position, reason)
        else:
            found.positions.append(position)
            if position < found.first:
                # Equal bytes can fail differently (the future bound reads the timestamp).
                found.first, found.reason = position, reason
        return
    payloads = by_id.get(event.event_id)
    if payloads is None:
        by_id[event.event_id] = [_Copies(event, [position])]
        return
    # Fingerprints are only needed once an id is seen twice, so only then are they computed.
    fingerprint = event.fingerprint
    for copies in payloads:
        if copies.event.fingerprint == fingerprint:
            copies.positions.append(position)
            return
    payloads.append(_Copies(event, [position]))


def _identify(
    by_id: dict[str, list[_Copies]], dead_letters: dict[str, ExpectedDeadLetter],
    tally: _Tally, arrived_first: ArrivedFirst | None,
) -> tuple[dict[str, _Copies], list[AmbiguousId]]:
    """The deciding half of rule 2: one event per eventId; other payloads are IdReused."""
    events: dict[str, _Copies] = {}
    ambiguous: list[AmbiguousId] = []
    reused = [event_id for event_id, payloads in by_id.items() if len(payloads) > 1]
    arrived = arrived_first(reused) if arrived_first is not None and reused else {}
    for event_id, payloads in by_id.items():
        if len(payloads) == 1:
            (copies,) = payloads
            events[event_id] = copies
            tally.duplicates += len(copies.positions) - 1
            continue
        firsts: dict[int, PartitionOffset] = {}  # partition -> its lowest offset carrying the id
        owner: dict[PartitionOffset, str] = {}
        fingerprints = {copies.event.fingerprint: copies for copies in payloads}
        for fingerprint, copies in fingerprints.items():
            for position in copies.positions:
                owner[position] = fingerprint
                known = firsts.get(position.partition)
                if known is None or position.offset < known.offset:
                    firsts[position.partition] = position
        # Which copy is applied first is timing: the first copy of one partition or another,
        # or, under faults (a partition's batches applied out of order after a redelivery),
        # any copy. The one that was, if known; else the lowest partition's first copy, so
        # that the fold itself is a function of the messages.
        candidates = sorted({owner[position] for position in firsts.values()})
        recorded = arrived.get(event_id)
        chosen = recorded if recorded in fingerprints else owner[firsts[min(firsts)]]
        first = min(fingerprints[chosen].positions)
        if len(candidates) > 1 or chosen not in candidates:
            ambiguous.append(AmbiguousId(event_id, chosen, tuple(candidates),
                                         tuple(sorted(owner))))
        for fingerprint, copies in fingerprints.items():
            if fingerprint == chosen:
                events[event_id] = copies
                tally.duplicates += len(copies.positions) - 1
                continue
            tally.id_reused += len(copies.positions)
            key = "e:" + fingerprint
            dead_letters[key] = ExpectedDeadLetter(
                key, ErrorClass.ID_REUSED, event_id, tuple(sorted(copies.positions)),
                f"eventId {event_id!r} was first used by a different event, at partition "
                f"{first.partition} offset {first.offset} (fingerprint {chosen})",
            )
    return events, ambiguous


def _adjust(inventory: dict[str, InventoryRow], adjusted: InventoryAdjusted) -> None:
    """Rule 3: a sum and a max, which no order of events can change."""
    row = inventory.get(adjusted.sku)
    if row is None:
        inventory[adjusted.sku] = InventoryRow(adjusted.delta, adjusted.adjusted_at)
    else:
        inventory[adjusted.sku] = InventoryRow(row.quantity + adjusted.delta,
                                               max(row.updated_at, adjusted.adjusted_at))


def _current(
    kind: EntityKind, entities: dict[str, list[Event]], current: dict[Entity, str],
    fates: dict[str, Fate],
) -> dict[str, Event]:
    """Rule 4: the newest version of each entity; its other events are stale."""
    newest: dict[str, Event] = {}
    for entity_id, events in entities.items():
        # Distinct events have distinct ids, so versions never tie.
        winner = max(events, key=lambda event: event.version)
        newest[entity_id] = winner
        current[Entity(kind, entity_id)] = winner.event_id
        fates[winner.event_id] = Fate.APPLIED  # until rule 5 holds it
        for event in events:
            if event is not winner:
                fates[event.event_id] = Fate.STALE
    return newest


def _visible_users(
    newest: dict[str, Event], held: dict[str, tuple[ErrorClass, str]]
) -> dict[str, UserRow]:
    """Rule 5 for users: an email belongs to its earliest claimant among current events."""
    owners: dict[str, Event] = {}
    for event in newest.values():
        email = _user(event).email
        owner = owners.get(email)
        if owner is None or event.version < owner.version:
            owners[email] = event
    visible: dict[str, UserRow] = {}
    for user_id, event in newest.items():
        user = _user(event)
        owner = owners[user.email]
        if owner is event:
            visible[user_id] = UserRow(user.email, user.name, user.created_at)
        else:
            held[event.event_id] = (
                ErrorClass.EMAIL_TAKEN,
                f"email {user.email!r} belongs to user {_user(owner).user_id!r}, whose claim "
                f"({utc_iso(owner.occurred_at)}, {owner.event_id}) is earlier than this one "
                f"({utc_iso(event.occurred_at)}, {event.event_id})",
            )
    return visible


def _visible_orders(
    newest: dict[str, Event], newest_users: dict[str, Event], users: dict[str, UserRow],
    held: dict[str, tuple[ErrorClass, str]],
) -> dict[str, OrderRow]:
    """Rule 5 for orders: visible iff their user is."""
    visible: dict[str, OrderRow] = {}
    for order_id, event in newest.items():
        order = _order(event)
        if order.user_id in users:
            visible[order_id] = OrderRow(
                order.user_id, order.total_amount, order.currency, order.placed_at,
                tuple(ItemRow(i.sku, i.quantity, i.unit_price) for i in order.items),
            )
        elif order.user_id in newest_users:
            held[event.event_id] = (
                ErrorClass.MISSING_PARENT,
                f"user {order.user_id!r} is not in the read model (its email is taken)",
            )
        else:
            held[event.event_id] = (ErrorClass.MISSING_PARENT,
                                    f"user {order.user_id!r} does not exist")
    return visible


def _visible_payments(
    newest: dict[str, Event], newest_orders: dict[str, Event], orders: dict[str, OrderRow],
    held: dict[str, tuple[ErrorClass, str]],
) -> dict[str, PaymentRow]:
    """Rule 5 for payments: visible iff their order is, in the order's current currency."""
    visible: dict[str, PaymentRow] = {}
    for payment_id, event in newest.items():
        payment = _payment(event)
        order = orders.get(payment.order_id)
        if order is None:
            reason = (
                f"order {payment.order_id!r} is not in the read model (its user is not)"
                if payment.order_id in newest_orders
                else f"order {payment.order_id!r} does not exist"
            )
            held[event.event_id] = (ErrorClass.MISSING_PARENT, reason)
        elif order.currency != payment.currency:
            held[event.event_id] = (
                ErrorClass.CURRENCY_MISMATCH,
                f"payment in {payment.currency} for order {payment.order_id!r}, which is in "
                f"{order.currency}",
            )
        else:
            visible[payment_id] = PaymentRow(payment.order_id, payment.amount, payment.currency,
                                             payment.settled_at)
    return visible


# The entity maps are built by payload type, so these narrowings cannot fail; they exist to
# give the type checker the payload's type without a cast.
def _user(event: Event) -> UserCreated:
    assert isinstance(event.data, UserCreated)
    return event.data


def _order(event: Event) -> OrderPlaced:
    assert isinstance(event.data, OrderPlaced)
    return event.data


def _payment(event: Event) -> PaymentSettled:
    assert isinstance(event.data, PaymentSettled)
    return event.data
