"""The two kinds of failure, and the one place that decides which kind an exception is.

A `PermanentError` will fail the same way however often it is tried: the event goes to the
dead-letter queue at once. A `TransientError` is about the world, not the event (a database
that is down, a deadlock, a timeout): the work is retried with backoff and never dead-lettered.
"""

from __future__ import annotations

import sqlalchemy.exc
from redis import exceptions as redis_exceptions


class PipelineError(Exception):
    """Base of the project's own errors."""


class PermanentError(PipelineError):
    """Retrying cannot help: dead-letter the event now."""


class InvalidEvent(PermanentError):
    """The bytes are not a valid event; `field` names the offending part of the message."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class TransientError(PipelineError):
    """The world failed, not the event: retry later."""


_TRANSIENT: tuple[type[BaseException], ...] = (
    TransientError,
    sqlalchemy.exc.OperationalError,  # connection lost, deadlock victim, lock timeout
    sqlalchemy.exc.TimeoutError,  # pool exhausted
    sqlalchemy.exc.DisconnectionError,
    redis_exceptions.ConnectionError,
    redis_exceptions.TimeoutError,
    ConnectionError,
    TimeoutError,
)


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same work later can succeed."""
    if isinstance(exc, _TRANSIENT):
        return True
    return bool(isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated)
