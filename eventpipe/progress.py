"""A progress bar for long commands: redrawn in place on stderr when stderr is a terminal, and
nothing at all otherwise, so a file or a pipe never gets carriage-return frames.

`produce generate`, `dlq replay`, `dlq restore`, `verify` and the demo's wait draw one:
`replaying [#########.....................] 310/1,000 entries  120/s`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

WIDTH = 30
REDRAW_S = 0.1


class ProgressBar:
    def __init__(self, label: str, total: int, unit: str, *, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.total = max(0, total)
        self.unit = unit
        self.stream = stream or sys.stderr
        self.shown = self.stream.isatty()
        self.clock = clock
        self.started = clock()
        self.done = 0
        self._drawn_at: float | None = None

    def advance(self, count: int = 1) -> None:
        self.update(self.done + count)

    __call__ = advance  # a progress callback (`count` more done)

    def update(self, done: int) -> None:
        self.done = done
        now = self.clock()
        if self.shown and (self._drawn_at is None or now - self._drawn_at >= REDRAW_S
                           or done >= self.total):
            self._draw(now)

    def finish(self) -> None:
        """The work is over, however much there was: the total is what was done."""
        self.total = self.done
        self.close()

    def close(self) -> None:
        """The last frame, then a newline: what follows starts on a line of its own. Once."""
        if self.shown and self._drawn_at is not None:
            self._draw(self.clock())
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False

    def frame(self, now: float) -> str:
        filled = WIDTH * min(self.done, self.total) // self.total if self.total else WIDTH
        elapsed = now - self.started
        rate = f"  {self.done / elapsed:,.0f}/s" if elapsed > 0 and self.done else ""
        return (f"{self.label} [{'#' * filled}{'.' * (WIDTH - filled)}] "
                f"{self.done:,}/{self.total:,} {self.unit}{rate}")

    def _draw(self, now: float) -> None:
        self._drawn_at = now
        self.stream.write("\r" + self.frame(now) + "\x1b[K")
        self.stream.flush()
