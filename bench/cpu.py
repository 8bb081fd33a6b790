"""Where a machine's cores go during a run: CPU time by role, read from /proc.

Processes are told apart by their command line: the workers (`celery -A tasks`, `eventpipe
worker` and the processes it starts by the path of `tasks/__main__.py`), the bridge,
PostgreSQL (every `postgres` process of the machine: its server is shared), the pipeline's
own Redis (by its port) and the Kafka broker (Tansu). The time of processes that exit between
two readings is lost; the benchmark reads while everything runs.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")
BROKER = ("tansu",)  # the Kafka broker's mark, for a run that watches the broker alone


def roles(redis_port: int) -> dict[str, tuple[str, ...]]:
    """Role → substrings of the command line that mark its processes."""
    return {"workers": ("celery -A tasks", "celery -A bench.noop_worker", "eventpipe worker",
                        "tasks/__main__.py"),
            "bridge": ("eventpipe bridge",),
            "PostgreSQL": ("postgres",),
            "Redis": (f"redis-server 127.0.0.1:{redis_port}", f"--port {redis_port} "),
            "Kafka": BROKER}


def reading(marks: dict[str, tuple[str, ...]]) -> dict[str, float]:
    """CPU seconds (user and system) each role's live processes have used so far."""
    used: dict[str, float] = defaultdict(float)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        role = next((name for name, found in marks.items()
                     if any(mark in command for mark in found)), None)
        if role is not None:
            fields = stat.rsplit(")", 1)[1].split()
            used[role] += (int(fields[11]) + int(fields[12])) / _TICKS
    return used


def per_event(before: dict[str, float], after: dict[str, float],
              events: int) -> dict[str, float]:
    """Microseconds of CPU per event, by role, between two readings."""
    return {role: max(0.0, used - before.get(role, 0.0)) / events * 1e6
            for role, used in after.items()}


class Sampler:
    """`reading` every `every_s` in a thread while the block runs, so that what each role
    used over any stretch of the run can be told, as a share of one core."""

    def __init__(self, marks: dict[str, tuple[str, ...]], every_s: float = 1.0) -> None:
        self.marks = marks
        self.every_s = every_s
        self.readings: list[tuple[float, dict[str, float]]] = []  # (monotonic time, reading)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.readings.append((time.monotonic(), reading(self.marks)))
            if self._stop.wait(self.every_s):
                self.readings.append((time.monotonic(), reading(self.marks)))
                return

    def shares(self, since: float, until: float) -> dict[str, float]:
        """Each role's CPU between the readings closest inside [since, until] (monotonic
        times), in cores: 0.5 is half of one."""
        inside = [(at, used) for at, used in self.readings if since <= at <= until]
        if len(inside) < 2:
            return {}
        (start, first), (end, last) = inside[0], inside[-1]
        return {role: max(0.0, used - first.get(role, 0.0)) / (end - start)
                for role, used in last.items()}


def reference_seconds(additions: int = 10_000_000) -> float:
    """CPU seconds a fixed pure-Python loop takes on this core now: this VM ran such a loop
    at speeds up to twice apart from one minute to the next, so runs are told apart by it.
    Time the hypervisor takes from the VM is not CPU time, and goes unseen here."""
    started = time.process_time()
    total = 0
    for number in range(additions):
        total += number
    return time.process_time() - started
