"""Reading orders from the read model (`eventpipe.readmodel`): one visible order with its items
and payment, or a user's latest orders. An order is settled once it has a visible payment (one
in the order's currency); the status is derived, never stored."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from eventpipe import readmodel

PENDING = "pending"
SETTLED = "settled"
LATEST_ORDERS = 5


def find_order(conn: Connection, order_id: str) -> dict[str, Any] | None:
    order = readmodel.visible_order(conn, order_id)
    if order is None:
        return None
    payment = readmodel.settled_payment(conn, order)
    return {
        "order_id": order.order_id, "user_id": order.user_id,
        "items": [{"sku": item.sku, "quantity": item.quantity, "unit_price": item.unit_price}
                  for item in readmodel.order_items_of(conn, order_id)],
        "total_amount": order.total_amount, "currency": order.currency,
        "placed_at": order.placed_at,
        "payment_status": PENDING if payment is None else SETTLED,
        "payment": None if payment is None else {
            "payment_id": payment.payment_id, "amount": payment.amount,
            "currency": payment.currency, "settled_at": payment.settled_at},
    }


def latest_orders(conn: Connection, user_id: str) -> list[dict[str, Any]]:
    """A visible user's newest orders (all of its orders are visible)."""
    return [{"order_id": order.order_id, "total_amount": order.total_amount,
             "currency": order.currency, "placed_at": order.placed_at,
             "payment_status": SETTLED if settled else PENDING}
            for order, settled in readmodel.recent_orders(conn, user_id, LATEST_ORDERS)]
