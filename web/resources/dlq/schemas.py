"""The JSON of dead letters (`DeadLetter.as_json()`, already camelCase) and of DLQ requests."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import marshmallow as ma
from marshmallow import ValidationError, fields, validate, validates_schema

from eventpipe.dlq import Filter
from web.schemas import CamelSchema, UtcDateTime

# A Redis Stream entry id, "<milliseconds>-<sequence>". Redis allows each part up to 2**64-1
# (20 digits); 19 digits always fit, cover every real id (13-digit milliseconds), and let the
# pattern alone say what Redis accepts.
ENTRY_ID_PATTERN = r"^[0-9]{1,19}-[0-9]{1,19}$"
MAX_PAGE = 500
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _stream_id(value: str) -> None:
    # fullmatch, as `$` in a Python pattern would let a trailing newline through to Redis.
    if re.fullmatch(ENTRY_ID_PATTERN[1:-1], value) is None:
        raise ValidationError("must be a stream entry id such as 1764000000000-0")


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
    since = UtcDateTime(metadata={"description": "Entries dead-lettered at or after this time"})
    until = UtcDateTime(metadata={"description": "Entries dead-lettered at or before this time"})


def to_filter(args: dict[str, Any]) -> Filter:
    """The DLQ filter; `since` after `until` is an empty range, not an error."""
    return Filter(args.get("event_type"), args.get("error_class"), _from_epoch(args.get("since")),
                  _from_epoch(args.get("until")))


def _from_epoch(moment: datetime | None) -> datetime | None:
    # Stream ids count milliseconds since 1970: an earlier bound means the same as 1970.
    return None if moment is None else max(moment, EPOCH)


class ListArgsSchema(FilterSchema):
    after = entry_id_field(metadata={"description": "The nextCursor of the previous page"})
    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=MAX_PAGE))


class SelectionSchema(FilterSchema):
    """Entries to replay or purge: a filter, or `all`; an empty selection is refused."""

    all = fields.Boolean(load_default=False, metadata={"description": "Every entry"})

    @validates_schema
    def _not_empty(self, data: dict[str, Any], **_: Any) -> None:
        chosen = any(data.get(k) is not None for k in ("event_type", "error_class", "since",
                                                        "until"))
        if not (chosen or data.get("all")):
            raise ValidationError("name a filter (eventType, errorClass, since, until) or set "
                                  "all to true", "_schema")


class BytesSchema(ma.Schema):
    """Message bytes: `text` when they are UTF-8, else `base64`."""

    text = fields.String()
    base64 = fields.String()


class FailureSchema(ma.Schema):
    errorClass = fields.String(required=True)
    errorMessage = fields.String(required=True)
    attempts = fields.Integer(required=True)
    firstFailureAt = fields.String(required=True, metadata={"format": "date-time"})
    lastFailureAt = fields.String(required=True, metadata={"format": "date-time"})
    worker = fields.String(required=True)
    replayedAt = fields.String(required=True, allow_none=True, metadata={"format": "date-time"})


class DeadLetterSchema(ma.Schema):
    id = fields.String(required=True, metadata={"pattern": ENTRY_ID_PATTERN})
    eventId = fields.String(required=True, allow_none=True)
    eventType = fields.String(required=True, allow_none=True)
    topic = fields.String(required=True, allow_none=True)
    partition = fields.Integer(required=True, allow_none=True)
    offset = fields.Integer(required=True, allow_none=True)
    key = fields.Nested(BytesSchema, required=True, allow_none=True)
    value = fields.Nested(BytesSchema, required=True)
    errorClass = fields.String(required=True)
    errorMessage = fields.String(required=True)
    traceback = fields.String(required=True)
    attempts = fields.Integer(required=True)
    firstFailureAt = fields.String(required=True, metadata={"format": "date-time"})
    lastFailureAt = fields.String(required=True, metadata={"format": "date-time"})
    worker = fields.String(required=True)
    history = fields.List(fields.Nested(FailureSchema), required=True,
                          metadata={"description": "Earlier failures, when replayed before"})


class PageSchema(CamelSchema):
    items = fields.List(fields.Nested(DeadLetterSchema), required=True)
    next_cursor = fields.String(
        required=True, allow_none=True,
        metadata={"description": "Pass as `after` for the next page; null on the last page"},
    )
    depth = fields.Integer(required=True, metadata={"description": "Entries in the DLQ now"})


class ReplayedSchema(CamelSchema):
    replayed = fields.Integer(required=True)


class DeletedSchema(CamelSchema):
    deleted = fields.Integer(required=True)
