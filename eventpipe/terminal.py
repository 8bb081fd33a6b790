"""What reaches an operator's terminal from the data: any producer can put control characters
in a message (an escape that erases the line just printed, retitles the window, or writes the
clipboard), and text that reverses its direction. Shown as escapes instead."""

from __future__ import annotations

import re

# C0 but tab and newline, DEL, C1, and Unicode's direction marks and overrides; and the
# newline, for what must stay one line (an entry of a listing).
_ACTED_ON = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e"
                       "\u2066-\u2069]")
_ACTED_ON_OR_NEWLINE = re.compile(f"{_ACTED_ON.pattern[:-1]}\n]")


def printable(text: str, *, one_line: bool = False) -> str:
    """`text` with each character a terminal would act on spelled as its escape; with
    `one_line`, its newlines too, so that no line can be forged after it."""
    acted_on = _ACTED_ON_OR_NEWLINE if one_line else _ACTED_ON
    return acted_on.sub(lambda found: found.group().encode("unicode_escape").decode(), text)
