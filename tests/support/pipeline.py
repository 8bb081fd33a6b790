"""A whole pipeline of real processes for end-to-end tests.

A fresh Kafka topic on the test broker, a fresh PostgreSQL database, a Redis server of its
own (database 0 for the DLQ and ledger, 1 for the Celery broker, so a test may flush the
broker's and no other test's worker can take its tasks), and as subprocesses the bridge
(`eventpipe bridge`) and Celery workers (`celery -A tasks worker`), configured only through
their environment, as in production.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import redis
from confluent_kafka import Consumer, Producer, TopicPartition
from sqlalchemy import Engine, create_engine, false, func, select

from eventpipe.dlq import records
from eventpipe.dlq.stream import DeadLetterStream, StreamEntry
from eventpipe.kafka import ensure_topic
from eventpipe.migrations import upgrade
from eventpipe.queues import queue_name
from eventpipe.samples import Document, Story, encode
from eventpipe.settings import Settings
from eventpipe.tables import applied_events, dead_letters, reconcile_queue
from eventpipe.verify import Report, render, verify
from launcher.children import terminate
from launcher.embedded import start_redis
from tests.support.databases import drop_database, new_database
from tests.support.model import expected_state, stored_state
from tests.support.tcp_proxy import TcpProxy

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str,
               interval_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


class Pipeline:
    def __init__(self, bootstrap: str, log_dir: Path, partitions: int = 4,
                 database_url: str | None = None, redis_proxy: bool = False,
                 celery_broker_url: str | None = None, **overrides: str) -> None:
        self.name = f"t{uuid.uuid4().hex[:8]}"
        self.log_dir = log_dir
        self.partitions = partitions
        self.own_database = database_url is None
        self.database_url = database_url or new_database("eventpipe_e2e")
        self.redis_server = start_redis()
        # The processes may reach Redis through a proxy the test can cut; the test itself
        # always talks to the server directly.
        self.redis_proxy = TcpProxy("127.0.0.1", self.redis_server.port) if redis_proxy else None
        redis_port = self.redis_proxy.port if self.redis_proxy else self.redis_server.port
        inherited = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        self.env = {
            **inherited,
            "EVENTPIPE_ENV_FILE": "/nonexistent",
            "DATABASE_URL": self.database_url,
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "KAFKA_TOPIC": self.name,
            "KAFKA_PARTITIONS": str(partitions),
            "KAFKA_GROUP_ID": f"{self.name}-bridge",
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "CELERY_BROKER_URL": celery_broker_url or f"redis://127.0.0.1:{redis_port}/1",
            "DLQ_STREAM": f"{self.name}:dlq",
            "BATCH_MAX_EVENTS": "100",
            "BATCH_MAX_WAIT_MS": "20",
            "COMMIT_INTERVAL_S": "0.2",
            "REDELIVERY_TIMEOUT_S": "4",
            "RETRY_BACKOFF_BASE_S": "0.2",
            "RETRY_BACKOFF_MAX_S": "1",
            "RETRY_MAX_ATTEMPTS": "40",
            "SHUTDOWN_DRAIN_TIMEOUT_S": "5",
            "BRIDGE_METRICS_PORT": "0",
            "WORKER_METRICS_PORT": "0",
            "LOG_LEVEL": "INFO",
            **overrides,
        }
        self.settings = Settings.from_env(self.env)
        self.redis = redis.Redis.from_url(f"{self.redis_server.url}/0")
        self.broker = redis.Redis.from_url(f"{self.redis_server.url}/1")
        self.dlq = DeadLetterStream(self.redis, self.settings.dlq_stream, 10_000, 10**8)
        self.engine: Engine = create_engine(self.database_url, pool_pre_ping=True)
        self.producer = Producer({"bootstrap.servers": bootstrap, "acks": "all",
                                  "linger.ms": 5})
        self.processes: list[subprocess.Popen[bytes]] = []
        ensure_topic(self.settings)
        upgrade(self.database_url)

    # -- processes -------------------------------------------------------------------------

    def spawn(self, name: str, command: list[str], **env: str) -> subprocess.Popen[bytes]:
        log = self.log_of(name).open("ab")
        process = subprocess.Popen(command, env={**self.env, **env}, cwd=ROOT,
                                   stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def start_bridge(self, name: str = "bridge") -> subprocess.Popen[bytes]:
        return self.spawn(name, [str(BIN / "eventpipe"), "bridge"])

    def log_of(self, name: str) -> Path:
        """Where the process spawned as `name` writes its output."""
        return self.log_dir / f"{self.name}-{name}.log"

    def start_worker(self, partitions: Iterable[int] | None = None,
                     name: str = "worker", **env: str) -> subprocess.Popen[bytes]:
        """One Celery worker process, as `celery -A tasks worker` is run by hand (`env`:
        settings of its own)."""
        chosen = range(self.partitions) if partitions is None else partitions
        queues = ",".join(queue_name(p) for p in chosen)
        return self.spawn(name, [
            sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool", "solo",
            "--queues", queues, "--hostname", f"{name}-{uuid.uuid4().hex[:6]}@%h",
            "--without-mingle", "--without-gossip", "--loglevel", "INFO",
        ], **env)

    def start_celery_worker(self, *options: str, name: str = "celery") -> subprocess.Popen[bytes]:
        """`celery -A tasks worker` as Celery users type it, with `options` of their own."""
        return self.spawn(name, [sys.executable, "-m", "celery", "-A", "tasks", "worker",
                                  "--hostname", f"{name}-{uuid.uuid4().hex[:6]}@%h", *options])

    def start_worker_host(self, partitions: str, processes: int,
                          name: str = "worker-host") -> subprocess.Popen[bytes]:
        """`eventpipe worker`: supervised processes sharing partitions, metrics aggregated."""
        return self.spawn(name, [str(BIN / "eventpipe"), "worker", "--partitions", partitions,
                                  "--processes", str(processes)])

    def stop(self, process: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
             timeout_s: float = 30) -> int:
        if process.poll() is None:
            process.send_signal(sig)
        return process.wait(timeout=timeout_s)

    def restart_redis(self) -> None:
        """Redis crashes and comes back empty on the same port, as one without persistence
        does: the Celery broker, the offset ledger and the DLQ stream are all gone."""
        port = self.redis_server.port
        self.redis_server.stop()
        self.redis_server = start_redis(port)

    def close(self) -> None:
        for process in self.processes:
            terminate(process, timeout_s=15)
        self.engine.dispose()
        self.redis.close()
        self.broker.close()
        if self.redis_proxy is not None:
            self.redis_proxy.close()
        self.redis_server.stop()
        if self.own_database:
            drop_database(self.database_url)

    # -- traffic ---------------------------------------------------------------------------

    def send(self, messages: Iterable[tuple[str | bytes | None, bytes | Document]]) -> int:
        sent = 0
        for key, value in messages:
            payload = value if isinstance(value, bytes) else encode(value)
            self.producer.produce(self.name, key=key, value=payload)
            self.producer.poll(0)
            sent += 1
        assert self.producer.flush(30) == 0, "Kafka did not acknowledge every message"
        return sent

    # -- observations ----------------------------------------------------------------------

    def applied_count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(applied_events))
                       .scalar_one())

    def dead_letters(self) -> list[StreamEntry]:
        return list(self.dlq.scan())

    def reconciled(self) -> bool:
        """The reconciler has caught up: nothing queued, every dead letter in the stream, a
        stream Redis lost rebuilt, and none it lost otherwise still missing."""
        return not self.behind()

    def behind(self) -> str:
        """What the reconciler has still to do, in words; empty once it caught up."""
        with self.engine.connect() as conn:
            queued = conn.execute(select(func.count()).select_from(reconcile_queue)).scalar_one()
            unprojected = conn.execute(select(func.count()).select_from(dead_letters).where(
                dead_letters.c.in_stream == false())).scalar_one()
            shown = records.count_shown(conn)
        entries, indexed = self.dlq.sizes()
        if queued or unprojected or not self.dlq.intact() or not shown == entries == indexed:
            return (f"{queued} key sets queued, {unprojected} dead letters unprojected, "
                    f"stream intact: {self.dlq.intact()}, {shown} shown in SQL, {entries} "
                    f"entries, {indexed} indexed")
        return ""

    def verify(self) -> Report:
        """`eventpipe verify`, in this process, once the reconciler has caught up."""
        try:
            wait_until(self.reconciled, 60, "the reconciler to catch up")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {self.behind()}") from None
        return verify(self.settings, self.engine, self.dlq)

    def end_offsets(self) -> dict[int, int]:
        """Per partition, the offset after the last message (read, since the broker's
        ListOffsets answer cannot be trusted)."""
        consumer = Consumer({"bootstrap.servers": self.settings.kafka_bootstrap_servers,
                             "group.id": f"{self.name}-reader", "enable.auto.commit": False,
                             "auto.offset.reset": "earliest", "enable.partition.eof": True,
                             "session.timeout.ms": 6000,
                             # As the pipeline's readers: record batches of any size it reads.
                             "receive.message.max.bytes": self.settings.kafka_receive_max_bytes})
        ends: dict[int, int] = {}
        consumer.assign([TopicPartition(self.name, p, 0) for p in range(self.partitions)])
        eof: set[int] = set()
        deadline = time.monotonic() + 30
        while len(eof) < self.partitions and time.monotonic() < deadline:
            record = consumer.poll(0.5)
            if record is None:
                continue
            if record.error() is not None:
                eof.add(record.partition() or 0)
                continue
            ends[record.partition() or 0] = (record.offset() or 0) + 1
        consumer.close()
        return ends

    def committed_offsets(self) -> dict[int, int]:
        consumer = Consumer({"bootstrap.servers": self.settings.kafka_bootstrap_servers,
                             "group.id": self.settings.kafka_group_id})
        found = consumer.committed([TopicPartition(self.name, p)
                                    for p in range(self.partitions)], timeout=10)
        consumer.close()
        return {tp.partition: tp.offset for tp in found if tp.offset >= 0}


def describe(entries: list[StreamEntry]) -> list[tuple[Any, ...]]:
    return sorted((e.letter.error_class,
                   e.letter.event_id or (e.value or b"").decode("utf-8", "replace"))
                  for e in entries)


Message = tuple[str, Document]


def stream(count: int, seed: int) -> list[Message]:
    """A story of `count` valid events, keyed as the producer keys them."""
    story = Story(seed=seed)
    return [story.next() for _ in range(count)]


def drained(pipeline: Pipeline, sent: int, timeout_s: float = 120) -> None:
    """Wait until every partition's committed offset is past its last message."""
    ends = pipeline.end_offsets()
    assert sum(ends.values()) == sent
    wait_until(lambda: pipeline.committed_offsets() == ends, timeout_s,
               f"all {sent} messages done and committed")


def assert_state(pipeline: Pipeline, documents: list[Document]) -> None:
    """The database holds what the events make, and `eventpipe verify` finds it clean."""
    assert stored_state(pipeline.engine) == expected_state(documents)
    report = pipeline.verify()
    assert report.clean, render(report)
