"""Text from the data, as an operator's terminal gets it (`eventpipe.terminal`)."""

from __future__ import annotations

from dataclasses import replace

from cli.dlq import _summary
from eventpipe.messages import RawMessage
from eventpipe.terminal import printable
from eventpipe.trace import Trace, render
from tests.support.factories import dead_letter

# A review's finding: an eventId that erases the line printed before it, retitles the window
# and rings the bell, then writes right to left.
HOSTILE = "esc-1\x1b[31mRED\x1b[0m\x1b]0;pwned\x07\r\x1b[2K\u202eevil"


def test_what_a_terminal_acts_on_is_spelled_out_and_the_rest_kept() -> None:
    assert printable(HOSTILE) == (
        "esc-1\\x1b[31mRED\\x1b[0m\\x1b]0;pwned\\x07\\r\\x1b[2K\\u202eevil")
    assert printable("tab\there\nnext line: é, 😀, 中文") == "tab\there\nnext line: é, 😀, 中文"
    assert printable("one\nforged line", one_line=True) == "one\\nforged line"


def test_the_dlq_listing_and_a_trace_print_no_control_character() -> None:
    entry = dead_letter(7)
    hostile = replace(entry, letter=replace(entry.letter, event_id=HOSTILE,
                                            event_type=HOSTILE))
    for text in (_summary(hostile), render(Trace(HOSTILE, None, [hostile.letter], {},
                                                 None))):
        assert "\x1b" not in text and "\r" not in text and "\u202e" not in text
        assert "esc-1\\x1b[31mRED" in text
    forged = replace(entry, letter=replace(entry.letter, event_id="e-1\n1-0  a forged entry"))
    assert "\n" not in _summary(forged)


def test_a_trace_forges_no_line_from_the_data() -> None:
    """A review's finding: an eventId or a reason holding a newline printed lines of its
    own in `eventpipe trace` (`event evil` then `second`), as a forged report."""
    entry = dead_letter(7)
    letter = replace(entry.letter, event_id="evil\nsecond", reason="bad\n  kafka  forged",
                     worker="w\n1")
    text = render(Trace("evil\nsecond", None, [letter], {}, None))
    assert text.splitlines()[0] == "event evil\\nsecond"
    assert "bad\\n  kafka  forged" in text and "on w\\n1;" in text
    assert len(text.splitlines()) == len(render(Trace("e", None, [entry.letter], {},
                                                      None)).splitlines())


def test_a_trace_shows_a_message_no_json_reader_takes_as_its_bytes() -> None:
    """A review's finding: a message nesting deeper than the interpreter's stack (a poison
    the DLQ holds) stopped `eventpipe trace` with a RecursionError."""
    entry = dead_letter(7)
    value = b"[" * 100_000 + b"]" * 100_000
    text = render(Trace("e", None, [entry.letter], {}, RawMessage(None, value)))
    assert text.splitlines()[-1] == f"    {value!r}"
