"""The fault soak: a hostile stream through the whole pipeline while a seeded schedule breaks it.

Real parts throughout (`tests.support.pipeline`): Kafka, the bridge and Celery worker
processes, Redis, PostgreSQL behind a proxy that can be cut. The stream (`producer.stream`)
carries duplicates, events held back and sent late (children before parents) and every kind
of poison in `POISON_KINDS`. Meanwhile, every few seconds, one fault from `FAULTS`:

- kill-worker / kill-bridge: SIGKILL, then a replacement starts;
- stop-worker: SIGSTOP for an outage, then SIGCONT (a stalled, not a dead, worker);
- flush-broker: every task queued in the Celery broker is gone;
- restart-redis: Redis restarts empty (no persistence): broker, offset ledger and DLQ stream;
- cut-database: PostgreSQL unreachable for an outage.

At the end every fault is healed, the pipeline drains, and `eventpipe verify` must find the
database exactly as the topic says: nothing lost, nothing applied twice, the DLQ holding
exactly the poison, no partition stuck, Redis memory within its bound.

    python -m tests.support.soak --seconds 600 --seed 1      # `make soak`
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import cast

from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from eventpipe import readmodel
from eventpipe.dlq.letter import OPEN, WAITING
from eventpipe.tables import dead_letters
from eventpipe.verify import Report, render
from eventpipe.visibility import Version
from producer.stream import POISON_KINDS, plan_stream
from tests.support.broker import running_kafka
from tests.support.databases import drop_database, new_database
from tests.support.pipeline import Pipeline, wait_until
from tests.support.tcp_proxy import TcpProxy

FAULTS = ("kill-worker", "kill-bridge", "stop-worker", "flush-broker", "restart-redis",
          "cut-database")
# Peak memory Redis may use (broker, ledger and DLQ together) for the soak to pass.
REDIS_MEMORY_BOUND = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a run ended with, without the times it happened to apply things at: two runs of
    one stream must end with equal outcomes, whatever their faults."""

    users: dict[str, tuple[object, ...]]  # the shown fields, then the version
    orders: dict[str, tuple[object, ...]]
    payments: dict[str, tuple[object, ...]]
    inventory: dict[str, tuple[int, datetime]]
    # (eventId, or the DLQ key of bytes that are no event; error class)
    dead_letters: frozenset[tuple[str, str]]

    def without(self, event_ids: Collection[str]) -> Outcome:
        """Leave out the entities whose current event is one of `event_ids`: an eventId reused
        with another payload, where which copy wins is a matter of timing (`verify` reports
        them as ambiguous)."""
        def keep(rows: dict[str, tuple[object, ...]]) -> dict[str, tuple[object, ...]]:
            return {key: row for key, row in rows.items()
                    if cast(Version, row[-1])[1] not in event_ids}

        return replace(self, users=keep(self.users), orders=keep(self.orders),
                       payments=keep(self.payments))


@dataclass(frozen=True, slots=True)
class Soak:
    seconds: float
    seed: int
    rate: float = 100.0  # messages per second
    poison: float = 0.01
    duplicates: float = 0.05
    out_of_order: float = 0.05
    fault_every_s: tuple[float, float] = (4.0, 12.0)
    outage_s: tuple[float, float] = (10.0, 30.0)
    workers: int = 2
    drain_timeout_s: float = 600.0
    faults: bool = True  # False: the calm run, to compare with
    now: datetime | None = None  # the stream's clock: the same seed and now, the same stream


@dataclass(slots=True)
class Result:
    messages: int = 0
    poison: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    stuck: dict[int, tuple[int, int]] = field(default_factory=dict)  # partition: (at, end)
    redis_peak_bytes: int = 0
    elapsed_s: float = 0.0
    report: Report = field(default_factory=Report)
    outcome: Outcome | None = None

    @property
    def lost(self) -> int:
        """Events below the commit with no fate, open dead letters the stream lost."""
        return sum(1 for d in self.report.differences
                   if d.what.startswith(("fate of", "DLQ stream entry")) or d.found == "None")

    @property
    def doubled(self) -> int:
        """Effects applied more than once show as stock levels off (the only additive one)."""
        return sum(1 for d in self.report.differences if d.what.startswith("inventory"))

    @property
    def passed(self) -> bool:
        return (self.report.clean and not self.stuck
                and self.redis_peak_bytes <= REDIS_MEMORY_BOUND)

    def summary(self) -> str:
        faults = ", ".join(f"{name} {count}" for name, count in sorted(self.faults.items()))
        return "\n".join([
            f"soak: {self.messages} messages ({self.poison} poison) in {self.elapsed_s:.0f}s; "
            f"faults injected: {sum(self.faults.values())} ({faults or 'none'})",
            f"  lost {self.lost}, doubled {self.doubled}, partitions stuck {len(self.stuck)}"
            + (f" {self.stuck}" if self.stuck else "")
            + f", Redis peak {self.redis_peak_bytes / 2**20:.1f} MiB "
            f"(bound {REDIS_MEMORY_BOUND / 2**20:.0f} MiB)",
            "  " + render(self.report).replace("\n", "\n  "),
            "PASSED" if self.passed else "FAILED",
        ])


def run(soak: Soak, bootstrap: str, log_dir: Path,
        say: Callable[[str], None] = lambda _line: None) -> Result:
    log_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(soak.seed)
    plan = plan_stream(int(soak.rate * soak.seconds), duplicates=soak.duplicates,
                       out_of_order=soak.out_of_order, poison=soak.poison, seed=soak.seed,
                       now=soak.now)
    result = Result(messages=len(plan.messages),
                    poison=sum(n for kind, n in plan.counts.items() if kind.startswith("poison")))
    direct = new_database("eventpipe_soak")
    url = make_url(direct)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    pipeline = Pipeline(
        bootstrap, log_dir, database_url=url.set(host="127.0.0.1", port=proxy.port)
        .render_as_string(hide_password=False),
        # Orphans enter the DLQ within the soak; a message may kill workers a few times.
        PARK_TIMEOUT_S="5", CRASH_MAX_ATTEMPTS="6")
    started = time.monotonic()
    try:
        workers = [_start_worker(pipeline, n, soak.workers) for n in range(soak.workers)]
        bridges = [pipeline.start_bridge(name="bridge-0")]
        sender = _Sender(pipeline, [(m.key, m.value) for m in plan.messages], soak.rate)
        sender.start()
        faults = _Faults(pipeline, proxy, workers, bridges, rng, soak, result, say)
        while sender.is_alive():
            result.redis_peak_bytes = max(result.redis_peak_bytes, _redis_memory(pipeline))
            if soak.faults:
                faults.next()
            else:
                sender.join(1.0)
        sender.join()
        if sender.error is not None:
            raise sender.error
        say(f"all {sender.sent} messages sent; draining")
        result.stuck = _drain(pipeline, sender.sent, soak.drain_timeout_s)
        result.redis_peak_bytes = max(result.redis_peak_bytes, _redis_memory(pipeline))
        # Held events whose parent never comes wait out their parking time, then show.
        wait_until(lambda: _waiting(pipeline) == 0, pipeline.settings.park_timeout_s + 60,
                   "orphans to enter the DLQ")
        result.report = pipeline.verify()
        result.outcome = _outcome(pipeline)
    finally:
        result.elapsed_s = time.monotonic() - started
        pipeline.close()
        proxy.close()
        drop_database(direct)
    return result


class _Sender(threading.Thread):
    """Produces the planned messages at the planned rate, in tenths of a second."""

    def __init__(self, pipeline: Pipeline, messages: list[tuple[bytes | None, bytes]],
                 rate: float) -> None:
        super().__init__(name="soak-sender", daemon=True)
        self.pipeline = pipeline
        self.messages = messages
        self.rate = rate
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        step = max(1, int(self.rate / 10))
        started = time.monotonic()
        try:
            for first in range(0, len(self.messages), step):
                self.sent += self.pipeline.send(self.messages[first:first + step])
                due = started + self.sent / self.rate
                time.sleep(max(0.0, due - time.monotonic()))  # pacing, not synchronisation
        except BaseException as exc:
            self.error = exc


@dataclass(slots=True)
class _Faults:
    pipeline: Pipeline
    proxy: TcpProxy
    workers: list[subprocess.Popen[bytes]]
    bridges: list[subprocess.Popen[bytes]]
    rng: random.Random
    soak: Soak
    result: Result
    say: Callable[[str], None]
    bag: list[str] = field(default_factory=list)

    def next(self) -> None:
        time.sleep(self.rng.uniform(*self.soak.fault_every_s))  # the schedule itself
        if not self.bag:  # every kind once, in a seeded order, then again
            self.bag = self.rng.sample(FAULTS, len(FAULTS))
        fault = self.bag.pop()
        self.say(f"{time.strftime('%H:%M:%S')} fault: {fault}")
        getattr(self, "_" + fault.replace("-", "_"))()
        self.result.faults[fault] += 1

    def _outage(self) -> float:
        return self.rng.uniform(*self.soak.outage_s)

    def _kill_worker(self) -> None:
        index = self.rng.randrange(len(self.workers))
        self.pipeline.stop(self.workers[index], signal.SIGKILL)
        self.workers[index] = _start_worker(self.pipeline, index, len(self.workers))

    def _kill_bridge(self) -> None:
        self.pipeline.stop(self.bridges[-1], signal.SIGKILL)
        self.bridges.append(self.pipeline.start_bridge(name=f"bridge-{len(self.bridges)}"))

    def _stop_worker(self) -> None:
        worker = self.rng.choice(self.workers)
        worker.send_signal(signal.SIGSTOP)
        try:
            time.sleep(self._outage())
        finally:
            worker.send_signal(signal.SIGCONT)

    def _flush_broker(self) -> None:
        self.pipeline.broker.flushdb()

    def _restart_redis(self) -> None:
        self.pipeline.restart_redis()

    def _cut_database(self) -> None:
        self.proxy.cut()
        try:
            time.sleep(self._outage())
        finally:
            self.proxy.restore()


def _start_worker(pipeline: Pipeline, index: int, of: int) -> subprocess.Popen[bytes]:
    """Worker `index` of `of`, each serving its own share of the partitions (as `eventpipe
    worker --processes` deals them), so a partition is applied in order while nothing fails."""
    return pipeline.start_worker(range(index, pipeline.partitions, of), name=f"worker-{index}")


def _drain(pipeline: Pipeline, sent: int, timeout_s: float) -> dict[int, tuple[int, int]]:
    """Wait for every partition's commit to reach its end; the partitions that did not."""
    ends = pipeline.end_offsets()
    assert sum(ends.values()) == sent, f"Kafka holds {sum(ends.values())} of {sent} messages"
    try:
        wait_until(lambda: pipeline.committed_offsets() == ends, timeout_s, "the drain")
    except AssertionError:
        committed = pipeline.committed_offsets()
        return {p: (committed.get(p, 0), end) for p, end in ends.items()
                if committed.get(p, 0) != end}
    return {}


def _outcome(pipeline: Pipeline) -> Outcome:
    with pipeline.engine.connect() as conn:
        model = readmodel.whole(conn)
        letters = frozenset((row.event_id or row.dlq_key, row.error_class) for row in
                            conn.execute(select(dead_letters).where(
                                dead_letters.c.state.in_((OPEN, WAITING)))))
    return Outcome(
        users={k: (r.email, r.name, r.created_at, r.version) for k, r in model.users.items()},
        orders={k: (r.user_id, r.total_amount, r.currency, r.placed_at,
                    tuple(model.items.get(k, ())), r.version) for k, r in model.orders.items()},
        payments={k: (r.order_id, r.amount, r.currency, r.settled_at, r.version)
                  for k, r in model.payments.items()},
        inventory=dict(model.inventory), dead_letters=letters)


def _waiting(pipeline: Pipeline) -> int:
    with pipeline.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(dead_letters)
                                .where(dead_letters.c.state == WAITING)).scalar_one())


def _redis_memory(pipeline: Pipeline) -> int:
    try:
        return int(pipeline.redis.info("memory")["used_memory"])
    except Exception:  # restarting: nothing to read this time
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0, help="length of the traffic")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=100.0, help="messages per second")
    parser.add_argument("--poison", type=float, default=0.01, help="ratio of poison, 0-1")
    args = parser.parse_args(argv)
    soak = Soak(seconds=args.seconds, seed=args.seed, rate=args.rate, poison=args.poison)
    log_dir = Path(tempfile.mkdtemp(prefix="eventpipe-soak-"))
    print(f"soak: seed {soak.seed}, {soak.seconds:.0f}s at {soak.rate:.0f} messages/s, "
          f"{len(POISON_KINDS)} kinds of poison, faults {', '.join(FAULTS)}; logs in {log_dir}",
          flush=True)
    with running_kafka(log_dir / "tansu.log") as bootstrap:
        result = run(soak, bootstrap, log_dir, say=lambda line: print(line, flush=True))
    print(result.summary())
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
