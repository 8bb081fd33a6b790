"""`eventpipe verify`: fold the topic and compare it with the database (`eventpipe.verify`)."""

from __future__ import annotations

import argparse
from typing import Any

from cli.arguments import at_least
from eventpipe import redis_clients
from eventpipe.database import make_engine
from eventpipe.dlq.stream import DeadLetterStream
from eventpipe.progress import ProgressBar
from eventpipe.settings import Settings
from eventpipe.verify import committed_offsets, render, verify


def add_command(commands: Any) -> None:
    command = commands.add_parser(
        "verify", help="read the topic up to the committed offsets, fold it with the "
        "contract's rules and compare with the database; exit 1 on any difference")
    command.add_argument("--limit", type=at_least(0), default=50,
                         help="differences to print (default 50)")
    command.set_defaults(handler=_verify)


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    committed = committed_offsets(settings)
    engine = make_engine(settings, writer=False, create=False)
    stream = DeadLetterStream(redis_clients.operator(settings.redis_url), settings.dlq_stream,
                              settings.dlq_max_entries, settings.dlq_max_bytes)
    bar = ProgressBar("reading the topic", sum(committed.values()), "messages")
    try:
        report = verify(settings, engine, stream, bar, committed)
    finally:
        engine.dispose()
        bar.close()
    print(render(report, args.limit))
    return 0 if report.clean else 1
