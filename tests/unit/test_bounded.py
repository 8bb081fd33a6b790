"""The bridge's calls to the database, waited for a bounded time on a thread of their own."""

from __future__ import annotations

import threading
import time

import pytest

from bridge.bounded import Bounded


def test_a_call_that_does_not_end_is_given_up_and_the_next_refused_until_it_ends() -> None:
    """A review's finding: behind a proxy that answers for the database at the network's
    level, a positions save held the bridge's loop, and every partition's reading, for as
    long as the database said nothing (90 s in a test), where the driver's timeouts never
    fire."""
    bounded = Bounded(0.2)
    answer = threading.Event()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"no answer within 0\.2 s"):
        bounded.call(lambda: answer.wait(30))
    assert time.monotonic() - started < 5
    with pytest.raises(TimeoutError, match="the last call has not ended"):
        bounded.call(lambda: "refused at once")
    answer.set()
    deadline = time.monotonic() + 10
    while True:  # the hung call ends as soon as it is answered
        try:
            assert bounded.call(lambda: "answered") == "answered"
            break
        except TimeoutError:
            assert time.monotonic() < deadline
            time.sleep(0.01)


def test_a_call_s_own_error_and_result_come_back_as_they_are() -> None:
    bounded = Bounded(5)
    assert bounded.call(lambda: 7) == 7

    def fails() -> None:
        raise TimeoutError("the driver's own")

    with pytest.raises(TimeoutError, match="the driver's own"):
        bounded.call(fails)
    with pytest.raises(ZeroDivisionError):
        bounded.call(lambda: 1 / 0)
