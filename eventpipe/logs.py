"""Logging for every process, with the event's context on each record.

Pass context with `extra={...}` (e.g. `eventId`, `eventType`, `partition`, `offset`, `taskId`,
`attempt`); each key becomes a field of the line, so one event's life is found by its
`eventId` across the bridge's, the workers' and the API's logs. Files, pipes and log
collectors get JSON lines; a person at a terminal gets one readable line per record, the
context as `key=value` after the message (`LOG_FORMAT` chooses otherwise).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from eventpipe.times import utc_iso

# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def _context(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in record.__dict__.items()
            if key not in _STANDARD and not key.startswith("_")}


class Repeats:
    """Which sayings of a message said again and again to let through: each kind once per
    `window_s`, the others held back and counted. Thread-safe; at most `kinds` kinds are
    remembered (past that, all are forgotten: at worst a kind passes again early)."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic,
                 kinds: int = 1000) -> None:
        self.window_s = window_s
        self.clock = clock
        self.kinds = kinds
        self._seen: dict[str, tuple[float, int]] = {}  # kind → (when let through, held since)
        self._lock = threading.Lock()

    def let_through(self, kind: str) -> int | None:
        """None to hold this saying back; else how many alike were held back since the last
        one let through."""
        now = self.clock()
        with self._lock:
            passed_at, held = self._seen.get(kind, (None, 0))
            if passed_at is not None and now - passed_at < self.window_s:
                self._seen[kind] = (passed_at, held + 1)
                return None
            if len(self._seen) >= self.kinds:
                self._seen.clear()
            self._seen[kind] = (now, 0)
        return held


class JsonFormatter(logging.Formatter):
    def __init__(self, process_role: str) -> None:
        super().__init__()
        self.role = process_role
        self.host = socket.gethostname()

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": utc_iso(datetime.fromtimestamp(record.created, UTC), "milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "role": self.role,
            "host": self.host,
            "pid": record.process or os.getpid(),
        }
        line.update(_context(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, separators=(",", ":"))


# Control characters as escapes: a message may quote bytes a producer sent, and a terminal
# must not take them as commands (colours, clearing the screen) or as a forged next line.
_VISIBLE = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7f)}


class TextFormatter(logging.Formatter):
    """`12:00:01.250 WARNING bridge.service: partition paused  partition=3 inFlight=5000`, in
    the terminal's local time."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        message = record.getMessage().translate(_VISIBLE)
        line = f"{moment} {record.levelname:<7} {record.name}: {message}"
        context = " ".join(f"{key}={str(value).translate(_VISIBLE)}"
                           for key, value in _context(record).items())
        if context:
            line = f"{line}  {context}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


def formatter(role: str, style: str, stream: Any) -> logging.Formatter:
    """Lines for `stream`: text lines (`style` "text", or "auto" when it is a terminal), else
    JSON lines tagged with `role` (a file, a pipe, a socket, no stream at all)."""
    isatty = getattr(stream, "isatty", None)
    text = style == "text" or (style == "auto" and isatty is not None and isatty())
    return TextFormatter() if text else JsonFormatter(role)


def configure(role: str, level: str = "INFO", style: str = "auto") -> None:
    """Send every logger's records to stderr, as `formatter` writes them for it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(role, style, sys.stderr))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings too become JSON records, not stray stderr text
    # celery.app.trace logs every task with its full arguments: event payloads, at INFO;
    # Alembic a line for each of its plugins wherever its commands are imported (the API's).
    for noisy in ("kombu", "celery.app.trace", "celery.worker.strategy", "urllib3", "redis",
                  "alembic.runtime.plugins"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
