"""Apply a batch of events to the database in one transaction, and record every event's fate.

In order, in one transaction:
1. read the fingerprints already recorded for the batch's event ids and plan the batch
   (`eventpipe.effects.plan_batch`): duplicates, ids reused for another payload, the newest
   version of each entity;
2. claim the remaining events in `applied_events` (insert unless recorded; the claim is what
   makes a delta apply once even when two writers hold the same event);
3. write the claimed entities with the version guard, returning the keys written; replace the
   items of the orders written; mark the entity events that wrote nothing as stale;
4. record the batch's failures in `dead_letters` (messages that are not events, reused ids)
   and one more attempt on the live dead letters of duplicates;
5. queue the keys written for the reconciler, which re-checks the rules that span keys;
6. add the claimed inventory deltas.
Failures of the database propagate: the caller classifies and retries them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, select, update

from eventpipe import upserts
from eventpipe.dlq import records
from eventpipe.dlq.letter import ID_REUSED, DeadLetter, event_key
from eventpipe.effects import Fate, Plan, Received, plan_batch, sum_deltas
from eventpipe.events import Event, OrderPlaced, PaymentSettled, UserCreated
from eventpipe.keysets import in_keys
from eventpipe.tables import applied_events, orders, payments, reconcile_queue, users


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class BatchResult:
    fates: list[Fate]
    # Dead letters this batch created or changed, as saved (to project to the DLQ stream).
    dead_letters: list[DeadLetter] = field(default_factory=list)
    applied_at: datetime = field(default_factory=_utc_now)


def apply_batch(
    engine: Engine, batch: Sequence[Received], failures: Sequence[DeadLetter] = (), *,
    worker: str = "", now: Callable[[], datetime] = _utc_now,
) -> BatchResult:
    """Each event's fate, in batch order, and the dead letters written."""
    with engine.begin() as conn:
        return apply_in(conn, batch, failures, worker=worker, applied_at=now())


def apply_in(conn: Connection, batch: Sequence[Received], failures: Sequence[DeadLetter], *,
             worker: str, applied_at: datetime) -> BatchResult:
    plan = plan_batch(batch, _recorded_fingerprints(conn, batch))
    # Stale within the batch is a fate too: recorded, so its redelivery is a duplicate.
    to_claim = [i for i, fate in enumerate(plan.fates) if fate in (None, Fate.STALE)]
    claimed = upserts.claim_events(conn, [
        applied_row(batch[i], plan.fates[i] or Fate.APPLIED, applied_at, worker)
        for i in to_claim])
    _lost_claims(conn, batch, plan, [i for i in to_claim
                                     if batch[i].event.event_id not in claimed])
    written, wrote_nothing = _write_entities(conn, batch, plan, applied_at)
    for where in in_keys(conn, applied_events.c.event_id, wrote_nothing):
        conn.execute(update(applied_events).where(where).values(outcome=Fate.STALE.value))
    letters = records.record_failures(conn, [
        *failures, *(_reused(batch[i], plan.reused_from[i], applied_at, worker)
                     for i in plan.reused_from)])
    duplicates = {event_key(batch[i].fingerprint): batch[i].position
                  for i, fate in enumerate(plan.fates) if fate is Fate.DUPLICATE}
    letters += records.repeat(conn, duplicates, duplicates, applied_at)
    if any(written.values()):
        conn.execute(reconcile_queue.insert(), {
            "keys": json.dumps({kind: sorted(keys) for kind, keys in written.items()}),
            "created_at": applied_at})
    # Last: every batch touches some of the few stock rows, and their locks are held until
    # the commit; taken here, concurrent batches wait on each other the least.
    deltas = [batch[i].event for i in plan.inventory if plan.fates[i] is None]
    upserts.add_deltas(conn, [{"sku": sku, "quantity": change.delta,
                               "updated_at": change.adjusted_at}
                              for sku, change in sum_deltas(deltas).items()])
    return BatchResult([fate or Fate.APPLIED for fate in plan.fates], letters, applied_at)


def _lost_claims(conn: Connection, batch: Sequence[Received], plan: Plan,
                 lost: list[int]) -> None:
    """A concurrent writer recorded these ids between the plan and the claim: the same
    payload is a duplicate, another one an id reused (never silently a duplicate)."""
    recorded = _recorded_fingerprints(conn, [batch[i] for i in lost])
    for index in lost:
        first = recorded.get(batch[index].event.event_id)
        if first is None or first == batch[index].fingerprint:
            plan.fates[index] = Fate.DUPLICATE
        else:
            plan.fates[index] = Fate.ID_REUSED
            plan.reused_from[index] = first


def _recorded_fingerprints(conn: Connection, batch: Sequence[Received]) -> dict[str, str | None]:
    ids = {received.event.event_id for received in batch}
    columns = (applied_events.c.event_id, applied_events.c.fingerprint)
    return {row.event_id: row.fingerprint
            for where in in_keys(conn, applied_events.c.event_id, ids)
            for row in conn.execute(select(*columns).where(where))}


def applied_row(received: Received, fate: Fate, applied_at: datetime,
                 worker: str) -> dict[str, Any]:
    event, position = received.event, received.position
    return {"event_id": event.event_id, "event_type": event.event_type.value,
            "outcome": fate.value, "fingerprint": received.fingerprint,
            "kafka_topic": position.topic, "kafka_partition": position.partition,
            "kafka_offset": position.offset, "occurred_at": event.occurred_at,
            "applied_at": applied_at, "worker": worker or None}


def _write_entities(conn: Connection, batch: Sequence[Received], plan: Plan,
                    applied_at: datetime) -> tuple[dict[str, set[str]], list[str]]:
    """Write each claimed entity's newest version: the keys written, and the ids of the
    events that wrote nothing (older than what their entity holds), now marked stale."""
    def claimed(chosen: dict[str, int]) -> dict[str, Event]:
        return {key: batch[i].event for key, i in chosen.items() if plan.fates[i] is None}

    order_events = claimed(plan.orders)
    written = upserts.write_entities(conn, {
        users: [user_row(e, applied_at) for e in claimed(plan.users).values()],
        orders: [order_row(e, applied_at) for e in order_events.values()],
        payments: [payment_row(e, applied_at) for e in claimed(plan.payments).values()],
    }, [item for e in order_events.values() for item in item_rows(e)])
    wrote_nothing = []
    for chosen, kind in ((plan.users, "users"), (plan.orders, "orders"),
                         (plan.payments, "payments")):
        for key, index in chosen.items():
            if plan.fates[index] is None and key not in written[kind]:
                plan.fates[index] = Fate.STALE
                wrote_nothing.append(batch[index].event.event_id)
    return written, wrote_nothing


def _versioned(event: Event, applied_at: datetime) -> dict[str, Any]:
    return {"version_at": event.occurred_at, "version_event_id": event.event_id,
            "updated_at": applied_at}


def user_row(event: Event, applied_at: datetime) -> dict[str, Any]:
    u = event.data
    assert isinstance(u, UserCreated)
    return {"user_id": u.user_id, "email": u.email, "name": u.name, "created_at": u.created_at,
            **_versioned(event, applied_at)}


def order_row(event: Event, applied_at: datetime) -> dict[str, Any]:
    o = event.data
    assert isinstance(o, OrderPlaced)
    return {"order_id": o.order_id, "user_id": o.user_id, "total_amount": o.total_amount,
            "currency": o.currency, "placed_at": o.placed_at, **_versioned(event, applied_at)}


def item_rows(event: Event) -> list[dict[str, Any]]:
    o = event.data
    assert isinstance(o, OrderPlaced)
    return [{"order_id": o.order_id, "line_no": line_no, "sku": item.sku,
             "quantity": item.quantity, "unit_price": item.unit_price}
            for line_no, item in enumerate(o.items, start=1)]


def payment_row(event: Event, applied_at: datetime) -> dict[str, Any]:
    p = event.data
    assert isinstance(p, PaymentSettled)
    return {"payment_id": p.payment_id, "order_id": p.order_id, "amount": p.amount,
            "currency": p.currency, "settled_at": p.settled_at, **_versioned(event, applied_at)}


def _reused(received: Received, first: str, now: datetime, worker: str) -> DeadLetter:
    event = received.event
    return DeadLetter(
        dlq_key=event_key(received.fingerprint), error_class=ID_REUSED,
        reason=f"eventId {event.event_id!r} was recorded before for another payload "
               f"(fingerprint {first}); this copy differs (fingerprint {received.fingerprint})",
        first_failure_at=now, last_failure_at=now, worker=worker, event_id=event.event_id,
        event_type=event.event_type.value, position=received.position)
