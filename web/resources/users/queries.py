"""Reading a visible user with their latest orders (`eventpipe.readmodel`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from eventpipe import readmodel
from web.resources.orders.queries import latest_orders


def find_user(conn: Connection, user_id: str) -> dict[str, Any] | None:
    user = readmodel.visible_user(conn, user_id)
    if user is None:
        return None
    return {"user_id": user.user_id, "email": user.email, "name": user.name,
            "created_at": user.created_at, "updated_at": user.updated_at,
            "orders": latest_orders(conn, user_id)}
