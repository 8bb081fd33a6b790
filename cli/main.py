"""`eventpipe`: one command line for every role and operator task.

Each subcommand parses its arguments, builds what it needs from the settings and hands over
to the package that owns the role; nothing here holds pipeline logic.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import sys
from collections.abc import Callable, Sequence
from importlib import metadata

from sqlalchemy.engine import make_url

from cli import dlq, errors, status, verify
from cli.arguments import at_least, event_id, positive, ratio
from eventpipe import logs
from eventpipe.settings import Settings, SettingsError, get_settings
from producer.stream import MAX_COUNT

Handler = Callable[[argparse.Namespace, Settings], int]


def main(argv: Sequence[str] | None = None) -> int:
    if sys.stdout is None:
        # Descriptor 1 closed (`>&-`): the next file or socket opened would take it, and what
        # this process or its children write to standard output would go into it.
        return _fail("standard output is closed", errors.BAD_SETTING)
    try:
        return _run(argv)
    except BrokenPipeError:
        if not _reader_gone():
            raise  # a socket's, not the output's: a bug, with its traceback
        # The reader of the output went away (`| head`): end quietly, as a shell's tools do,
        # with what is still buffered written nowhere rather than failing again at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            os.dup2(devnull, stream.fileno())
        return 128 + signal.SIGPIPE


# The commands that end by themselves, with a line for what went wrong.
_ONE_SHOT = frozenset({"dlq", "migrate", "status", "trace", "verify"})


def _run(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = get_settings()
    except SettingsError as exc:
        return _fail(f"bad setting: {exc}", errors.BAD_SETTING)
    if _in_memory(settings.database_url):
        return _fail(f"bad setting: DATABASE_URL={settings.database_url} is a database in "
                     "memory, gone when the process ends: name a file (sqlite:///path/"
                     "eventpipe.db) or a server's database", errors.BAD_SETTING)
    logs.configure(args.command, settings.log_level, settings.log_format)
    if args.command in _ONE_SHOT:
        # What such a command meets of Kafka its last line says (`errors.explain`); the
        # Kafka client's own lines before it (a connection refused, again) say the same.
        logging.getLogger("librdkafka").setLevel(logging.CRITICAL)
    handler: Handler = args.handler
    try:
        status = handler(args, settings)
        sys.stdout.flush()  # here, where a reader gone is caught, rather than at exit
        return status
    except KeyboardInterrupt:
        return 130
    except SettingsError as exc:  # a setting the services contradict (a topic's partitions)
        return _fail(f"bad setting: {exc}", errors.BAD_SETTING)
    except Exception as exc:
        line = errors.explain(exc, settings)
        if line is None:
            raise
        return _fail(line, errors.status_of(line))


def _reader_gone() -> bool:
    """Whether standard output or error is a pipe whose reader closed it (Linux says so by
    POLLERR on the writing end), rather than the BrokenPipeError a socket's."""
    if not hasattr(select, "poll"):
        return True
    poll = select.poll()
    for stream in (sys.stdout, sys.stderr):
        poll.register(stream.fileno(), 0)  # POLLERR is reported whether asked or not
    return any(events & select.POLLERR for _fd, events in poll.poll(0))


def _in_memory(url: str) -> bool:
    """A SQLite database in memory: each process, and each command, would have its own,
    empty, lost at its end. Refused here rather than by the settings, on which the API's
    unit tests build apps over one."""
    parsed = make_url(url)
    database = str(parsed.database or "")
    return parsed.get_backend_name() == "sqlite" and (
        database in ("", ":memory:") or database.startswith("file::memory:")
        or "mode=memory" in database or parsed.query.get("mode") == "memory")


def _fail(line: str, status: int) -> int:
    print(f"eventpipe: {line}", file=sys.stderr)
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eventpipe", description=__doc__)
    parser.add_argument("--version", action="version", version=f"eventpipe {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="run the whole pipeline here, in the foreground")
    up.add_argument("--demo", action="store_true", help="also send sample events and show "
                    "what the API answers")
    up.set_defaults(handler=_up)

    bridge = commands.add_parser("bridge", help="forward Kafka partitions to Celery queues")
    bridge.set_defaults(handler=_bridge)

    worker = commands.add_parser("worker", help="apply events from partition queues")
    worker.add_argument("--partitions", default=None,
                        help="fixed partitions, e.g. 0-5 or 0,2,4 (default: none fixed; the "
                        "processes join the worker pool, which shares every partition among "
                        "the live workers of all hosts)")
    worker.add_argument("--processes", type=at_least(1), default=1,
                        help="worker processes on this host (default 1)")
    worker.set_defaults(handler=_worker)

    migrate = commands.add_parser("migrate", help="create the database if missing, upgrade")
    migrate.set_defaults(handler=_migrate)

    produce = commands.add_parser("produce", help="publish events from a menu, or generate")
    produce.set_defaults(handler=_produce_menu)
    produce_commands = produce.add_subparsers(dest="produce_command", metavar="ACTION")
    generate = produce_commands.add_parser("generate", help="send a realistic stream")
    generate.add_argument("--count", type=at_least(1, MAX_COUNT), default=1000,
                          help="messages to send")
    generate.add_argument("--rate", type=positive, default=None, help="messages per second")
    generate.add_argument("--duplicates", type=ratio, default=0.0, help="ratio, 0-1")
    generate.add_argument("--out-of-order", type=ratio, default=0.0, help="ratio, 0-1")
    generate.add_argument("--poison", type=ratio, default=0.0, help="ratio, 0-1")
    generate.add_argument("--seed", type=int, default=None, help="repeatable streams")
    generate.set_defaults(handler=_produce_generate)

    trace = commands.add_parser("trace", help="show an event's life by its eventId")
    trace.add_argument("event_id", type=event_id)
    trace.add_argument("--no-kafka", action="store_true", help="don't fetch the message")
    trace.set_defaults(handler=_trace)

    web = commands.add_parser("web", help="serve the read API: gunicorn -c "
                              "web/gunicorn_conf.py web.wsgi:app, WEB_WORKERS processes")
    web.set_defaults(handler=_web)

    dlq.add_commands(commands)
    status.add_command(commands)
    verify.add_command(commands)
    return parser


def _version() -> str:
    try:
        return metadata.version("eventpipe")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def _up(args: argparse.Namespace, settings: Settings) -> int:
    from eventpipe.settings import provided
    from launcher.stack import run

    return run(settings, provided(), args.demo)


def _bridge(_args: argparse.Namespace, settings: Settings) -> int:
    from bridge.service import run
    from eventpipe import metrics

    metrics.serve(settings.bridge_metrics_port, "BRIDGE_METRICS_PORT", settings.metrics_host)
    run(settings)
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from launcher.workers import Supervisor, check_processes, parse_partitions

    partitions = None
    try:
        if args.partitions is not None:
            partitions = parse_partitions(args.partitions, settings.kafka_partitions)
        check_processes(args.processes, partitions, settings.kafka_partitions)
    except ValueError as exc:
        print(f"eventpipe worker: {exc}", file=sys.stderr)
        return 2
    return Supervisor(settings, partitions, args.processes).run()


def _web(_args: argparse.Namespace, settings: Settings) -> int:
    """gunicorn with the project's configuration, as production runs the API: JSON lines,
    WEB_WORKERS processes, and at SIGTERM the requests in flight finished before it exits."""
    import importlib.util
    import os
    from pathlib import Path

    from cli import SERVER_METRICS_DIR
    from eventpipe.ports import ensure_free
    from eventpipe.settings import child_environment

    # The port first, as every command says it; with options for gunicorn (a bind of its
    # own?) or a socket from systemd, the configuration decides (`_binds_elsewhere`).
    if not {"GUNICORN_CMD_ARGS", "LISTEN_FDS"} & os.environ.keys():
        ensure_free("WEB_PORT", settings.web_port, settings.web_host, host_setting="WEB_HOST")
    web = importlib.util.find_spec("web")  # found, not imported: gunicorn's workers import it
    assert web is not None and web.submodule_search_locations
    conf = Path(web.submodule_search_locations[0]) / "gunicorn_conf.py"
    env = child_environment({"PROMETHEUS_MULTIPROC_DIR": SERVER_METRICS_DIR}
                            if SERVER_METRICS_DIR else {})
    # Its own script where there is one: a binary upgrade (USR2) runs the command again, and
    # `python -m gunicorn` run again puts gunicorn's package first on the path, whose `http`
    # hides the standard library's.
    script = Path(sys.executable).with_name("gunicorn")
    command = ([str(script)] if script.is_file() else [sys.executable, "-m", "gunicorn"])
    sys.stdout.flush()
    sys.stderr.flush()
    # Signals reach gunicorn's arbiter itself, and a socket systemd passes finds its process.
    os.execve(command[0], [*command, "-c", str(conf), "web.wsgi:app"], env)


def _migrate(_args: argparse.Namespace, settings: Settings) -> int:
    from alembic.util.exc import CommandError

    from eventpipe.database import redacted
    from eventpipe.migrations import SchemaAhead, create_database_if_missing, upgrade

    create_database_if_missing(settings.database_url)
    where = f"the database at DATABASE_URL={redacted(settings.database_url)}"
    try:
        upgrade(settings.database_url)
    except SchemaAhead as exc:
        return _fail(f"{where} {exc}", errors.BAD_SETTING)
    except CommandError as exc:  # Alembic's own word on the scripts or the version table
        first = str(exc).strip().splitlines()
        return _fail(f"{where} cannot be migrated: {first[0] if first else 'CommandError'}",
                     errors.BAD_SETTING)
    return 0


def _produce_menu(_args: argparse.Namespace, settings: Settings) -> int:
    from eventpipe.kafka import ensure_topic, make_producer
    from producer.menu import Menu

    ensure_topic(settings)
    return Menu(make_producer(settings), settings.kafka_topic, input, sys.stdout).run()


def _produce_generate(args: argparse.Namespace, settings: Settings) -> int:
    import time
    from collections import Counter

    from eventpipe.kafka import ensure_topic, make_producer
    from producer.publish import publish
    from producer.stream import generate, tally

    try:
        messages = generate(args.count, duplicates=args.duplicates,
                            out_of_order=args.out_of_order, poison=args.poison, seed=args.seed)
    except ValueError as exc:
        print(f"eventpipe produce generate: {exc}", file=sys.stderr)
        return 2
    ensure_topic(settings)
    counts: Counter[str] = Counter()
    started = time.monotonic()
    result = publish(make_producer(settings), settings.kafka_topic, tally(messages, counts),
                     total=args.count, rate=args.rate, stop_on=(signal.SIGINT, signal.SIGTERM))
    elapsed = time.monotonic() - started
    if result.interrupted:
        print(f"interrupted after handing {result.handed} of {args.count} messages to "
              "Kafka's client:", end=" ")
    print(f"sent {result.delivered} of {args.count} messages to "
          f"{settings.kafka_topic} in {elapsed:.1f}s ({result.delivered / elapsed:,.0f}/s); "
          f"failed {result.failed}"
          + (f"; unconfirmed {result.unconfirmed}" if result.unconfirmed else ""))
    for error, number in result.errors.most_common():
        print(f"  failed {number}: {error}", file=sys.stderr)
    for kind, number in sorted(counts.items()):
        print(f"  {kind:20s} {number}")
    print(f"produce latency: p50 {result.percentile(0.5) * 1000:.1f} ms, "
          f"p95 {result.percentile(0.95) * 1000:.1f} ms, "
          f"p99 {result.percentile(0.99) * 1000:.1f} ms")
    if result.interrupted:
        return 128 + result.signal_number
    return 0 if result.delivered == args.count else 1


def _trace(args: argparse.Namespace, settings: Settings) -> int:
    from eventpipe.database import make_engine
    from eventpipe.kafka import MessageReader
    from eventpipe.trace import gather, render

    engine = make_engine(settings, writer=False, create=False)
    reader = None if args.no_kafka else MessageReader(settings)
    try:
        trace = gather(args.event_id, engine, dlq._stream(settings),
                       reader.fetch if reader else None)
    finally:
        engine.dispose()
        if reader is not None:
            reader.close()
    print(render(trace))
    return 0 if trace.found else 1


if __name__ == "__main__":
    sys.exit(main())
