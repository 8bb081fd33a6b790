"""The spans of offsets the bridge takes for done, against the ranges the database holds."""

from __future__ import annotations

import random

from eventpipe.spans import spans, uncovered


def test_offsets_are_the_fewest_spans_of_consecutive_ones() -> None:
    assert spans([]) == []
    assert spans([7, 3, 4, 5, 9, 9, 10]) == [(3, 5), (7, 7), (9, 10)]


def test_what_no_range_covers_is_counted_whatever_their_order_and_overlaps() -> None:
    assert uncovered([(10, 19)], [(10, 11)]) == 8
    assert uncovered([(10, 19)], [(15, 30), (9, 12)]) == 2
    assert uncovered([(0, 4), (8, 9)], []) == 7
    assert uncovered([], [(0, 9)]) == 0
    rng = random.Random(7)
    for _ in range(500):
        needed = [(first, first + rng.randrange(6)) for first in rng.sample(range(60), 5)]
        held = [(first, first + rng.randrange(9)) for first in rng.sample(range(60), 6)]
        wanted = {o for first, last in needed for o in range(first, last + 1)}
        covered = {o for first, last in held for o in range(first, last + 1)}
        assert uncovered(needed, held) == len(wanted - covered), (needed, held)
