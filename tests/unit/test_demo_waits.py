"""`eventpipe up --demo` says the DLQ's depth once the stream shows what SQL holds: a batch's
dead letters reach the stream a second or so after its offsets may be committed, and read
at once the depth said none (`tests/integration/test_up.py` saw it)."""

from __future__ import annotations

from launcher.demo import until_none_left


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_the_demo_waits_until_the_stream_shows_every_dead_letter() -> None:
    answers, checks = iter([3, 1, 0, 5]), []
    clock = _Clock()
    left = until_none_left(lambda: next(answers), lambda: checks.append(clock.now), 15.0,
                           clock=clock, sleep=clock.sleep)
    assert left == 0
    assert len(checks) == 3  # the pipeline's processes checked before each look


def test_the_demo_says_what_is_still_on_its_way_when_its_wait_runs_out() -> None:
    clock = _Clock()
    left = until_none_left(lambda: 2, lambda: None, 1.0, clock=clock, sleep=clock.sleep)
    assert left == 2
    assert 1.0 <= clock.now <= 1.2
