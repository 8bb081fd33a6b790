"""CPU instructions a worker spends per event, counted by valgrind: a figure this VM's noise
does not move, for comparing two versions of the code.

The path counted is a worker's, in one process: `Processor.run` over the benchmark's stream
(parsing, the fingerprint, the batch's statements, the offset ledger, the metrics) and the
reconciler's rounds, at two loads: batches of 500 with a round every two batches, as under
full load; and batches of 4 with a round every 120 batches, as at 1,000 events/s (the
latency runs' traffic: some 240 batches a second over two processes, a round every half
second), where what a batch costs whatever its size is most of the count. The database and
Redis are other processes, not counted. Each count is the whole run under `valgrind
--tool=callgrind` minus the same run stopped before the first batch (imports, the stream),
divided by the events. Counts of one version repeat to within a fraction of a percent; at
about three instructions a nanosecond of this machine's CPU time, 300,000 instructions is
some 100 µs.

    python -m bench instructions      # PostgreSQL and SQLite, 3,000 events at each load

To count another version, copy this file into its `bench/` and run it there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.pipeline_throughput import _stream

# (events a batch, batches a reconciler round): under full load, and at 1,000 events/s.
LOADS = ((500, 2), (4, 120))


def _work(url: str, count: int, setup_only: bool, batch: int, round_every: int) -> None:
    """The counted run (in the child process valgrind starts)."""
    import redis

    from eventpipe.database import make_engine
    from eventpipe.dlq.stream import DeadLetterStream
    from eventpipe.offset_ledger import OffsetLedger
    from eventpipe.queues import TaskMessage
    from eventpipe.reconcile import reconcile
    from eventpipe.settings import Settings
    from tasks.processing import Processor

    settings = Settings(database_url=url, log_level="WARNING")
    engine = make_engine(settings)
    client = redis.Redis.from_url(settings.redis_url)
    group = f"bench-{uuid.uuid4().hex}"
    processor = Processor(settings, engine, DeadLetterStream(client, f"{group}:dlq", 1000, 10**7),
                          OffsetLedger(client, group), worker="bench:1")
    messages = [TaskMessage(offset, key, value)
                for offset, (key, value) in enumerate(_stream(count))]
    if not setup_only:
        for number, start in enumerate(range(0, count, batch), start=1):
            processor.run("events", 0, messages[start:start + batch])
            if number % round_every == 0:
                reconcile(engine, lambda: datetime.now(UTC), timedelta(seconds=30))
        reconcile(engine, lambda: datetime.now(UTC), timedelta(seconds=30))
    for key in client.scan_iter(f"*{group}*"):
        client.delete(key)
    engine.dispose()


def _counted(url: str, count: int, setup_only: bool, batch: int, round_every: int) -> int:
    done = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         "-m", "bench.instructions", "--child", url, str(count), str(int(setup_only)),
         str(batch), str(round_every)],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no count from valgrind: {done.stderr[-500:]}")
    return int(found.group(1))


def _per_event(label: str, fresh: Callable[[], str], count: int) -> None:
    """`fresh`: a new, migrated database for each run."""
    setup = _counted(fresh(), count, True, *LOADS[0])  # the same whatever the load
    for batch, round_every in LOADS:
        full = _counted(fresh(), count, False, batch, round_every)
        print(f"instructions: {label:10s} {(full - setup) / count:10,.0f} a worker spends "
              f"per event ({count:,} events, batches of {batch}, a round every "
              f"{round_every} batches)")


def run(count: int = 3000) -> None:
    if shutil.which("valgrind") is None:
        print("instructions: valgrind is not installed (Debian: apt-get install valgrind)")
        return
    from eventpipe.migrations import upgrade
    from tests.support.databases import drop_database, new_database

    made: list[str] = []

    def postgres() -> str:
        made.append(new_database("eventpipe_bench"))
        upgrade(made[-1])
        return made[-1]

    with tempfile.TemporaryDirectory() as tmp:
        def sqlite() -> str:
            path = Path(tmp) / f"{uuid.uuid4().hex}.db"
            upgrade(f"sqlite:///{path}")
            return f"sqlite:///{path}"

        try:
            _per_event("postgresql", postgres, count)
            _per_event("sqlite", sqlite, count)
        finally:
            for url in made:
                drop_database(url)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _work(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5]),
              int(sys.argv[6]))
    else:
        run(*(int(arg) for arg in sys.argv[1:2]))
