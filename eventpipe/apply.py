"""Apply a batch of validated events to the read model in one transaction.

Load the stored rows the batch depends on, let `effects.decide` work out every event's
outcome, write the resulting rows and the ledger, commit. Events that cannot apply yet
(missing parent) or ever (rejected) are reported, not raised, so the rest of the batch still
applies. Database failures propagate for the caller to retry, except constraint violations,
which are narrowed down by applying the batch one event at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, select
from sqlalchemy.exc import IntegrityError

from eventpipe import upserts
from eventpipe.effects import (
    Delivery,
    OrderState,
    Outcome,
    Plan,
    Snapshot,
    Status,
    UserState,
    decide,
    keys_of,
)
from eventpipe.events import Event, OrderPlaced, PaymentSettled, UserCreated
from eventpipe.tables import applied_events, orders, payments, users

# Well under SQL Server's 2,100 parameters per statement and SQLite's 999 on old builds.
_IN_CHUNK = 500


def _utc_now() -> datetime:
    return datetime.now(UTC)


def apply_batch(
    engine: Engine, batch: Sequence[Delivery], now: Callable[[], datetime] = _utc_now
) -> list[Outcome]:
    """Each event's outcome, in batch order. Raises only what is worth retrying as a whole."""
    if not batch:
        return []
    try:
        with engine.begin() as conn:
            return _apply(conn, batch, now())
    except IntegrityError:
        # A constraint the snapshot could not foresee (a concurrent writer, an email swapped
        # between two users within the batch): isolate it so the others still apply.
        if len(batch) > 1:
            return [outcome for d in batch for outcome in apply_batch(engine, [d], now)]
    # One event that violated a constraint: decide it again on a fresh snapshot, which sees
    # what the concurrent writer committed; if it still violates, it never can apply.
    try:
        with engine.begin() as conn:
            return _apply(conn, batch, now())
    except IntegrityError as exc:
        return [Outcome(batch[0].event.event_id, Status.REJECTED, _constraint_reason(exc))]


def _constraint_reason(exc: IntegrityError) -> str:
    return f"database constraint violated: {str(exc.orig).strip().splitlines()[0][:500]}"


def _apply(conn: Connection, batch: Sequence[Delivery], applied_at: datetime) -> list[Outcome]:
    plan = decide(batch, load_snapshot(conn, batch))
    _write(conn, plan, applied_at)
    return plan.outcomes


def load_snapshot(conn: Connection, batch: Sequence[Delivery]) -> Snapshot:
    keys = keys_of(batch)
    snapshot = Snapshot()
    for rows in _chunked_select(conn, applied_events.c.event_id, keys.event_ids):
        snapshot.applied_ids.update(row.event_id for row in rows)
    user_columns = (users.c.user_id, users.c.email, users.c.version_at, users.c.version_event_id)
    for key_column, ids in ((users.c.user_id, keys.user_ids), (users.c.email, keys.emails)):
        for rows in _chunked_select(conn, key_column, ids, user_columns):
            for row in rows:
                snapshot.users[row.user_id] = UserState(
                    row.email, (row.version_at, row.version_event_id)
                )
                snapshot.email_owners[row.email] = row.user_id
    order_columns = (orders.c.order_id, orders.c.currency, orders.c.version_at,
                     orders.c.version_event_id)
    for rows in _chunked_select(conn, orders.c.order_id, keys.order_ids, order_columns):
        for row in rows:
            snapshot.orders[row.order_id] = OrderState(
                row.currency, (row.version_at, row.version_event_id)
            )
    payment_columns = (payments.c.payment_id, payments.c.version_at, payments.c.version_event_id)
    for rows in _chunked_select(conn, payments.c.payment_id, keys.payment_ids, payment_columns):
        for row in rows:
            snapshot.payment_versions[row.payment_id] = (row.version_at, row.version_event_id)
    return snapshot


def _chunked_select(
    conn: Connection, key: Any, ids: Collection[str], columns: Sequence[Any] = ()
) -> Iterator[Sequence[Any]]:
    ordered = sorted(ids)
    for start in range(0, len(ordered), _IN_CHUNK):
        chunk = ordered[start : start + _IN_CHUNK]
        yield conn.execute(select(*(columns or (key,))).where(key.in_(chunk))).all()


def _versioned(event: Event, applied_at: datetime) -> dict[str, Any]:
    return {
        "version_at": event.occurred_at,
        "version_event_id": event.event_id,
        "updated_at": applied_at,
    }


def _write(conn: Connection, plan: Plan, applied_at: datetime) -> None:
    dialect = conn.dialect.name
    user_rows: list[dict[str, Any]] = []
    order_rows: list[dict[str, Any]] = []
    item_rows: list[dict[str, Any]] = []
    payment_rows: list[dict[str, Any]] = []
    for event in plan.users.values():
        assert isinstance(event.data, UserCreated)
        u = event.data
        user_rows.append({"user_id": u.user_id, "email": u.email, "name": u.name,
                          "created_at": u.created_at, **_versioned(event, applied_at)})
    for event in plan.orders.values():
        assert isinstance(event.data, OrderPlaced)
        o = event.data
        order_rows.append({"order_id": o.order_id, "user_id": o.user_id,
                           "total_amount": o.total_amount, "currency": o.currency,
                           "placed_at": o.placed_at, **_versioned(event, applied_at)})
        item_rows.extend(
            {"order_id": o.order_id, "line_no": line_no, "sku": item.sku,
             "quantity": item.quantity, "unit_price": item.unit_price}
            for line_no, item in enumerate(o.items, start=1)
        )
    for event in plan.payments.values():
        assert isinstance(event.data, PaymentSettled)
        p = event.data
        payment_rows.append({"payment_id": p.payment_id, "order_id": p.order_id,
                             "amount": p.amount, "currency": p.currency,
                             "settled_at": p.settled_at, **_versioned(event, applied_at)})
    # Parents before children, so foreign keys hold at every statement.
    if user_rows:
        conn.execute(upserts.entity_upsert(dialect, users), user_rows)
    if order_rows:
        conn.execute(upserts.entity_upsert(dialect, orders), order_rows)
        delete_items, insert_items = upserts.replace_items()
        conn.execute(delete_items, [{"p_order_id": row["order_id"]} for row in order_rows])
        conn.execute(insert_items, item_rows)
    if payment_rows:
        conn.execute(upserts.entity_upsert(dialect, payments), payment_rows)
    if plan.inventory:
        conn.execute(
            upserts.inventory_upsert(dialect),
            [{"sku": sku, "quantity": change.delta, "updated_at": change.adjusted_at}
             for sku, change in plan.inventory.items()],
        )
    if plan.ledger:
        conn.execute(
            upserts.record_applied(),
            [{"event_id": d.event.event_id, "event_type": d.event.event_type.value,
              "outcome": status.value, "kafka_topic": d.position.topic,
              "kafka_partition": d.position.partition, "kafka_offset": d.position.offset,
              "occurred_at": d.event.occurred_at, "applied_at": applied_at}
             for d, status in plan.ledger],
        )
