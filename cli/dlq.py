"""`eventpipe dlq …`: list, show, replay, purge and restore the dead-letter queue.

Replay and purge go through `eventpipe.dlq.actions`, the same path as the API's; JSON output
is the API's own schema, so a script sees the same document either way.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine

from cli.arguments import at_least, some_text
from cli.errors import explain
from eventpipe import redis_clients
from eventpipe.database import make_engine
from eventpipe.dlq import actions, projection, records
from eventpipe.dlq.stream import ENTRY_ID, DeadLetterStream, Filter, StreamEntry
from eventpipe.kafka import MessageReader
from eventpipe.progress import ProgressBar
from eventpipe.settings import Settings, SettingsError
from eventpipe.terminal import printable
from web.resources.dlq.schemas import DeadLetterSchema

_SCHEMA = DeadLetterSchema()


def add_commands(commands: Any) -> None:
    dlq = commands.add_parser("dlq", help="inspect, replay, purge and restore dead letters")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    listing = dlq_commands.add_parser("list", help="list entries, oldest failure first")
    _filters(listing)
    listing.add_argument("--after", type=_entry_id,
                         help="entry id to continue after (pagination)")
    listing.add_argument("--limit", type=at_least(1), default=50)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(handler=_list)
    show = dlq_commands.add_parser("show", help="show one entry in full")
    show.add_argument("entry_id", type=_entry_id)
    show.set_defaults(handler=_show)
    for name, handler, verb in (("replay", _replay, "publish back to Kafka"),
                                ("purge", _purge, "delete")):
        action = dlq_commands.add_parser(name, help=f"{verb} entries: ids, a filter, or --all")
        action.add_argument("entry_ids", nargs="*", type=_entry_id, help="entry ids")
        _filters(action)
        action.add_argument("--all", action="store_true", help="every entry")
        action.add_argument("--dry-run", action="store_true", help="only list what it would do")
        action.set_defaults(handler=handler)
        if name == "purge":
            action.add_argument("--yes", action="store_true",
                                help="do not ask before deleting everything (with --all)")
        else:
            action.add_argument("--limit", type=at_least(1),
                                help="replay at most this many: the first ids named, or "
                                     "the first matches in the stream's order (a run again "
                                     "starts from the first match still in the DLQ)")
    restore = dlq_commands.add_parser(
        "restore", help="rebuild the Redis stream from the SQL record (after Redis lost it), "
        "fetching each message's bytes from Kafka")
    restore.set_defaults(handler=_restore)


def _filters(parser: argparse.ArgumentParser) -> None:
    # An empty value is refused, as `replay` and `purge` take it for no filter at all.
    parser.add_argument("--event-type", type=some_text)
    parser.add_argument("--error-class", type=some_text)
    parser.add_argument("--since", type=iso_time,
                        help="entries whose last failure was at or after this ISO-8601 time "
                             "(UTC unless it names an offset)")
    parser.add_argument("--until", type=iso_time,
                        help="entries whose last failure was at or before this ISO-8601 time")


def _entry_id(text: str) -> str:
    if ENTRY_ID.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a stream entry id such as 1764000000000-0")
    return text


def iso_time(text: str) -> datetime:
    """An ISO-8601 time, UTC unless it names an offset, in UTC (as the API reads it: a time
    that leaves the calendar there, `0001-01-01T00:00:00+05:00`, is refused)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO-8601 time such as 2026-01-31T12:00:00Z") from None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time in UTC: it leaves the calendar there") from None


def _stream(settings: Settings) -> DeadLetterStream:
    return DeadLetterStream(redis_clients.operator(settings.redis_url), settings.dlq_stream,
                            settings.dlq_max_entries, settings.dlq_max_bytes)


def _where(args: argparse.Namespace) -> Filter:
    return Filter(args.event_type, args.error_class, args.since, args.until)


def _summary(entry: StreamEntry) -> str:
    letter = entry.letter
    return printable(f"{entry.entry_id}  {letter.last_failure_at:%Y-%m-%d %H:%M:%S}  "
                     f"{letter.event_type or '-':18s} {letter.error_class:16s} "
                     f"p{letter.position.partition}@{letter.position.offset}  "
                     f"{letter.event_id or '-'}  {letter.reason[:80]}", one_line=True)


def _list(args: argparse.Namespace, settings: Settings) -> int:
    stream = _stream(settings)
    entries = stream.page(_where(args), args.after, args.limit).entries
    for entry in entries:
        print(json.dumps(_SCHEMA.dump(entry)) if args.json else _summary(entry))
    if not args.json:
        print(f"-- {len(entries)} shown, {stream.depth()} in the queue", file=sys.stderr)
    if behind := not_shown(settings, stream):
        print(behind, file=sys.stderr)
    return 0


def not_shown(settings: Settings, stream: DeadLetterStream) -> str:
    """What the stream lacks of the DLQ the SQL record holds, in a line ("" for nothing): a
    stream Redis lost (restarted empty, flushed) lists nothing while the dead letters are
    there, and the workers that rebuild it may be down. The SQL record is asked briefly; a
    database that does not answer leaves the listing as the stream has it, and says so."""
    try:
        engine = make_engine(settings, writer=False, create=False, brief=True)
        try:
            keys = projection.open_keys(engine)
        finally:
            engine.dispose()
    except SettingsError as exc:  # a SQLite file not here: the stream is listed all the same
        return f"not compared with the SQL record of dead letters: {exc}"
    except Exception as exc:
        said = explain(exc, settings)
        if said is None:  # a bug: its traceback
            raise
        return f"not compared with the SQL record of dead letters: {said}"
    # In pieces: past the stream's bounds SQL may hold many more.
    missing = len(keys) - sum(len(stream.holding(keys[start:start + 10_000]))
                              for start in range(0, len(keys), 10_000))
    if not missing:
        return ""
    return (f"{missing} of the {len(keys)} open dead letter(s) the SQL record holds are not in "
            "the stream (Redis lost it, or it is full): the workers put them back as they can, "
            "`eventpipe dlq restore` at once")


def _show(args: argparse.Namespace, settings: Settings) -> int:
    entry = _stream(settings).get(args.entry_id)
    if entry is None:
        print(f"no dead letter {args.entry_id}", file=sys.stderr)
        return 1
    print(json.dumps(_SCHEMA.dump(entry), indent=2))
    return 0


def _selected(args: argparse.Namespace, stream: DeadLetterStream, *,
              fresh_only: bool = False) -> Iterable[StreamEntry] | int:
    """The entries selected, or the exit status of a selection that is none: 2 for arguments
    that select nothing, 1 for an entry id the DLQ does not hold (as `show`). `fresh_only`:
    a filter's selection passes over what failed again since it began (`actions.UntilNow`)."""
    filtered = any((args.event_type, args.error_class, args.since, args.until))
    if args.entry_ids and (args.all or filtered):
        print("name entry ids, or a filter or --all, not both", file=sys.stderr)
        return 2
    if args.entry_ids:
        found = [stream.get(entry_id) for entry_id in args.entry_ids]
        missing = [i for i, e in zip(args.entry_ids, found, strict=True) if e is None]
        if missing:
            print(f"no dead letter {', '.join(missing)}", file=sys.stderr)
            return 1
        return [entry for entry in found if entry is not None]
    if not (args.all or filtered):
        print("name entry ids, a filter (--event-type, --error-class, --since, --until) "
              "or --all", file=sys.stderr)
        return 2
    return actions.UntilNow(stream, _where(args), fresh_only=fresh_only)


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    def replay(engine: Engine, stream: DeadLetterStream, entries: Iterable[StreamEntry]) -> int:
        # The selection is read lazily: the stream's depth bounds it until the end.
        total = len(entries) if isinstance(entries, list) else stream.depth()
        bar = ProgressBar("replaying", min(total, args.limit or total), "entries")
        try:
            result = actions.replay(engine, stream, entries, actions.Publisher(settings, 30.0),
                                    progress=bar, limit=args.limit)
        finally:
            bar.finish()
        # Skipped too: what failed again since the replay began, left for a later one.
        passed = entries.passed_over if isinstance(entries, actions.UntilNow) else 0
        print(f"replayed {result.replayed}; refused by Kafka {result.refused}; skipped "
              f"{result.skipped + passed}; without bytes {result.no_bytes}"
              + (f"; rejected by Kafka {result.rejected}, a replay again fails alike (the "
                 f"first: {result.why_rejected})" if result.rejected else "")
              + (("; more named: run again with those not replayed" if args.entry_ids else
                  "; more match (a run again starts from the first still in the DLQ)")
                 if result.more else ""), file=sys.stderr)
        return 0 if result.refused == result.rejected == result.no_bytes == 0 else 1

    return _act(args, settings, "replay", replay, fresh_only=True)


def _purge(args: argparse.Namespace, settings: Settings) -> int:
    def purge(engine: Engine, stream: DeadLetterStream, entries: Iterable[StreamEntry]) -> int:
        result = actions.purge(engine, stream, entries)
        held = f"; {result.replaying} left to a replay in progress" if result.replaying else ""
        print(f"deleted {result.deleted} entries{held}", file=sys.stderr)
        return 0

    if args.all and not (args.yes or args.dry_run) and not _confirmed(
            f"delete every entry of the dead-letter queue {settings.dlq_stream}?"):
        print("nothing deleted (--yes deletes without asking)", file=sys.stderr)
        return 1
    return _act(args, settings, "delete", purge)


def _confirmed(question: str, ask: Callable[[str], str] = input) -> bool:
    """A yes from the terminal; never from a pipe or a file (scripts say --yes)."""
    if not sys.stdin.isatty():
        return False
    try:
        return ask(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def _act(args: argparse.Namespace, settings: Settings, verb: str,
         act: Callable[[Engine, DeadLetterStream, Iterable[StreamEntry]], int], *,
         fresh_only: bool = False) -> int:
    """The entries the arguments select: listed under --dry-run, else acted on."""
    stream = _stream(settings)
    entries = _selected(args, stream, fresh_only=fresh_only)
    if isinstance(entries, int):
        return entries
    if args.dry_run:
        chosen = list(itertools.islice(entries, getattr(args, "limit", None)))
        for entry in chosen:
            print(f"would {verb} " + _summary(entry))
        if not chosen:
            print("no dead letter matches", file=sys.stderr)
        return 0
    engine = make_engine(settings, create=False)
    try:
        intact = stream.intact()
        status = act(engine, stream, entries)
        if args.entry_ids:
            return status
        lost, said = left_out(engine, stream, intact)
        for line in said:
            print(line, file=sys.stderr)
        return 1 if lost else status
    finally:
        engine.dispose()


def left_out(engine: Engine, stream: DeadLetterStream, intact: bool) -> tuple[bool, list[str]]:
    """What a run over the stream's entries (a filter, --all) could not reach: open dead
    letters the stream does not show, or the whole stream, lost during the run (`intact`:
    whether it was whole at its start); and whether it was lost."""
    if intact and not stream.intact():
        return True, ["the DLQ stream was lost during the run (Redis restarted or flushed?): "
                      "the workers rebuild it from SQL; run again once `eventpipe dlq list` "
                      "shows it"]
    with engine.connect() as conn:
        unshown = records.unshown(conn)
    waiting = len(set(unshown) - stream.holding(unshown)) if unshown else 0
    if not waiting:
        return False, []
    return False, [f"{waiting} more open dead letter(s) wait in SQL, not in the stream yet (it "
                   "is full, was rebuilt, or they failed again just now): the workers show "
                   "them as they can; run again once they have"]


def _restore(_args: argparse.Namespace, settings: Settings) -> int:
    engine = make_engine(settings, create=False)
    reader = MessageReader(settings)
    bar = ProgressBar("restoring", projection.open_count(engine), "entries")
    try:
        report = projection.restore(engine, _stream(settings), reader.fetch, progress=bar)
    finally:
        bar.finish()
        reader.close()
        engine.dispose()
    print(f"restored: {report.put} entries put back, {report.removed} strays removed")
    if report.missing_bytes:
        print(f"{len(report.missing_bytes)} entries are back without their message: Kafka no "
              f"longer has it (retention): {', '.join(report.missing_bytes[:20])}")
    if report.full:
        print("the stream is full: replay or purge entries, then run restore again",
              file=sys.stderr)
        return 1
    if report.stopped:
        print("the rebuild stopped before the end: Redis restarted, or another rebuild began; "
              "run restore again", file=sys.stderr)
        return 1
    return 0
