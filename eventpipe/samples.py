"""Builders for events in their wire format, for the producer, the demo, tests and benchmarks.

Each builder returns `(key, document)`; `encode` turns a document into message bytes.
Defaults are filled from a seeded `random.Random`, so streams are realistic yet repeatable.
"""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from eventpipe.events import EventType
from eventpipe.times import utc_iso

Document = dict[str, Any]
T = TypeVar("T")
_FIRST = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Ken", "Margaret", "Linus", "Radia")
_LAST = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Thompson", "Hamilton", "Perlman")
_SKUS = tuple(f"SKU-{n:04d}" for n in range(1, 41))
_CURRENCIES = ("EUR", "USD", "GBP")
_REASONS = ("restock", "sale", "return", "damaged", "recount")


def iso(moment: datetime) -> str:
    """ISO-8601 UTC with milliseconds and a 'Z', as the contract shows it."""
    return utc_iso(moment, "milliseconds")


def encode(document: Document) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def envelope(
    event_type: EventType, data: Document, *, event_id: str | None = None,
    occurred_at: datetime | None = None,
) -> Document:
    return {
        "eventId": event_id or str(uuid.uuid4()),
        "eventType": event_type.value,
        "schemaVersion": 1,
        "occurredAt": iso(occurred_at or datetime.now(UTC)),
        "data": data,
    }


def user_created(
    user_id: str, *, email: str | None = None, name: str = "Ada Lovelace",
    occurred_at: datetime | None = None, event_id: str | None = None,
) -> tuple[str, Document]:
    when = occurred_at or datetime.now(UTC)
    data = {"userId": user_id, "email": email or f"{user_id}@example.com", "name": name,
            "createdAt": iso(when)}
    return user_id, envelope(EventType.USER_CREATED, data, event_id=event_id, occurred_at=when)


def order_placed(
    order_id: str, user_id: str, *, items: list[tuple[str, int, str]] | None = None,
    currency: str = "EUR", occurred_at: datetime | None = None, event_id: str | None = None,
) -> tuple[str, Document]:
    when = occurred_at or datetime.now(UTC)
    lines = items or [("SKU-0001", 1, "10.00")]
    total = sum((Decimal(price) * quantity for _, quantity, price in lines), Decimal("0"))
    data = {
        "orderId": order_id, "userId": user_id,
        "items": [{"sku": sku, "quantity": q, "unitPrice": p} for sku, q, p in lines],
        "totalAmount": str(total), "currency": currency, "placedAt": iso(when),
    }
    return order_id, envelope(EventType.ORDER_PLACED, data, event_id=event_id, occurred_at=when)


def payment_settled(
    payment_id: str, order_id: str, amount: str, *, currency: str = "EUR",
    occurred_at: datetime | None = None, event_id: str | None = None,
) -> tuple[str, Document]:
    when = occurred_at or datetime.now(UTC)
    data = {"paymentId": payment_id, "orderId": order_id, "amount": amount,
            "currency": currency, "settledAt": iso(when)}
    return order_id, envelope(EventType.PAYMENT_SETTLED, data, event_id=event_id, occurred_at=when)


def inventory_adjusted(
    sku: str, delta: int, *, reason: str = "restock", occurred_at: datetime | None = None,
    event_id: str | None = None,
) -> tuple[str, Document]:
    when = occurred_at or datetime.now(UTC)
    data = {"sku": sku, "delta": delta, "reason": reason, "adjustedAt": iso(when)}
    return sku, envelope(
        EventType.INVENTORY_ADJUSTED, data, event_id=event_id, occurred_at=when
    )


class Story:
    """A realistic stream: users sign up, place orders, pay; stock moves alongside.

    Every child is emitted after its parent; reordering, duplicates and poison are the
    caller's to add, so what a stream should produce stays computable.
    """

    KEPT = 100_000

    def __init__(self, seed: int = 7, start: datetime | None = None) -> None:
        self.random = random.Random(seed)
        # A day back: events are at most 0.9 s apart, so a story of up to ~96,000 events
        # stays in the past (the contract refuses events from the future).
        self.clock = start or datetime.now(UTC) - timedelta(days=1)
        # At most `KEPT` of each, the oldest replaced in turn: a story of any length fits in
        # memory, and one under that size is the same as it always was.
        self.users: list[str] = []
        self.unpaid: list[tuple[str, str, str]] = []  # (order_id, amount, currency)
        self._serial = 0

    def _keep(self, kept: list[T], item: T) -> None:
        if len(kept) < self.KEPT:
            kept.append(item)
        else:
            kept[self._serial % self.KEPT] = item

    def _id(self, prefix: str) -> str:
        self._serial += 1
        return f"{prefix}-{self._serial:06d}-{self.random.randrange(16**6):06x}"

    def _tick(self) -> datetime:
        self.clock += timedelta(milliseconds=self.random.randint(1, 900))
        return self.clock

    def _event_id(self) -> str:
        return str(uuid.UUID(int=self.random.getrandbits(128), version=4))

    def next(self) -> tuple[str, Document]:
        roll = self.random.random()
        if not self.users or roll < 0.2:
            user_id = self._id("user")
            self._keep(self.users, user_id)
            name = f"{self.random.choice(_FIRST)} {self.random.choice(_LAST)}"
            return user_created(user_id, email=f"{user_id}@example.com", name=name,
                                occurred_at=self._tick(), event_id=self._event_id())
        if self.unpaid and roll < 0.45:
            order_id, amount, currency = self.unpaid.pop(self.random.randrange(len(self.unpaid)))
            return payment_settled(self._id("pay"), order_id, amount, currency=currency,
                                   occurred_at=self._tick(), event_id=self._event_id())
        if roll < 0.8:
            lines = [
                (self.random.choice(_SKUS), self.random.randint(1, 4),
                 f"{self.random.randint(1, 200)}.{self.random.randint(0, 99):02d}")
                for _ in range(self.random.randint(1, 4))
            ]
            order_id, currency = self._id("order"), self.random.choice(_CURRENCIES)
            key, document = order_placed(order_id, self.random.choice(self.users), items=lines,
                                         currency=currency, occurred_at=self._tick(),
                                         event_id=self._event_id())
            self._keep(self.unpaid, (order_id, document["data"]["totalAmount"], currency))
            return key, document
        delta = self.random.choice((-3, -2, -1, 1, 2, 5, 10, 20))
        return inventory_adjusted(self.random.choice(_SKUS), delta,
                                  reason=self.random.choice(_REASONS), occurred_at=self._tick(),
                                  event_id=self._event_id())
