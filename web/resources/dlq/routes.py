"""The dead-letter queue over HTTP: list, show, replay (one or by filter), delete, purge.

Every endpoint requires the bearer token (`DLQ_API_TOKEN`), checked before anything else.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, TypeVar

import marshmallow as ma
from flask.views import MethodView
from flask_smorest import Blueprint

from eventpipe.dlq import actions
from eventpipe.dlq.actions import Replayed
from eventpipe.dlq.replays import KEEP_S, Replays, selection_of
from eventpipe.dlq.stream import DeadLetterStream, Filter, StreamEntry
from eventpipe.errors import TransientError
from web import services
from web.errors import conflict, not_found
from web.resources.dlq.auth import require_token
from web.resources.dlq.schemas import (
    DeadLetterSchema,
    DeletedSchema,
    EntryPathSchema,
    ListArgsSchema,
    PageSchema,
    ReplayedSchema,
    ReplayedSomeSchema,
    ReplaySelectionSchema,
    SelectionSchema,
    to_filter,
)

SECURITY_SCHEME = "bearerAuth"
# A replay by filter takes entries for this long, under the HTTP server's timeout (60 s) less
# the last chunk's wait for Kafka (`actions.FLUSH_TIMEOUT_S`): the client goes on with the
# cursor it is given (`eventpipe.dlq.replays`).
REPLAY_REQUEST_S = 30.0
# A replay's call holds it at most this long: a call the server killed holds it until the
# claims it left lapse, so that the next call does not take them for another replay's.
REPLAY_HELD_S = actions.REPLAY_CLAIM_S + 60.0

blp = Blueprint("dlq", __name__, url_prefix="/dlq",
                description="The dead-letter queue (bearer token required)")
blp.before_request(require_token)

View = TypeVar("View", bound=Callable[..., Any])


def guarded(view: View) -> View:
    """Document the token requirement and its two refusals on an operation."""
    view = blp.alt_response(403, response="FORBIDDEN")(view)
    view = blp.alt_response(401, response="UNAUTHORIZED")(view)
    documented: View = blp.doc(security=[{SECURITY_SCHEME: []}])(view)
    return documented


def _stream() -> DeadLetterStream:
    return services.current().dead_letters()


def _entry(entry_id: str) -> StreamEntry:
    entry = _stream().get(entry_id)
    if entry is None:
        not_found(f"no dead letter {entry_id!r}")
    return entry


def _publisher() -> actions.Publisher:
    return actions.Publisher(services.current().settings)


@blp.route("/entries")
class Entries(MethodView):
    @guarded
    # A misspelt filter (?evenType=…) must be an error, not a silent listing of everything.
    @blp.arguments(ListArgsSchema, location="query", unknown=ma.RAISE)
    @blp.response(200, PageSchema)
    @blp.doc(operationId="listDeadLetters")
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """Entries, oldest failure first, a page at a time, optionally filtered"""
        stream = _stream()
        page = stream.page(to_filter(args), args.get("after"), args["limit"])
        return {"items": page.entries,
                "next_cursor": page.entries[-1].entry_id if page.more else None,
                "depth": stream.depth()}


@blp.route("/entries/<id:entryId>")
class Entry(MethodView):
    @guarded
    @blp.arguments(EntryPathSchema, location="path")
    @blp.response(200, DeadLetterSchema)
    @blp.alt_response(404, response="NOT_FOUND")
    @blp.doc(operationId="getDeadLetter")
    def get(self, path: dict[str, str], **_: str) -> StreamEntry:
        """One entry in full: message bytes, Kafka position, error, traceback, history"""
        return _entry(path["entry_id"])

    @guarded
    @blp.arguments(EntryPathSchema, location="path")
    @blp.response(204)
    @blp.alt_response(404, response="NOT_FOUND")
    @blp.alt_response(409, response="CONFLICT")
    @blp.doc(operationId="deleteDeadLetter")
    def delete(self, path: dict[str, str], **_: str) -> None:
        """Delete one entry for good (its event's fate stays recorded as purged); 409 while a
        replay in progress has it"""
        if actions.purge(services.current().writer, _stream(),
                         [_entry(path["entry_id"])]).replaying:
            conflict("a replay in progress has this entry: it leaves the DLQ once Kafka "
                     "takes it, or stays if Kafka refuses it")


@blp.route("/entries/<id:entryId>/replay")
class ReplayEntry(MethodView):
    @guarded
    @blp.arguments(EntryPathSchema, location="path")
    @blp.response(200, ReplayedSchema)
    @blp.alt_response(404, response="NOT_FOUND")
    @blp.alt_response(409, response="CONFLICT")
    @blp.alt_response(503, response="SERVICE_UNAVAILABLE")
    @blp.doc(operationId="replayDeadLetter")
    def post(self, path: dict[str, str], **_: str) -> Replayed:
        """Publish one entry back to Kafka; it leaves the DLQ once Kafka acknowledged it; 409
        when Kafka refuses its message itself (a replay again fails alike)"""
        result = actions.replay(services.current().writer, _stream(),
                                [_entry(path["entry_id"])], _publisher())
        if result.rejected:
            conflict(f"Kafka refuses this entry's message: {result.why_rejected}; it stays in "
                     "the dead-letter queue, and a replay again fails alike until what Kafka "
                     "refuses changes (the topic's max.message.bytes, its ACLs)")
        if result.refused:
            raise TransientError("Kafka did not acknowledge the replayed message; it stays in "
                                 "the dead-letter queue")
        return result


@blp.route("/replay")
class Replay(MethodView):
    @guarded
    @blp.arguments(ReplaySelectionSchema)
    @blp.response(200, ReplayedSomeSchema)
    @blp.alt_response(404, response="NOT_FOUND")
    @blp.alt_response(409, response="CONFLICT")
    @blp.alt_response(503, response="SERVICE_UNAVAILABLE")
    @blp.doc(operationId="replayDeadLetters")
    def post(self, selection: dict[str, Any]) -> dict[str, Any]:
        """Publish the entries that match back to Kafka (a filter, or all), in chunks: up to
        `limit`, or those it can in about 30 s; go on with the `cursor` it answers"""
        deadline = time.monotonic() + REPLAY_REQUEST_S  # noting the keys counts too
        replays = Replays(_stream())
        where = to_filter(selection)
        first = "cursor" not in selection
        cursor = replays.begin(where) if first else selection["cursor"]
        try:
            result = _replay_call(replays, cursor, where, selection.get("limit"), deadline)
            if result.refused and not result.replayed:  # Kafka's trouble, not the letters'
                raise TransientError(
                    f"Kafka did not acknowledge the {result.refused} message(s) this call "
                    "replayed; they stay in the dead-letter queue. "
                    + ("Begin the replay again" if first else "The same cursor goes on past "
                       "them"))
        except Exception:
            if first:  # never answered: a call made again begins anew
                replays.end(cursor)
            raise
        if not result.more:
            replays.end(cursor)
        return {**dataclasses.asdict(result), "cursor": cursor if result.more else None}


def _replay_call(replays: Replays, cursor: str, where: Filter, limit: int | None,
                 deadline: float) -> Replayed:
    """One call of a replay by filter, which it holds meanwhile: given back as the call ends,
    but not when the HTTP server cut it off (`SystemExit`): then the claims it left lapse
    before another call of the replay takes them for another replay's."""
    begun = replays.selection(cursor)
    if begun is None:
        not_found(f"no replay {cursor!r}: it ended, or was not called for {KEEP_S // 60} "
                  "min; begin another (without a cursor)")
    if begun != selection_of(where):
        conflict("the cursor is of a replay of another selection: send the same filter with "
                 "it")
    held = replays.hold(cursor, REPLAY_HELD_S)
    if held is None:
        conflict("another call of this replay is running, or was cut off less than "
                 f"{REPLAY_HELD_S / 60:.0f} min ago (its claims lapse then): retry later")
    try:
        result = actions.replay(
            services.current().writer, replays.stream, replays.entries(cursor), _publisher(),
            limit=limit, deadline=deadline, done=lambda entries: replays.taken(cursor, entries))
    except Exception:
        replays.release(cursor, held)
        raise
    replays.release(cursor, held)
    result.skipped += replays.passed
    return result


@blp.route("/purge")
class Purge(MethodView):
    @guarded
    @blp.arguments(SelectionSchema)
    @blp.response(200, DeletedSchema)
    @blp.doc(operationId="purgeDeadLetters")
    def post(self, selection: dict[str, Any]) -> actions.Purged:
        """Delete every entry that matches (a filter, or all), but those a replay in progress
        has"""
        stream = _stream()
        return actions.purge(services.current().writer, stream, stream.scan(to_filter(selection)))
