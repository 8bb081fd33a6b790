"""JSON-lines logging for every process, with the event's context on each record.

Pass context with `extra={...}` (e.g. `eventId`, `eventType`, `partition`, `offset`, `taskId`,
`attempt`); each key becomes a field of the line, so one event's life is found by its
`eventId` across the bridge's, the workers' and the API's logs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from datetime import UTC, datetime
from typing import Any

from eventpipe.times import utc_iso

# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


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
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, separators=(",", ":"))


def configure(role: str, level: str = "INFO") -> None:
    """Send every logger's records to stderr as JSON lines tagged with `role`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings too become JSON records, not stray stderr text
    # celery.app.trace logs every task with its full arguments: event payloads, at INFO.
    for noisy in ("kombu", "celery.app.trace", "celery.worker.strategy", "urllib3", "redis"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
