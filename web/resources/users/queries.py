"""Reading a user with their latest orders: at most two statements."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, select

from eventpipe.tables import users
from web.resources.orders.queries import latest_orders


def find_user(conn: Connection, user_id: str) -> dict[str, Any] | None:
    row = conn.execute(
        select(users.c.user_id, users.c.email, users.c.name, users.c.created_at,
               users.c.updated_at)
        .where(users.c.user_id == user_id)
    ).mappings().first()
    if row is None:
        return None
    return {**row, "orders": latest_orders(conn, user_id)}
