"""Apply a batch of events to the database in one transaction, and record every event's fate.

In order, in one transaction:
1. claim the batch's events in `applied_events`, each id once, with its fate in the batch
   alone (insert unless recorded; the claim is what makes a delta apply once even when two
   writers hold the same event), reading the fingerprints of the ids recorded before;
2. plan the batch with them (`eventpipe.effects.plan_batch`): duplicates, ids reused for
   another payload, the newest version of each entity among the events claimed;
3. write the claimed entities with the version guard, returning the keys written; replace the
   items of the orders written; queue the keys written for the reconciler, which re-checks
   the rules that span keys; record the fate of each event where the plan or the write
   changed it (an event that wrote nothing is stale);
4. record the batch's failures in `dead_letters` (messages that are not events, reused ids)
   and one more attempt on the live dead letters of duplicates;
5. record the offsets of the messages given their fates (`done`:
   `eventpipe.positions.record_done`), which the bridge looks for before it commits past them;
6. add the claimed inventory deltas.
Failures of the database propagate: the caller classifies and retries them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine

from eventpipe import positions, upserts
from eventpipe.dlq import records
from eventpipe.dlq.letter import ID_REUSED, DeadLetter, event_key
from eventpipe.effects import Fate, Plan, Received, plan_batch, sum_deltas
from eventpipe.events import Event, OrderPlaced, PaymentSettled, UserCreated
from eventpipe.tables import orders, payments, users


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
    done: positions.Done | None = None,
) -> BatchResult:
    """Each event's fate, in batch order, and the dead letters written. `done`: the offsets
    of the messages these events and failures are, recorded with their fates."""
    with engine.begin() as conn:
        return apply_in(conn, batch, failures, worker=worker, applied_at=now(), done=done)


def apply_in(conn: Connection, batch: Sequence[Received], failures: Sequence[DeadLetter], *,
             worker: str, applied_at: datetime,
             done: positions.Done | None = None) -> BatchResult:
    # The claim comes first, as the batch alone plans it: the statement that records the
    # new ids also says which were recorded before, and the batch is planned again with that.
    plan = plan_batch(batch, {})
    # Stale within the batch is a fate too: recorded, so its redelivery is a duplicate.
    first = [i for i, fate in enumerate(plan.fates) if fate in (None, Fate.STALE)]
    rows = [applied_row(batch[i], plan.fates[i] or Fate.APPLIED, applied_at, worker)
            for i in first]
    claim = upserts.claim_events(conn, rows)
    known = {**claim.recorded, **_lost_claims(conn, batch, first, claim)}
    if known:  # most batches hold no id recorded before: their plan stands
        plan = plan_batch(batch, known)
    _write_entities(conn, batch, plan, applied_at)
    _correct_outcomes(conn, [(row["event_id"], row["outcome"], plan.fates[i])
                             for i, row in zip(first, rows, strict=True)
                             if row["event_id"] in claim.claimed])
    letters = records.record_failures(conn, [
        *failures, *(_reused(batch[i], plan.reused_from[i], applied_at, worker)
                     for i in plan.reused_from)])
    duplicates = {event_key(batch[i].fingerprint): batch[i].position
                  for i, fate in enumerate(plan.fates) if fate is Fate.DUPLICATE}
    letters += records.repeat(conn, duplicates, duplicates, applied_at)
    # Late: SQL Server's bridge reads the ranges with locks, and waits on a batch's row until
    # the batch commits. Not last: the stock rows' locks are.
    if done is not None:
        positions.record_done(conn, done)
    # Last: every batch touches some of the few stock rows, and their locks are held until
    # the commit; taken here, concurrent batches wait on each other the least.
    deltas = [batch[i].event for i in plan.inventory if plan.fates[i] is None]
    upserts.add_deltas(conn, [{"sku": sku, "quantity": change.delta,
                               "updated_at": change.adjusted_at}
                              for sku, change in sum_deltas(deltas).items()])
    return BatchResult([fate or Fate.APPLIED for fate in plan.fates], letters, applied_at)


def _lost_claims(conn: Connection, batch: Sequence[Received], first: list[int],
                 claim: upserts.Claim) -> dict[str, str | None]:
    """Ids a concurrent writer recorded while this claim ran (neither claimed nor read as
    recorded): what that writer recorded, so that the same payload is a duplicate and
    another one an id reused, never silently a duplicate."""
    lost = {batch[i].event.event_id for i in first} - claim.claimed - claim.recorded.keys()
    if not lost:
        return {}
    found = upserts.recorded(conn, lost)
    # An id recorded with no fingerprint we can read counts as the same event.
    return {event_id: found.get(event_id) for event_id in lost}


def _correct_outcomes(conn: Connection, claimed: list[tuple[str, str, Fate | None]]) -> None:
    """The claim recorded each event (id, outcome) with its fate in the batch alone; record
    the final one where it differs: an event that wrote nothing is stale, and one that was
    stale behind a recorded event of its entity may have been written."""
    changed: dict[Fate, list[str]] = {}
    for event_id, outcome, fate in claimed:
        if (fate or Fate.APPLIED) != outcome:  # a `Fate` is the string it records
            changed.setdefault(fate or Fate.APPLIED, []).append(event_id)
    for fate, event_ids in changed.items():
        upserts.set_outcome(conn, fate.value, event_ids)


def applied_row(received: Received, fate: Fate, applied_at: datetime,
                 worker: str) -> dict[str, Any]:
    event, position = received.event, received.position
    return {"event_id": event.event_id, "event_type": event.event_type.value,
            "outcome": fate.value, "fingerprint": received.fingerprint,
            "kafka_topic": position.topic, "kafka_partition": position.partition,
            "kafka_offset": position.offset, "occurred_at": event.occurred_at,
            "applied_at": applied_at, "worker": worker or None}


def _write_entities(conn: Connection, batch: Sequence[Received], plan: Plan,
                    applied_at: datetime) -> None:
    """Write each claimed entity's newest version and queue the keys written for the
    reconciler. The events that wrote nothing (older than what their entity holds) are
    stale."""
    def claimed(chosen: dict[str, int]) -> dict[str, Event]:
        return {key: batch[i].event for key, i in chosen.items() if plan.fates[i] is None}

    order_events = claimed(plan.orders)
    written = upserts.write_entities(conn, {
        users: [user_row(e, applied_at) for e in claimed(plan.users).values()],
        orders: [order_row(e, applied_at) for e in order_events.values()],
        payments: [payment_row(e, applied_at) for e in claimed(plan.payments).values()],
    }, [item for e in order_events.values() for item in item_rows(e)], queued_at=applied_at)
    for chosen, kind in ((plan.users, "users"), (plan.orders, "orders"),
                         (plan.payments, "payments")):
        for key, index in chosen.items():
            if plan.fates[index] is None and key not in written[kind]:
                plan.fates[index] = Fate.STALE


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
