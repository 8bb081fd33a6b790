"""Realistic event streams with the imperfections the pipeline must absorb, decided purely.

`plan_stream` returns the messages to send, in order, and what they contain: a story of
users, orders, payments and stock moves, some held back and sent later (out of order), some
sent twice (duplicates), and some poison (malformed, invalid or unknown) that must end in
the dead-letter queue.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field

from eventpipe.samples import Story, encode, user_created

_POISON_KINDS = ("malformed", "invalid", "unknown-type")


@dataclass(frozen=True, slots=True)
class Planned:
    key: bytes | None
    value: bytes
    kind: str  # an event type, "duplicate", or "poison:<why>"


@dataclass(slots=True)
class Plan:
    messages: list[Planned] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)


def _poison(rng: random.Random, serial: int) -> Planned:
    kind = rng.choice(_POISON_KINDS)
    if kind == "malformed":
        return Planned(b"poison", b'{"eventId": "broken-' + str(serial).encode() + b'", ',
                       "poison:malformed")
    key, doc = user_created(f"poison-{serial}", email="not-an-email")
    if kind == "unknown-type":
        doc["eventType"] = "OrderShipped"
    return Planned(key.encode(), encode(doc), f"poison:{kind}")


def plan_stream(
    count: int, *, duplicates: float = 0.0, out_of_order: float = 0.0, poison: float = 0.0,
    seed: int | None = None,
) -> Plan:
    """`count` messages; the ratios are probabilities per message, from 0 to 1."""
    for name, ratio in (("duplicates", duplicates), ("out-of-order", out_of_order),
                        ("poison", poison)):
        if not 0 <= ratio <= 1:
            raise ValueError(f"--{name} must be between 0 and 1, got {ratio}")
    rng = random.Random(seed)
    story = Story(seed=rng.randrange(2**32))
    plan = Plan()
    sent: list[Planned] = []
    held: list[tuple[int, Planned]] = []  # (release at, message)
    while len(plan.messages) < count:
        position = len(plan.messages)
        due = [m for at, m in held if at <= position]
        held = [(at, m) for at, m in held if at > position]
        for message in due[: count - position]:
            plan.messages.append(message)
        if len(plan.messages) >= count:
            break
        roll = rng.random()
        if roll < poison:
            message = _poison(rng, position)
        elif roll < poison + duplicates and sent:
            original = rng.choice(sent[-500:])
            message = Planned(original.key, original.value, "duplicate")
        else:
            key, doc = story.next()
            message = Planned(key.encode(), encode(doc), doc["eventType"])
            sent.append(message)
            if rng.random() < out_of_order:
                held.append((position + rng.randint(2, 50), message))
                continue
        plan.messages.append(message)
    plan.messages.extend(m for _, m in held[: max(0, count - len(plan.messages))])
    for message in plan.messages:
        plan.counts[message.kind] += 1
    return plan


def describe(message: Planned) -> str:
    try:
        document = json.loads(message.value)
        return f"{document.get('eventType')} {document.get('eventId')}"
    except ValueError:
        return "malformed bytes"
