"""`eventpipe up --demo`: send a realistic stream, wait until it is applied, show the API."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from eventpipe import redis_clients
from eventpipe.database import make_engine, reading
from eventpipe.dlq import records
from eventpipe.dlq.stream import DeadLetterStream
from eventpipe.kafka import make_producer, reader_config
from eventpipe.progress import ProgressBar
from eventpipe.settings import Settings
from producer.publish import publish
from producer.stream import plan_stream

DEMO_EVENTS = 600
DRAIN_TIMEOUT_S = 120.0
PROJECTED_TIMEOUT_S = 15.0


def run_demo(settings: Settings, check: Callable[[], None], reach: str = "") -> None:
    """`reach`: what a command in another shell needs before it to reach this pipeline
    (`Stack.exports`), as `VAR=value … `."""
    # Events of their own at each run: a database kept from an earlier run holds the ids of
    # its events, with payloads of another time, which would all be ids reused.
    plan = plan_stream(DEMO_EVENTS, duplicates=0.05, out_of_order=0.05, poison=0.01)
    print(f"demo: sending {len(plan.messages)} events "
          f"({', '.join(f'{n} {k}' for k, n in sorted(plan.counts.items()))})")
    sent = publish(make_producer(settings), settings.kafka_topic, plan.messages,
                   total=len(plan.messages), progress=False)
    print(f"demo: {sent.delivered} acknowledged by Kafka; waiting until all are done")
    _wait_drained(settings, sent.ends, check)
    documents = [json.loads(m.value) for m in plan.messages if not m.kind.startswith("poison")]
    base = f"http://{settings.web_host}:{settings.web_port}"
    user_id, order_id, sku = _examples(documents)
    for path in (f"/users/{user_id}", f"/orders/{order_id}", f"/inventory/{sku}"):
        print(f"\nGET {base}{path}")
        print(json.dumps(_get(base + path), indent=2))
    left = _wait_projected(settings, check)
    client = redis_clients.operator(settings.redis_url)
    depth = DeadLetterStream(client, settings.dlq_stream, settings.dlq_max_entries,
                             settings.dlq_max_bytes).depth()
    client.close()
    poison = sum(n for kind, n in plan.counts.items() if kind.startswith("poison"))
    print(f"\ndemo: {poison} poison message(s) sent; {depth} in the dead-letter queue"
          f"{f' ({left} more on their way to it)' if left else ''}: "
          f"`{reach}eventpipe dlq list`")
    print(f"demo: a user to look at: {base}/users/{user_id}\n")


def _wait_projected(settings: Settings, check: Callable[[], None]) -> int:
    """Wait until the DLQ stream shows every dead letter SQL holds; how many it does not yet,
    after `PROJECTED_TIMEOUT_S`. A batch's dead letters are written with its fates, and so
    its offsets may be committed before the workers' projection puts them in the stream (a
    second or so later): read at once, the stream's depth could say none."""
    engine = make_engine(settings, writer=False)

    def unprojected() -> int:
        with reading(engine) as conn:
            return records.count_unprojected(conn)

    try:
        return until_none_left(unprojected, check, PROJECTED_TIMEOUT_S)
    finally:
        engine.dispose()


def until_none_left(left: Callable[[], int], check: Callable[[], None], timeout_s: float, *,
                    clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], None] = time.sleep) -> int:
    """Ask `left` until it says 0 or `timeout_s` passed, `check`ing between; its last answer."""
    deadline = clock() + timeout_s
    while True:
        check()
        found = left()
        if found == 0 or clock() >= deadline:
            return found
        sleep(0.2)


def _wait_drained(settings: Settings, ends: dict[int, int], check: Callable[[], None]) -> None:
    consumer = Consumer(reader_config(settings, **{
        "group.id": settings.kafka_group_id, "enable.auto.commit": False}))
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    bar = ProgressBar("demo: done", sum(ends.values()), "events")
    try:
        while True:
            check()
            found = consumer.committed([TopicPartition(settings.kafka_topic, p) for p in ends],
                                       timeout=5)
            behind = sum(max(0, ends[tp.partition] - max(tp.offset, 0)) for tp in found)
            bar.update(bar.total - behind)
            if behind == 0:
                return
            if time.monotonic() > deadline:
                bar.close()
                print(f"demo: still {behind} events to go after {DRAIN_TIMEOUT_S:.0f}s; "
                      "carrying on")
                return
            time.sleep(0.5)
    finally:
        bar.close()
        consumer.close()


def _examples(documents: list[dict[str, Any]]) -> tuple[str, str, str]:
    """The user with the most orders, one of their orders, the busiest SKU."""
    orders = [d["data"] for d in documents if d["eventType"] == "OrderPlaced"]
    per_user = Counter(o["userId"] for o in orders)
    user_id = per_user.most_common(1)[0][0]
    order_id = next(o["orderId"] for o in reversed(orders) if o["userId"] == user_id)
    skus = Counter(d["data"]["sku"] for d in documents if d["eventType"] == "InventoryAdjusted")
    return user_id, order_id, skus.most_common(1)[0][0]


def _get(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read() or b"{}")
