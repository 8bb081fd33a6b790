"""Spans of Kafka offsets, `(first, last)` with both included: how the offset ledger, the
ranges a batch records in the database and the bridge's check of them speak of offsets."""

from __future__ import annotations

from collections.abc import Iterable

Span = tuple[int, int]  # offsets from the first to the last, both included


def spans(offsets: Iterable[int]) -> list[Span]:
    """The offsets as the fewest spans of consecutive ones, in order. On a batch's path (the
    ledger's marks): sorted once, and walked with the span in hand in locals."""
    found: list[Span] = []
    first = last = -2  # no span yet: Kafka's offsets are never negative
    for offset in sorted(offsets):
        if offset > last + 1:
            if last >= first >= 0:
                found.append((first, last))
            first = last = offset
        elif offset > last:
            last = offset
    if last >= first >= 0:
        found.append((first, last))
    return found


def merged(held: Iterable[Span]) -> list[Span]:
    """Spans that overlap or touch, as one, in order."""
    found: list[Span] = []
    for first, last in sorted(held):
        if found and first <= found[-1][1] + 1:
            found[-1] = (found[-1][0], max(found[-1][1], last))
        else:
            found.append((first, last))
    return found


def uncovered(needed: Iterable[Span], held: Iterable[Span]) -> int:
    """How many offsets of the `needed` spans none of the `held` spans covers: one pass over
    both, in order (a topic whose offsets leave gaps has thousands of each)."""
    cover = merged(held)
    missing, at = 0, 0
    for first, last in merged(needed):
        while at < len(cover) and cover[at][1] < first:
            at += 1
        reached, next_held = first, at  # the first offset not known covered yet
        while next_held < len(cover) and cover[next_held][0] <= last:
            start, end = cover[next_held]
            missing += max(0, start - reached)
            reached = end + 1
            next_held += 1
        missing += max(0, last + 1 - reached)
    return missing
