"""The event contract as JSON Schema (draft 2020-12), for producers and their tooling.

Built from the bounds `eventpipe.events` enforces, so the two cannot drift apart: one schema
for the envelope and one per event type. `parse_event` stays the authority: a few of its rules
are beyond what JSON Schema can say (lengths in UTF-16 code units, NUL and lone surrogates,
the length of an email once lowercased, times that leave the calendar in UTC, `occurredAt`
against the Kafka timestamp, the Kafka key) and are named in each schema's `$comment`.

    python -m eventpipe.schemas docs/contract     # write docs/contract/*.schema.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from eventpipe.events import (
    MAX_DELTA,
    MAX_EMAIL_LENGTH,
    MAX_ID_LENGTH,
    MAX_ITEMS,
    MAX_QUANTITY,
    MAX_TEXT_LENGTH,
    SUPPORTED_SCHEMA_VERSIONS,
    EventType,
)

Schema = dict[str, Any]
BASE_URI = "urn:eventpipe:contract:"
BEYOND = ("Also checked by the pipeline, beyond JSON Schema: lengths count UTF-16 code units; "
          "no NUL or lone surrogates in text; the email's length once lowercased; times that "
          "stay in the calendar once in UTC; occurredAt at most MAX_FUTURE_SKEW_S after the "
          "message's Kafka timestamp; the Kafka key equals the event's key; the value is at "
          "most 1 MiB of UTF-8.")

# Every pattern ends at the end of the text: `$` alone also matches before a final newline
# in Python's regexes (which JSON Schema validators written in Python use), not in ECMA's.
_END = r"(?!\n)$"
# Every time this pattern admits is one the parser reads (it reads more ISO-8601 forms than
# these): a day the month has (February 29 in leap years only), no hour 24, no leap second
# (Python's times have none), ASCII digits only (a pattern's `\d` is any digit to some
# validators).
_DIGIT = "[0-9]"
_DAY = (f"{_DIGIT}{{4}}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]{_DIGIT}|3[01])"
        f"|(?:0[469]|11)-(?:0[1-9]|[12]{_DIGIT}|30)|02-(?:0[1-9]|1{_DIGIT}|2[0-8]))"
        f"|(?:{_DIGIT}{{2}}(?:0[48]|[2468][048]|[13579][26])|(?:[02468][048]|[13579][26])00)"
        "-02-29")
_CLOCK = f"(?:[01]{_DIGIT}|2[0-3]):[0-5]{_DIGIT}(?::[0-5]{_DIGIT}(?:\\.{_DIGIT}{{1,6}})?)?"
_OFFSET = f"(?:Z|[+-](?:[01]{_DIGIT}|2[0-3]):[0-5]{_DIGIT})"
_TIME = {"type": "string", "maxLength": 64, "format": "date-time",
         "pattern": f"^(?!0000)(?:{_DAY})T{_CLOCK}{_OFFSET}{_END}",
         "description": "ISO-8601 with an offset, e.g. 2026-11-24T10:15:00.123Z"}
_MONEY = {"type": "string", "pattern": r"^(0|[1-9][0-9]{0,13})(\.[0-9]{1,4})?" + _END,
          "description": "A non-negative decimal string: at most 14 digits before the point "
                         "and 4 after (never a JSON number)"}
_CURRENCY = {"type": "string", "pattern": "^[A-Z]{3}" + _END, "description": "ISO 4217 code"}


# Whitespace as the parser sees it (Python's `str.isspace`, what `strip()` removes), spelt out:
# `\s` and `\S` mean another set in the ECMA-262 regexes of JSON Schema's validators (with
# U+FEFF, without U+001C–U+001F and U+0085), so a schema written with them would admit texts
# the pipeline dead-letters and refuse some it applies.
SPACE = r"\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def _text(max_length: int) -> Schema:
    return {"type": "string", "minLength": 1, "maxLength": max_length, "pattern": f"[^{SPACE}]"}


# An id must not end with a space either (`eventpipe.events.ID_TRAILING_SPACE`).
_ID = {**_text(MAX_ID_LENGTH), "allOf": [{"pattern": "[^ ]$"}]}


def _object(properties: dict[str, Schema]) -> Schema:
    # Unknown fields are allowed: producers may add fields before consumers know them.
    return {"type": "object", "required": list(properties), "properties": properties}


_DATA: dict[EventType, Schema] = {
    EventType.USER_CREATED: _object({
        "userId": _ID,
        "email": {**_text(MAX_EMAIL_LENGTH),
                  "pattern": f"^[^@{SPACE}]+@[^@{SPACE}]+\\.[^@{SPACE}]+{_END}"},
        "name": _text(MAX_TEXT_LENGTH),
        "createdAt": _TIME,
    }),
    EventType.ORDER_PLACED: _object({
        "orderId": _ID,
        "userId": _ID,
        "items": {"type": "array", "minItems": 1, "maxItems": MAX_ITEMS, "items": _object({
            "sku": _ID,
            "quantity": {"type": "integer", "minimum": 1, "maximum": MAX_QUANTITY},
            "unitPrice": _MONEY,
        })},
        "totalAmount": _MONEY,
        "currency": _CURRENCY,
        "placedAt": _TIME,
    }),
    EventType.PAYMENT_SETTLED: _object({
        "paymentId": _ID,
        "orderId": _ID,
        "amount": {**_MONEY, "not": {"pattern": r"^0(\.0{1,4})?" + _END},
                   "description": "Greater than zero"},
        "currency": _CURRENCY,
        "settledAt": _TIME,
    }),
    EventType.INVENTORY_ADJUSTED: _object({
        "sku": _ID,
        "delta": {"type": "integer", "minimum": -MAX_DELTA, "maximum": MAX_DELTA,
                  "not": {"const": 0}},
        "reason": _text(MAX_TEXT_LENGTH),
        "adjustedAt": _TIME,
    }),
}
_KEYS = {EventType.USER_CREATED: "userId", EventType.ORDER_PLACED: "orderId",
         EventType.PAYMENT_SETTLED: "orderId", EventType.INVENTORY_ADJUSTED: "sku"}


def _envelope(event_type: Schema, data: Schema) -> Schema:
    return _object({
        "eventId": _ID,
        "eventType": event_type,
        "schemaVersion": {"type": "integer", "enum": sorted(SUPPORTED_SCHEMA_VERSIONS)},
        "occurredAt": _TIME,
        "data": data,
    })


def schemas() -> dict[str, Schema]:
    """`envelope` (any event type, `data` any object) and one schema per event type."""
    found: dict[str, Schema] = {"envelope": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"{BASE_URI}envelope",
        "title": "An event: the envelope every type shares",
        **_envelope({"enum": [t.value for t in EventType]}, {"type": "object"}),
        "$comment": BEYOND,
    }}
    for event_type, data in _DATA.items():
        found[event_type.value] = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"{BASE_URI}{event_type.value}",
            "title": f"{event_type.value} (Kafka key: data.{_KEYS[event_type]})",
            **_envelope({"const": event_type.value}, data),
            "$comment": BEYOND,
        }
    return found


def render(schema: Schema) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def write(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in schemas().items():
        path = folder / f"{name}.schema.json"
        path.write_text(render(schema))
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/contract")):
        print(path)
