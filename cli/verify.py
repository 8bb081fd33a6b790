"""`eventpipe verify`: fold the topic and compare it with the database (`eventpipe.verify`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cli.arguments import at_least
from eventpipe import redis_clients
from eventpipe.database import make_engine
from eventpipe.dlq.stream import DeadLetterStream
from eventpipe.progress import ProgressBar
from eventpipe.settings import Settings
from eventpipe.verify import committed_offsets, holds_events, render, verify


def add_command(commands: Any) -> None:
    command = commands.add_parser(
        "verify", help="read the topic's messages the database records as done, fold them "
        "with the contract's rules and compare with the database, read in one snapshot; "
        "exit 1 on any difference")
    command.add_argument("--limit", type=at_least(0), default=50,
                         help="differences to print (default 50)")
    command.set_defaults(handler=_verify)


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    committed = committed_offsets(settings)
    engine = make_engine(settings, writer=False, create=False)
    try:
        if not committed and holds_events(engine):
            # Not the thousands of differences of a topic read up to nothing: the group of
            # another pipeline, or a typo, is the likelier cause.
            print(f"eventpipe: consumer group KAFKA_GROUP_ID={settings.kafka_group_id} has "
                  f"committed no offset of topic {settings.kafka_topic!r}: is it the "
                  "bridges' group?", file=sys.stderr)
            return 2
        stream = DeadLetterStream(redis_clients.operator(settings.redis_url),
                                  settings.dlq_stream, settings.dlq_max_entries,
                                  settings.dlq_max_bytes)
        # Read once first: a DLQ_STREAM key of another kind is then the one line every command
        # gives (its index alone, which verify reads, could not say it).
        stream.sizes()
        bar = ProgressBar("reading the topic", sum(committed.values()), "messages")

        def planned(total: int) -> None:
            bar.total = total  # what the database's snapshot records as done

        try:
            report = verify(settings, engine, stream, bar, committed, planned)
        finally:
            bar.close()
    finally:
        engine.dispose()
    print(render(report, args.limit))
    return 0 if report.clean else 1
