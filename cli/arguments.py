"""Argument types that refuse, before anything is done, numbers that make no sense."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from eventpipe.errors import InvalidEvent
from eventpipe.events import MAX_ID_LENGTH, check_text


def at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An integer of `minimum` or more, and of `maximum` or less if given."""
    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"{number}: must be at least {minimum}")
        if maximum is not None and number > maximum:
            raise argparse.ArgumentTypeError(f"{number}: must be at most {maximum:,}")
        return number
    return parse


def positive(text: str) -> float:
    """A finite number above 0."""
    number = _number(text)
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"{text}: must be a number above 0")
    return number


def ratio(text: str) -> float:
    """A number from 0 to 1."""
    number = _number(text)
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"{text}: must be from 0 to 1")
    return number


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def text(value: str) -> str:
    """Text as given, if it is UTF-8: bytes of argv that are not reach Python as lone
    surrogates, which no database driver, Redis or Kafka client can encode."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("not UTF-8 text") from None
    return value


def event_id(value: str) -> str:
    """An id as the DLQ may show one (a message that is no event keeps the id it gave, blank
    or not): another names nothing, and is said so, not looked for."""
    if not value:
        raise argparse.ArgumentTypeError("empty: name an event id")
    try:
        check_text(text(value), "eventId", MAX_ID_LENGTH)
    except InvalidEvent as exc:
        raise argparse.ArgumentTypeError(f"no event id: it {exc.reason}") from None
    return value


def some_text(value: str) -> str:
    """Text of at least one character, as a filter's value: an empty one would match
    nothing, rather than leave the filter out."""
    if not value:
        raise argparse.ArgumentTypeError("empty: name a value, or leave the option out")
    return text(value)
