"""Reading orders: one order with its items and latest payment, or a user's latest orders.

Each function is one or two SELECTs that compile the same on PostgreSQL, SQLite and SQL
Server; payment status is derived from the payments table (an order with a payment is
settled), never stored.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Select, case, exists, select

from eventpipe.tables import order_items, orders, payments

PENDING = "pending"
SETTLED = "settled"
LATEST_ORDERS = 5


def find_order(conn: Connection, order_id: str) -> dict[str, Any] | None:
    """The order, its items in line order, and its latest payment; two statements."""
    row = conn.execute(order_query(order_id)).mappings().first()
    if row is None:
        return None
    items = conn.execute(
        select(order_items.c.sku, order_items.c.quantity, order_items.c.unit_price)
        .where(order_items.c.order_id == order_id)
        .order_by(order_items.c.line_no)
    ).mappings()
    payment = None if row["payment_id"] is None else {
        "payment_id": row["payment_id"], "amount": row["amount"],
        "currency": row["payment_currency"], "settled_at": row["settled_at"],
    }
    return {
        "order_id": row["order_id"], "user_id": row["user_id"],
        "items": [dict(item) for item in items],
        "total_amount": row["total_amount"], "currency": row["currency"],
        "placed_at": row["placed_at"],
        "payment_status": PENDING if payment is None else SETTLED,
        "payment": payment,
    }


def order_query(order_id: str) -> Select[Any]:
    # An order may have several payments: join only the latest settled one.
    candidate = payments.alias("candidate")
    latest_payment = (
        select(candidate.c.payment_id)
        .where(candidate.c.order_id == orders.c.order_id)
        .order_by(candidate.c.settled_at.desc(), candidate.c.payment_id.desc())
        .limit(1)
        .correlate(orders)
        .scalar_subquery()
    )
    return (
        select(
            orders.c.order_id, orders.c.user_id, orders.c.total_amount, orders.c.currency,
            orders.c.placed_at, payments.c.payment_id, payments.c.amount,
            payments.c.currency.label("payment_currency"), payments.c.settled_at,
        )
        .select_from(orders.outerjoin(payments, payments.c.payment_id == latest_payment))
        .where(orders.c.order_id == order_id)
    )


def latest_orders_query(user_id: str, limit: int = LATEST_ORDERS) -> Select[Any]:
    """A user's newest orders; an index range scan on `ix_orders_user_id_placed_at`."""
    # CASE WHEN EXISTS because T-SQL has no boolean expressions in a select list.
    settled = case((exists().where(payments.c.order_id == orders.c.order_id), 1), else_=0)
    return (
        select(orders.c.order_id, orders.c.total_amount, orders.c.currency,
               orders.c.placed_at, settled.label("settled"))
        .where(orders.c.user_id == user_id)
        # order_id breaks ties so that equal placedAt times still list in a stable order.
        .order_by(orders.c.placed_at.desc(), orders.c.order_id.desc())
        .limit(limit)
    )


def latest_orders(conn: Connection, user_id: str) -> list[dict[str, Any]]:
    return [
        {"order_id": row["order_id"], "total_amount": row["total_amount"],
         "currency": row["currency"], "placed_at": row["placed_at"],
         "payment_status": SETTLED if row["settled"] else PENDING}
        for row in conn.execute(latest_orders_query(user_id)).mappings()
    ]
