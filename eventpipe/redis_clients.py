"""Redis clients, one factory per purpose, each with the timeouts that purpose can afford.

- `pipeline`: the bridge and the workers (offset ledger, DLQ, Celery queue depths). A call
  that hangs holds up a partition, so it fails within seconds and the caller retries.
- `request`: the web API. A request must answer fast or fail with 503.
- `operator`: command-line tools, which may scan a whole DLQ.
Responses stay bytes (`decode_responses` off): dead letters hold the original message bytes.
"""

from __future__ import annotations

import redis

_CONNECT_TIMEOUT_S = 2.0
# A write a replica refused is tried again, on a new connection: a failover that moved the name
# Redis is reached by (DNS, a virtual address) left the old primary up as a replica, which
# answers the health check's PING. Nothing was written, so trying again is safe.
_FAILOVER = {"retry_on_error": [redis.exceptions.ReadOnlyError]}


def decoded(raw: bytes | str) -> str:
    """A key or value Redis answered, as text."""
    return raw.decode() if isinstance(raw, bytes) else raw


def pipeline(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=_CONNECT_TIMEOUT_S,
                                socket_timeout=5.0, health_check_interval=30, **_FAILOVER)


def request(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=_CONNECT_TIMEOUT_S,
                                socket_timeout=5.0, **_FAILOVER)


def operator(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=_CONNECT_TIMEOUT_S,
                                socket_timeout=30.0, **_FAILOVER)

