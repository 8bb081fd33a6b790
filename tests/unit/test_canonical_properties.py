"""The canonical fold is a function of the set of messages, never of the order it reads them in.

Streams are drawn from a small universe so that the interesting collisions happen often: users
clashing on and moving between emails, orders and payments before, after or without their
parents, orders changing user and currency between versions, equal `occurredAt`s, duplicates on
any partition, eventIds reused by other payloads, and poison of several kinds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from eventpipe.canonical import ErrorClass, Expected, Fate, PartitionOffset, TopicMessage, fold
from eventpipe.samples import (
    Document,
    encode,
    inventory_adjusted,
    order_placed,
    payment_settled,
    user_created,
)
from tests.unit.test_canonical import DAY, RECEIVED, TOLERANCE

PARTITIONS = 3
_USERS = ("U1", "U2", "U3")
_EMAILS = ("a@x.io", "B@x.io", "b@x.io", "c@x.io")  # "B@x.io" and "b@x.io" are one email
_ORDERS = ("O1", "O2", "O3")
_PAYMENTS = ("P1", "P2", "P3")
_CURRENCIES = ("EUR", "USD")


@dataclass(frozen=True)
class Draft:
    """A message before its offset is known: offsets follow from the final layout."""

    partition: int
    key: bytes | None
    value: bytes
    timestamp: datetime


def _moment(minute: int) -> datetime:
    # A handful of distinct times, so versions often tie and eventIds decide.
    return DAY + timedelta(minutes=minute)


_minute = st.integers(0, 4)
_user = st.builds(
    lambda uid, email, minute: user_created(uid, email=email, occurred_at=_moment(minute)),
    st.sampled_from(_USERS), st.sampled_from(_EMAILS), _minute)
_order = st.builds(
    lambda oid, uid, currency, minute, quantity: order_placed(
        oid, uid, currency=currency, occurred_at=_moment(minute),
        items=[("SKU-1", quantity, "2.50"), ("SKU-2", 1, "1.00")]),
    # U4 never exists: its orders wait for ever (drawn less often than the others).
    st.sampled_from(_ORDERS), st.sampled_from((*_USERS, *_USERS, "U4")),
    st.sampled_from(_CURRENCIES), _minute, st.integers(1, 3))
_payment = st.builds(
    lambda pid, oid, currency, minute: payment_settled(
        pid, oid, "6.00", currency=currency, occurred_at=_moment(minute)),
    st.sampled_from(_PAYMENTS), st.sampled_from((*_ORDERS, *_ORDERS, "O4")),
    st.sampled_from(_CURRENCIES), _minute)
_stock = st.builds(
    lambda sku, delta, minute: inventory_adjusted(sku, delta, occurred_at=_moment(minute)),
    st.sampled_from(("SKU-1", "SKU-2")), st.sampled_from((-2, -1, 1, 5)), _minute)
_sample = st.one_of(_user, _order, _payment, _stock)

_POISON_VALUES = (b"", b"not json", b"[]", b"{}", b"[" * 3000, b'{"eventId":"x"}', b"\xff\xff")


@st.composite
def drafts(draw: st.DrawFn) -> list[Draft]:
    """A stream laid out on partitions, in production order."""
    # Every kind in every stream, then any production order: children may precede parents.
    samples: list[tuple[str, Document]] = draw(st.permutations(
        draw(st.lists(_user, min_size=2, max_size=8))
        + draw(st.lists(_order, min_size=1, max_size=10))
        + draw(st.lists(_payment, min_size=1, max_size=10))
        + draw(st.lists(_stock, max_size=4))))
    stream: list[Draft] = []
    for serial, (key, document) in enumerate(samples):
        # Low serials, so that ties on occurredAt are broken by code point ("e10" < "e9").
        document["eventId"] = f"e{serial}"
        stream.append(_draft(draw, key, document))
    extras = draw(st.lists(st.tuples(st.sampled_from(("duplicate", "reuse", "poison")),
                                     st.integers(0, len(stream) - 1), st.integers(0, 10**6)),
                           max_size=12))
    originals = list(stream)  # extras copy these, never each other
    for kind, index, where in extras:
        original = originals[index]
        if kind == "duplicate":  # the same bytes, on any partition
            copy = Draft(draw(st.integers(0, PARTITIONS - 1)), original.key, original.value,
                         original.timestamp)
        elif kind == "reuse":  # the id of an existing event on a different payload
            key, document = draw(_sample)
            document["eventId"] = json.loads(original.value)["eventId"]
            copy = Draft(original.partition, key.encode(), encode(document), RECEIVED)
        else:
            copy = Draft(draw(st.integers(0, PARTITIONS - 1)), draw(st.none() | st.binary()),
                         draw(st.sampled_from(_POISON_VALUES) | st.binary(max_size=40)),
                         RECEIVED)
        stream.insert(where % (len(stream) + 1), copy)  # before or after the original
    return stream


def _draft(draw: st.DrawFn, key: str, document: Document) -> Draft:
    """A valid event, or one made poison by its key or its Kafka timestamp."""
    fate = draw(st.sampled_from(("keyed",) * 12 + ("unkeyed", "wrong key", "early")))
    message_key: bytes | None = {"keyed": key.encode(), "early": key.encode(),
                                 "unkeyed": None, "wrong key": b"someone-else"}[fate]
    # "early": the Kafka timestamp is more than the tolerance before occurredAt.
    timestamp = DAY - TOLERANCE - timedelta(seconds=1) if fate == "early" else RECEIVED
    return Draft(draw(st.integers(0, PARTITIONS - 1)), message_key, encode(document), timestamp)


def layout(stream: list[Draft]) -> list[TopicMessage]:
    offsets = [0] * PARTITIONS
    messages = []
    for draft in stream:
        offset = offsets[draft.partition]
        offsets[draft.partition] += 1
        messages.append(TopicMessage(draft.partition, offset, draft.key, draft.value,
                                     draft.timestamp))
    return messages


def _fold(messages: list[TopicMessage]) -> Expected:
    return fold(messages, max_future=TOLERANCE)


@settings(max_examples=300, deadline=None)
@given(stream=drafts(), data=st.data())
def test_any_order_of_the_messages_folds_to_the_same_result(
    stream: list[Draft], data: st.DataObject
) -> None:
    messages = layout(stream)
    expected = _fold(messages)
    for _ in range(3):
        assert _fold(data.draw(st.permutations(messages))) == expected


@settings(max_examples=300, deadline=None)
@given(stream=drafts())
def test_every_message_has_one_fate_and_the_read_model_is_closed(stream: list[Draft]) -> None:
    messages = layout(stream)
    result = _fold(messages)
    counts = result.counts

    # Every message is counted once: poison, a distinct event, a copy of one, or a reused id.
    assert counts.messages == len(messages) == counts.invalid + counts.valid
    assert counts.valid == counts.events + counts.duplicates + counts.id_reused
    assert len(result.fates) == counts.events
    assert counts.stale == sum(f is Fate.STALE for f in result.fates.values())
    # No message is in two dead letters, and every one of them is on the topic.
    positions = [p for d in result.dead_letters.values() for p in d.positions]
    assert len(positions) == len(set(positions))
    assert set(positions) <= {PartitionOffset(m.partition, m.offset) for m in messages}
    assert sum(d.error_class is ErrorClass.INVALID_EVENT
               for d in result.dead_letters.values()) <= counts.invalid
    # The held events are exactly the non-invalid, non-reused dead letters.
    held = {d.event_id for d in result.dead_letters.values()
            if d.error_class not in (ErrorClass.INVALID_EVENT, ErrorClass.ID_REUSED)}
    assert held == {e for e, f in result.fates.items() if f is Fate.HELD}
    assert len(held) == counts.held
    assert held <= set(result.current.values())

    # The read model is closed under its references, and emails are unique in it.
    emails = [user.email for user in result.users.values()]
    assert len(emails) == len(set(emails))
    assert all(order.user_id in result.users for order in result.orders.values())
    for payment in result.payments.values():
        assert result.orders[payment.order_id].currency == payment.currency
