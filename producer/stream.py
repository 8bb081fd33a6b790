"""Realistic event streams with the imperfections the pipeline must absorb, decided purely.

`plan_stream` returns the messages to send, in order, and what they contain: a story of
users, orders, payments and stock moves, some held back and sent later (out of order), some
sent twice (duplicates), and some poison (`POISON_KINDS`: hostile bytes, every contract rule
broken, cross-key rejections) that must end in the dead-letter queue.
"""

from __future__ import annotations

import json
import random
import uuid
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from eventpipe.samples import Story, encode, iso, order_placed, user_created

# Every kind of message the pipeline must dead-letter rather than choke on: bytes that are not
# JSON, JSON that is not an event, events the contract refuses (each rule, including the ones
# that guard what the databases can store), and events the cross-key rules reject.
POISON_KINDS = ("malformed", "not-utf8", "random-bytes", "random-json", "deep-nesting",
                "invalid-email", "unknown-type", "wrong-key", "time-overflow", "far-future",
                "nul-text", "lone-surrogate", "astral-id", "quantity-overflow", "orphan-order",
                "email-clash", "reused-id")

# Duplicates and the poison that reuses an event draw on this many of the latest events.
RECENT = 500
# The story starts a second per message before now, so that it ends in the past: 32 years
# back at most.
MAX_COUNT = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Planned:
    key: bytes | None
    value: bytes
    kind: str  # an event type, "duplicate", or "poison:<why>"


@dataclass(slots=True)
class Plan:
    messages: list[Planned] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)


def _poison(rng: random.Random, serial: int, sent: deque[Planned], now: datetime) -> Planned:
    kind = rng.choice(POISON_KINDS)
    name = f"poison-{serial}"
    # Ids and times from the seed and the stream's clock: the same stream, the same poison.
    event_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    key, doc = user_created(name, email=f"{name}@example.com", event_id=event_id,
                            occurred_at=now)
    data = doc["data"]
    if kind == "malformed":
        return Planned(b"poison", b'{"eventId": "broken-' + str(serial).encode() + b'", ',
                       "poison:malformed")
    if kind == "not-utf8":
        return Planned(b"poison", b"\xff\xfe" + rng.randbytes(rng.randint(0, 64)),
                       "poison:not-utf8")
    if kind == "random-bytes":
        return Planned(rng.randbytes(rng.randint(0, 16)) or None,
                       rng.randbytes(rng.randint(1, 256)), "poison:random-bytes")
    if kind == "random-json":
        return Planned(b"poison", json.dumps(_random_json(rng, 4)).encode(), "poison:random-json")
    if kind == "deep-nesting":
        depth = rng.randint(10_000, 200_000)
        return Planned(b"poison", b"[" * depth + b"]" * depth, "poison:deep-nesting")
    if kind == "invalid-email":
        data["email"] = "not-an-email"
    elif kind == "unknown-type":
        doc["eventType"] = "OrderShipped"
    elif kind == "wrong-key":
        key = f"not-{name}"
    elif kind == "time-overflow":
        doc["occurredAt"] = rng.choice(["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-01:00"])
    elif kind == "far-future":
        doc["occurredAt"] = iso(now + timedelta(days=rng.randint(1, 3000)))
    elif kind == "nul-text":
        data["name"] = "Ada\x00Lovelace"
    elif kind == "lone-surrogate":
        data["name"] = "Ada \ud800"
    elif kind == "astral-id":
        data["userId"] = key = "\U0001f600" * 64
    elif kind == "quantity-overflow":
        key, doc = order_placed(f"order-{name}", name, items=[("SKU-0001", 2**31, "1.00")],
                                event_id=event_id, occurred_at=now)
    elif kind == "orphan-order":  # its user never comes: dead-lettered after the parking time
        key, doc = order_placed(f"order-{name}", f"user-that-never-exists-{serial}",
                                event_id=event_id, occurred_at=now)
    elif kind == "email-clash":  # a later claim of an email already taken
        users = [m for m in sent if m.kind == "UserCreated"]
        data["email"] = json.loads(rng.choice(users).value)["data"]["email"] if users \
            else "not-an-email"
    elif kind == "reused-id" and sent:  # an eventId sent again with another payload
        original = rng.choice(sent)
        doc = json.loads(original.value)
        changed = datetime.fromisoformat(doc["occurredAt"]) + timedelta(milliseconds=1)
        doc["occurredAt"] = iso(changed)
        return Planned(original.key, encode(doc), "poison:reused-id")
    elif kind == "reused-id":
        doc["eventId"] = ""
    return Planned(key.encode(), encode(doc), f"poison:{kind}")


def _random_json(rng: random.Random, depth: int) -> Any:
    roll = rng.random()
    if depth == 0 or roll < 0.4:
        return rng.choice([None, True, 0, -1, 2**70, 1.5, "", "x" * rng.randint(1, 40)])
    if roll < 0.7:
        return [_random_json(rng, depth - 1) for _ in range(rng.randint(0, 4))]
    keys = ["eventId", "eventType", "data", "occurredAt", "schemaVersion", "k"]
    return {rng.choice(keys): _random_json(rng, depth - 1) for _ in range(rng.randint(0, 5))}


def plan_stream(
    count: int, *, duplicates: float = 0.0, out_of_order: float = 0.0, poison: float = 0.0,
    seed: int | None = None, now: datetime | None = None,
) -> Plan:
    """The whole of `generate`'s stream, in memory, with its counts by kind."""
    plan = Plan(list(generate(count, duplicates=duplicates, out_of_order=out_of_order,
                              poison=poison, seed=seed, now=now)))
    plan.counts.update(message.kind for message in plan.messages)
    return plan


def generate(
    count: int, *, duplicates: float = 0.0, out_of_order: float = 0.0, poison: float = 0.0,
    seed: int | None = None, now: datetime | None = None,
) -> Iterator[Planned]:
    """`count` messages, made as they are taken: memory stays bounded however many are asked.
    The ratios are probabilities per message, from 0 to 1; the same `seed` and `now` give the
    same messages."""
    for name, ratio in (("duplicates", duplicates), ("out-of-order", out_of_order),
                        ("poison", poison)):
        if not 0 <= ratio <= 1:
            raise ValueError(f"--{name} must be between 0 and 1, got {ratio}")
    if count > MAX_COUNT:
        raise ValueError(f"--count must be at most {MAX_COUNT:,}, got {count:,}")
    return _generate(count, duplicates, out_of_order, poison, random.Random(seed),
                     now or datetime.now(UTC))


def _generate(count: int, duplicates: float, out_of_order: float, poison: float,
              rng: random.Random, now: datetime) -> Iterator[Planned]:
    # Events are about a second apart at most: the story ends before now, so no valid event
    # is in the future of its Kafka timestamp however long the stream.
    story = Story(seed=rng.randrange(2**32), start=now - timedelta(hours=1, seconds=count))
    recent: deque[Planned] = deque(maxlen=RECENT)  # what duplicates and poison draw on
    held: list[tuple[int, Planned]] = []  # (release at, message)
    sent = 0
    while sent < count:
        position = sent
        due = [m for at, m in held if at <= position]
        held = [(at, m) for at, m in held if at > position]
        for message in due[: count - sent]:
            yield message
            sent += 1
        if sent >= count:
            return
        roll = rng.random()
        if roll < poison:
            message = _poison(rng, position, recent, now)
        elif roll < poison + duplicates and recent:
            original = rng.choice(recent)
            message = Planned(original.key, original.value, "duplicate")
        else:
            key, doc = story.next()
            message = Planned(key.encode(), encode(doc), doc["eventType"])
            recent.append(message)
            if rng.random() < out_of_order:
                held.append((position + rng.randint(2, 50), message))
                continue
        yield message
        sent += 1


def tally(messages: Iterable[Planned], counts: Counter[str]) -> Iterator[Planned]:
    """`messages` as they are taken, each counted by kind into `counts`."""
    for message in messages:
        counts[message.kind] += 1
        yield message


def describe(message: Planned) -> str:
    try:
        document = json.loads(message.value)
        return f"{document.get('eventType')} {document.get('eventId')}"
    except ValueError:
        return "malformed bytes"
