"""The JSON of dead letters (`DeadLetter.as_json()`, already camelCase) and of DLQ requests."""

from __future__ import annotations

import base64
import re
from typing import Any, ClassVar

import marshmallow as ma
from marshmallow import ValidationError, fields, validate, validates_schema

from eventpipe.dlq.stream import Filter
from web.schemas import CamelSchema, StrictBoolean, UtcDateTime

# A Redis Stream entry id, "<milliseconds>-<sequence>". Redis allows each part up to 2**64-1
# (20 digits); 19 digits always fit, cover every real id (13-digit milliseconds), and let the
# pattern alone say what Redis accepts.
ENTRY_ID_PATTERN = r"^[0-9]{1,19}-[0-9]{1,19}$"
MAX_PAGE = 500


def _stream_id(value: str) -> None:
    # fullmatch, as `$` in a Python pattern would let a trailing newline through to Redis.
    if re.fullmatch(ENTRY_ID_PATTERN[1:-1], value) is None:
        raise ValidationError("must be a stream entry id such as 1764000000000-0")


# A replay's cursor (`eventpipe.dlq.replays`): URL-safe base64 of 16 random bytes.
CURSOR_PATTERN = r"^[A-Za-z0-9_-]{22}$"


def _cursor(value: str) -> None:
    if re.fullmatch(CURSOR_PATTERN[1:-1], value) is None:  # as `_stream_id`
        raise ValidationError("must be the cursor an earlier call answered")


def entry_id_field(**kwargs: Any) -> fields.String:
    return fields.String(
        validate=_stream_id,
        metadata={"example": "1764000000000-0", "pattern": ENTRY_ID_PATTERN,
                  **kwargs.pop("metadata", {})},
        **kwargs,
    )


class EntryPathSchema(CamelSchema):
    entry_id = entry_id_field(required=True)


class FilterSchema(CamelSchema):
    """Which entries: every given criterion must match."""

    event_type = fields.String(validate=validate.Length(min=1, max=64),
                               metadata={"example": "OrderPlaced"})
    error_class = fields.String(validate=validate.Length(min=1, max=200),
                                metadata={"example": "InvalidEvent"})
    since = UtcDateTime(metadata={
        "description": "Entries whose last failure was at or after this time"})
    until = UtcDateTime(metadata={
        "description": "Entries whose last failure was at or before this time"})


def to_filter(args: dict[str, Any]) -> Filter:
    """The DLQ filter; `since` after `until` is an empty range, not an error."""
    return Filter(args.get("event_type"), args.get("error_class"), args.get("since"),
                  args.get("until"))


class ListArgsSchema(FilterSchema):
    after = entry_id_field(metadata={"description": "The nextCursor of the previous page"})
    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=MAX_PAGE))


class SelectionSchema(FilterSchema):
    """Entries to replay or purge: a filter, or `all`; an empty selection is refused."""

    # What `_not_empty` holds, for the OpenAPI document (which marshmallow cannot say).
    ANY_OF: ClassVar[list[dict[str, Any]]] = [
        *({"required": [name]} for name in ("eventType", "errorClass", "since", "until")),
        {"required": ["all"], "properties": {"all": {"enum": [True]}}}]

    all = StrictBoolean(load_default=False, metadata={"description": "Every entry"})

    @validates_schema
    def _not_empty(self, data: dict[str, Any], **_: Any) -> None:
        chosen = any(data.get(k) is not None for k in ("event_type", "error_class", "since",
                                                        "until"))
        if not (chosen or data.get("all")):
            raise ValidationError("name a filter (eventType, errorClass, since, until) or set "
                                  "all to true", "_schema")


class ReplaySelectionSchema(SelectionSchema):
    """Entries to replay: a filter, or `all`; at most how many this call takes, and where an
    earlier call of the same replay stopped."""

    # Strict: in a JSON body 1.9 would be taken for 1 and "1" for 1, where the document says
    # an integer.
    limit = fields.Integer(strict=True, validate=validate.Range(min=1), metadata={
        "description": "Replay at most this many, in the stream's order; the rest are left "
                       "for another call (`cursor`)"})
    cursor = fields.String(validate=_cursor, metadata={
        "pattern": CURSOR_PATTERN,
        "description": "The `cursor` the last call answered, with the same filter: go on past "
                       "the entries the calls before took"})


class BytesSchema(ma.Schema):
    """Message bytes: `text` when they are UTF-8, else `base64`."""

    text = fields.String()
    base64 = fields.String()


def _bytes(raw: bytes | None) -> dict[str, str] | None:
    if raw is None:
        return None
    try:
        return {"text": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(raw).decode()}


class EpisodeSchema(CamelSchema):
    """An earlier life of the dead letter: how it failed, and how it left the DLQ."""

    error_class = fields.String(required=True)
    reason = fields.String(required=True)
    attempts = fields.Integer(required=True)
    first_failure_at = fields.String(required=True, metadata={"format": "date-time"})
    last_failure_at = fields.String(required=True, metadata={"format": "date-time"})
    worker = fields.String(required=True)
    ended = fields.String(required=True, validate=validate.OneOf(["replayed", "purged",
                                                                  "resolved"]))
    ended_at = fields.String(required=True, metadata={"format": "date-time"})


class DeadLetterSchema(CamelSchema):
    """One dead letter as the DLQ holds it (a `StreamEntry`)."""

    id = fields.String(required=True, attribute="entry_id",
                       metadata={"pattern": ENTRY_ID_PATTERN})
    dlq_key = fields.String(required=True, attribute="letter.dlq_key",
                            metadata={"description": "The dead letter's name: e:<fingerprint> "
                                      "for an event, m:<fingerprint> for other bytes"})
    event_id = fields.String(required=True, allow_none=True, attribute="letter.event_id")
    event_type = fields.String(required=True, allow_none=True, attribute="letter.event_type")
    topic = fields.String(required=True, allow_none=True, attribute="letter.position.topic")
    partition = fields.Integer(required=True, allow_none=True,
                               attribute="letter.position.partition")
    offset = fields.Integer(required=True, allow_none=True, attribute="letter.position.offset")
    key = fields.Function(lambda entry: _bytes(entry.key), required=True, allow_none=True,
                          metadata={"type": "object", "nullable": True,
                                    "description": "{text} or {base64}"})
    value = fields.Function(
        lambda entry: _bytes(entry.value), required=True, allow_none=True,
        metadata={"type": "object", "nullable": True,
                  "description": "{text} or {base64}; null if the stream lost the bytes "
                                 "(`eventpipe dlq restore` fetches them from Kafka); no text "
                                 "for a null value, a tombstone (`tombstone`)"})
    tombstone = fields.Boolean(
        required=True, metadata={"description": "The message's value is null (a Kafka "
                                 "tombstone), not empty: `value` shows no text, and a replay "
                                 "sends it null"})
    headers = fields.Function(
        lambda entry: [{"name": name, "value": _bytes(value)} for name, value in entry.headers],
        required=True,
        metadata={"type": "array", "items": {
                      "type": "object", "required": ["name", "value"], "properties": {
                          "name": {"type": "string"},
                          "value": {"type": "object", "nullable": True,
                                    "description": "{text} or {base64}"}}},
                  "description": "The message's Kafka headers, in order; a replay sends "
                                 "them"})
    error_class = fields.String(required=True, attribute="letter.error_class")
    error_message = fields.String(required=True, attribute="letter.reason")
    traceback = fields.String(required=True, allow_none=True, attribute="letter.traceback")
    attempts = fields.Integer(required=True, attribute="letter.attempts")
    first_failure_at = UtcDateTime(required=True, attribute="letter.first_failure_at")
    last_failure_at = UtcDateTime(required=True, attribute="letter.last_failure_at")
    worker = fields.String(required=True, attribute="letter.worker")
    history = fields.List(fields.Nested(EpisodeSchema), required=True,
                          attribute="letter.history",
                          metadata={"description": "Earlier lives, oldest first"})


class PageSchema(CamelSchema):
    items = fields.List(fields.Nested(DeadLetterSchema), required=True)
    next_cursor = fields.String(
        required=True, allow_none=True,
        metadata={"description": "Pass as `after` for the next page; null on the last page"},
    )
    depth = fields.Integer(required=True, metadata={"description": "Entries in the DLQ now"})


class ReplayedSchema(CamelSchema):
    replayed = fields.Integer(required=True, metadata={
        "description": "Published and acknowledged by Kafka: out of the DLQ"})
    refused = fields.Integer(required=True, metadata={
        "description": "Kafka did not acknowledge them: still in the DLQ"})
    rejected = fields.Integer(required=True, metadata={
        "description": "Kafka refuses the messages themselves (larger than the topic takes, a "
                       "topic it refuses): still in the DLQ, and a replay again fails alike"})
    why_rejected = fields.String(required=True, allow_none=True, metadata={
        "description": "Kafka's reason for the first of them; null when none was rejected"})
    skipped = fields.Integer(required=True, metadata={
        "description": "No longer open (another replay has them, or they are gone)"})
    no_bytes = fields.Integer(required=True, metadata={
        "description": "Their message bytes are neither in the stream nor in Kafka at the "
                       "entry's position (its retention passed), or Kafka did not answer "
                       "for them: still in the DLQ"})


class ReplayedSomeSchema(ReplayedSchema):
    skipped = fields.Integer(required=True, metadata={
        "description": "Not replayed: another replay has them, or they failed again since "
                       "the replay began (left for a later one). Entries already gone from "
                       "the DLQ when the call reached them are not counted"})
    more = fields.Boolean(required=True, metadata={
        "description": "Entries that match were left: the call took `limit` of them, or "
                       "those it could in about 30 s, under the HTTP server's timeout"})
    cursor = fields.String(required=True, allow_none=True, metadata={
        "description": "While `more`: send it with the same selection to go on (for an hour "
                       "after the last call); null when the replay is done"})


class DeletedSchema(CamelSchema):
    deleted = fields.Integer(required=True)
    replaying = fields.Integer(required=True, metadata={
        "description": "entries left to a replay in progress: they leave the DLQ once Kafka "
                       "takes them, or stay if it refuses them"})
