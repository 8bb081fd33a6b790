"""Readiness checks: each dependency probed at once, the whole bounded by one short timeout.

The checks run in threads so a dependency that hangs (a black-holed host) costs the request
`timeout_s`, not the driver's own connect timeout; such a thread is left to finish alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from eventpipe.kafka import broker_reachable
from eventpipe.migrations import schema_behind
from web.services import Services

TIMEOUT_S = 2.0
# A probe that has its own timeout gets a shorter one, so it reports its own reason
# ("no broker answered") rather than losing the race against the overall deadline.
PROBE_TIMEOUT_S = 1.5

Check = Callable[[], None]


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    ok: bool
    duration_ms: float
    error: str | None = None


class Unreachable(Exception):
    """A probe got no answer it could use."""


def dependency_checks(services: Services, timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, Check]:
    def database() -> None:
        with services.engine.connect() as conn:
            # Not ready while migrations have not run: every read would fail.
            behind = schema_behind(conn)
        if behind is not None:
            raise Unreachable(behind)

    def redis() -> None:
        services.redis.ping()

    def kafka() -> None:
        if not broker_reachable(services.settings, timeout_s=timeout_s):
            raise Unreachable(f"no broker answered within {timeout_s:g} s")

    return {"database": database, "redis": redis, "kafka": kafka}


def run_checks(checks: Mapping[str, Check], timeout_s: float = TIMEOUT_S) -> list[CheckResult]:
    pool = ThreadPoolExecutor(max_workers=len(checks), thread_name_prefix="ready")
    try:
        futures = {name: pool.submit(_timed, check) for name, check in checks.items()}
        done, _ = wait(futures.values(), timeout=timeout_s)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return [_result(name, future, future in done, timeout_s) for name, future in futures.items()]


def _timed(check: Check) -> float:
    started = time.perf_counter()
    check()
    return (time.perf_counter() - started) * 1000


def _result(name: str, future: Future[float], finished: bool, timeout_s: float) -> CheckResult:
    if not finished:
        return CheckResult(name, False, timeout_s * 1000, f"no answer within {timeout_s:g} s")
    exc = future.exception()
    if exc is None:
        return CheckResult(name, True, round(future.result(), 3))
    # The class and, for our own probes, the reason; a driver's message may name hosts.
    reason = str(exc) if isinstance(exc, Unreachable) else type(exc).__name__
    return CheckResult(name, False, 0.0, reason)
