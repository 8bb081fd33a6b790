"""The failure decision alone: what the worker does when applying a batch fails."""

from __future__ import annotations

import random

import psycopg
import sqlalchemy.exc

from eventpipe.dlq.letter import WORKER_CRASHED
from eventpipe.failures import (
    GiveUp,
    RetryAlone,
    RetryLater,
    RetryPolicy,
    Split,
    after_crashes,
    decide,
)

POLICY = RetryPolicy(backoff_base_s=1.0, backoff_max_s=60.0, max_attempts=3,
                     crash_max_attempts=3)


def dbapi(kind: type[sqlalchemy.exc.DBAPIError], message: str) -> sqlalchemy.exc.DBAPIError:
    return kind("INSERT …", {}, Exception(message))


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    rng = random.Random(1)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (7, 60.0), (30, 60.0)]:
        delays = [POLICY.backoff(attempt, rng) for _ in range(200)]
        assert min(delays) >= ceiling / 2 and max(delays) <= ceiling
        assert max(delays) - min(delays) > ceiling / 10  # jittered, not constant


def test_a_failure_of_the_world_retries_the_whole_batch_for_ever() -> None:
    lost = dbapi(sqlalchemy.exc.OperationalError, "server closed the connection")
    first = decide(lost, size=500, attempts=0, retries=0, policy=POLICY)
    late = decide(lost, size=1, attempts=9, retries=40, policy=POLICY)
    assert isinstance(first, RetryLater) and first.delay_s <= 1.0
    assert isinstance(late, RetryLater) and 30.0 <= late.delay_s <= 60.0


def test_a_privilege_the_login_lacks_is_waited_for_never_dead_lettered() -> None:
    """A grant revoked, or the app's login short of one: the batch waits whole, whatever its
    size and however often it was tried, until an operator grants it."""
    refused = sqlalchemy.exc.ProgrammingError("INSERT …", {},
                                              psycopg.errors.InsufficientPrivilege(
                                                  "permission denied for table entities"))
    for size, attempts, retries in ((500, 0, 0), (1, POLICY.max_attempts, 40)):
        decision = decide(refused, size=size, attempts=attempts, retries=retries,
                          policy=POLICY)
        assert isinstance(decision, RetryLater)
        assert "permission denied for table entities" in decision.reason


def test_anything_else_in_a_batch_splits_it() -> None:
    for error in (RecursionError("deep"), dbapi(sqlalchemy.exc.DataError, "value too long"),
                  KeyError("x")):
        assert isinstance(decide(error, size=2, attempts=0, retries=0, policy=POLICY), Split)


def test_a_value_the_database_refuses_is_dead_lettered_at_once() -> None:
    refused = decide(dbapi(sqlalchemy.exc.DataError, "integer out of range"), size=1,
                     attempts=0, retries=0, policy=POLICY)
    assert isinstance(refused, GiveUp) and refused.error_class == "DataError"
    assert "integer out of range" in refused.reason


def test_an_unforeseen_error_of_one_message_is_retried_then_given_up() -> None:
    bug = ValueError("unexpected")
    again = decide(bug, size=1, attempts=1, retries=0, policy=POLICY, rng=random.Random(2))
    assert isinstance(again, RetryAlone) and 1.0 <= again.delay_s <= 2.0
    given_up = decide(bug, size=1, attempts=2, retries=0, policy=POLICY)
    assert isinstance(given_up, GiveUp) and given_up.reason == (
        "failed 3 times: ValueError: unexpected")


def test_a_message_that_kills_its_worker_is_isolated_then_dead_lettered() -> None:
    assert after_crashes(0, size=500, policy=POLICY) is None
    assert isinstance(after_crashes(1, size=500, policy=POLICY), Split)
    assert after_crashes(2, size=1, policy=POLICY) is None  # alone: one more try
    gave_up = after_crashes(3, size=1, policy=POLICY)
    assert isinstance(gave_up, GiveUp) and gave_up.error_class == WORKER_CRASHED
