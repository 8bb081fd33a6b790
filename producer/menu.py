"""The interactive producer: a menu to publish each event type, with generated defaults."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation, Overflow, getcontext
from typing import TextIO, TypeVar

from confluent_kafka import Producer

from eventpipe.errors import InvalidEvent
from eventpipe.events import parse_event
from eventpipe.samples import (
    Document,
    encode,
    inventory_adjusted,
    order_placed,
    payment_settled,
    user_created,
)
from producer.publish import FLUSH_TIMEOUT_S, publish
from producer.stream import MAX_COUNT, Planned, generate, tally

MENU = """
  1) UserCreated         3) PaymentSettled       5) generate a sample stream
  2) OrderPlaced         4) InventoryAdjusted    q) quit
"""
Parsed = TypeVar("Parsed")


class Menu:
    def __init__(self, producer: Producer, topic: str, read: Callable[[str], str],
                 out: TextIO) -> None:
        self.producer = producer
        self.topic = topic
        self.read = read
        self.out = out
        self.last_user = f"user-{uuid.uuid4().hex[:8]}"
        self.last_order: tuple[str, str, str] | None = None  # id, amount, currency

    def ask(self, label: str, default: str) -> str:
        return self._line(f"  {label} [{default}]: ", label) or default

    def _line(self, prompt: str, label: str) -> str:
        """An answer, asked again until it is UTF-8 text: bytes that are not reach Python as
        a decoding error or as lone surrogates, which no key or event can carry."""
        while True:
            try:
                answer = self.read(prompt).strip()
                answer.encode()
            except UnicodeError:
                self.out.write(f"  {label}: not UTF-8 text\n")
                continue
            return answer

    def ask_number(self, label: str, default: str, parse: Callable[[str], Parsed]) -> Parsed:
        """Ask until `parse` takes the answer: a typo costs one line naming what the question
        wants and the question again, not the session (the end of input still ends it)."""
        while True:
            answer = self.ask(label, default)
            try:
                return parse(answer)
            except ValueError as exc:
                self.out.write(f"  {label}: {answer!r} {exc}\n")

    def run(self) -> int:
        actions: dict[str, Callable[[], tuple[str, Document] | None]] = {
            "1": self.user, "2": self.order, "3": self.payment, "4": self.stock,
            "5": self.generate,
        }
        while True:
            self.out.write(MENU)
            try:
                choice = self._line("choose: ", "choice").lower()
            except EOFError:
                return 0
            if choice in ("q", "quit", "exit"):
                return 0
            action = actions.get(choice)
            if action is None:
                self.out.write(f"  no such choice {choice!r}\n")
                continue
            try:
                built = action()
            except EOFError:
                return 0
            if built is not None:
                self.send(*built)

    def send(self, key: str, document: Document) -> None:
        value = encode(document)
        try:
            parse_event(value, key)
        except InvalidEvent as exc:
            self.out.write(f"  note: this event is invalid and will be dead-lettered: {exc}\n")
        result = publish(self.producer, self.topic, [Planned(key.encode(), value, "manual")],
                         total=1, progress=False)
        why = "; ".join(result.errors) or ("interrupted" if result.interrupted else
                                            f"unconfirmed after {FLUSH_TIMEOUT_S:.0f} s")
        status = "sent" if result.delivered else f"FAILED ({why})"
        self.out.write(f"  {status}: {document['eventType']} {document['eventId']} "
                       f"key={key}\n")

    def user(self) -> tuple[str, Document]:
        user_id = self.ask("userId", f"user-{uuid.uuid4().hex[:8]}")
        email = self.ask("email", f"{user_id}@example.com")
        name = self.ask("name", "Ada Lovelace")
        self.last_user = user_id
        return user_created(user_id, email=email, name=name)

    def order(self) -> tuple[str, Document]:
        order_id = self.ask("orderId", f"order-{uuid.uuid4().hex[:8]}")
        user_id = self.ask("userId", self.last_user)
        sku = self.ask("sku", "SKU-0001")
        quantity = self.ask_number("quantity", "2", _whole)
        price = self.ask_number("unitPrice", "19.99", _unit_price(quantity))
        currency = self.ask("currency", "EUR")
        key, document = order_placed(order_id, user_id, items=[(sku, quantity, price)],
                                     currency=currency)
        self.last_order = (order_id, document["data"]["totalAmount"], currency)
        return key, document

    def payment(self) -> tuple[str, Document]:
        order_id, amount, currency = self.last_order or (f"order-{uuid.uuid4().hex[:8]}",
                                                         "10.00", "EUR")
        return payment_settled(self.ask("paymentId", f"pay-{uuid.uuid4().hex[:8]}"),
                               self.ask("orderId", order_id), self.ask("amount", amount),
                               currency=self.ask("currency", currency))

    def stock(self) -> tuple[str, Document]:
        sku = self.ask("sku", "SKU-0001")
        delta = self.ask_number("delta", "10", _whole)
        return inventory_adjusted(sku, delta, reason=self.ask("reason", "restock"))

    def generate(self) -> None:
        count = self.ask_number("how many events", "200", _count)
        counts: Counter[str] = Counter()
        messages = generate(count, duplicates=0.05, out_of_order=0.05,
                            seed=int(datetime.now(UTC).timestamp()))
        result = publish(self.producer, self.topic, tally(messages, counts), total=count)
        stopped = "interrupted: " if result.interrupted else ""
        self.out.write(f"  {stopped}sent {result.delivered} of {count} ({dict(counts)})\n")
        return None


# The parsers `Menu.ask_number` takes: each raises ValueError saying what the question wants.
# A number the contract refuses (a quantity of 0, a negative price) is taken: the menu sends
# invalid events on purpose, to be dead-lettered; only what no event can carry is asked again.

def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("is not a whole number") from None


def _unit_price(quantity: int) -> Callable[[str], str]:
    """The price as typed (the event carries it as text), if the order's total can be computed
    from it: a signalling NaN parses, and so does an exponent that overflows, yet the total's
    arithmetic raises on each."""
    def parse(text: str) -> str:
        try:
            price = Decimal(text)
        except InvalidOperation:
            raise ValueError("is not a decimal number") from None
        try:
            getcontext().multiply(price, quantity)
        except (InvalidOperation, Overflow):
            raise ValueError(f"times {quantity} gives no total") from None
        return text
    return parse


def _count(text: str) -> int:
    """From one to `MAX_COUNT`, as `produce generate --count` takes: fewer would send
    nothing."""
    wants = f"is not a whole number from 1 to {MAX_COUNT:,}"
    try:
        count = int(text)
    except ValueError:
        raise ValueError(wants) from None
    if not 1 <= count <= MAX_COUNT:
        raise ValueError(wants)
    return count
