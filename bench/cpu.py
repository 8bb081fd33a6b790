"""Where a machine's cores go during a run: CPU time by role, read from /proc.

Processes are told apart by their command line: the workers (`celery -A tasks`, `eventpipe
worker`), the bridge, PostgreSQL (every `postgres` process of the machine: its server is
shared), the pipeline's own Redis (by its port) and the Kafka broker (Tansu). The time of
processes that exit between two readings is lost; the benchmark reads while everything runs.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def roles(redis_port: int) -> dict[str, tuple[str, ...]]:
    """Role → substrings of the command line that mark its processes."""
    return {"workers": ("celery -A tasks", "celery -A bench.noop_worker", "eventpipe worker"),
            "bridge": ("eventpipe bridge",),
            "PostgreSQL": ("postgres",),
            "Redis": (f"redis-server 127.0.0.1:{redis_port}", f"--port {redis_port} "),
            "Kafka": ("tansu",)}


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
