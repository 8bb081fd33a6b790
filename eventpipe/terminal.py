"""What reaches an operator's terminal from the data: any producer can put control characters
in a message (an escape that erases the line just printed, retitles the window, or writes the
clipboard), and text that reverses its direction. Shown as escapes instead."""

from __future__ import annotations

import re

# C0 but tab and newline, DEL, C1, and Unicode's direction marks and overrides.
_ACTED_ON = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e"
                       "\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with each character a terminal would act on spelled as its escape."""
    return _ACTED_ON.sub(lambda found: found.group().encode("unicode_escape").decode(), text)
