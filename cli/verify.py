"""`eventpipe verify`: fold the topic and compare it with the database (`eventpipe.verify`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from eventpipe import redis_clients
from eventpipe.database import make_engine
from eventpipe.dlq.stream import DeadLetterStream
from eventpipe.settings import Settings
from eventpipe.verify import committed_offsets, render, verify


def add_command(commands: Any) -> None:
    command = commands.add_parser(
        "verify", help="read the topic up to the committed offsets, fold it with the "
        "contract's rules and compare with the database; exit 1 on any difference")
    command.add_argument("--limit", type=int, default=50,
                         help="differences to print (default 50)")
    command.set_defaults(handler=_verify)


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    committed = committed_offsets(settings)
    engine = make_engine(settings, writer=False)
    stream = DeadLetterStream(redis_clients.operator(settings.redis_url), settings.dlq_stream,
                              settings.dlq_max_entries, settings.dlq_max_bytes)
    bar = _ProgressBar(sum(committed.values())) if sys.stderr.isatty() else None
    try:
        report = verify(settings, engine, stream, bar, committed)
    finally:
        engine.dispose()
        if bar is not None:
            bar.close()
    print(render(report, args.limit))
    return 0 if report.clean else 1


class _ProgressBar:
    """`reading the topic [#####.....] 12,000/27,000 messages` on stderr, while it reads."""

    WIDTH = 30

    def __init__(self, total: int) -> None:
        self.total = max(1, total)
        self.read = 0

    def __call__(self, count: int) -> None:
        self.read += count
        if self.read % 1000 == 0 or self.read >= self.total:
            self._draw()

    def _draw(self) -> None:
        filled = min(self.WIDTH, self.WIDTH * self.read // self.total)
        print(f"\rreading the topic [{'#' * filled}{'.' * (self.WIDTH - filled)}] "
              f"{self.read:,}/{self.total:,} messages", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.read:
            self._draw()
            print(file=sys.stderr)
