"""Progress bars draw on terminals only."""

from __future__ import annotations

import io

from eventpipe.progress import ProgressBar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_frames_redrawn_in_place_and_a_last_newline() -> None:
    now = [0.0]
    screen = Terminal()
    bar = ProgressBar("replaying", 4, "entries", stream=screen, clock=lambda: now[0])
    bar(1)
    now[0] = 0.05
    bar(1)  # within the redraw interval: not drawn
    now[0] = 1.0
    bar.advance(2)
    bar.close()
    bar.close()  # once is enough: a second close draws nothing
    frames = screen.getvalue()
    assert frames.count("\r") == 3  # the first, the last (complete), and close's
    assert "replaying [" + "#" * 30 + "] 4/4 entries  4/s" in frames
    assert frames.endswith("\n")


def test_a_file_or_a_pipe_gets_nothing() -> None:
    output = io.StringIO()
    bar = ProgressBar("sending", 10, "messages", stream=output)
    for _ in range(10):
        bar(1)
    bar.close()
    assert output.getvalue() == ""
