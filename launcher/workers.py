"""`eventpipe worker`: run Celery worker processes that apply the partition queues.

Each process is a `--pool solo` Celery worker, so it applies one batch at a time, and each
partition queue is served by one process at any moment. Without `--partitions` every process
joins the worker pool (`tasks.pool`), whose live members, on every host, share the partitions
by themselves; with it, the host's processes (`--processes`) split those partitions between
them, fixed. The parent restarts a process that dies, forwards SIGTERM/SIGINT for a warm
shutdown, and serves the metrics of all its processes, aggregated, on one port.
"""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import redis
from prometheus_client import multiprocess

from eventpipe import redis_clients
from eventpipe.queues import queue_name
from eventpipe.settings import Settings, child_environment
from eventpipe.status import WORKER, Board
from launcher.children import die_with_parent, restart_delay

log = logging.getLogger(__name__)


def parse_partitions(spec: str, count: int | None = None) -> list[int]:
    """'0-5', '0,2,4' or '0-2,7' → sorted partition numbers; each below `count` (the topic's
    partitions, KAFKA_PARTITIONS) when given."""
    chosen: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        low, sep, high = part.partition("-")
        try:
            first, last = int(low), int(high) if sep else int(low)
        except ValueError:
            raise ValueError(f"bad partition range {part!r}: use e.g. 0-5 or 0,2,4") from None
        if first < 0 or last < first:
            raise ValueError(f"bad partition range {part!r}")
        if count is not None and last >= count:  # before the range is made: it may be huge
            raise ValueError(f"partition {last} does not exist: the topic has {count} "
                             f"(0-{count - 1}; KAFKA_PARTITIONS)")
        chosen.update(range(first, last + 1))
    if not chosen:
        raise ValueError("no partitions given")
    if count is not None and max(chosen) >= count:
        raise ValueError(f"partition {max(chosen)} does not exist: the topic has {count} "
                         f"(0-{count - 1}; KAFKA_PARTITIONS)")
    return sorted(chosen)


def check_processes(processes: int, partitions: Sequence[int] | None, count: int) -> None:
    """A process more than the partitions it would serve would serve none: `partitions`
    given, there are as many; in the pool, at most the topic's `count` (KAFKA_PARTITIONS).
    Refused, rather than started idle (or, with a typo, by the thousand)."""
    if partitions is not None and processes > len(partitions):
        raise ValueError(f"--processes {processes}: more than the {len(partitions)} "
                         "partition(s) given to serve (--partitions); at most one process "
                         "serves a partition")
    if partitions is None and processes > count:
        raise ValueError(f"--processes {processes}: more than the topic's {count} "
                         "partition(s) (KAFKA_PARTITIONS); at most one process serves a "
                         "partition")


def share(partitions: Sequence[int], processes: int) -> list[list[int]]:
    """Deal partitions round-robin over `processes` (never more processes than partitions)."""
    count = max(1, min(processes, len(partitions)))
    return [list(partitions[i::count]) for i in range(count)]


def tasks_main() -> str:
    """`tasks/__main__.py` by its path: beside this package, as every package of the project
    is installed (never looked for in the working directory, which Celery's `-A tasks` would
    search first)."""
    return str(Path(__file__).resolve().parents[1] / "tasks" / "__main__.py")


def celery_command(partitions: Sequence[int] | None, index: int, log_level: str) -> list[str]:
    """One worker process: of the pool (`partitions` None), or serving these partitions."""
    queues = [] if partitions is None else ["--queues", ",".join(queue_name(p)
                                                                  for p in partitions)]
    return [
        # --quiet: no banner on stdout, so every line of output is a log record.
        sys.executable, tasks_main(), "--quiet", "worker",
        "--pool", "solo", *queues,
        "--hostname", f"eventpipe-{index}-{uuid.uuid4().hex[:6]}@%h",
        "--without-mingle", "--without-gossip",
        "--loglevel", log_level,
    ]


class Supervisor:
    def __init__(self, settings: Settings, partitions: Sequence[int] | None,
                 processes: int) -> None:
        self.settings = settings
        self.groups: list[list[int] | None] = (
            [None] * max(1, processes) if partitions is None
            else list(share(partitions, processes)))
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.started_at: dict[int, float] = {}
        self.restart_delay: dict[int, float] = {}
        self.stopping = False
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="eventpipe-worker-metrics-"))

    def _start(self, index: int) -> None:
        env = child_environment({"PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)})
        command = celery_command(self.groups[index], index, self.settings.log_level)
        # SIGTERM if this supervisor dies: a warm shutdown, never an orphan still consuming.
        self.children[index] = subprocess.Popen(command, env=env,
                                                preexec_fn=die_with_parent(signal.SIGTERM))
        self.started_at[index] = time.monotonic()
        group = self.groups[index]
        log.info("worker process started", extra={
            "pid": self.children[index].pid,
            "queues": "from the pool" if group is None else [queue_name(p) for p in group]})

    def _restart(self, index: int, child: subprocess.Popen[bytes], code: int) -> None:
        multiprocess.mark_process_dead(child.pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
        self._off_the_board(child.pid)
        delay = self.restart_delay[index] = restart_delay(
            time.monotonic() - self.started_at[index], self.restart_delay.get(index, 0))
        log.error("worker process %d exited with %s; restarting in %.0fs", child.pid, code,
                  delay)
        deadline = time.monotonic() + delay
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(0.2)
        if not self.stopping:
            self._start(index)

    def _off_the_board(self, pid: int) -> None:
        """A dead process's line goes at once, not once it is `STALE_S` old: meanwhile the
        status would show its partitions consumed by it and by its successor."""
        # A request's short timeouts: the supervisor's loop, restarts included, waits on it.
        client = redis_clients.request(self.settings.redis_url)
        try:
            Board(client, self.settings.kafka_group_id).leave(
                WORKER, f"{socket.gethostname()}:{pid}")
        except redis.RedisError as exc:
            log.debug("could not take a dead worker off the status board: %s", exc)
        finally:
            client.close()

    def _serve_metrics(self) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        from eventpipe import metrics

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.metrics_dir))  # type: ignore[no-untyped-call]
        metrics.serve(self.settings.worker_metrics_port, "WORKER_METRICS_PORT",
                      self.settings.metrics_host, registry)

    def run(self) -> int:
        try:
            return self._supervise()
        finally:  # the processes' metrics files, of no use to anyone once they are gone
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _supervise(self) -> int:
        def stop(signum: int, _frame: FrameType | None) -> None:
            self.stopping = True
            for child in self.children.values():
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        self._serve_metrics()
        for index in range(len(self.groups)):
            self._start(index)
        while not self.stopping:
            for index, child in list(self.children.items()):
                code = child.poll()
                if code is not None and not self.stopping:
                    self._restart(index, child, code)
            time.sleep(0.5)
        # One deadline for all: they drain side by side, and whoever stops this host (`eventpipe
        # up`, Docker) waits for it only so long.
        deadline = time.monotonic() + self.settings.shutdown_drain_timeout_s + 10
        for child in self.children.values():
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        return 0
