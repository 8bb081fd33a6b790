"""Redis clients, one factory per purpose, each with the timeouts that purpose can afford.

- `pipeline`: the bridge and the workers (offset ledger, DLQ, Celery queue depths). A call
  that hangs holds up a partition, so it fails within seconds and the caller retries.
- `request`: the web API. A request must answer fast or fail with 503.
- `scrape`: what the API reads for a metrics scrape, which must answer well within
  Prometheus' scrape timeout (10 s by default) whatever Redis does.
- `operator`: command-line tools, which may scan a whole DLQ.
Responses stay bytes (`decode_responses` off): dead letters hold the original message bytes.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

_CONNECT_TIMEOUT_S = 2.0
# A write a replica refused is tried again, on a new connection: a failover that moved the name
# Redis is reached by (DNS, a virtual address) left the old primary up as a replica, which
# answers the health check's PING. Nothing was written, so trying again is safe.
_FAILOVER = {"retry_on_error": [redis.exceptions.ReadOnlyError]}


def _failover_not_timeouts() -> dict[str, Any]:
    """The same for the API and the tools, but for a command that timed out: tried again, it
    would double the wait before the answer that Redis does not answer. Both spellings:
    redis-py 5 retries what `retry_on_error` names, later ones what the `Retry` supports. One
    `Retry` per client: a client may change its own."""
    errors = [redis.exceptions.ReadOnlyError, redis.exceptions.ConnectionError]
    return {"retry": Retry(NoBackoff(), 1, supported_errors=tuple(errors)),
            "retry_on_error": errors}


def decoded(raw: bytes | str) -> str:
    """A key or value Redis answered, as text."""
    return raw.decode() if isinstance(raw, bytes) else raw


def pipeline(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=_CONNECT_TIMEOUT_S,
                                socket_timeout=5.0, health_check_interval=30, **_FAILOVER)


def request(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=_CONNECT_TIMEOUT_S,
                                socket_timeout=5.0, **_failover_not_timeouts())


def scrape(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)


def operator(url: str) -> redis.Redis:
    # Each of a tool's commands reads a page or a hash at most: 10 s is ample for one, and
    # the most a Redis that takes connections and answers nothing holds a tool per command.
    return redis.Redis.from_url(url, socket_connect_timeout=_CONNECT_TIMEOUT_S,
                                socket_timeout=10.0, **_failover_not_timeouts())

