"""The canonical fold, rule by rule: small hand-written streams, their results written out."""

from __future__ import annotations

import random
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from eventpipe.canonical import (
    AmbiguousId,
    Counts,
    Entity,
    EntityKind,
    ErrorClass,
    Expected,
    ExpectedDeadLetter,
    Fate,
    InventoryRow,
    ItemRow,
    OrderRow,
    PartitionOffset,
    PaymentRow,
    TopicMessage,
    UserRow,
    fold,
)
from eventpipe.events import message_fingerprint, parse_event, position_fingerprint
from eventpipe.samples import (
    Document,
    encode,
    inventory_adjusted,
    order_placed,
    payment_settled,
    user_created,
)

DAY = datetime(2024, 5, 1, tzinfo=UTC)
# Kafka timestamps default to the next day: after every occurredAt the streams use.
RECEIVED = DAY + timedelta(days=1)
TOLERANCE = timedelta(minutes=5)
_DEFAULT_KEY = b"<the contract's key>"


def at(hour: int, minute: int = 0) -> datetime:
    return DAY + timedelta(hours=hour, minutes=minute)


class Topic:
    """Messages laid out on partitions with consecutive offsets, as a producer would write them."""

    def __init__(self) -> None:
        self.messages: list[TopicMessage] = []
        self._next_offset: dict[int, int] = {}

    def raw(self, value: bytes, *, key: bytes | None = None, partition: int = 0,
            timestamp: datetime | None = RECEIVED) -> TopicMessage:
        offset = self._next_offset.get(partition, 0)
        self._next_offset[partition] = offset + 1
        message = TopicMessage(partition, offset, key, value, timestamp)
        self.messages.append(message)
        return message

    def add(self, sample: tuple[str, Document], *, partition: int = 0,
            key: bytes | None = _DEFAULT_KEY, timestamp: datetime | None = RECEIVED
            ) -> TopicMessage:
        entity_key, document = sample
        return self.raw(encode(document), partition=partition, timestamp=timestamp,
                        key=entity_key.encode() if key == _DEFAULT_KEY else key)

    def fold(self) -> Expected:
        result = fold(self.messages, max_future=TOLERANCE)
        # Every test also checks that the result does not hang on the order of the messages.
        shuffled = list(self.messages)
        random.Random(len(shuffled)).shuffle(shuffled)
        assert fold(reversed(self.messages), max_future=TOLERANCE) == result
        assert fold(shuffled, max_future=TOLERANCE) == result
        return result


def e_key(message: TopicMessage) -> str:
    return "e:" + parse_event(message.value).fingerprint


def m_key(message: TopicMessage) -> str:
    return "m:" + message_fingerprint(message.key, message.value)


def pos(message: TopicMessage) -> PartitionOffset:
    return PartitionOffset(message.partition, message.offset)


# Rule 1: parse; poison is InvalidEvent under the message's fingerprint.


def test_poison_of_every_kind_is_dead_lettered_by_message_fingerprint() -> None:
    topic = Topic()
    topic.add(user_created("U1", email="a@x.io", name="Ada", occurred_at=at(9),
                                  event_id="e1"))
    junk = topic.raw(b"\xff\xfe not utf-8")
    malformed = topic.raw(b'{"eventId": ', key=b"U1")
    deep = topic.raw(b"[" * 200_000)
    _, far_past = user_created("U2", occurred_at=at(9), event_id="e2")
    far_past["occurredAt"] = "0001-01-01T00:00:00+14:00"
    overflow = topic.raw(encode(far_past), key=b"U2")
    wrong_key = topic.add(user_created("U3", occurred_at=at(9), event_id="e3"), key=b"U4")
    _, missing = order_placed("O1", "U1", occurred_at=at(9), event_id="e4")
    del missing["data"]["currency"]
    incomplete = topic.raw(encode(missing), key=b"O1")
    poison = [junk, malformed, deep, overflow, wrong_key, incomplete]

    result = topic.fold()

    assert result.users == {"U1": UserRow("a@x.io", "Ada", at(9))}
    assert set(result.dead_letters) == {m_key(m) for m in poison}
    for message in poison:
        letter = result.dead_letters[m_key(message)]
        assert letter.error_class is ErrorClass.INVALID_EVENT
        assert letter.event_id is None and letter.positions == (pos(message),)
    assert "not UTF-8" in result.dead_letters[m_key(junk)].reason
    assert "malformed JSON" in result.dead_letters[m_key(malformed)].reason
    assert "does not match the event's key 'U3'" in result.dead_letters[m_key(wrong_key)].reason
    assert "data.currency" in result.dead_letters[m_key(incomplete)].reason
    assert result.fates == {"e1": Fate.APPLIED}
    assert result.counts == Counts(messages=7, invalid=6, valid=1, events=1)


def test_the_same_poison_twice_is_one_dead_letter_with_both_positions() -> None:
    topic = Topic()
    first = topic.raw(b"not json", key=b"k", partition=0)
    again = topic.raw(b"not json", key=b"k", partition=2)
    other_key = topic.raw(b"not json", key=b"j", partition=2)

    result = topic.fold()

    assert m_key(first) == m_key(again) != m_key(other_key)
    assert result.dead_letters[m_key(first)].positions == (PartitionOffset(0, 0),
                                                           PartitionOffset(2, 0))
    assert result.dead_letters[m_key(other_key)].positions == (PartitionOffset(2, 1),)
    assert result.counts == Counts(messages=3, invalid=3)


def test_each_offset_kafka_cannot_hand_over_is_a_dead_letter_of_its_own() -> None:
    topic = Topic()
    topic.raw(b"not json", key=b"k")
    for offset in (1, 2):
        topic.messages.append(TopicMessage(
            0, offset, None, None, None,
            (position_fingerprint("t", "id", 0, offset), "its record batch cannot be read")))

    result = topic.fold()

    unreadable = {key: letter for key, letter in result.dead_letters.items()
                  if letter.error_class is ErrorClass.UNREADABLE_MESSAGE}
    assert sorted(letter.positions for letter in unreadable.values()) == [
        (PartitionOffset(0, 1),), (PartitionOffset(0, 2),)]
    assert set(unreadable) == {f"u:{position_fingerprint('t', 'id', 0, o)}" for o in (1, 2)}
    assert result.counts == Counts(messages=3, invalid=3)


def test_a_future_occurred_at_is_judged_against_the_kafka_timestamp() -> None:
    topic = Topic()
    sample = user_created("U1", email="a@x.io", name="Ada", occurred_at=at(9, 6), event_id="e1")
    too_early = topic.add(sample, timestamp=at(9))  # 6 minutes ahead of the message: invalid
    in_time = topic.add(sample, timestamp=at(9, 1))  # 5 minutes ahead: within the tolerance
    topic.add(sample, timestamp=None)  # no timestamp: nothing to judge against

    result = topic.fold()

    assert m_key(too_early) == m_key(in_time)  # same bytes, yet only one copy is poison
    assert result.dead_letters == {
        m_key(too_early): ExpectedDeadLetter(
            m_key(too_early), ErrorClass.INVALID_EVENT, None, (pos(too_early),),
            result.dead_letters[m_key(too_early)].reason),
    }
    assert "occurredAt" in result.dead_letters[m_key(too_early)].reason
    assert result.users == {"U1": UserRow("a@x.io", "Ada", at(9, 6))}
    assert result.counts == Counts(messages=3, invalid=1, valid=2, events=1, duplicates=1)
    # Without a tolerance nothing is judged as future.
    assert fold(topic.messages).dead_letters == {}


# Rule 2: event identity.


def test_duplicates_are_one_event_wherever_they_sit() -> None:
    topic = Topic()
    sample = inventory_adjusted("SKU-1", 5, occurred_at=at(9), event_id="e1")
    topic.add(sample, partition=0)
    topic.add(sample, partition=0)
    topic.add(sample, partition=3)

    result = topic.fold()

    assert result.inventory == {"SKU-1": InventoryRow(5, at(9))}
    assert result.dead_letters == {} and result.ambiguous == ()
    assert result.counts == Counts(messages=3, valid=3, events=1, duplicates=2)


def test_an_id_reused_in_one_partition_keeps_the_lowest_offset() -> None:
    topic = Topic()
    first = topic.add(user_created("U1", email="a@x.io", name="Ada", occurred_at=at(9),
                                   event_id="e1"))
    reused = topic.add(user_created("U2", email="b@x.io", name="Bob", occurred_at=at(10),
                                    event_id="e1"))
    reused_again = topic.add(user_created("U2", email="b@x.io", name="Bob", occurred_at=at(10),
                                          event_id="e1"))

    result = topic.fold()

    assert result.users == {"U1": UserRow("a@x.io", "Ada", at(9))}
    assert result.dead_letters == {
        e_key(reused): ExpectedDeadLetter(
            e_key(reused), ErrorClass.ID_REUSED, "e1", (pos(reused), pos(reused_again)),
            "eventId 'e1' was first used by a different event, at partition 0 offset 0 "
            f"(fingerprint {e_key(first)[2:]})"),
    }
    assert result.current == {Entity(EntityKind.USER, "U1"): "e1"}
    assert result.counts == Counts(messages=3, valid=3, events=1, id_reused=2)


def test_an_id_reused_across_event_types_applies_only_the_first() -> None:
    topic = Topic()
    topic.add(inventory_adjusted("SKU-1", 2, occurred_at=at(8), event_id="e1"), partition=1)
    stock = topic.add(inventory_adjusted("SKU-1", 7, occurred_at=at(9), event_id="e1"),
                      partition=1)
    topic.add(user_created("U1", occurred_at=at(9), event_id="e2"), partition=1)
    user = topic.add(user_created("U1", occurred_at=at(9), event_id="e2", name="Other"),
                     partition=1)

    result = topic.fold()

    assert result.inventory == {"SKU-1": InventoryRow(2, at(8))}
    assert {k: d.error_class for k, d in result.dead_letters.items()} == {
        e_key(stock): ErrorClass.ID_REUSED, e_key(user): ErrorClass.ID_REUSED}
    assert result.users == {"U1": UserRow("u1@example.com", "Ada Lovelace", at(9))}


def test_an_id_whose_first_copy_depends_on_the_partition_is_reported_ambiguous() -> None:
    topic = Topic()
    left = topic.add(inventory_adjusted("SKU-1", 1, occurred_at=at(9), event_id="e1"),
                     partition=1)
    right = topic.add(inventory_adjusted("SKU-1", 100, occurred_at=at(9), event_id="e1"),
                      partition=0)

    result = topic.fold()

    # The fold stands in partition 0 for "arrived first" and says so.
    assert result.inventory == {"SKU-1": InventoryRow(100, at(9))}
    assert result.ambiguous == (AmbiguousId(
        "e1", e_key(right)[2:], tuple(sorted((e_key(left)[2:], e_key(right)[2:]))),
        (pos(right), pos(left))),)
    assert set(result.dead_letters) == {e_key(left)}
    assert result.dead_letters[e_key(left)].error_class is ErrorClass.ID_REUSED


def test_an_ambiguous_id_takes_the_copy_that_arrived_first_when_it_could_have() -> None:
    topic = Topic()
    left = topic.add(inventory_adjusted("SKU-1", 1, occurred_at=at(9), event_id="e1"),
                     partition=1)
    right = topic.add(inventory_adjusted("SKU-1", 100, occurred_at=at(9), event_id="e1"),
                      partition=0)
    asked: list[list[str]] = []

    def arrived(ids: Collection[str]) -> dict[str, str]:
        asked.append(sorted(ids))
        return {"e1": e_key(left)[2:]}

    result = fold(topic.messages, max_future=TOLERANCE, arrived_first=arrived)

    assert asked == [["e1"]]
    assert result.inventory == {"SKU-1": InventoryRow(1, at(9))}
    assert set(result.dead_letters) == {e_key(right)}
    # A fingerprint no copy has is not taken.
    result = fold(topic.messages, max_future=TOLERANCE, arrived_first=lambda _: {"e1": "x"})
    assert result.inventory == {"SKU-1": InventoryRow(100, at(9))}


def test_a_later_copy_applied_first_under_faults_is_taken_and_reported() -> None:
    """A partition's batches applied out of order (a redelivery overtaking a stalled worker):
    the later copy of a reused id was the one applied."""
    topic = Topic()
    first = topic.add(inventory_adjusted("SKU-1", 1, occurred_at=at(9), event_id="e1"))
    later = topic.add(inventory_adjusted("SKU-1", 100, occurred_at=at(9), event_id="e1"))

    result = fold(topic.messages, max_future=TOLERANCE,
                  arrived_first=lambda _: {"e1": e_key(later)[2:]})

    assert result.inventory == {"SKU-1": InventoryRow(100, at(9))}
    assert set(result.dead_letters) == {e_key(first)}
    assert [a.event_id for a in result.ambiguous] == ["e1"]
    # Without a record, the calm rule: the lowest offset.
    assert fold(topic.messages, max_future=TOLERANCE).inventory == {
        "SKU-1": InventoryRow(1, at(9))}


def test_partitions_that_agree_on_the_first_copy_are_not_ambiguous() -> None:
    topic = Topic()
    sample = inventory_adjusted("SKU-1", 1, occurred_at=at(9), event_id="e1")
    topic.add(sample, partition=0)
    topic.add(sample, partition=1)
    later = topic.add(inventory_adjusted("SKU-1", 100, occurred_at=at(9), event_id="e1"),
                      partition=1)

    result = topic.fold()

    assert result.ambiguous == ()
    assert result.inventory == {"SKU-1": InventoryRow(1, at(9))}
    assert set(result.dead_letters) == {e_key(later)}
    assert result.counts == Counts(messages=3, valid=3, events=1, duplicates=1, id_reused=1)


# Rule 3: inventory.


def test_inventory_sums_distinct_deltas_and_keeps_the_latest_time() -> None:
    topic = Topic()
    topic.add(inventory_adjusted("SKU-1", 10, occurred_at=at(11), event_id="e1"))
    topic.add(inventory_adjusted("SKU-1", -3, occurred_at=at(9), event_id="e2"), partition=1)
    topic.add(inventory_adjusted("SKU-1", -3, occurred_at=at(9), event_id="e2"), partition=1)
    topic.add(inventory_adjusted("SKU-1", -4, occurred_at=at(10), event_id="e3"))
    topic.add(inventory_adjusted("SKU-2", -1, occurred_at=at(8), event_id="e4"))

    result = topic.fold()

    assert result.inventory == {"SKU-1": InventoryRow(3, at(11)),
                                "SKU-2": InventoryRow(-1, at(8))}
    assert result.fates == dict.fromkeys(("e1", "e2", "e3", "e4"), Fate.APPLIED)
    assert result.counts.stale == 0


# Rule 4: the newest version is current, the others are stale.


def test_the_newest_version_wins_whatever_its_offset() -> None:
    topic = Topic()
    topic.add(user_created("U1", email="new@x.io", name="New", occurred_at=at(10),
                           event_id="e2"))
    topic.add(user_created("U1", email="old@x.io", name="Old", occurred_at=at(9),
                           event_id="e1"))

    result = topic.fold()

    assert result.users == {"U1": UserRow("new@x.io", "New", at(10))}
    assert result.current == {Entity(EntityKind.USER, "U1"): "e2"}
    assert result.fates == {"e1": Fate.STALE, "e2": Fate.APPLIED}
    assert result.dead_letters == {}
    assert result.counts.stale == 1


def test_equal_times_are_ordered_by_event_id_code_points() -> None:
    topic = Topic()
    # By code point "a" (97) > "Z" (90); a case-insensitive collation would say otherwise.
    topic.add(order_placed("O1", "U1", currency="USD", occurred_at=at(9), event_id="a"))
    topic.add(order_placed("O1", "U1", currency="GBP", occurred_at=at(9), event_id="Z"))
    topic.add(user_created("U1", occurred_at=at(8), event_id="u"))

    result = topic.fold()

    assert result.orders["O1"].currency == "USD"
    assert result.fates == {"a": Fate.APPLIED, "Z": Fate.STALE, "u": Fate.APPLIED}


# Rule 5: visibility.


def test_an_email_belongs_to_its_earliest_claimant_not_its_first_arrival() -> None:
    topic = Topic()
    # U1 claims a@x at 09:00 and arrives first; U2 claims a@x at 08:00 → U2 wins.
    late = topic.add(user_created("U1", email="a@x.io", name="One", occurred_at=at(9),
                                  event_id="e1"), partition=0)
    topic.add(user_created("U2", email="A@X.io", name="Two", occurred_at=at(8),
                           event_id="e2"), partition=1)

    result = topic.fold()

    assert result.users == {"U2": UserRow("a@x.io", "Two", at(8))}
    assert result.dead_letters == {
        e_key(late): ExpectedDeadLetter(
            e_key(late), ErrorClass.EMAIL_TAKEN, "e1", (pos(late),),
            "email 'a@x.io' belongs to user 'U2', whose claim (2024-05-01T08:00:00.000Z, e2) is "
            "earlier than this one (2024-05-01T09:00:00.000Z, e1)"),
    }
    assert result.fates == {"e1": Fate.HELD, "e2": Fate.APPLIED}
    assert result.current == {Entity(EntityKind.USER, "U1"): "e1",
                              Entity(EntityKind.USER, "U2"): "e2"}
    assert result.counts.held == 1


def test_a_claim_at_the_same_time_goes_to_the_lower_event_id() -> None:
    topic = Topic()
    topic.add(user_created("U1", email="a@x.io", occurred_at=at(9), event_id="e2"))
    loser = topic.add(user_created("U2", email="a@x.io", occurred_at=at(9), event_id="e3"))
    topic.add(user_created("U3", email="a@x.io", occurred_at=at(9), event_id="e1"))

    result = topic.fold()

    assert set(result.users) == {"U3"}
    assert result.dead_letters[e_key(loser)].reason.startswith(
        "email 'a@x.io' belongs to user 'U3'")
    assert {d.event_id for d in result.dead_letters.values()} == {"e2", "e3"}


def test_an_email_left_behind_is_free_for_a_later_claimant() -> None:
    topic = Topic()
    # U1 moves from a@x to b@x; U2 claims a@x later → both visible.
    topic.add(user_created("U1", email="a@x.io", name="One", occurred_at=at(8), event_id="e1"))
    topic.add(user_created("U2", email="a@x.io", name="Two", occurred_at=at(9), event_id="e2"),
              partition=1)
    topic.add(user_created("U1", email="b@x.io", name="One", occurred_at=at(10),
                           event_id="e3"))

    result = topic.fold()

    assert result.users == {"U1": UserRow("b@x.io", "One", at(10)),
                            "U2": UserRow("a@x.io", "Two", at(9))}
    assert result.dead_letters == {}
    assert result.fates == {"e1": Fate.STALE, "e2": Fate.APPLIED, "e3": Fate.APPLIED}


def test_a_displaced_user_takes_its_orders_and_payments_out_of_the_read_model() -> None:
    topic = Topic()
    topic.add(user_created("U1", email="a@x.io", occurred_at=at(9), event_id="u1"))
    topic.add(user_created("U2", email="a@x.io", occurred_at=at(8), event_id="u2"), partition=1)
    order = topic.add(order_placed("O1", "U1", occurred_at=at(9, 30), event_id="o1"))
    payment = topic.add(payment_settled("P1", "O1", "10.00", occurred_at=at(9, 40),
                                        event_id="p1"))

    result = topic.fold()

    assert result.users.keys() == {"U2"} and result.orders == {} and result.payments == {}
    assert {k: (d.error_class, d.reason) for k, d in result.dead_letters.items()
            if k != e_key(topic.messages[0])} == {
        e_key(order): (ErrorClass.MISSING_PARENT,
                       "user 'U1' is not in the read model (its email is taken)"),
        e_key(payment): (ErrorClass.MISSING_PARENT,
                         "order 'O1' is not in the read model (its user is not)"),
    }
    assert result.dead_letters[e_key(order)].parks


def test_children_before_their_parents_are_visible() -> None:
    topic = Topic()
    # Payment before its order, order before its user, on one partition and across partitions.
    topic.add(payment_settled("P1", "O1", "25.00", currency="EUR", occurred_at=at(9, 2),
                              event_id="p1"))
    topic.add(order_placed("O1", "U1", items=[("SKU-2", 2, "10.00"), ("SKU-1", 1, "5.00")],
                           currency="EUR", occurred_at=at(9, 1), event_id="o1"), partition=1)
    topic.add(user_created("U1", email="a@x.io", name="Ada", occurred_at=at(9), event_id="u1"),
              partition=2)

    result = topic.fold()

    assert result.users == {"U1": UserRow("a@x.io", "Ada", at(9))}
    assert result.orders == {"O1": OrderRow(
        "U1", Decimal("25.00"), "EUR", at(9, 1),
        (ItemRow("SKU-2", 2, Decimal("10.00")), ItemRow("SKU-1", 1, Decimal("5.00"))))}
    assert result.payments == {"P1": PaymentRow("O1", Decimal("25.00"), "EUR", at(9, 2))}
    assert result.dead_letters == {}
    assert result.fates == {"p1": Fate.APPLIED, "o1": Fate.APPLIED, "u1": Fate.APPLIED}


def test_an_order_whose_newest_version_names_a_missing_user_is_held() -> None:
    topic = Topic()
    topic.add(user_created("U1", occurred_at=at(8), event_id="u1"))
    topic.add(order_placed("O1", "U1", occurred_at=at(9), event_id="o1"))
    newest = topic.add(order_placed("O1", "U9", occurred_at=at(10), event_id="o2"))
    payment = topic.add(payment_settled("P1", "O1", "10.00", occurred_at=at(11),
                                        event_id="p1"))
    orphan = topic.add(payment_settled("P2", "O7", "10.00", occurred_at=at(11), event_id="p2"))

    result = topic.fold()

    assert result.orders == {} and result.payments == {}
    assert result.fates == {"u1": Fate.APPLIED, "o1": Fate.STALE, "o2": Fate.HELD,
                            "p1": Fate.HELD, "p2": Fate.HELD}
    assert result.dead_letters == {
        e_key(newest): ExpectedDeadLetter(e_key(newest), ErrorClass.MISSING_PARENT, "o2",
                                          (pos(newest),), "user 'U9' does not exist"),
        e_key(payment): ExpectedDeadLetter(
            e_key(payment), ErrorClass.MISSING_PARENT, "p1", (pos(payment),),
            "order 'O1' is not in the read model (its user is not)"),
        e_key(orphan): ExpectedDeadLetter(e_key(orphan), ErrorClass.MISSING_PARENT, "p2",
                                          (pos(orphan),), "order 'O7' does not exist"),
    }


def test_a_currency_change_turns_a_payment_into_a_mismatch_and_back() -> None:
    topic = Topic()
    topic.add(user_created("U1", occurred_at=at(8), event_id="u1"))
    topic.add(order_placed("O1", "U1", currency="EUR", occurred_at=at(9), event_id="o1"))
    payment = topic.add(payment_settled("P1", "O1", "10.00", currency="EUR",
                                        occurred_at=at(9, 30), event_id="p1"))
    topic.add(payment_settled("P1", "O1", "10.00", currency="EUR", occurred_at=at(9, 30),
                              event_id="p1"), partition=1)
    topic.add(order_placed("O1", "U1", currency="USD", occurred_at=at(10),
                                 event_id="o2"))

    result = topic.fold()

    assert result.orders["O1"].currency == "USD" and result.payments == {}
    assert result.dead_letters == {
        e_key(payment): ExpectedDeadLetter(
            e_key(payment), ErrorClass.CURRENCY_MISMATCH, "p1",
            (PartitionOffset(0, 2), PartitionOffset(1, 0)),
            "payment in EUR for order 'O1', which is in USD"),
    }
    assert not result.dead_letters[e_key(payment)].parks

    # A later version back in EUR makes the payment visible again by itself.
    topic.add(order_placed("O1", "U1", currency="EUR", occurred_at=at(11), event_id="o3"))
    result = topic.fold()
    assert result.payments == {"P1": PaymentRow("O1", Decimal("10.00"), "EUR", at(9, 30))}
    assert result.dead_letters == {}
    assert result.fates["o2"] is Fate.STALE


def test_a_payment_follows_its_newest_version_and_an_order_its_newest_user() -> None:
    topic = Topic()
    topic.add(user_created("U1", email="a@x.io", occurred_at=at(8), event_id="u1"))
    topic.add(order_placed("O1", "U1", occurred_at=at(9), event_id="o1"))
    topic.add(order_placed("O2", "U1", occurred_at=at(9), event_id="o2"))
    moved = topic.add(order_placed("O1", "U5", occurred_at=at(10), event_id="o3"))
    topic.add(payment_settled("P1", "O1", "10.00", occurred_at=at(9, 30), event_id="p1"))
    topic.add(payment_settled("P1", "O2", "10.00", occurred_at=at(10, 30), event_id="p2"))

    result = topic.fold()

    assert set(result.orders) == {"O2"}
    assert result.payments == {"P1": PaymentRow("O2", Decimal("10.00"), "EUR", at(10, 30))}
    assert set(result.dead_letters) == {e_key(moved)}
    assert result.fates["p1"] is Fate.STALE


def test_a_whole_stream_folds_to_its_literal_result() -> None:
    topic = Topic()
    topic.add(user_created("U1", email="ada@x.io", name="Ada", occurred_at=at(9),
                           event_id="u1"), partition=0)
    topic.add(order_placed("O1", "U1", items=[("SKU-1", 3, "2.50")], currency="GBP",
                           occurred_at=at(9, 5), event_id="o1"), partition=1)
    topic.add(payment_settled("P1", "O1", "7.50", currency="GBP", occurred_at=at(9, 10),
                              event_id="p1"), partition=1)
    topic.add(inventory_adjusted("SKU-1", -3, occurred_at=at(9, 6), event_id="i1"),
              partition=2)
    poison = topic.raw(b"{}", key=None, partition=2)

    result = topic.fold()

    assert result.users == {"U1": UserRow("ada@x.io", "Ada", at(9))}
    assert result.orders == {"O1": OrderRow("U1", Decimal("7.50"), "GBP", at(9, 5),
                                            (ItemRow("SKU-1", 3, Decimal("2.50")),))}
    assert result.payments == {"P1": PaymentRow("O1", Decimal("7.50"), "GBP", at(9, 10))}
    assert result.inventory == {"SKU-1": InventoryRow(-3, at(9, 6))}
    assert result.dead_letters == {m_key(poison): ExpectedDeadLetter(
        m_key(poison), ErrorClass.INVALID_EVENT, None, (PartitionOffset(2, 1),),
        "eventId: is required")}
    assert result.current == {Entity(EntityKind.USER, "U1"): "u1",
                              Entity(EntityKind.ORDER, "O1"): "o1",
                              Entity(EntityKind.PAYMENT, "P1"): "p1"}
    assert result.counts == Counts(messages=5, invalid=1, valid=4, events=4)


def test_nothing_folds_to_nothing() -> None:
    result = fold([])
    assert result.users == {} and result.dead_letters == {} and result.ambiguous == ()
    assert result.counts == Counts()
