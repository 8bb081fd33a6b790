"""How many messages per second `parse_event` turns into validated events."""

from __future__ import annotations

import time

from eventpipe.events import parse_event
from eventpipe.samples import Story, encode


def run(count: int = 50_000) -> None:
    story = Story(seed=1)
    messages = [(key.encode(), encode(doc)) for key, doc in (story.next() for _ in range(count))]
    for value_key in messages[:1000]:
        parse_event(value_key[1], value_key[0])
    started = time.perf_counter()
    for key, value in messages:
        parse_event(value, key)
    elapsed = time.perf_counter() - started
    size = sum(len(v) for _, v in messages) / count
    print(f"validate: {count / elapsed:,.0f} events/s ({elapsed / count * 1e6:.1f} µs/event, "
          f"mean message {size:.0f} B, mixed types)")
