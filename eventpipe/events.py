"""The event contract: bytes from Kafka in, a typed, validated `Event` out.

Pure functions, no I/O. Every rejection is an `InvalidEvent` naming the field and the reason,
so a dead-lettered message says exactly what was wrong with it. Money stays `Decimal`, times
become aware UTC datetimes, ids are bounded strings. Unknown fields are ignored so producers
can add fields before consumers know them.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from json.encoder import encode_basestring
from typing import Any, Final, NamedTuple

import msgspec

from eventpipe.errors import InvalidEvent
from eventpipe.times import utc_iso

SUPPORTED_SCHEMA_VERSIONS: Final = frozenset({1})
# Bounds match the columns (`eventpipe.tables`) after normalisation, on every database: text
# lengths are counted in UTF-16 code units, as SQL Server's NVARCHAR counts them.
MAX_ID_LENGTH: Final = 64
MAX_TEXT_LENGTH: Final = 200
MAX_EMAIL_LENGTH: Final = 254
MAX_ITEMS: Final = 1000
MAX_QUANTITY: Final = 2**31 - 1  # INTEGER
MAX_DELTA: Final = 10**12  # the stock level is a BIGINT; any sum of such deltas fits
# A message larger than this is not an event (the contract's largest is well under 1 MiB).
MAX_MESSAGE_BYTES: Final = 1 << 20
# Matches the `NUMERIC(18, 4)` money columns: larger values or finer fractions would be
# rounded by the database, and money must never be silently changed.
_MONEY = re.compile(r"(?:0|[1-9][0-9]{0,13})(?:\.[0-9]{1,4})?")
_MONEY_QUANTUM = Decimal("0.0001")
_CURRENCY = re.compile(r"[A-Z]{3}")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_SURROGATE = re.compile("[\ud800-\udfff]")


class EventType(StrEnum):
    USER_CREATED = "UserCreated"
    ORDER_PLACED = "OrderPlaced"
    PAYMENT_SETTLED = "PaymentSettled"
    INVENTORY_ADJUSTED = "InventoryAdjusted"


@dataclass(frozen=True, slots=True)
class UserCreated:
    user_id: str
    email: str
    name: str
    created_at: datetime

    @property
    def key(self) -> str:
        return self.user_id


@dataclass(frozen=True, slots=True)
class OrderItem:
    sku: str
    quantity: int
    unit_price: Decimal


@dataclass(frozen=True, slots=True)
class OrderPlaced:
    order_id: str
    user_id: str
    items: tuple[OrderItem, ...]
    total_amount: Decimal
    currency: str
    placed_at: datetime

    @property
    def key(self) -> str:
        return self.order_id


@dataclass(frozen=True, slots=True)
class PaymentSettled:
    payment_id: str
    order_id: str
    amount: Decimal
    currency: str
    settled_at: datetime

    @property
    def key(self) -> str:
        return self.order_id


@dataclass(frozen=True, slots=True)
class InventoryAdjusted:
    sku: str
    delta: int
    reason: str
    adjusted_at: datetime

    @property
    def key(self) -> str:
        return self.sku


Payload = UserCreated | OrderPlaced | PaymentSettled | InventoryAdjusted


@dataclass(frozen=True, slots=True)
class Event:
    event_id: str
    event_type: EventType
    schema_version: int
    occurred_at: datetime
    data: Payload

    @property
    def key(self) -> str:
        """The Kafka key the contract assigns to this event: the id of the entity it changes."""
        return self.data.key

    @property
    def version(self) -> tuple[datetime, str]:
        """Orders events of one entity: newer `occurredAt` wins, ties broken by `eventId`."""
        return (self.occurred_at, self.event_id)

    @property
    def fingerprint(self) -> str:
        """A digest of the event as parsed: two copies of one `eventId` are the same event
        when their fingerprints agree, whatever the spelling of their JSON (key order,
        spacing, unknown fields, time zone of the times)."""
        return hashlib.blake2b(canonical_text(self).encode(), digest_size=16).hexdigest()


def canonical_text(event: Event) -> str:
    """The text a fingerprint digests: the compact JSON (UTF-8 left as is) of
    `[eventId, eventType, schemaVersion, occurredAt, {payload field: value, …}]`, the payload's
    fields named and ordered as its class declares them, times as `utc_iso` spells them,
    amounts with four decimals. Fingerprints are stored, so this spelling never changes
    (`tests/unit/test_events.py` holds it to a generic JSON encoding of the same values). It
    is for events as `parse_event` makes them: exact `int`, `str` and finite `Decimal`
    values, items as a tuple."""
    data = event.data
    return (f'[{_quoted(event.event_id)},{_quoted(event.event_type.value)},'
            f'{event.schema_version},"{utc_iso(event.occurred_at)}",'
            f'{_CANONICAL_PAYLOAD[type(data)](data)}]')


# Spelled out per payload type: walking the fields generically and handing the result to a
# JSON encoder cost twice as much, and this runs for every event a worker applies.
_quoted = encode_basestring  # a JSON string with non-ASCII kept, as `ensure_ascii=False` has it


def _money_text(amount: Decimal) -> str:
    return str(amount.quantize(_MONEY_QUANTUM))


def _canonical_user(user: UserCreated) -> str:
    return (f'{{"user_id":{_quoted(user.user_id)},"email":{_quoted(user.email)},'
            f'"name":{_quoted(user.name)},"created_at":"{utc_iso(user.created_at)}"}}')


def _canonical_order(order: OrderPlaced) -> str:
    items = ",".join(f'{{"sku":{_quoted(item.sku)},"quantity":{item.quantity},'
                     f'"unit_price":"{_money_text(item.unit_price)}"}}' for item in order.items)
    return (f'{{"order_id":{_quoted(order.order_id)},"user_id":{_quoted(order.user_id)},'
            f'"items":[{items}],"total_amount":"{_money_text(order.total_amount)}",'
            f'"currency":{_quoted(order.currency)},"placed_at":"{utc_iso(order.placed_at)}"}}')


def _canonical_payment(payment: PaymentSettled) -> str:
    return (f'{{"payment_id":{_quoted(payment.payment_id)},'
            f'"order_id":{_quoted(payment.order_id)},"amount":"{_money_text(payment.amount)}",'
            f'"currency":{_quoted(payment.currency)},'
            f'"settled_at":"{utc_iso(payment.settled_at)}"}}')


def _canonical_adjustment(adjusted: InventoryAdjusted) -> str:
    return (f'{{"sku":{_quoted(adjusted.sku)},"delta":{adjusted.delta},'
            f'"reason":{_quoted(adjusted.reason)},"adjusted_at":"{utc_iso(adjusted.adjusted_at)}"}}')


_CANONICAL_PAYLOAD: Final[dict[type, Callable[[Any], str]]] = {
    UserCreated: _canonical_user, OrderPlaced: _canonical_order,
    PaymentSettled: _canonical_payment, InventoryAdjusted: _canonical_adjustment,
}


def message_fingerprint(key: bytes | None, value: bytes | None) -> str:
    """A digest of a message's raw bytes (key and value), for messages that are not events.
    A null value (a tombstone) is digested as an empty one, as it was before tombstones were
    kept apart: the dead letters recorded then keep their names, and `made_of` knows such a
    message read back from Kafka. A tombstone and an empty value of one key are thus one dead
    letter, as copies of one message are."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(len(key).to_bytes(8, "big") + key if key is not None else b"\xff" * 8)
    digest.update(value or b"")
    return digest.hexdigest()


def position_fingerprint(topic: str, topic_id: str, partition: int, offset: int) -> str:
    """A digest of where a message is, for one Kafka could not hand over: it has no bytes to
    be named by. The topic's id is in it: a topic made again holds other messages there."""
    where = f"{topic}\0{topic_id}\0{partition}\0{offset}".encode()
    return hashlib.blake2b(where, digest_size=16).hexdigest()


class Identity(NamedTuple):
    """What could be read of a message that may not be a valid event (for the DLQ and logs)."""

    event_id: str | None
    event_type: str | None


def parse_event(value: bytes | str | None, key: bytes | str | None = None, *,
                received_at: datetime | None = None, max_future: timedelta | None = None) -> Event:
    """Decode and validate one message value; `key`, when given, must match the contract's key.

    `received_at` is the message's Kafka timestamp: an `occurredAt` more than `max_future`
    after it is refused, since a version from the far future would make every later event of
    its entity stale.

    Raises `InvalidEvent` (a `PermanentError`) for anything that is not a valid event, and
    nothing else whatever the bytes: any other exception here would fail the task without
    giving the message a fate.
    """
    if value is None:
        raise InvalidEvent("value", "null (a tombstone): no event")
    try:
        return _parse(value, key, received_at, max_future)
    except InvalidEvent:
        raise
    except RecursionError:
        raise InvalidEvent("value", "nested too deeply") from None
    except Exception as exc:
        raise InvalidEvent("value", f"cannot be read as an event: {type(exc).__name__}: "
                           f"{exc}"[:300]) from exc


def _parse(value: bytes | str, key: bytes | str | None, received_at: datetime | None,
           max_future: timedelta | None) -> Event:
    document = _load_object(value)
    event_id = _id(document, "eventId", "eventId")
    type_name = _required(document, "eventType", "eventType")
    parse_data = _PAYLOAD_PARSERS.get(type_name) if isinstance(type_name, str) else None
    if parse_data is None:
        known = ", ".join(t.value for t in EventType)
        raise InvalidEvent("eventType", f"unknown event type {type_name!r} (known: {known})")
    given = _required(document, "schemaVersion", "schemaVersion")
    version = _whole(given)
    if version is None or version not in SUPPORTED_SCHEMA_VERSIONS:
        supported = ", ".join(map(str, sorted(SUPPORTED_SCHEMA_VERSIONS)))
        raise InvalidEvent(
            "schemaVersion", f"unsupported schema version {_short(given)} (supported: {supported})"
        )
    occurred_at = _time(document, "occurredAt", "occurredAt")
    data = _required(document, "data", "data")
    if not isinstance(data, dict):
        raise InvalidEvent("data", "must be an object")
    payload = parse_data(data)
    # Compared as bytes: a key that is not UTF-8 matches no id (read with replacement
    # characters, b"\xff" would pass for an id "\ufffd").
    if key is not None and (
            key != payload.key.encode() if isinstance(key, bytes) else key != payload.key):
        shown = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
        raise InvalidEvent(
            "key", f"Kafka key {shown!r} does not match the event's key {payload.key!r}")
    if received_at is not None and max_future is not None \
            and occurred_at - received_at > max_future:
        raise InvalidEvent("occurredAt", f"{utc_iso(occurred_at)} is more than {max_future} "
                           f"in the future of the message's Kafka timestamp "
                           f"{utc_iso(received_at)}")
    return Event(event_id, EventType(type_name), version, occurred_at, payload)


def peek_identity(value: bytes | str | None) -> Identity:
    """Best effort `eventId`/`eventType` of any message, valid or not; never raises."""
    if value is None or len(value) > MAX_MESSAGE_BYTES:
        return Identity(None, None)
    try:
        document = _decode(value)
    except Exception:  # InvalidEvent, or whatever else reading these bytes raises
        return Identity(None, None)
    if not isinstance(document, dict):
        return Identity(None, None)
    event_id, event_type = document.get("eventId"), document.get("eventType")
    return Identity(_printable(event_id), _printable(event_type))


def _printable(value: Any) -> str | None:
    """A string field as logs and the DLQ can show it: bounded as an id is (a longer one,
    cut to that many characters, could be twice as long as SQL Server's column), NUL and
    surrogates replaced."""
    if not isinstance(value, str):
        return None
    shown = value[:MAX_ID_LENGTH].encode("utf-8", "replace").decode().replace("\x00", "?")
    return utf16_prefix(shown, MAX_ID_LENGTH)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Python converts integers of at most this many digits whatever a process sets as its bound
# (`sys.set_int_max_str_digits`, 4300 unless set: it refuses none below 640).
_LONGEST_INTEGER: Final = sys.int_info.str_digits_check_threshold


# A run of more digits: msgspec reads an integer that long, or refuses it, as that bound says.
# Looked for from the start of each run only, once a message holds that many digits at all.
_LONG_DIGITS_TEXT = re.compile(f"(?<![0-9])[0-9]{{{_LONGEST_INTEGER + 1}}}")
_LONG_DIGITS_BYTES = re.compile(_LONG_DIGITS_TEXT.pattern.encode())
_DIGITS = "0123456789"


def _integer_literal(text: str) -> int | float:
    """An integer of the JSON text, as `json` reads it. One of more than `_LONGEST_INTEGER`
    digits is read as a float, infinite, as `1e400` is: no field holds it, a field the
    contract ignores may, and the process's bound no longer decides whether the message is
    JSON at all."""
    return int(text) if len(text) - text.startswith("-") <= _LONGEST_INTEGER else float(text)


def _long_digits(value: bytes | str) -> bool:
    if len(value) <= _LONGEST_INTEGER:
        return False
    if isinstance(value, bytes):
        return len(value) - len(value.translate(None, _DIGITS.encode())) > _LONGEST_INTEGER \
            and _LONG_DIGITS_BYTES.search(value) is not None
    return sum(map(value.count, _DIGITS)) > _LONGEST_INTEGER \
        and _LONG_DIGITS_TEXT.search(value) is not None


class _Fraction(float):
    """A number whose text has a fraction that its double rounds away (`0.99999999999999999`
    is 1.0): no integer, as its text says, and shown as written."""

    __slots__ = ("text",)
    text: str

    def __new__(cls, value: float, text: str) -> _Fraction:
        number = super().__new__(cls, value)
        number.text = text
        return number

    def is_integer(self) -> bool:
        return False

    def __repr__(self) -> str:
        return self.text


# Named as the double it is where a reason names a value's type ("not float").
_Fraction.__name__ = _Fraction.__qualname__ = "float"

_NUMBER_TEXT = re.compile(r"-?([0-9]+)(?:\.([0-9]+))?(?:[eE]([+-]?)([0-9]+))?")
# An exponent of more digits moves the point further than a message has digits
# (`MAX_MESSAGE_BYTES`): its sign alone says whether a non-zero number keeps a fraction.
_EXPONENT_DIGITS = 7


def _float_literal(text: str) -> float:
    """A number of the JSON text that has a fraction or an exponent, as a double; one whose
    fraction the double rounded away is a `_Fraction`, so that only a zero fraction makes an
    integer (`2.0`, `1e2`)."""
    value = float(text)
    if value.is_integer() and _fraction_rounded_away(text):
        return _Fraction(value, text)
    return value


def _fraction_rounded_away(text: str) -> bool:
    """Whether the number `text` has a digit other than 0 after the point once its exponent
    moved it, read from the text alone (a `Decimal` refuses exponents past 10**18)."""
    number = _NUMBER_TEXT.fullmatch(text)
    if number is None:  # not JSON's syntax: the decoder refuses it
        return False
    whole, fraction, sign, exponent = number.groups()
    fraction = fraction or ""
    digits = whole + fraction
    significant = digits.rstrip("0")
    if not significant.strip("0"):
        return False  # zero, whatever its exponent
    # Places after the point the last digit other than 0 holds, before the exponent moves it.
    places = len(fraction) - (len(digits) - len(significant))
    if exponent is None:
        return places > 0
    if len(exponent.lstrip("0")) > _EXPONENT_DIGITS:
        return sign == "-"
    return places > (-int(exponent) if sign == "-" else int(exponent))


# One decoder for every message: `json.loads` with options builds a new one per call. Its
# integers are read in C but for a message with a long run of digits (`_integer_literal`).
_decode_json = json.JSONDecoder(parse_constant=_reject_constant,
                                parse_float=_float_literal).decode
_decode_json_long = json.JSONDecoder(parse_constant=_reject_constant,
                                     parse_float=_float_literal,
                                     parse_int=_integer_literal).decode
# msgspec's decoder, in C, reads the benchmark's events in a third of the time `json` takes
# (1.2 against 3.3 µs an event). Whatever it refuses, for whatever reason (a byte order mark,
# an escaped lone surrogate, a number beyond a double, bytes that are not UTF-8), `json` reads
# again, and its verdict and message stand; what it accepts, `json` accepts and reads the same
# (`tests/unit/test_events.py` holds the two to that). Nesting is the exception: each stops
# at its own depth, near a thousand, so a message with that many brackets is `json`'s alone.
_decode_fast = msgspec.json.Decoder(float_hook=_float_literal).decode
# Arrays and objects nest at most this deep. Counted before `json` reads a message, since
# `json` stops at a depth that depends on its caller's stack (about a thousand frames less
# those already used): the same bytes would be an event for one caller and not for another.
# A message with fewer brackets cannot nest deeper, so msgspec's messages need no count.
MAX_NESTING: Final = 500
_FAST_BRACKETS = MAX_NESTING
# A string, or what is left of one that never closes (the message is then no JSON anyway).
# The repeat gives nothing back: backtracking through an unclosed string full of escapes,
# from every quote in it, took time growing with the square of its length.
_STRING_BYTES = re.compile(rb'"(?:[^"\\]|\\.)*+"?', re.DOTALL)
_STRING_TEXT = re.compile(r'"(?:[^"\\]|\\.)*+"?', re.DOTALL)
_NOT_BRACKET_BYTES = bytes(set(range(256)) - set(b"[]{}"))
_NOT_BRACKET_TEXT = re.compile(r"[^\[\]{}]+")


def _load_object(value: bytes | str) -> dict[str, Any]:
    if len(value) > MAX_MESSAGE_BYTES:
        raise InvalidEvent("value", f"is {len(value)} bytes, larger than {MAX_MESSAGE_BYTES}")
    document = _decode(value)
    if not isinstance(document, dict):
        raise InvalidEvent("value", f"must be a JSON object, not {type(document).__name__}")
    return document


def _decode(value: bytes | str) -> Any:
    brackets = (value.count(b"[") + value.count(b"{") if isinstance(value, bytes)
                else value.count("[") + value.count("{"))
    if brackets < _FAST_BRACKETS and not _long_digits(value):
        try:
            return _decode_fast(value)
        except Exception:  # any refusal is `json`'s to explain, below
            pass
    elif _nesting(value) > MAX_NESTING:
        raise InvalidEvent("value", f"nested more than {MAX_NESTING} deep")
    return decode_json(value)


def _nesting(value: bytes | str) -> int:
    """How deep arrays and objects nest in a JSON text, counted without recursion; brackets
    inside strings are not counted."""
    if isinstance(value, bytes):
        brackets = _STRING_BYTES.sub(b"", value).translate(None, _NOT_BRACKET_BYTES).decode()
    else:
        brackets = _NOT_BRACKET_TEXT.sub("", _STRING_TEXT.sub("", value))
    depth = deepest = 0
    for bracket in brackets:
        if bracket in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
        else:
            depth -= 1
    return deepest


def decode_json(value: bytes | str) -> Any:
    """A message's JSON as the contract reads it, by `json`: UTF-8 only, no byte order mark,
    no NaN or Infinity; `InvalidEvent` saying why it cannot be read."""
    try:
        # Decoded here, not by json.loads, which would guess UTF-16/32 from the first bytes.
        text = value.decode("utf-8") if isinstance(value, bytes) else value
        if text.startswith("\ufeff"):  # as `json.loads` refuses it
            raise ValueError("unexpected UTF-8 BOM")
        return (_decode_json_long if _long_digits(text) else _decode_json)(text)
    except UnicodeDecodeError as exc:
        raise InvalidEvent("value", f"not UTF-8: {exc.reason} at byte {exc.start}") from exc
    except ValueError as exc:
        raise InvalidEvent("value", f"malformed JSON: {exc}") from exc


def _required(obj: dict[str, Any], name: str, path: str) -> Any:
    try:
        value = obj[name]
    except KeyError:
        raise InvalidEvent(path, "is required") from None
    if value is None:
        raise InvalidEvent(path, "is required")
    return value


def _text(obj: dict[str, Any], name: str, path: str, max_length: int) -> str:
    value = obj.get(name)
    # Most text is short ASCII: then every check below is these, in C, with no call made.
    if value.__class__ is str and value.isascii() and 0 < len(value) <= max_length \
            and "\x00" not in value and not value.isspace():
        return value
    value = _required(obj, name, path)
    if not isinstance(value, str):
        raise InvalidEvent(path, f"must be a string, not {type(value).__name__}")
    if not value or value.isspace():
        raise InvalidEvent(path, "must not be empty")
    check_text(value, path, max_length)
    return value


def check_text(value: str, path: str, max_length: int) -> None:
    """Text every database stores unchanged: no NUL (PostgreSQL refuses it), no lone
    surrogate (not encodable), at most `max_length` UTF-16 code units (NVARCHAR's count)."""
    if "\x00" in value:
        raise InvalidEvent(path, "must not contain NUL characters")
    # Every check in C, not a loop over characters: this runs for every text field of every
    # event. ASCII text holds no surrogate and counts one UTF-16 unit per character.
    ascii_only = value.isascii()
    if not ascii_only and _SURROGATE.search(value):
        raise InvalidEvent(path, "must not contain lone surrogates (not valid Unicode text)")
    if len(value) > max_length or (
            not ascii_only and len(value.encode("utf-16-le", "surrogatepass")) // 2 > max_length):
        raise InvalidEvent(path, f"must be at most {max_length} characters "
                           "(UTF-16 code units)")


def utf16_prefix(text: str, units: int) -> str:
    """The longest prefix of `text` that fits in `units` UTF-16 code units, the count
    SQL Server's NVARCHAR keeps to (a character beyond the Basic Multilingual Plane is two;
    a pair is never split)."""
    if len(text) <= units // 2 or (len(text) <= units and text.isascii()):
        return text
    used = 0
    for index, character in enumerate(text):
        used += 2 if ord(character) > 0xFFFF else 1
        if used > units:
            return text[:index]
    return text


# SQL Server compares text with its trailing spaces dropped (whatever the collation, in `=`
# and in a key's uniqueness): `u-1 ` would be `u-1` there and another id elsewhere, so one
# user on SQL Server, two on PostgreSQL and SQLite, and a second event's payload lost as a
# duplicate of the first. The same events must give the same read model on every database.
ID_TRAILING_SPACE = ("must not end with a space (SQL Server compares ids without their "
                     "trailing spaces: it would be the same id as without them)")


def _id(obj: dict[str, Any], name: str, path: str) -> str:
    value = _text(obj, name, path, MAX_ID_LENGTH)
    if value[-1] == " ":
        raise InvalidEvent(path, ID_TRAILING_SPACE)
    return value


def _time(obj: dict[str, Any], name: str, path: str) -> datetime:
    value = _text(obj, name, path, 64)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidEvent(path, f"must be an ISO-8601 time, got {value!r}") from None
    if parsed.tzinfo is None:
        raise InvalidEvent(path, f"must carry a UTC offset (e.g. 'Z'), got {value!r}")
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+14:00 is in year 0 in UTC
        raise InvalidEvent(path, f"is out of range once in UTC, got {value!r}") from None


def _money(obj: dict[str, Any], name: str, path: str) -> Decimal:
    value = _required(obj, name, path)
    if not isinstance(value, str):
        raise InvalidEvent(path, f"must be a decimal string such as \"12.50\", not {value!r}")
    if _MONEY.fullmatch(value) is None:
        raise InvalidEvent(
            path, f"must be a non-negative decimal with at most 14 digits before the point "
            f"and 4 after, got {value!r}"
        )
    return Decimal(value)


def _currency(obj: dict[str, Any], name: str, path: str) -> str:
    value = _required(obj, name, path)
    if not isinstance(value, str) or _CURRENCY.fullmatch(value) is None:
        raise InvalidEvent(path, f"must be a 3-letter ISO 4217 code such as 'EUR', got {value!r}")
    return value


def _integer(obj: dict[str, Any], name: str, path: str) -> int:
    given = _required(obj, name, path)
    value = _whole(given)
    if value is None:
        if type(given) is float and math.isinf(given):  # `1e400`, or a thousand digits
            raise InvalidEvent(path, "is out of range")
        raise InvalidEvent(path, f"must be an integer, not {_short(given)}")
    return value


def _whole(value: Any) -> int | None:
    """`value` as an integer, if it is one. As in JSON Schema, a number whose fraction is zero
    is one (`2.0`, `1e2`: JSON has one kind of number, and some encoders write every number
    with a point). A bool is not, though Python's bool is an int."""
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer():
        return int(value)
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _user_created(data: dict[str, Any]) -> UserCreated:
    email = _text(data, "email", "data.email", MAX_EMAIL_LENGTH)
    if _EMAIL.fullmatch(email) is None:
        raise InvalidEvent("data.email", f"is not an email address: {_short(email)}")
    # Addresses are unique regardless of case, so they are kept in one case; lowercasing can
    # lengthen them ("İ" becomes two characters), so the bound is checked again.
    email = email.lower()
    check_text(email, "data.email", MAX_EMAIL_LENGTH)
    return UserCreated(
        user_id=_id(data, "userId", "data.userId"),
        email=email,
        name=_text(data, "name", "data.name", MAX_TEXT_LENGTH),
        created_at=_time(data, "createdAt", "data.createdAt"),
    )


def _order_item(item: Any, path: str) -> OrderItem:
    if not isinstance(item, dict):
        raise InvalidEvent(path, "must be an object")
    quantity = _integer(item, "quantity", f"{path}.quantity")
    if quantity < 1:
        raise InvalidEvent(f"{path}.quantity", f"must be at least 1, got {quantity}")
    if quantity > MAX_QUANTITY:
        raise InvalidEvent(f"{path}.quantity", f"must be at most {MAX_QUANTITY}")
    return OrderItem(
        sku=_id(item, "sku", f"{path}.sku"),
        quantity=quantity,
        unit_price=_money(item, "unitPrice", f"{path}.unitPrice"),
    )


def _order_placed(data: dict[str, Any]) -> OrderPlaced:
    items = _required(data, "items", "data.items")
    if not isinstance(items, list) or not items:
        raise InvalidEvent("data.items", "must be a non-empty list")
    if len(items) > MAX_ITEMS:
        raise InvalidEvent("data.items", f"must hold at most {MAX_ITEMS} items")
    return OrderPlaced(
        order_id=_id(data, "orderId", "data.orderId"),
        user_id=_id(data, "userId", "data.userId"),
        items=tuple(_order_item(item, f"data.items[{i}]") for i, item in enumerate(items)),
        total_amount=_money(data, "totalAmount", "data.totalAmount"),
        currency=_currency(data, "currency", "data.currency"),
        placed_at=_time(data, "placedAt", "data.placedAt"),
    )


def _payment_settled(data: dict[str, Any]) -> PaymentSettled:
    amount = _money(data, "amount", "data.amount")
    if amount == 0:
        raise InvalidEvent("data.amount", "must be greater than 0")
    return PaymentSettled(
        payment_id=_id(data, "paymentId", "data.paymentId"),
        order_id=_id(data, "orderId", "data.orderId"),
        amount=amount,
        currency=_currency(data, "currency", "data.currency"),
        settled_at=_time(data, "settledAt", "data.settledAt"),
    )


def _inventory_adjusted(data: dict[str, Any]) -> InventoryAdjusted:
    delta = _integer(data, "delta", "data.delta")
    if delta == 0 or abs(delta) > MAX_DELTA:
        raise InvalidEvent("data.delta", f"must be non-zero and at most {MAX_DELTA} in size")
    return InventoryAdjusted(
        sku=_id(data, "sku", "data.sku"),
        delta=delta,
        reason=_text(data, "reason", "data.reason", MAX_TEXT_LENGTH),
        adjusted_at=_time(data, "adjustedAt", "data.adjustedAt"),
    )


_PAYLOAD_PARSERS: Final[dict[str, Callable[[dict[str, Any]], Payload]]] = {
    EventType.USER_CREATED.value: _user_created,
    EventType.ORDER_PLACED.value: _order_placed,
    EventType.PAYMENT_SETTLED.value: _payment_settled,
    EventType.INVENTORY_ADJUSTED.value: _inventory_adjusted,
}
