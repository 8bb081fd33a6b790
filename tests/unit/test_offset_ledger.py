"""The offset ledger's encoding: a batch's offsets go to Redis as the fewest ranges."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from eventpipe.offset_ledger import count_covered, offsets_of, ranges


@given(st.sets(st.integers(0, 2000), max_size=60))
def test_offsets_go_to_the_ledger_as_the_fewest_ranges(offsets: set[int]) -> None:
    written = ranges(offsets)
    assert offsets_of(written) == offsets
    spans = [tuple(map(int, member.split("-"))) for member in written]
    # In order, and no two could be one: every gap between them holds an offset left out.
    assert all(last + 1 < first for (_, last), (first, _) in itertools.pairwise(spans))


def test_a_batch_of_consecutive_offsets_is_one_range() -> None:
    assert ranges(range(100, 600)) == ["100-599"]
    assert ranges([7, 3, 4, 3]) == ["3-4", "7-7"]
    assert offsets_of([b"0-2", "5-5"]) == {0, 1, 2, 5}
    assert offsets_of(["0-2", "5-9"], low=2) == {2, 5, 6, 7, 8, 9}


def test_the_offsets_ranges_cover_are_counted_on_the_ranges() -> None:
    assert count_covered([], 0, 10) == 0
    assert count_covered(["0-4", "7-7"], 0, 10) == 6
    assert count_covered(["0-4", "3-8"], 2, 6) == 4  # overlapping, clipped at both ends
    assert count_covered([b"5-9", b"0-1"], 1, 7) == 3
    assert count_covered(["0-1000000000"], 10, 20) == 10  # no set of a billion offsets
    assert count_covered(["3-4"], 5, 3) == 0


def test_a_mark_that_is_no_range_is_left_out_and_none_reaches_past_what_is_awaited() -> None:
    """Before: a member written by hand ("abc", "-5--5" of a task with a negative offset)
    stopped the bridge with a ValueError at each sync and each start, and "0-3000000000" made
    it a set of three billion offsets (1.9 GB within 15 s: a review's finding)."""
    members: list[bytes | str] = [b"abc", "-5--5", b"7-", "9-3", b"0-3000000000",
                                  "\u0661-\u0662", b"2-4"]
    assert offsets_of(members, low=1, high=10) == set(range(1, 11))
    assert offsets_of([b"abc", b"2-4"]) == {2, 3, 4}
    assert count_covered(members, 0, 10) == 10
    assert count_covered([b"abc", b"2-4"], 0, 10) == 3
