"""`eventpipe status`: the pipeline's state (`eventpipe.status`), as `GET /status` has it."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from eventpipe import redis_clients
from eventpipe.broker_queues import depth_reader
from eventpipe.database import make_engine
from eventpipe.settings import Settings
from eventpipe.status import collect, render
from web.resources.status.schemas import StatusSchema


def add_command(commands: Any) -> None:
    command = commands.add_parser(
        "status", help="per partition: committed offset, lag, queue, in flight, who reads and "
        "who applies it; processes, events/s, dead letters; exit 1 if there are problems")
    command.add_argument("--json", action="store_true", help="print the JSON document of GET "
                         "/status (the default when the output is not a terminal)")
    command.set_defaults(handler=_status)


def _status(args: argparse.Namespace, settings: Settings) -> int:
    engine = make_engine(settings, writer=False, create=False)
    client = redis_clients.operator(settings.redis_url)
    broker = depth_reader(settings, redis_clients.operator)
    try:
        status = collect(settings, engine, client, broker)
    finally:
        engine.dispose()
        if broker is not None:
            broker.close()
    if args.json or not sys.stdout.isatty():
        print(json.dumps(StatusSchema().dump(status), indent=2))
    else:
        print(render(status))
    return 1 if status.problems else 0
