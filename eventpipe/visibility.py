"""The rules that span keys: which stored entities the read model shows, and why the others wait.

Every entity is stored at its newest version whatever the others hold (`eventpipe.effects`).
These pure functions decide, from what is stored, whether it is *visible*:

- a user is visible when no other user claimed its email earlier: the email belongs to the
  claimant whose current event has the smallest version (`occurredAt`, then `eventId`); the
  others are held `EmailTaken`, naming the winner;
- an order is visible when its user is; otherwise it is held `MissingParent`;
- a payment is visible when its order is and has the payment's currency; otherwise it is held
  `MissingParent` or `CurrencyMismatch`.

Because they read only what is stored, the answer does not depend on the order in which the
events arrived: the same events give the same read model. A held entity becomes visible by
itself as soon as its condition clears (the parent arrives, the winner moves to another email,
the order's currency changes). `MissingParent` is a wait, not yet a failure: it enters the
dead-letter queue only after the parking time (`Held.waits`); the other two enter it at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

Version = tuple[datetime, str]

EMAIL_TAKEN = "EmailTaken"
MISSING_PARENT = "MissingParent"
CURRENCY_MISMATCH = "CurrencyMismatch"


@dataclass(frozen=True, slots=True)
class Held:
    """Why an entity's current event is not in the read model, and what it waits for."""

    error_class: str
    reason: str
    parent_kind: str
    parent_key: str
    waits: bool  # True: a wait (enters the DLQ after the parking time); False: a rejection


Standing = Held | None  # None: visible


def user_standing(user_id: str, email: str, owner: str) -> Standing:
    """`owner`: the user whose current event claims `email` with the smallest version."""
    if owner == user_id:
        return None
    return Held(EMAIL_TAKEN, f"email {email!r} belongs to user {owner!r}, who claimed it "
                "earlier", "user", owner, waits=False)


def order_standing(user_id: str, user: Standing | None, user_exists: bool) -> Standing:
    if not user_exists:
        return Held(MISSING_PARENT, f"user {user_id!r} not found", "user", user_id, waits=True)
    if user is not None:
        return Held(MISSING_PARENT, f"user {user_id!r} is not in the read model "
                    f"({user.error_class}: {user.reason})", "user", user_id, waits=True)
    return None


def payment_standing(order_id: str, currency: str, order_currency: str | None,
                     order: Standing | None) -> Standing:
    """`order_currency` is None when the order does not exist."""
    if order_currency is None:
        return Held(MISSING_PARENT, f"order {order_id!r} not found", "order", order_id,
                    waits=True)
    if order is not None:
        return Held(MISSING_PARENT, f"order {order_id!r} is not in the read model "
                    f"({order.error_class}: {order.reason})", "order", order_id, waits=True)
    if order_currency != currency:
        return Held(CURRENCY_MISMATCH, f"payment currency {currency} differs from order "
                    f"{order_id!r} currency {order_currency}", "order", order_id, waits=False)
    return None
