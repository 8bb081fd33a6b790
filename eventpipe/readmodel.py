"""Reading the read model: stored entities and whether each is visible (`eventpipe.visibility`).

The API, the reconciler and `eventpipe verify` all read through here, so they agree on what
the read model is. Lookups are by sets of keys, a few statements whatever the set's size.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import Connection, Select, case, exists, select

from eventpipe.keysets import Keyed
from eventpipe.sqltypes import by_code_point
from eventpipe.tables import inventory, order_items, orders, payments, users
from eventpipe.visibility import (
    Standing,
    Version,
    order_standing,
    payment_standing,
    user_standing,
)


@dataclass(frozen=True, slots=True)
class UserRow:
    user_id: str
    email: str
    name: str
    created_at: datetime
    version: Version
    updated_at: datetime
    email_owner: str  # the earliest claimant of the email (this user, when it is visible)


@dataclass(frozen=True, slots=True)
class OrderRow:
    order_id: str
    user_id: str
    total_amount: Decimal
    currency: str
    placed_at: datetime
    version: Version
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class PaymentRow:
    payment_id: str
    order_id: str
    amount: Decimal
    currency: str
    settled_at: datetime
    version: Version
    updated_at: datetime


def _email_owner() -> Any:
    """Per users row, the user whose current event claims its email with the smallest version
    (`occurredAt`, then `eventId` by code point, as Python orders them; the user id breaks the
    tie a reused event id could cause)."""
    claimant = users.alias("claimant")
    return (select(claimant.c.user_id).where(claimant.c.email == users.c.email)
            .order_by(claimant.c.version_at, by_code_point(claimant.c.version_event_id),
                      by_code_point(claimant.c.user_id))
            .limit(1).correlate(users).scalar_subquery())


def users_query() -> Select[Any]:
    return select(users, _email_owner().label("email_owner"))


def _user(row: Any) -> UserRow:
    return UserRow(row.user_id, row.email, row.name, row.created_at,
                   (row.version_at, row.version_event_id), row.updated_at, row.email_owner)


def _order(row: Any) -> OrderRow:
    return OrderRow(row.order_id, row.user_id, row.total_amount, row.currency, row.placed_at,
                    (row.version_at, row.version_event_id), row.updated_at)


def _payment(row: Any) -> PaymentRow:
    return PaymentRow(row.payment_id, row.order_id, row.amount, row.currency, row.settled_at,
                      (row.version_at, row.version_event_id), row.updated_at)


_USERS = Keyed(users_query(), users.c.user_id)
_ORDERS = Keyed(select(orders), orders.c.order_id)


def load_users(conn: Connection, ids: Collection[str]) -> dict[str, UserRow]:
    return {row.user_id: _user(row) for row in _USERS.rows(conn, ids)}


def load_orders(conn: Connection, ids: Collection[str]) -> dict[str, OrderRow]:
    return {row.order_id: _order(row) for row in _ORDERS.rows(conn, ids)}


def user_standings(rows: Mapping[str, UserRow | UserFacts]) -> dict[str, Standing]:
    return {user_id: user_standing(user_id, row.email, row.email_owner)
            for user_id, row in rows.items()}


def order_standings(conn: Connection, rows: dict[str, OrderRow]) -> dict[str, Standing]:
    return Lookup(conn).order_standings(rows)


class UserFacts(NamedTuple):
    """What the rules read of a stored user, and its current event."""

    email: str
    email_owner: str
    event_id: str


class OrderFacts(NamedTuple):
    """What the rules read of a stored order, and its current event."""

    user_id: str
    currency: str
    event_id: str


class PaymentFacts(NamedTuple):
    """What the rules read of a stored payment, and its current event."""

    order_id: str
    currency: str
    event_id: str


class Lookup:
    """What the rules read of entities, by key, each read at most once per `Lookup`: a
    reconciler round asks for the same users and orders several times (as written, as
    claimants of an email, as parents). Only the columns the rules read are fetched."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._users: dict[str, UserFacts | None] = {}
        self._orders: dict[str, OrderFacts | None] = {}

    def users(self, ids: Collection[str]) -> dict[str, UserFacts]:
        missing = [key for key in ids if key not in self._users]
        found = _facts(self.conn, _USER_FACTS, missing, UserFacts)
        self._users.update((key, found.get(key)) for key in missing)
        return {key: row for key in ids if (row := self._users[key]) is not None}

    def orders(self, ids: Collection[str]) -> dict[str, OrderFacts]:
        missing = [key for key in ids if key not in self._orders]
        found = _facts(self.conn, _ORDER_FACTS, missing, OrderFacts)
        self._orders.update((key, found.get(key)) for key in missing)
        return {key: row for key in ids if (row := self._orders[key]) is not None}

    def payments(self, ids: Collection[str]) -> dict[str, PaymentFacts]:
        return _facts(self.conn, _PAYMENT_FACTS, ids, PaymentFacts)

    def order_standings(self, rows: Mapping[str, OrderRow | OrderFacts]) -> dict[str, Standing]:
        parents = self.users({row.user_id for row in rows.values()})
        parent_standings = user_standings(parents)
        return {order_id: order_standing(row.user_id, parent_standings.get(row.user_id),
                                         row.user_id in parents)
                for order_id, row in rows.items()}

    def payment_standings(self, rows: Mapping[str, PaymentFacts]) -> dict[str, Standing]:
        parents = self.orders({row.order_id for row in rows.values()})
        parent_standings = self.order_standings(parents)
        result: dict[str, Standing] = {}
        for payment_id, row in rows.items():
            order = parents.get(row.order_id)
            result[payment_id] = payment_standing(
                row.order_id, row.currency, order.currency if order else None,
                parent_standings.get(row.order_id))
        return result


Facts = UserFacts | OrderFacts | PaymentFacts
_Facts = TypeVar("_Facts", UserFacts, OrderFacts, PaymentFacts)


# What `Lookup` reads of each kind: the key first, then the fields of its facts.
_USER_FACTS = Keyed(select(users.c.user_id, users.c.email, _email_owner().label("email_owner"),
                           users.c.version_event_id), users.c.user_id)
_ORDER_FACTS = Keyed(select(orders.c.order_id, orders.c.user_id, orders.c.currency,
                            orders.c.version_event_id), orders.c.order_id)
_PAYMENT_FACTS = Keyed(select(payments.c.payment_id, payments.c.order_id, payments.c.currency,
                              payments.c.version_event_id), payments.c.payment_id)


def _facts(conn: Connection, read: Keyed, ids: Collection[str],
           kind: type[_Facts]) -> dict[str, _Facts]:
    """`read`'s rows of these keys: the key first, then `kind`'s fields."""
    return {row[0]: kind._make(row[1:]) for row in read.rows(conn, ids)}


def visible_user(conn: Connection, user_id: str) -> UserRow | None:
    rows = load_users(conn, [user_id])
    return rows.get(user_id) if rows and user_standings(rows)[user_id] is None else None


def visible_order(conn: Connection, order_id: str) -> OrderRow | None:
    rows = load_orders(conn, [order_id])
    return rows.get(order_id) if rows and order_standings(conn, rows)[order_id] is None else None


def recent_orders_query(user_id: str, limit: int) -> Select[Any]:
    """A user's newest orders, each with whether it has a visible payment (one in its
    currency); an index range scan on `ix_orders_user_id_placed_at`. The order id breaks
    ties, by code point, so equal times list in one order on every database."""
    # CASE WHEN EXISTS because T-SQL has no boolean expressions in a select list.
    settled = case((exists().where(payments.c.order_id == orders.c.order_id,
                                   payments.c.currency == orders.c.currency), 1), else_=0)
    return (select(orders, settled.label("settled")).where(orders.c.user_id == user_id)
            .order_by(orders.c.placed_at.desc(), by_code_point(orders.c.order_id).desc())
            .limit(limit))


def recent_orders(conn: Connection, user_id: str, limit: int) -> list[tuple[OrderRow, bool]]:
    """A visible user's newest orders (all of a visible user's orders are visible), each
    with whether it is settled."""
    return [(_order(row), bool(row.settled))
            for row in conn.execute(recent_orders_query(user_id, limit))]


def order_items_of(conn: Connection, order_id: str) -> list[Any]:
    query = (select(order_items).where(order_items.c.order_id == order_id)
             .order_by(order_items.c.line_no))
    return list(conn.execute(query))


def settled_payment_query(order_id: str, currency: str) -> Select[Any]:
    """The visible payment of a visible order: one in its currency, the latest if several
    (of those settled at one time, the last payment id by code point)."""
    return (select(payments)
            .where(payments.c.order_id == order_id, payments.c.currency == currency)
            .order_by(payments.c.settled_at.desc(), by_code_point(payments.c.payment_id).desc())
            .limit(1))


def settled_payment(conn: Connection, order: OrderRow) -> PaymentRow | None:
    row = conn.execute(settled_payment_query(order.order_id, order.currency)).first()
    return _payment(row) if row is not None else None


_ORDERS_OF_USERS = Keyed(select(orders.c.order_id), orders.c.user_id)
_PAYMENTS_OF_ORDERS = Keyed(select(payments.c.payment_id), payments.c.order_id)
_USERS_CLAIMING = Keyed(select(users.c.user_id), users.c.email)


def orders_of_users(conn: Connection, user_ids: Collection[str]) -> set[str]:
    return {row.order_id for row in _ORDERS_OF_USERS.rows(conn, user_ids)}


def payments_of_orders(conn: Connection, order_ids: Collection[str]) -> set[str]:
    return {row.payment_id for row in _PAYMENTS_OF_ORDERS.rows(conn, order_ids)}


def users_claiming(conn: Connection, emails: Collection[str]) -> set[str]:
    return {row.user_id for row in _USERS_CLAIMING.rows(conn, emails)}


@dataclass(frozen=True, slots=True)
class ReadModel:
    """Everything the read model shows, by key: for `eventpipe verify` and tests."""

    users: dict[str, UserRow]
    orders: dict[str, OrderRow]
    items: dict[str, list[tuple[str, int, Decimal]]]  # order id → (sku, quantity, unit price)
    payments: dict[str, PaymentRow]
    inventory: dict[str, tuple[int, datetime]]  # sku → (quantity, updated at)


def whole(conn: Connection) -> ReadModel:
    """The whole read model, reading every table once (and the owners of emails)."""
    every_user = {row.user_id: _user(row) for row in conn.execute(
        select(users, _email_owner().label("email_owner")))}
    user_view = user_standings(every_user)
    every_order = {row.order_id: _order(row) for row in conn.execute(select(orders))}
    order_view = {key: order_standing(row.user_id, user_view.get(row.user_id),
                                      row.user_id in every_user)
                  for key, row in every_order.items()}
    every_payment = {row.payment_id: _payment(row) for row in conn.execute(select(payments))}
    items: dict[str, list[tuple[str, int, Decimal]]] = {}
    for row in conn.execute(select(order_items).order_by(order_items.c.order_id,
                                                          order_items.c.line_no)):
        items.setdefault(row.order_id, []).append((row.sku, row.quantity, row.unit_price))
    visible_orders = {k: r for k, r in every_order.items() if order_view[k] is None}
    return ReadModel(
        users={k: r for k, r in every_user.items() if user_view[k] is None},
        orders=visible_orders,
        items={k: v for k, v in items.items() if k in visible_orders},
        payments={k: r for k, r in every_payment.items() if payment_standing(
            r.order_id, r.currency,
            every_order[r.order_id].currency if r.order_id in every_order else None,
            order_view.get(r.order_id)) is None},
        inventory={row.sku: (row.quantity, row.updated_at)
                   for row in conn.execute(select(inventory))},
    )
