"""The effect contract, run live on every database: SQLite and PostgreSQL."""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, func, select, text

from eventpipe import readmodel, upserts
from eventpipe.apply import BatchResult, applied_row, apply_batch, apply_in
from eventpipe.database import make_engine
from eventpipe.dlq import records
from eventpipe.dlq.letter import INVALID_EVENT, DeadLetter, message_key
from eventpipe.effects import Fate, Position, Received
from eventpipe.samples import (
    Document,
    Story,
    inventory_adjusted,
    order_placed,
    payment_settled,
    user_created,
)
from eventpipe.settings import Settings
from eventpipe.tables import (
    applied_events,
    dead_letters,
    inventory,
    order_items,
    orders,
    payments,
    users,
)
from tests.support.databases import postgres_database
from tests.support.factories import at, received
from tests.support.services import migrate


def apply(engine: Engine, *messages: tuple[str, Document]) -> list[Fate]:
    return apply_batch(engine, received(*messages)).fates


def visible(engine: Engine) -> dict[str, set[str]]:
    """The keys the read model shows."""
    with engine.connect() as conn:
        model = readmodel.whole(conn)
    return {"users": set(model.users), "orders": set(model.orders),
            "payments": set(model.payments)}


def rows(engine: Engine, table: Any, *order_by: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(table).order_by(*order_by))]


def scalar(engine: Engine, query: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(query).scalar_one()


def ledger_count(engine: Engine) -> int:
    return int(scalar(engine, select(func.count()).select_from(applied_events)))


def user_names(engine: Engine) -> dict[str, str]:
    return {r["user_id"]: r["name"] for r in rows(engine, users, users.c.user_id)}


def outcomes(engine: Engine) -> dict[str, str]:
    """The ledger's outcome of every event id."""
    return {r["event_id"]: r["outcome"]
            for r in rows(engine, applied_events, applied_events.c.event_id)}


def test_new_entities_of_every_type_apply(engine: Engine) -> None:
    statuses = apply(
        engine,
        user_created("u1", email="Ada@Example.com", name="Ada", occurred_at=at(0)),
        order_placed("o1", "u1", items=[("SKU-1", 2, "9.99"), ("SKU-2", 1, "0.02")],
                     currency="EUR", occurred_at=at(1)),
        payment_settled("p1", "o1", "20.00", currency="EUR", occurred_at=at(2)),
        inventory_adjusted("SKU-1", -2, occurred_at=at(3)),
    )
    assert statuses == [Fate.APPLIED] * 4
    [user] = rows(engine, users)
    assert (user["user_id"], user["email"], user["name"]) == ("u1", "ada@example.com", "Ada")
    assert user["created_at"] == at(0) and user["version_at"] == at(0)
    [order] = rows(engine, orders)
    assert (order["user_id"], order["total_amount"], order["currency"]) == (
        "u1", Decimal("20.00"), "EUR")
    assert order["placed_at"] == at(1)
    items = rows(engine, order_items, order_items.c.line_no)
    assert [(i["line_no"], i["sku"], i["quantity"], i["unit_price"]) for i in items] == [
        (1, "SKU-1", 2, Decimal("9.99")), (2, "SKU-2", 1, Decimal("0.02"))]
    [payment] = rows(engine, payments)
    assert (payment["order_id"], payment["amount"], payment["settled_at"]) == (
        "o1", Decimal("20.00"), at(2))
    [stock] = rows(engine, inventory)
    assert (stock["sku"], stock["quantity"], stock["updated_at"]) == ("SKU-1", -2, at(3))
    ledger = rows(engine, applied_events, applied_events.c.kafka_offset)
    assert [r["outcome"] for r in ledger] == ["applied"] * 4
    assert {r["kafka_topic"] for r in ledger} == {"events"}
    assert {r["kafka_partition"] for r in ledger} == {3}


def test_duplicate_is_a_no_op_across_and_within_batches(engine: Engine) -> None:
    message = user_created("u1", name="First", occurred_at=at(0), event_id="e-1")
    assert apply(engine, message, message) == [Fate.APPLIED, Fate.DUPLICATE]
    assert apply(engine, message) == [Fate.DUPLICATE]
    assert user_names(engine) == {"u1": "First"}
    assert ledger_count(engine) == 1


def test_the_claim_records_new_ids_and_reads_those_recorded_before(engine: Engine) -> None:
    earlier = received(user_created("u1", occurred_at=at(0)), user_created("u2", occurred_at=at(1)))
    apply_batch(engine, earlier)
    later = received(user_created("u3", occurred_at=at(2)))
    with engine.begin() as conn:
        claim = upserts.claim_events(conn, [applied_row(item, Fate.APPLIED, at(3), "w1")
                                            for item in (*earlier, *later)])
    assert claim.claimed == {later[0].event.event_id}
    assert claim.recorded == {item.event.event_id: item.fingerprint for item in earlier}


def test_older_version_changes_nothing(engine: Engine) -> None:
    assert apply(engine, user_created("u1", name="New", occurred_at=at(10))) == [Fate.APPLIED]
    assert apply(engine, user_created("u1", name="Old", occurred_at=at(5))) == [Fate.STALE]
    assert user_names(engine) == {"u1": "New"}
    # A stale event is done with: it is in the ledger, so its redelivery is a duplicate.
    assert ledger_count(engine) == 2


def test_newer_version_wins_and_ties_break_by_event_id(engine: Engine) -> None:
    apply(engine, user_created("u1", name="v1", occurred_at=at(0), event_id="e-b"))
    assert apply(engine, user_created("u1", name="v2", occurred_at=at(1), event_id="e-a")) == [
        Fate.APPLIED]
    assert apply(engine, user_created("u1", name="tie-low", occurred_at=at(1),
                                      event_id="e-0")) == [Fate.STALE]
    assert apply(engine, user_created("u1", name="tie-high", occurred_at=at(1),
                                      event_id="e-z")) == [Fate.APPLIED]
    assert user_names(engine) == {"u1": "tie-high"}


def test_newer_order_replaces_its_items(engine: Engine) -> None:
    apply(engine, user_created("u1", occurred_at=at(0)),
          order_placed("o1", "u1", items=[("A", 1, "1.00"), ("B", 1, "2.00")], occurred_at=at(1)))
    assert apply(engine, order_placed("o1", "u1", items=[("C", 3, "5.00")],
                                      occurred_at=at(2))) == [Fate.APPLIED]
    items = rows(engine, order_items)
    assert [(i["sku"], i["quantity"]) for i in items] == [("C", 3)]
    assert rows(engine, orders)[0]["total_amount"] == Decimal("15.00")
    # More lines again, one order among others in the batch whose items are kept.
    assert apply(engine, order_placed("o2", "u1", items=[("E", 1, "1.00")], occurred_at=at(2)),
                 order_placed("o1", "u1", items=[("D", 1, "1.00"), ("C", 2, "5.00"),
                                                 ("A", 4, "0.50")], occurred_at=at(3))) == [
        Fate.APPLIED, Fate.APPLIED]
    items = rows(engine, order_items, order_items.c.order_id, order_items.c.line_no)
    assert [(i["order_id"], i["line_no"], i["sku"], i["quantity"]) for i in items] == [
        ("o1", 1, "D", 1), ("o1", 2, "C", 2), ("o1", 3, "A", 4), ("o2", 1, "E", 1)]


def test_a_newer_order_replaces_the_items_a_concurrent_writer_just_committed(
        engine: Engine) -> None:
    """Two writers of one order: the newer version waits on the order row while the older
    one commits three lines; once through, it must still leave only its own line (its
    items are replaced after its order row is written, reading what was committed since)."""
    apply(engine, user_created("u1", occurred_at=at(0)))
    older = order_placed("o1", "u1", items=[("B", 1, "1.00"), ("C", 2, "1.00"),
                                            ("D", 3, "1.00")], occurred_at=at(1))
    newer = order_placed("o1", "u1", items=[("Z", 9, "9.00")], occurred_at=at(2))
    assert behind_a_writer(engine, older, newer).fates == [Fate.APPLIED]
    assert [(i["line_no"], i["sku"]) for i in rows(engine, order_items)] == [(1, "Z")]
    assert rows(engine, orders)[0]["version_at"] == at(2)


def test_inventory_delta_applies_once_per_event_id(engine: Engine) -> None:
    plus = inventory_adjusted("SKU-9", 5, occurred_at=at(2), event_id="d-1")
    minus = inventory_adjusted("SKU-9", -2, occurred_at=at(1), event_id="d-2")
    assert apply(engine, plus, minus, plus) == [Fate.APPLIED, Fate.APPLIED, Fate.DUPLICATE]
    assert apply(engine, minus, inventory_adjusted("SKU-9", 10, occurred_at=at(0))) == [
        Fate.DUPLICATE, Fate.APPLIED]
    [stock] = rows(engine, inventory)
    assert stock["quantity"] == 13
    assert stock["updated_at"] == at(2)  # the latest adjustment, whatever the arrival order


def test_children_are_stored_before_their_parents_and_appear_with_them(engine: Engine) -> None:
    assert apply(engine,
                 order_placed("o1", "ghost", occurred_at=at(1)),
                 payment_settled("p1", "o1", "10.00", occurred_at=at(2))) == [Fate.APPLIED] * 2
    assert visible(engine) == {"users": set(), "orders": set(), "payments": set()}
    assert ledger_count(engine) == 2  # their fate is recorded: the offsets may be committed
    assert apply(engine, user_created("ghost", occurred_at=at(0))) == [Fate.APPLIED]
    assert visible(engine) == {"users": {"ghost"}, "orders": {"o1"}, "payments": {"p1"}}


def test_event_ids_above_the_basic_plane_order_by_code_point_in_every_batching(
        engine: Engine) -> None:
    """U+1F600 comes after U+E000 by code point, before it by UTF-16 code unit: on every
    database, as in Python, the emoji's event is the newer, in one batch or two, and the
    earlier claimant of an email is the other's."""
    low, high = "\ue000", "\U0001f600"
    apply(engine, user_created("u1", name="low", occurred_at=at(1), event_id=low))
    assert apply(engine, user_created("u1", name="high", occurred_at=at(1),
                                      event_id=high)) == [Fate.APPLIED]
    assert apply(engine, user_created("u2", name="high", occurred_at=at(1), event_id=high + "2"),
                 user_created("u2", name="low", occurred_at=at(1), event_id=low + "2")) == [
        Fate.APPLIED, Fate.STALE]
    assert user_names(engine) == {"u1": "high", "u2": "high"}
    apply(engine, user_created("u3", email="same@example.com", occurred_at=at(2),
                               event_id=high + "3"),
          user_created("u4", email="same@example.com", occurred_at=at(2), event_id=low + "4"))
    assert {"u3", "u4"} & visible(engine)["users"] == {"u4"}


def test_claimants_tied_in_version_are_ordered_by_code_point_whatever_the_collation() -> None:
    """On a PostgreSQL database whose default collation is a language's, `a` comes before
    `B`; by code point, as Python orders them, `B` comes first. Two users whose current
    versions tie (one event id recorded for both) give the email to the first user id."""
    with postgres_database("eventpipe_collated", icu_locale="en-US") as url:
        migrate(url)
        engine = make_engine(Settings(database_url=url))
        try:
            with engine.begin() as conn:
                conn.execute(users.insert(), [
                    {"user_id": user_id, "email": "same@example.com", "name": user_id,
                     "created_at": at(0), "version_at": at(1), "version_event_id": "e1",
                     "updated_at": at(2)} for user_id in ("a", "B")])
                assert conn.execute(text("SELECT 'a' < 'B'")).scalar_one()  # the language's
                owners = {user_id: row.email_owner
                          for user_id, row in readmodel.load_users(conn, ["a", "B"]).items()}
        finally:
            engine.dispose()
    assert owners == {"a": "B", "B": "B"}


def test_ties_in_time_list_by_code_point_whatever_the_collation() -> None:
    """A hostile test's finding: a user's newest orders, and an order's payment, tied in
    time, were ordered by their ids in the database's collation. On a database whose default
    is a language's the API listed other orders, and another payment, than SQLite does for
    the same events. By code point, as Python orders them: `e c a F D` of `a B c D e F`, and
    `pa` of `pa pB`."""
    ids = ["a", "B", "c", "D", "e", "F"]
    versioned = {"version_at": at(1), "version_event_id": "e1", "updated_at": at(2)}
    with postgres_database("eventpipe_collated", icu_locale="en-US") as url:
        migrate(url)
        engine = make_engine(Settings(database_url=url))
        try:
            with engine.begin() as conn:
                conn.execute(users.insert(), [{"user_id": "u", "email": "u@example.com",
                                               "name": "u", "created_at": at(0), **versioned}])
                conn.execute(orders.insert(), [
                    {"order_id": order_id, "user_id": "u", "total_amount": Decimal("1.00"),
                     "currency": "EUR", "placed_at": at(1), **versioned} for order_id in ids])
                conn.execute(payments.insert(), [
                    {"payment_id": f"p{order_id}", "order_id": "a", "amount": Decimal("1.00"),
                     "currency": "EUR", "settled_at": at(1), **versioned}
                    for order_id in ("a", "B")])
                assert conn.execute(text("SELECT 'a' < 'B'")).scalar_one()  # the language's
                listed = [row.order_id for row, _ in readmodel.recent_orders(conn, "u", 5)]
                [order] = [row for row, _ in readmodel.recent_orders(conn, "u", 6)
                           if row.order_id == "a"]
                payment = readmodel.settled_payment(conn, order)
        finally:
            engine.dispose()
    assert listed == sorted(ids, reverse=True)[:5] == ["e", "c", "a", "F", "D"]
    assert payment is not None and payment.payment_id == "pa"


def test_an_email_belongs_to_its_earliest_claimant_whatever_the_arrival(engine: Engine) -> None:
    apply(engine, user_created("late", email="same@example.com", occurred_at=at(5)))
    assert visible(engine)["users"] == {"late"}
    apply(engine, user_created("early", email="SAME@example.com", occurred_at=at(1)),
          user_created("other", email="other@example.com", occurred_at=at(1)))
    assert visible(engine)["users"] == {"early", "other"}
    # The winner moves to another address: the email is free for the next claimant.
    apply(engine, user_created("early", email="new@example.com", occurred_at=at(9)))
    assert visible(engine)["users"] == {"early", "late", "other"}


def test_emails_can_move_between_users_within_a_batch(engine: Engine) -> None:
    apply(engine, user_created("a", email="a@x.io", occurred_at=at(0)),
          user_created("b", email="b@x.io", occurred_at=at(0)))
    statuses = apply(
        engine,
        user_created("a", email="tmp@x.io", occurred_at=at(1)),
        user_created("b", email="c@x.io", occurred_at=at(1)),
        user_created("a", email="b@x.io", occurred_at=at(2)),
    )
    assert statuses == [Fate.STALE, Fate.APPLIED, Fate.APPLIED]
    assert {r["user_id"]: r["email"] for r in rows(engine, users)} == {
        "a": "b@x.io", "b": "c@x.io"}
    assert visible(engine)["users"] == {"a", "b"}


def test_a_payment_shows_only_in_its_orders_currency(engine: Engine) -> None:
    apply(engine, user_created("u1", occurred_at=at(0)),
          order_placed("o1", "u1", currency="EUR", occurred_at=at(1)),
          payment_settled("p1", "o1", "10.00", currency="USD", occurred_at=at(2)))
    assert visible(engine)["payments"] == set()
    apply(engine, order_placed("o1", "u1", currency="USD", occurred_at=at(3)))
    assert visible(engine)["payments"] == {"p1"}


def test_an_order_written_by_nobody_keeps_its_items(engine: Engine) -> None:
    """Two writers of one order (a replay on another partition, two workers on one queue):
    the older version must not replace the newer version's items (issue 9, item 3)."""
    apply(engine, user_created("u1", occurred_at=at(0)))
    newer = order_placed("o1", "u1", items=[("NEW", 2, "2.00")], occurred_at=at(2))
    older = order_placed("o1", "u1", items=[("OLD", 1, "1.00")], occurred_at=at(1))
    assert behind_a_writer(engine, newer, older).fates == [Fate.STALE]
    assert [(i["sku"], i["quantity"]) for i in rows(engine, order_items)] == [("NEW", 2)]
    assert rows(engine, orders)[0]["version_at"] == at(2)


def test_an_id_reused_by_a_concurrent_writer_is_dead_lettered_not_a_duplicate(
    engine: Engine,
) -> None:
    """Two writers hold two payloads of one eventId (a partition applied out of order after a
    redelivery): the one that loses the claim must be dead-lettered IdReused, never counted
    as a duplicate of an event it is not."""
    first = inventory_adjusted("SKU-1", 5, occurred_at=at(1), event_id="e1")
    other = inventory_adjusted("SKU-1", 7, occurred_at=at(1), event_id="e1")
    result = behind_a_writer(engine, first, other)
    assert result.fates == [Fate.ID_REUSED]
    assert [(letter.error_class, letter.event_id) for letter in result.dead_letters] == [
        ("IdReused", "e1")]
    assert [r["quantity"] for r in rows(engine, inventory)] == [5]


def test_two_writers_of_one_new_dead_letter_both_fold_into_it(engine: Engine) -> None:
    """The same bad bytes on two partitions, applied at once (or a redelivered batch beside
    the original): the second writer's read finds no letter to lock, and its insert meets the
    first one's. It must fold its failure into that letter once it commits, as into one
    committed before its read; failing on the key instead split its batch, and its message
    alone was dead-lettered with the database's error in place of its own."""
    value = b'{"eventId": "e1", not json'
    first = DeadLetter(dlq_key=message_key(None, value), error_class=INVALID_EVENT,
                       reason="value: malformed JSON", first_failure_at=at(1),
                       last_failure_at=at(1), worker="w1", position=Position("events", 0, 10))
    second = replace(first, worker="w2", last_failure_at=at(2),
                     position=Position("events", 5, 42))
    [letter] = behind_a_writer(engine, first, second).dead_letters
    assert (letter.error_class, letter.reason, letter.attempts, letter.position) == (
        INVALID_EVENT, "value: malformed JSON", 2, Position("events", 5, 42))
    assert [(row["dlq_key"], row["attempts"], row["revision"]) for row in rows(
        engine, dead_letters)] == [(first.dlq_key, 2, 2)]


def test_writers_of_overlapping_new_dead_letters_all_commit_every_attempt_counted(
        engine: Engine) -> None:
    """Several writers at once, each with new letters some others also write: each must
    commit, with no deadlock (a writer that read again the letter another one inserted,
    while holding its own inserts, locked out of key order: three such writers deadlocked)
    and no attempt lost."""
    writers, rounds, keys = 4, 40, [f"m:{n:02d}" for n in range(8)]

    def write(writer: int) -> list[str]:
        chosen, failed = random.Random(writer), []
        for round_ in range(rounds):
            start.wait(timeout=30)
            letters = [DeadLetter(dlq_key=f"{key}:{round_}", error_class=INVALID_EVENT,
                                  reason="bad", first_failure_at=at(1), last_failure_at=at(1),
                                  worker=f"w{writer}", position=Position("events", 0, round_))
                       for key in chosen.sample(keys, 4)]
            try:
                with engine.begin() as conn:
                    records.record_failures(conn, letters)
            except Exception as exc:
                failed.append(type(getattr(exc, "orig", exc)).__name__)
        return failed

    start = threading.Barrier(writers)
    with ThreadPoolExecutor(writers) as pool:
        failed = [name for names in pool.map(write, range(writers)) for name in names]
    assert failed == []
    assert sum(row["attempts"] for row in rows(engine, dead_letters)) == writers * rounds * 4


def test_a_batch_with_no_dead_letter_to_write_takes_no_savepoint(engine: Engine) -> None:
    """The race-safe writing of new dead letters is paid by the batches that have some: a
    savepoint is two statements more, a third of a small batch's."""
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        apply(engine, user_created("u1", occurred_at=at(1)))
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert statements and not [s for s in statements if "SAVEPOINT" in s.upper()]


def test_an_event_behind_a_reused_id_in_its_batch_applies(engine: Engine) -> None:
    """The batch's newest event of an entity reuses a recorded id, so it is dead-lettered:
    the next newest is the one to write, and the ledger records it applied."""
    assert apply(engine, user_created("u1", name="First", occurred_at=at(1),
                                      event_id="e1")) == [Fate.APPLIED]
    fates = apply(engine, user_created("u1", name="Reused", occurred_at=at(5), event_id="e1"),
                  user_created("u1", name="Second", occurred_at=at(3), event_id="e2"))
    assert fates == [Fate.ID_REUSED, Fate.APPLIED]
    assert user_names(engine) == {"u1": "Second"}
    assert outcomes(engine) == {"e1": "applied", "e2": "applied"}


def test_an_event_behind_an_id_a_concurrent_writer_reused_applies(engine: Engine) -> None:
    """As above, when the id is recorded by a writer that commits while this batch claims:
    the batch is planned again with what the claim met, not left as planned without it."""
    first = user_created("u1", name="First", occurred_at=at(1), event_id="e1")
    result = behind_a_writer(engine, first, [
        user_created("u1", name="Reused", occurred_at=at(5), event_id="e1"),
        user_created("u1", name="Second", occurred_at=at(3), event_id="e2")])
    assert result.fates == [Fate.ID_REUSED, Fate.APPLIED]
    assert user_names(engine) == {"u1": "Second"}
    assert outcomes(engine) == {"e1": "applied", "e2": "applied"}


def test_money_is_exact(engine: Engine) -> None:
    amounts = ["99999999999999.9999", "0.1", "0.0001", "12345.6789"]
    apply(engine, user_created("u1", occurred_at=at(0)),
          *(order_placed(f"o{i}", "u1", items=[("S", 1, a)], occurred_at=at(1))
            for i, a in enumerate(amounts)))
    stored = {r["order_id"]: r["total_amount"] for r in rows(engine, orders)}
    assert stored == {f"o{i}": Decimal(a) for i, a in enumerate(amounts)}
    assert all(isinstance(v, Decimal) for v in stored.values())


def test_mixed_batch_matches_one_by_one_application(engine: Engine) -> None:
    messages = [
        user_created("u1", occurred_at=at(0), event_id="m-1"),
        order_placed("o1", "u1", occurred_at=at(1), event_id="m-2"),
        order_placed("o1", "u1", items=[("X", 2, "3.50")], occurred_at=at(0.5), event_id="m-3"),
        payment_settled("p1", "o1", "10.00", occurred_at=at(2), event_id="m-4"),
        inventory_adjusted("X", 7, occurred_at=at(3), event_id="m-5"),
        user_created("u2", email="u1@example.com", occurred_at=at(4), event_id="m-6"),
        payment_settled("p2", "o9", "1.00", occurred_at=at(5), event_id="m-7"),
        inventory_adjusted("X", 7, occurred_at=at(3), event_id="m-5"),
    ]
    batched = apply(engine, *messages)
    assert batched == [Fate.APPLIED, Fate.APPLIED, Fate.STALE, Fate.APPLIED,
                       Fate.APPLIED, Fate.APPLIED, Fate.APPLIED, Fate.DUPLICATE]
    state, shown = _state(engine), visible(engine)
    assert shown == {"users": {"u1"}, "orders": {"o1"}, "payments": {"p1"}}
    with engine.begin() as conn:
        for table in (applied_events, inventory, payments, order_items, orders, users):
            conn.execute(table.delete())
    singly = [s for m in messages for s in apply(engine, m)]
    assert singly == batched
    assert _state(engine) == state and visible(engine) == shown


def test_sqlite_writes_a_batch_in_as_many_statements_as_its_parameters_need(
        tmp_path: Path) -> None:
    """SQLite refuses a statement with more parameters than its limit: a batch is written a
    page of rows at a time, and what it writes does not depend on the page."""
    story = Story(seed=2)
    batch = received(*(story.next() for _ in range(600)))
    states, fates = [], []
    # 999: SQLite's limit before 3.32; 99 to 199 rows a statement, by table.
    for limit in (None, 999):
        url = f"sqlite:///{tmp_path / f'limit-{limit}.db'}"
        migrate(url)
        engine = make_engine(Settings(database_url=url))
        try:
            with engine.begin() as conn:
                if limit is not None:
                    driver: Any = conn.connection.driver_connection
                    driver.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, limit)
                fates.append(apply_in(conn, batch, [], worker="w1", applied_at=at(100)).fates)
            states.append(_state(engine))
        finally:
            engine.dispose()
    assert fates[0] == fates[1] and fates[0].count(Fate.APPLIED) == len(batch)
    assert states[0] == states[1] and len(states[0]["order_items"]) > 199


def test_sqlite_compiles_a_few_texts_of_each_statement_whatever_the_batches_sizes(
        tmp_path: Path) -> None:
    """SQLite compiles a statement's text once per connection, and the driver keeps the last
    128 (Python's default): batches of every size from 1 to 300 events write each table with
    at most 21 texts, at most 16 rows or a power of two a statement, and delete the items of
    their orders with one, so that a connection's texts all stay compiled (compiling a
    statement of 500 rows cost as long as running it). (Before: a text for each count of
    rows, 300 of them for the claims alone.)"""
    story = Story(seed=3)
    url = f"sqlite:///{tmp_path / 'texts.db'}"
    migrate(url)
    engine = make_engine(Settings(database_url=url))
    texts: dict[int, set[str]] = {}

    @event.listens_for(engine, "before_cursor_execute")
    def _seen(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        texts.setdefault(id(conn.connection.driver_connection), set()).add(statement)

    try:
        for size in range(1, 301):
            assert Fate.APPLIED in apply(engine, *(story.next() for _ in range(size)))
    finally:
        engine.dispose()
    inserts = Counter(text.split()[2] for each in texts.values() for text in each
                      if text.startswith("INSERT INTO "))
    assert {"applied_events", "users", "orders", "order_items"} <= inserts.keys()
    assert {table: count for table, count in inserts.items() if count > 21} == {}
    assert [len(each) for each in texts.values() if len(each) > 128] == []


def behind_a_writer(engine: Engine, first: tuple[str, Document] | DeadLetter,
                    second: tuple[str, Document] | list[tuple[str, Document]] | DeadLetter,
                    ) -> BatchResult:
    """`second` (one message, a batch, or a failure) applied while another transaction holds
    `first` written but not committed yet: on PostgreSQL it waits on the rows until that one
    commits."""
    def parts(of: Any) -> tuple[list[Received], list[DeadLetter]]:
        if isinstance(of, DeadLetter):
            return [], [of]
        return (received(*of) if isinstance(of, list) else received(of)), []

    with engine.connect() as holder:
        transaction = holder.begin()
        apply_in(holder, *parts(first), worker="w1", applied_at=at(10))
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(apply_batch, engine, *parts(second))
            if engine.dialect.name == "postgresql":
                wait_for_lock_waiter(engine)
            transaction.commit()
            return waiting.result(timeout=30)


def wait_for_lock_waiter(engine: Engine) -> None:
    """Until another backend waits on a lock (the second writer is blocked on the row)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        # A connection of its own: within a transaction, pg_stat_activity is a snapshot.
        with engine.connect() as probe:
            waiting = probe.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database()")).scalar_one()
        if waiting:
            return
        time.sleep(0.02)
    raise AssertionError("the second writer never waited on the first")


def _state(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    volatile = ("updated_at", "applied_at", "kafka_offset", "worker")

    def strip(table: Any, skip: Iterable[str] = volatile) -> list[Any]:
        keys = [c for c in table.columns if c.name not in skip]
        return sorted(tuple(r[c.name] for c in keys) for r in rows(engine, table))
    return {t.name: strip(t) for t in (users, orders, order_items, payments, applied_events)} | {
        "inventory": strip(inventory, ())}
