"""`eventpipe`: one command line for every role and operator task.

Each subcommand parses its arguments, builds what it needs from the settings and hands over
to the package that owns the role; nothing here holds pipeline logic.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from eventpipe import logs
from eventpipe.settings import Settings, get_settings

Handler = Callable[[argparse.Namespace, Settings], int]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    settings = get_settings()
    logs.configure(args.command, settings.log_level)
    handler: Handler = args.handler
    try:
        return handler(args, settings)
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eventpipe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="run the whole pipeline here, in the foreground")
    up.add_argument("--demo", action="store_true", help="also send sample events and show "
                    "what the API answers")
    up.set_defaults(handler=_up)

    bridge = commands.add_parser("bridge", help="forward Kafka partitions to Celery queues")
    bridge.set_defaults(handler=_bridge)

    worker = commands.add_parser("worker", help="apply events from partition queues")
    worker.add_argument("--partitions", default=None,
                        help="e.g. 0-5 or 0,2,4 (default: all KAFKA_PARTITIONS)")
    worker.add_argument("--processes", type=int, default=1,
                        help="worker processes sharing these partitions (default 1)")
    worker.set_defaults(handler=_worker)

    migrate = commands.add_parser("migrate", help="create the database if missing, upgrade")
    migrate.set_defaults(handler=_migrate)

    produce = commands.add_parser("produce", help="publish events from a menu, or generate")
    produce.set_defaults(handler=_produce_menu)
    produce_commands = produce.add_subparsers(dest="produce_command", metavar="ACTION")
    generate = produce_commands.add_parser("generate", help="send a realistic stream")
    generate.add_argument("--count", type=int, default=1000, help="messages to send")
    generate.add_argument("--rate", type=float, default=None, help="messages per second")
    generate.add_argument("--duplicates", type=float, default=0.0, help="ratio, 0-1")
    generate.add_argument("--out-of-order", type=float, default=0.0, help="ratio, 0-1")
    generate.add_argument("--poison", type=float, default=0.0, help="ratio, 0-1")
    generate.add_argument("--seed", type=int, default=None, help="repeatable streams")
    generate.set_defaults(handler=_produce_generate)

    trace = commands.add_parser("trace", help="show an event's life by its eventId")
    trace.add_argument("event_id")
    trace.add_argument("--no-kafka", action="store_true", help="don't fetch the message")
    trace.set_defaults(handler=_trace)

    web = commands.add_parser("web", help="serve the read API (development server; "
                              "production: gunicorn -c web/gunicorn_conf.py web.wsgi:app)")
    web.set_defaults(handler=_web)

    dlq = commands.add_parser("dlq", help="inspect, replay and purge dead letters")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    listing = dlq_commands.add_parser("list", help="list entries, oldest first")
    _filters(listing)
    listing.add_argument("--after", help="entry id to continue after (pagination)")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(handler=_dlq_list)
    show = dlq_commands.add_parser("show", help="show one entry in full")
    show.add_argument("entry_id")
    show.set_defaults(handler=_dlq_show)
    for name, handler, verb in (("replay", _dlq_replay, "publish back to Kafka"),
                                ("purge", _dlq_purge, "delete")):
        action = dlq_commands.add_parser(name, help=f"{verb} entries: ids, a filter, or --all")
        action.add_argument("entry_ids", nargs="*", help="entry ids")
        _filters(action)
        action.add_argument("--all", action="store_true", help="every entry")
        action.add_argument("--dry-run", action="store_true", help="only list what it would do")
        action.set_defaults(handler=handler)
    return parser


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--event-type")
    parser.add_argument("--error-class")
    parser.add_argument("--since", type=datetime.fromisoformat, help="ISO-8601 time")
    parser.add_argument("--until", type=datetime.fromisoformat, help="ISO-8601 time")


def _up(args: argparse.Namespace, settings: Settings) -> int:
    from eventpipe.settings import provided
    from eventpipe.stack import run

    return run(settings, provided(), args.demo)


def _bridge(_args: argparse.Namespace, settings: Settings) -> int:
    from prometheus_client import start_http_server

    from bridge.service import run

    start_http_server(settings.bridge_metrics_port)
    run(settings)
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from tasks.workers import Supervisor, parse_partitions

    spec = args.partitions or f"0-{settings.kafka_partitions - 1}"
    try:
        partitions = parse_partitions(spec)
    except ValueError as exc:
        print(f"eventpipe worker: {exc}", file=sys.stderr)
        return 2
    return Supervisor(settings, partitions, args.processes).run()


def _web(_args: argparse.Namespace, settings: Settings) -> int:
    from web import create_app

    create_app(settings).run(host=settings.web_host, port=settings.web_port, threaded=True)
    return 0


def _migrate(_args: argparse.Namespace, settings: Settings) -> int:
    from eventpipe.migrations import create_database_if_missing, upgrade

    create_database_if_missing(settings.database_url)
    upgrade(settings.database_url)
    return 0


def _produce_menu(_args: argparse.Namespace, settings: Settings) -> int:
    from eventpipe.kafka import ensure_topic, make_producer
    from producer.menu import Menu

    ensure_topic(settings)
    return Menu(make_producer(settings), settings.kafka_topic, input, sys.stdout).run()


def _produce_generate(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from eventpipe.kafka import ensure_topic, make_producer
    from producer.publish import publish
    from producer.stream import plan_stream

    try:
        plan = plan_stream(args.count, duplicates=args.duplicates,
                           out_of_order=args.out_of_order, poison=args.poison, seed=args.seed)
    except ValueError as exc:
        print(f"eventpipe produce generate: {exc}", file=sys.stderr)
        return 2
    ensure_topic(settings)
    started = time.monotonic()
    result = publish(make_producer(settings), settings.kafka_topic, plan.messages,
                     total=len(plan.messages), rate=args.rate)
    elapsed = time.monotonic() - started
    print(f"sent {result.delivered} of {len(plan.messages)} messages to "
          f"{settings.kafka_topic} in {elapsed:.1f}s ({result.delivered / elapsed:,.0f}/s); "
          f"failed {result.failed}")
    for kind, number in sorted(plan.counts.items()):
        print(f"  {kind:20s} {number}")
    print(f"produce latency: p50 {result.percentile(0.5) * 1000:.1f} ms, "
          f"p95 {result.percentile(0.95) * 1000:.1f} ms, "
          f"p99 {result.percentile(0.99) * 1000:.1f} ms")
    return 0 if result.failed == 0 else 1


def _trace(args: argparse.Namespace, settings: Settings) -> int:
    from eventpipe.database import make_engine
    from eventpipe.kafka import fetch_message
    from eventpipe.trace import gather, render

    engine = make_engine(settings, writer=False)
    fetch = None if args.no_kafka else (
        lambda topic, partition, offset: fetch_message(settings, topic, partition, offset))
    trace = gather(args.event_id, engine, _queue(settings), fetch)
    engine.dispose()
    print(render(trace))
    return 0 if trace.found else 1


def _queue(settings: Settings) -> Any:
    import redis

    from eventpipe.dlq import DeadLetterQueue

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=10)
    return DeadLetterQueue(client, settings.dlq_stream, settings.dlq_max_entries)


def _where(args: argparse.Namespace) -> Any:
    from eventpipe.dlq import Filter

    return Filter(args.event_type, args.error_class, args.since, args.until)


def _summary(entry: Any) -> str:
    return (f"{entry.entry_id}  {entry.last_failure_at:%Y-%m-%d %H:%M:%S}  "
            f"{entry.event_type or '-':18s} {entry.error_class:16s} "
            f"p{entry.partition}@{entry.offset}  {entry.event_id or '-'}  "
            f"{entry.error_message[:80]}")


def _dlq_list(args: argparse.Namespace, settings: Settings) -> int:
    queue = _queue(settings)
    entries = queue.page(_where(args), args.after, args.limit)
    for entry in entries:
        print(json.dumps(entry.as_json()) if args.json else _summary(entry))
    if not args.json:
        print(f"-- {len(entries)} shown, {queue.depth()} in the queue", file=sys.stderr)
    return 0


def _dlq_show(args: argparse.Namespace, settings: Settings) -> int:
    entry = _queue(settings).get(args.entry_id)
    if entry is None:
        print(f"no dead letter {args.entry_id}", file=sys.stderr)
        return 1
    print(json.dumps(entry.as_json(), indent=2))
    return 0


def _selected(args: argparse.Namespace, queue: Any) -> list[Any] | None:
    filtered = any((args.event_type, args.error_class, args.since, args.until))
    if args.entry_ids:
        found = [queue.get(entry_id) for entry_id in args.entry_ids]
        missing = [i for i, e in zip(args.entry_ids, found, strict=True) if e is None]
        if missing:
            print(f"no dead letter {', '.join(missing)}", file=sys.stderr)
            return None
        return found
    if not (args.all or filtered):
        print("name entry ids, a filter (--event-type, --error-class, --since, --until) "
              "or --all", file=sys.stderr)
        return None
    return list(queue.scan(_where(args)))


def _dlq_replay(args: argparse.Namespace, settings: Settings) -> int:
    from eventpipe.replay import Publisher

    queue = _queue(settings)
    entries = _selected(args, queue)
    if entries is None:
        return 2
    for entry in entries:
        print(("would replay " if args.dry_run else "replaying ") + _summary(entry))
    if args.dry_run or not entries:
        return 0
    publisher = Publisher(settings, timeout_s=30)
    replayed = queue.replay(entries, publisher.publish, publisher.flush)
    print(f"replayed {replayed} entries", file=sys.stderr)
    return 0


def _dlq_purge(args: argparse.Namespace, settings: Settings) -> int:
    queue = _queue(settings)
    entries = _selected(args, queue)
    if entries is None:
        return 2
    if args.dry_run:
        for entry in entries:
            print("would delete " + _summary(entry))
        return 0
    deleted = sum(queue.delete(entry) for entry in entries)
    print(f"deleted {deleted} entries", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
