"""The rules that span keys, kept in step by the reconciler, on every database.

The read model never depends on the order events arrive in (issue 10): these tests apply
the same events in different orders and batch cuts through the real apply path, reconcile,
and compare what the read model shows and which events are dead-lettered.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from threading import Thread
from typing import Any

import pytest
import redis
from confluent_kafka import KafkaError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select, text

from eventpipe import readmodel
from eventpipe import reconcile as reconciling
from eventpipe.apply import apply_batch
from eventpipe.database import make_engine
from eventpipe.dlq import actions, projection, records
from eventpipe.dlq.letter import OPEN, WAITING, DeadLetter
from eventpipe.dlq.stream import DeadLetterStream, StreamEntry
from eventpipe.effects import Fate, Position, Received
from eventpipe.messages import RawMessage
from eventpipe.samples import Document, order_placed, payment_settled, user_created
from eventpipe.settings import Settings
from eventpipe.tables import dead_letters, metadata, reconcile_queue
from tests.support.broker import TopicFactory, settings_for
from tests.support.factories import at, received
from tests.support.pipeline import wait_until

PARK = timedelta(minutes=30)


def settle(engine: Engine, now: datetime | None = None, rounds: int = 20) -> list[DeadLetter]:
    """Reconcile (up to `rounds` rounds); the dead letters changed."""
    return reconciling.reconcile(engine, lambda: now or datetime.now(UTC), PARK,
                                 max_rounds=rounds)


def apply(engine: Engine, *messages: tuple[str, Document]) -> None:
    apply_batch(engine, received(*messages))
    settle(engine)


def live(engine: Engine) -> dict[tuple[str | None, str | None], tuple[str, str, str | None]]:
    """(entity kind, key) → (state, error class, parent key) of the live dead letters."""
    with engine.connect() as conn:
        return {(r.entity_kind, r.entity_key): (r.state, r.error_class, r.parent_key)
                for r in conn.execute(select(dead_letters)
                                      .where(dead_letters.c.state.in_((WAITING, OPEN))))}


def shown(engine: Engine) -> dict[str, Any]:
    """What the read model shows: visible users, orders, payments, with their fields."""
    with engine.connect() as conn:
        model = readmodel.whole(conn)
    return {"users": sorted((k, r.email, r.name) for k, r in model.users.items()),
            "orders": sorted((k, r.user_id, r.currency) for k, r in model.orders.items()),
            "payments": sorted((k, r.order_id) for k, r in model.payments.items())}


def test_an_order_waits_for_its_user_then_appears_and_its_wait_leaves_no_trace(
    engine: Engine,
) -> None:
    apply(engine, order_placed("o1", "u1", occurred_at=at(1)))
    assert live(engine) == {("order", "o1"): (WAITING, "MissingParent", "u1")}
    apply(engine, user_created("u1", occurred_at=at(0)))
    assert live(engine) == {}
    assert shown(engine)["orders"] == [("o1", "u1", "EUR")]
    with engine.connect() as conn:
        assert conn.execute(select(dead_letters)).all() == []


def test_a_wait_past_the_parking_time_enters_the_dlq_and_closes_when_the_parent_comes(
    engine: Engine,
) -> None:
    apply(engine, payment_settled("p1", "o1", "5.00", occurred_at=at(1)))
    settle(engine, datetime.now(UTC) + PARK + timedelta(seconds=1))
    assert live(engine) == {("payment", "p1"): (OPEN, "MissingParent", "o1")}
    apply(engine, user_created("u1", occurred_at=at(0)),
          order_placed("o1", "u1", occurred_at=at(0)))
    assert live(engine) == {}
    with engine.connect() as conn:
        [row] = conn.execute(select(dead_letters)).all()
    assert row.state == "resolved" and row.error_class == "MissingParent"


def test_a_lapsed_replay_whose_parent_came_meanwhile_is_resolved_not_reopened(
    engine: Engine,
) -> None:
    """A replayer claimed an open dead letter and died; the parent came while the claim hid
    the letter from the rounds. When the claim lapses, the letter's entity is evaluated
    again: it is visible now, so its letter resolves rather than reopen in the DLQ."""
    apply(engine, order_placed("o1", "u1", occurred_at=at(1)))
    later = datetime.now(UTC) + PARK + timedelta(seconds=1)
    settle(engine, later)
    with engine.begin() as conn:
        [key] = conn.execute(select(dead_letters.c.dlq_key)).scalars()
        assert key in records.claim_for_replay(conn, [key], later + timedelta(seconds=5))
    apply(engine, user_created("u1", occurred_at=at(0)))
    assert live(engine) == {}  # the claim hides it: neither open nor resolved yet
    settle(engine, later + timedelta(seconds=10))
    assert live(engine) == {}
    with engine.connect() as conn:
        assert conn.execute(select(dead_letters.c.state)).scalars().all() == ["resolved"]
    assert shown(engine)["orders"] == [("o1", "u1", "EUR")]


def test_a_round_leaves_a_letter_a_replay_has_to_the_replay(engine: Engine) -> None:
    """A round that evaluates a held event while a replay has its dead letter leaves the
    letter to the replay: made live again under it, the letter lost the replay's claim (a
    second replay could take it) and its history the episode the replay's end records. The
    replay's end queues the entity again, for the round that decides it then."""
    apply(engine, order_placed("o1", "u1", occurred_at=at(1)))
    later = datetime.now(UTC) + PARK + timedelta(seconds=1)
    settle(engine, later)
    claim = later + timedelta(minutes=5)
    with engine.begin() as conn:
        [key] = conn.execute(select(dead_letters.c.dlq_key)).scalars()
        letter = records.claim_for_replay(conn, [key], claim)[key]
        reconciling.queue_entities(conn, [letter], later)
    settle(engine, later + timedelta(seconds=1))
    with engine.begin() as conn:
        assert records.load(conn, [key])[key].state == "replaying"
        assert key in records.finish_replay(conn, [key], later + timedelta(seconds=2),
                                            published=True, claim=claim)
        reconciling.queue_entities(conn, [letter], later + timedelta(seconds=2))
    settle(engine, later + timedelta(seconds=3))
    with engine.connect() as conn:
        [found] = records.load(conn, [key]).values()
    # Its wait was spent before the replay: back in the DLQ at once, not hidden for another.
    assert found.state == OPEN and [e.ended for e in found.history] == ["replayed"]


def test_a_replayed_event_still_held_comes_back_to_the_dlq(
    engine: Engine, redis_client: redis.Redis, kafka_broker: str, kafka_topic: TopicFactory,
) -> None:
    """An operator replays an order still waiting for its user: the copy the pipeline reads
    back is a duplicate, which changes nothing, and the order is still held. Its dead letter
    must be live again, not left `replayed` with the order shown nowhere; and in the DLQ at
    once, its wait spent, rather than hidden for another PARK_TIMEOUT_S (an hour by default)
    as if it had just arrived, and at the copy's position (a review's finding: it kept the
    first message's, which Kafka's retention takes first, and a DLQ rebuilt from Kafka then
    finds no bytes). Should its user come then, the letter resolves, keeping its history."""
    topic = kafka_topic(partitions=1)
    document = order_placed("o1", "u1", occurred_at=at(1))
    apply(engine, document)
    settle(engine, datetime.now(UTC) + PARK + timedelta(seconds=1))
    assert live(engine) == {("order", "o1"): (OPEN, "MissingParent", "u1")}
    stream = DeadLetterStream(redis_client, f"test:dlq:{uuid.uuid4().hex}", max_entries=5,
                              max_bytes=10_000)
    with engine.connect() as conn:
        [key] = conn.execute(select(dead_letters.c.dlq_key)).scalars()
    projection.project(engine, stream, None,
                       {key: RawMessage(b"o1", json.dumps(document[1]).encode())})
    result = actions.replay(engine, stream, list(stream.scan()),
                            actions.Publisher(settings_for(kafka_broker, topic)))
    assert result.replayed == 1
    [copy] = received(document)  # the replayed message, read back from the topic
    first = letter_at(engine, key).position  # where the copy went: its message's partition
    further = Position(first.topic, first.partition, (first.offset or 0) + 1_000)
    assert apply_batch(engine, [replace(copy, position=further)]).fates == [Fate.DUPLICATE]
    settle(engine)
    assert live(engine) == {("order", "o1"): (OPEN, "MissingParent", "u1")}
    assert letter_at(engine, key).position == further
    assert shown(engine)["orders"] == []
    apply(engine, user_created("u1", occurred_at=at(0)))
    settle(engine)
    assert live(engine) == {}
    with engine.connect() as conn:
        [found] = records.load(conn, [key]).values()
    assert found.state == "resolved"
    assert [e.ended for e in found.history] == ["replayed", "resolved"]
    assert shown(engine)["orders"] == [("o1", "u1", "EUR")]


def letter_at(engine: Engine, key: str) -> DeadLetter:
    with engine.connect() as conn:
        [letter] = records.load(conn, [key]).values()
    return letter


def test_a_replayed_copy_read_before_its_replay_ends_is_where_the_letter_reopens(
    engine: Engine,
) -> None:
    """A review's finding: the copy's duplicate can reach the letter before the replayer,
    still flushing the rest of its chunk, marks it replayed; its position was not kept, and
    the letter reopened at the first message's. A copy of the first message read again after
    the replay's (a redelivery) does not take it back."""
    document = order_placed("o1", "u1", occurred_at=at(1))
    apply(engine, document)
    settle(engine, datetime.now(UTC) + PARK + timedelta(seconds=1))
    [key] = [letter.dlq_key for letter in records_of(engine)]
    first = letter_at(engine, key).position
    claim = datetime.now(UTC) + timedelta(minutes=5)
    with engine.begin() as conn:
        assert records.claim_for_replay(conn, [key], claim)
    [copy] = received(document)
    further = Position(first.topic, first.partition, (first.offset or 0) + 1_000)
    assert apply_batch(engine, [replace(copy, position=further)]).fates == [Fate.DUPLICATE]
    with engine.begin() as conn:  # as the replayer ends its claims
        ended = records.finish_replay(conn, [key], datetime.now(UTC), published=True,
                                      claim=claim)
        reconciling.queue_entities(conn, ended.values(), datetime.now(UTC))
    assert ended[key].position == further
    assert apply_batch(engine, [replace(copy, position=first)]).fates == [Fate.DUPLICATE]
    settle(engine)
    assert live(engine) == {("order", "o1"): (OPEN, "MissingParent", "u1")}
    assert letter_at(engine, key).position == further


def records_of(engine: Engine) -> list[DeadLetter]:
    with engine.connect() as conn:
        return list(records.load(conn, list(conn.execute(
            select(dead_letters.c.dlq_key)).scalars())).values())


def test_a_replay_kafka_refuses_goes_back_with_its_entity_queued_for_a_round(
    engine: Engine, redis_client: redis.Redis, kafka_broker: str, kafka_topic: TopicFactory,
) -> None:
    """The parent came while a replay's claim hid the letter from the rounds, then Kafka
    refused the replay: the letter goes back to the DLQ, and its entity to the next round,
    which finds it visible and resolves the letter."""
    topic = kafka_topic(partitions=1)
    apply(engine, order_placed("o1", "u1", occurred_at=at(1)))
    settle(engine, datetime.now(UTC) + PARK + timedelta(seconds=1))
    assert live(engine) == {("order", "o1"): (OPEN, "MissingParent", "u1")}
    stream = DeadLetterStream(redis_client, f"test:dlq:{uuid.uuid4().hex}", max_entries=5,
                              max_bytes=10_000)

    class ParentFirst(actions.Publisher):
        def publish(self, entry: StreamEntry,
                    done: Callable[[KafkaError | None], None]) -> None:
            apply(engine, user_created("u1", occurred_at=at(0)))
            super().publish(entry, done)

    try:
        with engine.connect() as conn:
            [key] = conn.execute(select(dead_letters.c.dlq_key)).scalars()
        projection.project(engine, stream, None, {key: RawMessage(b"o1", b"{}")})
        [entry] = stream.scan()
        # A topic Kafka does not have: the message is refused for good.
        refused = replace(entry, letter=replace(entry.letter,
                                                position=Position("bad topic!", 0, 1)))
        result = actions.replay(engine, stream, [refused],
                                ParentFirst(settings_for(kafka_broker, topic), timeout_s=5))
        assert (result.refused, result.rejected) == (0, 1)
        assert live(engine) == {("order", "o1"): (OPEN, "MissingParent", "u1")}
        settle(engine)
        assert live(engine) == {}
        assert shown(engine)["orders"] == [("o1", "u1", "EUR")]
    finally:
        redis_client.delete(stream.stream, stream.index, stream.totals, stream.marker)


def test_an_earlier_claimant_displaces_the_owner_of_an_email_and_its_orders(
    engine: Engine,
) -> None:
    apply(engine, user_created("late", email="a@x.io", occurred_at=at(5)),
          order_placed("o-late", "late", occurred_at=at(6)))
    assert live(engine) == {}
    apply(engine, user_created("early", email="a@x.io", occurred_at=at(1)))
    assert live(engine) == {("user", "late"): (OPEN, "EmailTaken", "early"),
                            ("order", "o-late"): (WAITING, "MissingParent", "late")}
    assert [u[0] for u in shown(engine)["users"]] == ["early"]
    # The winner moves on: the email is free, and the displaced user comes back with its order.
    apply(engine, user_created("early", email="b@x.io", occurred_at=at(9)))
    assert live(engine) == {}
    assert shown(engine)["orders"] == [("o-late", "late", "EUR")]


def test_a_payment_in_another_currency_is_dead_lettered_until_the_order_matches(
    engine: Engine,
) -> None:
    apply(engine, user_created("u1", occurred_at=at(0)),
          order_placed("o1", "u1", currency="EUR", occurred_at=at(1)),
          payment_settled("p1", "o1", "10.00", currency="USD", occurred_at=at(2)))
    assert live(engine) == {("payment", "p1"): (OPEN, "CurrencyMismatch", "o1")}
    apply(engine, order_placed("o1", "u1", currency="USD", occurred_at=at(3)))
    assert live(engine) == {}
    assert shown(engine)["payments"] == [("p1", "o1")]


@pytest.mark.parametrize("order", ["payment before the order moves", "payment after"])
def test_a_rejection_that_turns_into_a_wait_for_a_parent_stays_in_the_dlq(
    engine: Engine, order: str,
) -> None:
    """A payment dead-lettered for its order's currency, whose order then leaves the read
    model (its user missing), now waits for a parent: in the other order it waits its
    parking time before it enters the DLQ, here it is in the DLQ already and stays there,
    as a letter an operator may have seen (docs/contract.md). The same letter either way, in
    the same state once the parking time is over."""
    payment = payment_settled("p1", "o1", "1.00", currency="EUR", occurred_at=at(3))
    moved = order_placed("o1", "u9", currency="EUR", occurred_at=at(2))
    apply(engine, user_created("u1", occurred_at=at(0)),
          order_placed("o1", "u1", currency="USD", occurred_at=at(1)))
    if order == "payment after":
        apply(engine, moved)
        apply(engine, payment)
        state = WAITING
    else:
        apply(engine, payment)
        assert live(engine) == {("payment", "p1"): (OPEN, "CurrencyMismatch", "o1")}
        apply(engine, moved)
        state = OPEN
    assert live(engine) == {("order", "o1"): (WAITING, "MissingParent", "u9"),
                            ("payment", "p1"): (state, "MissingParent", "o1")}
    settle(engine, now=datetime.now(UTC) + PARK + timedelta(seconds=1))
    assert live(engine) == {("order", "o1"): (OPEN, "MissingParent", "u9"),
                            ("payment", "p1"): (OPEN, "MissingParent", "o1")}


def test_a_held_event_an_operator_purged_stays_purged_while_it_is_held(engine: Engine) -> None:
    """Purged is the event's fate for good: a round that finds it still held (its order
    written again, in the same currency) leaves the dead letter purged, even after a copy of
    the payment sent again moved the letter's position; the payment stays out of the read
    model."""
    payment = payment_settled("p1", "o1", "10.00", currency="USD", occurred_at=at(2))
    apply(engine, user_created("u1", occurred_at=at(0)),
          order_placed("o1", "u1", currency="EUR", occurred_at=at(1)), payment)
    apply(engine, payment)  # sent again: a duplicate, at another offset
    with engine.begin() as conn:
        [key] = conn.execute(select(dead_letters.c.dlq_key)).scalars()
        assert records.purge(conn, [key], datetime.now(UTC)) == {key: OPEN}
    apply(engine, order_placed("o1", "u1", currency="EUR", occurred_at=at(3)))
    assert live(engine) == {}
    with engine.connect() as conn:
        assert conn.execute(select(dead_letters.c.state)).scalars().all() == ["purged"]
    assert shown(engine)["payments"] == []


@contextmanager
def emptied(url: str) -> Iterator[Engine]:
    """An engine of its own on the database at `url`, emptied first (for a test of one
    database, or of two engines on it)."""
    engine = make_engine(Settings(database_url=url))
    try:
        with engine.begin() as conn:
            for table in reversed(metadata.sorted_tables):
                conn.execute(table.delete())
        yield engine
    finally:
        engine.dispose()


# -- the same events give the same result, whatever the order -------------------------------


def _stream(rng: random.Random) -> list[tuple[str, Document]]:
    """Users (some sharing emails, some moving), orders before and after their users, payments
    in matching and other currencies, duplicates, stale versions."""
    base = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
    emails = [f"e{n}@x.io" for n in range(3)]
    messages: list[tuple[str, Document]] = []
    serial = 0

    def event_id() -> str:
        nonlocal serial
        serial += 1
        return f"ev-{serial:04d}"

    for user in range(5):
        for version in range(rng.randint(1, 2)):
            messages.append(user_created(
                f"u{user}", email=rng.choice(emails), name=f"v{version}",
                occurred_at=base + timedelta(seconds=rng.randint(0, 50)), event_id=event_id()))
    for order in range(6):
        for _version in range(rng.randint(1, 2)):
            messages.append(order_placed(
                f"o{order}", f"u{rng.randint(0, 6)}", currency=rng.choice(("EUR", "USD")),
                occurred_at=base + timedelta(seconds=rng.randint(0, 50)), event_id=event_id()))
    for payment in range(5):
        messages.append(payment_settled(
            f"p{payment}", f"o{rng.randint(0, 7)}", "9.99", currency=rng.choice(("EUR", "USD")),
            occurred_at=base + timedelta(seconds=rng.randint(0, 50)), event_id=event_id()))
    messages += rng.sample(messages, 4)  # duplicates
    return messages


def _outcome(engine: Engine, batch: list[Received], cuts: list[int]) -> tuple[Any, Any]:
    with engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            conn.execute(table.delete())
    start = 0
    for cut in [*cuts, len(batch)]:
        apply_batch(engine, batch[start:cut])
        start = cut
        settle(engine)
    with engine.connect() as conn:
        failed = sorted((r.dlq_key, r.error_class) for r in conn.execute(
            select(dead_letters).where(dead_letters.c.state.in_((WAITING, OPEN)))))
    return shown(engine), failed


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), order_seed=st.integers(0, 10_000),
       cuts=st.lists(st.integers(1, 40), max_size=4))
def test_any_order_and_batching_of_the_same_events_gives_the_same_result(
    engine: Engine, seed: int, order_seed: int, cuts: list[int],
) -> None:
    events = received(*_stream(random.Random(seed)))
    expected = _outcome(engine, events, [])
    shuffled = list(events)
    random.Random(order_seed).shuffle(shuffled)
    assert _outcome(engine, shuffled, sorted(c for c in cuts if c < len(events))) == expected


@pytest.mark.parametrize("order", ["users first", "children first"])
def test_the_issue_10_scenario_ends_the_same_way(engine: Engine, order: str) -> None:
    """A user with orders and payments, and a later-dated user claiming the same email, with
    the user's partition late in one of the runs."""
    early = [user_created("U", email="u@x.io", occurred_at=at(1), event_id="u-1"),
             *(order_placed(f"o{n}", "U", occurred_at=at(10 + n), event_id=f"o-{n}")
               for n in range(3)),
             *(payment_settled(f"p{n}", f"o{n}", "10.00", occurred_at=at(20 + n),
                               event_id=f"p-{n}") for n in range(3))]
    rival = [user_created("V", email="u@x.io", occurred_at=at(4200), event_id="v-1")]
    if order == "users first":
        apply(engine, *early)
        apply(engine, *rival)
    else:
        apply(engine, *rival)
        apply(engine, *early[1:])
        apply(engine, early[0])
    assert [u[0] for u in shown(engine)["users"]] == ["U"]
    assert [o[0] for o in shown(engine)["orders"]] == ["o0", "o1", "o2"]
    assert [p[0] for p in shown(engine)["payments"]] == ["p0", "p1", "p2"]
    assert live(engine) == {("user", "V"): (OPEN, "EmailTaken", "U")}



def test_a_wait_resolves_even_when_a_redelivered_copy_touches_it_at_the_same_time(
    postgresql_url: str,
) -> None:
    """A redelivery bumps a waiting dead letter (one more attempt) while a reconciler round
    finds its parent arrived: the round must still resolve it, not lose its decision to the
    concurrent update and leave the event waiting out its parking time."""
    with emptied(postgresql_url) as engine:
        apply(engine, order_placed("o1", "u1", occurred_at=at(1)))
        assert list(live(engine)) == [("order", "o1")]
        apply_batch(engine, received(user_created("u1", occurred_at=at(0))))
        with engine.connect() as conn:
            [key] = conn.execute(select(dead_letters.c.dlq_key)).scalars()

        with engine.connect() as redelivery, redelivery.begin():
            records.repeat(redelivery, [key], {key: Position("t", 0, 99)}, datetime.now(UTC))
            round_ = Thread(target=settle, args=(engine,))
            round_.start()
            wait_until(lambda: _lock_waits(engine) > 0, 30, "the round to reach the letter")
        round_.join(30)
        assert not round_.is_alive()
        assert live(engine) == {}
        assert shown(engine)["orders"] == [("o1", "u1", "EUR")]


def _lock_waits(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM pg_locks WHERE NOT granted"))
                   .scalar_one())


# -- a round reads first, without its lock ----------------------------------------------------


def _during_the_survey(monkeypatch: pytest.MonkeyPatch, action: Any) -> list[bool]:
    """Run `action` once, while the next round reads the users it evaluates; whether it ran."""
    done: list[bool] = []
    users = readmodel.Lookup.users

    def looking(lookup: readmodel.Lookup, ids: Any) -> Any:
        if not done:
            done.append(True)
            action()
        return users(lookup, ids)

    monkeypatch.setattr(readmodel.Lookup, "users", looking)
    return done


def test_batches_write_while_a_round_evaluates_on_sqlite(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The survey, a round's long part, holds neither the writers' turn nor SQLite's write
    lock: a batch with a short lock timeout commits in the middle of it, and the round then
    decides on data that includes that batch."""
    batches = make_engine(Settings(database_url=sqlite_url, database_lock_timeout_s=0.2))
    try:
        with emptied(sqlite_url) as engine:
            apply(engine, order_placed("o1", "u1", occurred_at=at(1)))
            assert list(live(engine)) == [("order", "o1")]
            apply_batch(engine, received(order_placed("o2", "u1", occurred_at=at(2))))
            ran = _during_the_survey(monkeypatch, lambda: apply_batch(
                batches, received(user_created("u1", occurred_at=at(0)))))
            settle(engine, rounds=1)
            assert ran
            # The survey read o2 held (no user yet) and the round, reading again under its lock,
            # found the user there: no dead letter for o2. The user's own queue row came after
            # the survey read the queue; the next round takes it and lets o1 go.
            assert live(engine) == {("order", "o1"): (WAITING, "MissingParent", "u1")}
            settle(engine)
            assert live(engine) == {}
            assert [o[0] for o in shown(engine)["orders"]] == ["o1", "o2"]
    finally:
        batches.dispose()


def test_on_sqlite_what_a_batch_changes_after_the_survey_is_left_to_the_next_round(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An order the survey reads as visible, with no dead letter, is held by a newer version
    (a user that does not exist) committed once the survey read the queue: the round leaves
    it out, and keeps the queue row that batch wrote, so the next round dead-letters it."""
    with emptied(sqlite_url) as engine:
        apply(engine, user_created("u1", occurred_at=at(0)))
        apply_batch(engine, received(order_placed("o1", "u1", occurred_at=at(1))))
        ran = _during_the_survey(monkeypatch, lambda: apply_batch(
            engine, received(order_placed("o1", "u2", occurred_at=at(3)))))
        settle(engine, rounds=1)
        assert ran
        with engine.connect() as conn:
            queued = conn.execute(select(reconcile_queue.c["keys"])).scalars().all()
        assert [json.loads(keys) for keys in queued] == [{"orders": ["o1"]}]
        assert live(engine) == {}
        settle(engine)
        assert live(engine) == {("order", "o1"): (WAITING, "MissingParent", "u2")}


def test_a_second_reconciler_skips_while_a_round_surveys(
    engine: Engine, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reconciler that comes while another's round surveys skips, rather than survey
    itself: on PostgreSQL, where batches and rounds commit while a round reads, the survey is
    read under the round's lock (a second survey could miss a dead letter the round in flight
    writes from older data); on SQLite, where the survey reads before the write lock, a file
    lock keeps the two transactions of a round together (a second survey could take queue rows
    the first round deletes, and delete new rows given their ids)."""
    surveys: list[int] = []
    survey = reconciling.survey

    def counted(conn: Any) -> reconciling.Survey:
        surveys.append(1)
        return survey(conn)

    monkeypatch.setattr(reconciling, "survey", counted)
    apply(engine, user_created("u1", email="e@x.io", occurred_at=at(0)))
    apply_batch(engine, received(user_created("u2", email="e@x.io", occurred_at=at(1))))
    skipped: list[tuple[list[DeadLetter], int]] = []

    def meanwhile() -> None:
        # The user moves to another email, and a second reconciler comes.
        apply_batch(engine, received(user_created("u1", email="f@x.io", occurred_at=at(2))))
        skipped.append((settle(engine), len(surveys)))

    ran = _during_the_survey(monkeypatch, meanwhile)
    surveys.clear()
    settle(engine)
    assert ran
    assert skipped == [([], 1)]  # only the first round's survey was read
    settle(engine)
    assert sorted(u[0] for u in shown(engine)["users"]) == ["u1", "u2"]
    assert live(engine) == {}


def test_an_event_replayed_long_ago_and_held_again_waits_and_keeps_its_history(
        engine: Engine) -> None:
    """An order replayed long ago, then visible, is held again later (its user lost its email
    to an earlier claimant): it waits its parking time as any event does, not in the DLQ at
    once as a replay still held would be; and when its user is back, its letter is resolved
    with its earlier lives kept (a wait with a history is no longer one nobody saw)."""
    apply(engine, order_placed("o1", "u1", occurred_at=at(1)))
    settle(engine, datetime.now(UTC) + PARK + timedelta(seconds=1))
    long_ago = datetime.now(UTC) - 3 * PARK
    with engine.begin() as conn:
        [key] = conn.execute(select(dead_letters.c.dlq_key)).scalars()
        claim = long_ago + timedelta(minutes=5)
        assert key in records.claim_for_replay(conn, [key], claim)
        assert key in records.finish_replay(conn, [key], long_ago, published=True, claim=claim)
    apply(engine, user_created("u1", email="a@x.io", occurred_at=at(0)))
    assert live(engine) == {}
    apply(engine, user_created("u0", email="a@x.io", occurred_at=at(-1)))
    assert live(engine)[("order", "o1")] == (WAITING, "MissingParent", "u1")
    apply(engine, user_created("u0", email="b@x.io", occurred_at=at(2)))
    assert live(engine) == {}
    with engine.connect() as conn:
        [found] = records.load(conn, [key]).values()
    assert found.state == "resolved"
    assert [e.ended for e in found.history] == ["replayed", "resolved"]
