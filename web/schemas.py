"""What every resource's schemas share: camelCase JSON, money, UTC times, ids, errors.

The marshmallow schemas are the single source of both the JSON the API sends and the OpenAPI
document that describes it, so the formats below carry their pattern and format for the doc.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import marshmallow as ma
from marshmallow import fields, validate

from eventpipe.errors import InvalidEvent
from eventpipe.events import MAX_ID_LENGTH, check_text
from eventpipe.schemas import SPACE
from eventpipe.times import utc_iso

# An id as the event contract allows it (1 to 64 characters, not only whitespace, not ending
# with a space, no NUL), whitespace spelt out as the contract's schemas spell it.
ID_PATTERN = rf"^[^\x00]*[^\x00{SPACE}]([^\x00]*[^\x00 ])?$"

# Money as the event contract writes it: fixed point, 2 to 4 decimals here (see `money`).
MONEY_PATTERN = r"^(0|[1-9][0-9]*)\.[0-9]{2,4}$"


def camel_case(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


class StrictBoolean(fields.Boolean):
    """`true` or `false` only: marshmallow's Boolean also takes 0, 1, "yes", "on"…, which an
    API whose document says boolean must refuse (a client sending `"all": 0` meant no)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return value


class CamelSchema(ma.Schema):
    """Python names inside, camelCase names on the wire and in the OpenAPI document."""

    def on_bind_field(self, field_name: str, field_obj: fields.Field[Any]) -> None:
        field_obj.data_key = camel_case(field_obj.data_key or field_name)


def money(value: Decimal) -> str:
    """A decimal string with 2 to 4 decimals: the same text whatever the database kept.

    PostgreSQL returns NUMERIC(18, 4) values with four decimals and SQLite the text it was
    given, so trailing zeros beyond the cents are dropped to give one spelling everywhere.
    """
    text = f"{value:f}"
    whole, _, fraction = text.partition(".")
    return f"{whole}.{fraction.rstrip('0').ljust(2, '0')}"


class Money(fields.String):
    """A `Decimal` sent as a decimal string, never as a float."""

    def __init__(self, **kwargs: Any) -> None:
        metadata = {"pattern": MONEY_PATTERN, "example": "19.99", **kwargs.pop("metadata", {})}
        super().__init__(metadata=metadata, **kwargs)

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        return None if value is None else money(Decimal(value))


class UtcDateTime(fields.AwareDateTime):
    """Sent as ISO-8601 UTC with a 'Z'; read as ISO-8601, naive times taken as UTC, and
    given in UTC: a time that leaves the calendar there (`0001-01-01T00:00:00+05:00`) is
    refused, as the event contract refuses it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(format="iso", default_timezone=UTC, **kwargs)

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        return None if value is None else utc_iso(value)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> datetime:
        moment = super()._deserialize(value, attr, data, **kwargs)
        try:
            return moment.astimezone(UTC)
        except OverflowError:
            raise ma.ValidationError("not a time in UTC: it leaves the calendar there") from None


def _within_the_contract(value: str) -> None:
    """What the event contract refuses in an id, beyond what the pattern and the length in
    characters say: more than 64 UTF-16 code units (characters beyond the BMP count two),
    a lone surrogate. No event can hold such an id, so it is a 422, not a 404."""
    if len(value) > MAX_ID_LENGTH or "\x00" in value:
        return  # the length and the pattern say so already
    try:
        check_text(value, "id", MAX_ID_LENGTH)
    except InvalidEvent as exc:
        raise ma.ValidationError(exc.reason) from None


class Id(fields.String):
    """An entity id in a URL path: validated so a bad one is a 422 naming the parameter."""

    def __init__(self, what: str, **kwargs: Any) -> None:
        super().__init__(
            required=True,
            validate=[
                validate.Length(min=1, max=MAX_ID_LENGTH),
                validate.Regexp(
                    ID_PATTERN,
                    error="must hold a character other than whitespace, not end with a "
                          "space, and hold no NUL",
                ),
                _within_the_contract,
            ],
            metadata={"description": f"The {what}'s id: 1 to {MAX_ID_LENGTH} characters, "
                                     "counted as UTF-16 code units (as the event contract "
                                     "counts them: a character beyond the BMP, such as "
                                     "an emoji, counts two)",
                      "example": f"{what.split()[0]}-1"},
            **kwargs,
        )


class ErrorSchema(ma.Schema):
    """Every error the API answers, 4xx or 5xx: never a stack trace."""

    code = fields.Integer(required=True, metadata={"description": "HTTP status code"})
    status = fields.String(required=True, metadata={"description": "HTTP status name"})
    message = fields.String(required=True, metadata={"description": "What went wrong"})
    errors = fields.Dict(
        required=True,
        metadata={"description": "Field errors by location then field (e.g. "
                                 "{\"path\": {\"userId\": [\"…\"]}}); empty when none"},
    )
