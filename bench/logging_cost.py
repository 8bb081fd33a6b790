"""What per-event log records cost: the worker's processing rate at each log level.

Runs the worker's `Processor` (validation, one transaction per batch of 500, DLQ and ledger
writes) on SQLite with an embedded Redis, logging JSON lines to a file, at WARNING, INFO
(a line per batch) and DEBUG (a line per event).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import redis

from eventpipe.database import make_engine
from eventpipe.dlq.stream import DeadLetterStream
from eventpipe.logs import JsonFormatter
from eventpipe.migrations import upgrade
from eventpipe.offset_ledger import OffsetLedger
from eventpipe.queues import TaskMessage
from eventpipe.samples import Story, encode
from eventpipe.settings import Settings
from launcher.embedded import start_redis


def _measure(level: int, workdir: Path, server_url: str, count: int, batch: int) -> float:
    # Imported here: the `tasks` package builds the Celery app, which sets up the process's
    # logging as a worker's, and every benchmark's output would carry its JSON lines.
    from tasks.processing import Processor

    handler = logging.FileHandler(workdir / f"log-{level}.jsonl")
    handler.setFormatter(JsonFormatter("worker"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    url = f"sqlite:///{workdir / f'log-{level}.db'}"
    upgrade(url)
    settings = Settings(database_url=url)
    client = redis.Redis.from_url(server_url)
    processor = Processor(settings, make_engine(settings),
                          DeadLetterStream(client, f"bench:dlq:{level}", 10**6, 10**9),
                          OffsetLedger(client, f"bench{level}"), worker="bench")
    story = Story(seed=level)
    messages = [TaskMessage(offset, key.encode(), encode(doc))
                for offset, (key, doc) in enumerate(story.next() for _ in range(count))]
    started = time.perf_counter()
    for start in range(0, count, batch):
        processor.run("bench", 0, messages[start : start + batch])
    elapsed = time.perf_counter() - started
    root.handlers[:] = []
    handler.close()
    client.close()
    return count / elapsed


def run(count: int = 20_000, batch: int = 500) -> None:
    server = start_redis()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, level in (("WARNING", logging.WARNING), ("INFO", logging.INFO),
                                ("DEBUG", logging.DEBUG)):
                rate = _measure(level, Path(tmp), server.url, count, batch)
                print(f"worker, log level {name:7s}: {rate:8,.0f} events/s "
                      f"(batches of {batch}, SQLite)")
    finally:
        server.stop()
