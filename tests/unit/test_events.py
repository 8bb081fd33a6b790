"""The event contract: every type parses; every kind of bad input names its field and reason."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from dataclasses import fields, is_dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventpipe import events
from eventpipe.errors import InvalidEvent, PermanentError
from eventpipe.events import (
    MAX_MESSAGE_BYTES,
    Event,
    EventType,
    InventoryAdjusted,
    OrderItem,
    OrderPlaced,
    PaymentSettled,
    UserCreated,
    canonical_text,
    decode_json,
    parse_event,
    peek_identity,
)
from eventpipe.samples import (
    Document,
    encode,
    inventory_adjusted,
    order_placed,
    payment_settled,
    user_created,
)
from eventpipe.times import utc_iso
from tests.support.factories import DELETE, mutated

WHEN = datetime(2026, 11, 24, 10, 15, 0, 123000, tzinfo=UTC)


def test_every_event_type_parses_with_exact_types() -> None:
    key, doc = order_placed("o-1", "u-1", items=[("SKU-1", 2, "19.99"), ("SKU-2", 1, "0.01")],
                            currency="USD", occurred_at=WHEN, event_id="e-1")
    event = parse_event(encode(doc), key.encode())
    assert event.event_id == "e-1" and event.event_type is EventType.ORDER_PLACED
    assert event.occurred_at == WHEN and event.occurred_at.tzinfo is UTC
    assert isinstance(event.data, OrderPlaced)
    assert event.data.total_amount == Decimal("39.99")
    assert [(i.sku, i.quantity, i.unit_price) for i in event.data.items] == [
        ("SKU-1", 2, Decimal("19.99")), ("SKU-2", 1, Decimal("0.01"))]
    assert event.key == "o-1" and event.version == (WHEN, "e-1")

    user = parse_event(encode(user_created("u-1", email="A@B.io", occurred_at=WHEN)[1]))
    assert isinstance(user.data, UserCreated) and user.data.email == "a@b.io"
    payment = parse_event(encode(payment_settled("p-1", "o-1", "5.5", occurred_at=WHEN)[1]))
    assert isinstance(payment.data, PaymentSettled) and payment.data.amount == Decimal("5.5")
    assert payment.key == "o-1"
    stock = parse_event(encode(inventory_adjusted("S", -4, occurred_at=WHEN)[1]))
    assert isinstance(stock.data, InventoryAdjusted) and stock.data.delta == -4


def test_offsets_are_converted_to_utc() -> None:
    _, doc = user_created("u", occurred_at=WHEN)
    doc["occurredAt"] = "2026-11-24T12:15:00.123+02:00"
    assert parse_event(encode(doc)).occurred_at == WHEN


def _mutated(path: str, value: Any) -> bytes:
    return encode(mutated(order_placed("o-1", "u-1", occurred_at=WHEN)[1], path, value))



@pytest.mark.parametrize(
    ("path", "value", "field", "reason"),
    [
        ("eventId", DELETE, "eventId", "is required"),
        ("eventId", "", "eventId", "must not be empty"),
        ("eventId", " \t\u3000", "eventId", "must not be empty"),
        ("eventId", "x" * 65, "eventId", "must be at most 64 characters"),
        ("eventType", "OrderShipped", "eventType", "unknown event type 'OrderShipped'"),
        ("schemaVersion", 2, "schemaVersion", "unsupported schema version 2"),
        ("schemaVersion", True, "schemaVersion", "unsupported schema version True"),
        ("occurredAt", "yesterday", "occurredAt", "must be an ISO-8601 time"),
        ("occurredAt", "2026-11-24T10:00:00", "occurredAt", "must carry a UTC offset"),
        ("data", [], "data", "must be an object"),
        ("data.items", [], "data.items", "must be a non-empty list"),
        ("data.items.0.quantity", 0, "data.items[0].quantity", "must be at least 1"),
        ("data.items.0.quantity", 1.5, "data.items[0].quantity", "must be an integer"),
        ("data.items.0.quantity", True, "data.items[0].quantity", "must be an integer"),
        ("data.items.0.unitPrice", 10.0, "data.items[0].unitPrice", "must be a decimal string"),
        ("data.items.0.unitPrice", "-1.00", "data.items[0].unitPrice", "non-negative decimal"),
        ("data.items.0.unitPrice", "1.23456", "data.items[0].unitPrice", "4 after"),
        ("data.items.0.unitPrice", "1e3", "data.items[0].unitPrice", "non-negative decimal"),
        ("data.totalAmount", "NaN", "data.totalAmount", "non-negative decimal"),
        ("data.currency", "eur", "data.currency", "3-letter ISO 4217"),
        ("data.userId", 42, "data.userId", "must be a string"),
        ("data.placedAt", DELETE, "data.placedAt", "is required"),
    ],
)
def test_invalid_fields_are_named_with_a_reason(
    path: str, value: Any, field: str, reason: str
) -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(_mutated(path, value))
    assert caught.value.field == field
    assert reason in caught.value.reason
    assert isinstance(caught.value, PermanentError)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"{not json", "malformed JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1, 2]", "must be a JSON object, not list"),
        (b'{"eventId": NaN}', "malformed JSON"),
        ("\ufeff{}".encode(), "malformed JSON: unexpected UTF-8 BOM"),
    ],
)
def test_bytes_that_are_not_an_event(value: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(value)
    assert caught.value.field == "value" and reason in caught.value.reason


def test_payload_rules_per_type() -> None:
    cases: list[tuple[Document, str]] = [
        (user_created("u", email="not-an-email")[1], "data.email"),
        (payment_settled("p", "o", "0.00")[1], "data.amount"),
        (inventory_adjusted("S", 0)[1], "data.delta"),
    ]
    for doc, field in cases:
        with pytest.raises(InvalidEvent) as caught:
            parse_event(encode(doc))
        assert caught.value.field == field


def test_key_must_match_the_contract() -> None:
    key, doc = payment_settled("p-1", "o-1", "1.00")
    assert parse_event(encode(doc), key).key == "o-1"
    with pytest.raises(InvalidEvent) as caught:
        parse_event(encode(doc), b"p-1")
    assert caught.value.field == "key"


def test_unknown_fields_are_ignored() -> None:
    _, doc = user_created("u", occurred_at=WHEN)
    plain = parse_event(encode(doc)).data
    doc["trace"] = {"span": 1}
    doc["data"]["nickname"] = "ada"
    assert parse_event(json.dumps(doc)).data == plain


def test_peek_identity_reads_what_it_can_and_never_raises() -> None:
    _, doc = user_created("u", event_id="e-9")
    assert peek_identity(encode(doc)) == ("e-9", "UserCreated")
    assert peek_identity(b'{"eventId": 3, "eventType": "X"}') == (None, "X")
    assert peek_identity(b"\xff garbage") == (None, None)
    assert peek_identity(b"[]") == (None, None)


# Issue 9, item 1: whatever the bytes, parsing ends in `InvalidEvent`, never another exception
# (which would fail the task without a fate and wedge the partition).
@pytest.mark.parametrize(
    ("value", "field", "reason"),
    [
        (b"[" * 200_000, "value", "nested more than 500 deep"),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "value", "nested more than 500 deep"),
        (b" " * (MAX_MESSAGE_BYTES + 1), "value", "larger than"),
    ],
)
def test_hostile_bytes_are_invalid_events(value: bytes, field: str, reason: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(value)
    assert caught.value.field == field and reason in caught.value.reason
    assert peek_identity(value) == (None, None)


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-01:00"])
def test_times_that_leave_the_calendar_in_utc_are_invalid(when: str) -> None:
    for path in ("occurredAt", "data.placedAt"):
        with pytest.raises(InvalidEvent) as caught:
            parse_event(_mutated(path, when))
        assert caught.value.field == path and "out of range" in caught.value.reason


# Issue 9, item 8: what the contract accepts, every supported database stores unchanged.
@pytest.mark.parametrize(
    ("path", "value", "field", "reason"),
    [
        ("data.userId", "u\x00", "data.userId", "NUL"),
        ("data.items.0.sku", "sku-\ud800", "data.items[0].sku", "surrogate"),
        # 64 characters but 128 UTF-16 code units: NVARCHAR(64) on SQL Server refuses it.
        ("data.orderId", "\U0001f600" * 64, "data.orderId", "at most 64 characters"),
        ("data.items.0.quantity", 2**31, "data.items[0].quantity", "at most 2147483647"),
    ],
)
def test_values_the_columns_would_refuse_are_invalid(
    path: str, value: Any, field: str, reason: str
) -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(_mutated(path, value))
    assert caught.value.field == field and reason in caught.value.reason


def test_an_email_is_bounded_after_it_is_lowercased() -> None:
    # "İ" (U+0130) lowercases to two characters: 240 of them make 480.
    _, doc = user_created("u", email="\u0130" * 240 + "@example.com")
    with pytest.raises(InvalidEvent) as caught:
        parse_event(encode(doc))
    assert caught.value.field == "data.email" and "at most 254" in caught.value.reason


# Issue 9, item 6: an event from the far future would make every later update of its entity
# stale; it is judged against the message's Kafka timestamp.
def test_an_event_far_in_the_future_of_its_kafka_timestamp_is_invalid() -> None:
    received = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
    soon = user_created("u", occurred_at=received + timedelta(minutes=4))[1]
    later = user_created("u", occurred_at=received + timedelta(minutes=6))[1]
    skew = timedelta(minutes=5)
    assert parse_event(encode(soon), received_at=received, max_future=skew)
    with pytest.raises(InvalidEvent) as caught:
        parse_event(encode(later), received_at=received, max_future=skew)
    assert caught.value.field == "occurredAt" and "future" in caught.value.reason


@given(st.binary(max_size=2048) | st.text(max_size=512).map(str.encode))
@settings(max_examples=500, deadline=None)
def test_no_bytes_make_the_parser_raise_anything_but_invalid_event(value: bytes) -> None:
    with contextlib.suppress(InvalidEvent):
        parse_event(value, b"k", received_at=WHEN, max_future=timedelta(minutes=5))
    peek_identity(value)


def _json_values(depth: int = 3) -> st.SearchStrategy[Any]:
    scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
               | st.text(max_size=80))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                        max_leaves=12)


def _typed(value: Any) -> Any:
    """A decoded JSON value with every type spelled out: 1 and 1.0, 0.0 and -0.0 differ."""
    if isinstance(value, dict):
        return ("object", [(key, _typed(item)) for key, item in value.items()])
    if isinstance(value, list):
        return ("array", [_typed(item) for item in value])
    return (type(value).__name__, repr(value))


def _verdict(decode: Any, value: bytes | str) -> Any:
    try:
        return _typed(decode(value))
    except Exception:  # msgspec refuses with several kinds of error
        return "refused"


_numbers = st.from_regex(r"-?(0|[1-9][0-9]{0,40})(\.[0-9]{1,30})?([eE][+-]?[0-9]{1,4})?",
                         fullmatch=True)
_any_text = st.text(st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF)
                    | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=20)
_documents = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_any_text, inner, max_size=4),
    max_leaves=12)


@st.composite
def _json_texts(draw: st.DrawFn) -> bytes | str:
    """JSON as producers spell it (and misspell it): any document, any escaping, numbers of
    any size, then perhaps a few bytes changed."""
    if draw(st.booleans()):
        text = json.dumps(draw(_documents), ensure_ascii=draw(st.booleans()),
                          allow_nan=True, indent=draw(st.sampled_from([None, 0, 2])))
    else:
        text = f'{{"n": {draw(_numbers)}, "s": {json.dumps(draw(_any_text))}}}'
    try:
        value = text.encode()
    except UnicodeEncodeError:  # a lone surrogate left unescaped: only a str can hold it
        return text
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(value)))
        value = value[:at] + draw(st.binary(max_size=2)) + value[at + draw(st.integers(0, 2)):]
    return value


@given(_json_texts())
@settings(max_examples=2000, deadline=None)
def test_what_the_fast_decoder_accepts_json_reads_the_same(value: bytes | str) -> None:
    """The parser reads messages with msgspec's decoder and leaves what it refuses to
    `json`: that is the contract's reading only if msgspec never accepts what `json`
    refuses, nor reads it otherwise."""
    fast = _verdict(events._decode_fast, value)
    if fast != "refused":
        assert _verdict(decode_json, value) == fast


@pytest.mark.parametrize("decode", ["msgspec", "json"])
@pytest.mark.parametrize(("field", "literal", "read"), [
    # A fraction a double rounds away: was read as 1, 10**12 (at the delta's bound) and 1.
    ("delta", "0.99999999999999999", None), ("delta", "999999999999.99999", None),
    ("schemaVersion", "0.99999999999999999", None), ("delta", "-1.0000000000000001", None),
    # A zero fraction, an exponent: integers, as JSON Schema says.
    ("delta", "2.0", 2), ("delta", "-1e2", -100), ("delta", "1.5e1", 15),
    ("schemaVersion", "1.000", 1), ("schemaVersion", "10e-1", 1), ("delta", "100e-2", 1),
    ("delta", "0.000070e6", 70), ("delta", "1" + "0" * 30 + "e-30", 1),
    # Exponents past what a Decimal takes: a fraction, and a zero.
    ("schemaVersion", "1e-99999999999999999999", None),
])
def test_only_a_number_whose_text_has_no_fraction_is_an_integer(
    field: str, literal: str, read: int | None, decode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, doc = inventory_adjusted("S", 7, occurred_at=WHEN)
    value = encode(doc)
    written = b'"delta":7' if field == "delta" else b'"schemaVersion":1'
    assert written in value
    value = value.replace(written, written.split(b":")[0] + b":" + literal.encode())
    if decode == "json":
        monkeypatch.setattr(events, "_decode_fast", _refused)
    if read is None:
        with pytest.raises(InvalidEvent) as caught:
            parse_event(value)
        assert caught.value.field == ("data.delta" if field == "delta" else field)
        assert literal in caught.value.reason  # as written, not as the double reads it
        return
    event = parse_event(value)
    assert isinstance(event.data, InventoryAdjusted)
    assert (event.data.delta if field == "delta" else 1) == read


@pytest.mark.parametrize("decode", ["msgspec", "json"])
@pytest.mark.parametrize("literal", ["0e99999999999999999999", "1e-99999999999999999999",
                                     "0.5", "1e400", "-0.0", "1E+2"])
def test_a_number_in_a_field_the_contract_ignores_changes_nothing(
    literal: str, decode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: an exponent of twenty digits raised from the number's reading, in
    `peek_identity` too (which never raises): the worker failed the message at every try,
    and its partition waited for good (an adversarial review's finding)."""
    _, doc = inventory_adjusted("S", 7, occurred_at=WHEN, event_id="e-7")
    value = encode(doc).replace(b'"reason":', b'"note":' + literal.encode() + b',"reason":')
    if decode == "json":
        monkeypatch.setattr(events, "_decode_fast", _refused)
    event = parse_event(value)
    assert isinstance(event.data, InventoryAdjusted) and event.data.delta == 7
    assert peek_identity(value).event_id == "e-7"


def test_a_reason_names_a_number_written_with_a_fraction_as_the_double_it_is() -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(b"0.99999999999999999")
    assert caught.value.reason == "must be a JSON object, not float"


def _refused(_value: bytes | str) -> Any:
    """msgspec's decoder, out of the way: every message read by `json` alone."""
    raise msgspec.DecodeError("refused")


@pytest.mark.parametrize("value", [
    b'\xef\xbb\xbf{"eventId": "e"}', b'{"eventId": "\\ud800"}', '{"eventId": "\udc80"}',
    b'{"schemaVersion": 1e400}', b'{"schemaVersion": 1.7976931348623159e308}',
    b'{"a": NaN}', b'{"a": Infinity}', b'{"eventId": "\xff"}', b"[" * 5000 + b"]" * 5000,
    b'{"schemaVersion": 100000000000000000000000000000}', b'{"eventId": 1, "eventId": "e"}',
])
def test_the_parser_says_of_what_msgspec_refuses_what_json_says(
    value: bytes | str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def verdict() -> str:
        with pytest.raises(InvalidEvent) as caught:
            parse_event(value)
        return str(caught.value)

    fast = verdict()

    monkeypatch.setattr(events, "_decode_fast", _refused)
    assert fast == verdict()


@given(st.sampled_from(["eventId", "eventType", "schemaVersion", "occurredAt", "data",
                        "data.userId", "data.items", "data.items.0", "data.items.0.quantity",
                        "data.items.0.unitPrice", "data.totalAmount", "data.currency",
                        "data.placedAt", "data.orderId"]),
       _json_values())
@settings(max_examples=500, deadline=None)
def test_any_field_replaced_by_any_json_gives_an_event_or_invalid_event(
    path: str, value: Any
) -> None:
    with contextlib.suppress(InvalidEvent):
        parse_event(_mutated(path, value))


def test_the_fingerprint_keeps_its_spelling() -> None:
    """Fingerprints are stored (`applied_events`) and compared with those of later copies:
    a change to how they are computed would make every redelivered event of a running
    pipeline an id reused for another payload. This spells the canonical form out."""
    key, doc = order_placed("o-1", "u-1", items=[("SKU-1", 2, "19.9"), ("SKU-2", 1, "0.01")],
                            occurred_at=WHEN, currency="EUR")
    event = parse_event(encode(doc), key)
    canonical = json.dumps([
        doc["eventId"], "OrderPlaced", 1, "2026-11-24T10:15:00.123Z",
        {"order_id": "o-1", "user_id": "u-1",
         "items": [{"sku": "SKU-1", "quantity": 2, "unit_price": "19.9000"},
                   {"sku": "SKU-2", "quantity": 1, "unit_price": "0.0100"}],
         "total_amount": "39.8100", "currency": "EUR",
         "placed_at": "2026-11-24T10:15:00.123Z"}],
        separators=(",", ":"), ensure_ascii=False)
    assert event.fingerprint == hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()
    # Text outside ASCII is hashed as its UTF-8, not as \u escapes.
    key, doc = user_created("u-1", email="zoe@example.com", name="Zoë Ångström",
                            occurred_at=WHEN)
    canonical = json.dumps([
        doc["eventId"], "UserCreated", 1, "2026-11-24T10:15:00.123Z",
        {"user_id": "u-1", "email": "zoe@example.com", "name": "Zoë Ångström",
         "created_at": "2026-11-24T10:15:00.123Z"}], separators=(",", ":"), ensure_ascii=False)
    assert parse_event(encode(doc), key).fingerprint == hashlib.blake2b(
        canonical.encode(), digest_size=16).hexdigest()
    key, doc = payment_settled("p-1", "o-1", "12.5", currency="USD", occurred_at=WHEN)
    canonical = json.dumps([
        doc["eventId"], "PaymentSettled", 1, "2026-11-24T10:15:00.123Z",
        {"payment_id": "p-1", "order_id": "o-1", "amount": "12.5000", "currency": "USD",
         "settled_at": "2026-11-24T10:15:00.123Z"}], separators=(",", ":"), ensure_ascii=False)
    assert parse_event(encode(doc), key).fingerprint == hashlib.blake2b(
        canonical.encode(), digest_size=16).hexdigest()
    key, doc = inventory_adjusted("SKU-1", -3, reason="damaged", occurred_at=WHEN)
    canonical = json.dumps([
        doc["eventId"], "InventoryAdjusted", 1, "2026-11-24T10:15:00.123Z",
        {"sku": "SKU-1", "delta": -3, "reason": "damaged",
         "adjusted_at": "2026-11-24T10:15:00.123Z"}], separators=(",", ":"), ensure_ascii=False)
    assert parse_event(encode(doc), key).fingerprint == hashlib.blake2b(
        canonical.encode(), digest_size=16).hexdigest()


def _generic_canonical(event: Event) -> str:
    """The fingerprint's text as first defined: every field of the event and its payload, in
    declaration order, through a JSON encoder; times by `utc_iso`, amounts to four places."""
    def plain(value: Any) -> Any:
        if isinstance(value, datetime):
            return utc_iso(value)
        if isinstance(value, Decimal):
            return str(value.quantize(Decimal("0.0001")))
        if isinstance(value, tuple):
            return [plain(item) for item in value]
        if is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
        return value
    return json.dumps([event.event_id, event.event_type.value, event.schema_version,
                       plain(event.occurred_at), plain(event.data)],
                      separators=(",", ":"), ensure_ascii=False)


_texts = st.text(max_size=12)  # any character but lone surrogates: quotes, controls, astral
# Times the parser can give: in UTC they fall within datetime's range (it refuses
# 0001-01-01T00:00:00+05:30, in year 0 once in UTC), whatever their offset.
_times = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                      timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)),
                                                 timezone(-timedelta(hours=14))]))
_amounts = st.decimals(min_value=0, max_value=10**14 - 1, places=4) | st.decimals(
    min_value=0, max_value=10**6, places=1)
_payloads = st.one_of(
    st.builds(UserCreated, _texts, _texts, _texts, _times),
    st.builds(OrderPlaced, _texts, _texts, st.lists(st.builds(
        OrderItem, _texts, st.integers(1, 2**31 - 1), _amounts), max_size=3).map(tuple),
        _amounts, _texts, _times),
    st.builds(PaymentSettled, _texts, _texts, _amounts, _texts, _times),
    st.builds(InventoryAdjusted, _texts, st.integers(-10**12, 10**12), _texts, _times),
)


@given(_texts, _times, _payloads)
@settings(max_examples=400, deadline=None)
def test_the_fingerprint_text_is_the_generic_json_of_the_event(
    event_id: str, occurred_at: datetime, payload: Any
) -> None:
    """`canonical_text` spells each payload type out by hand; it must give exactly what the
    generic definition gives, for any text (escapes, non-ASCII), time zone and amount."""
    kind = {UserCreated: EventType.USER_CREATED, OrderPlaced: EventType.ORDER_PLACED,
            PaymentSettled: EventType.PAYMENT_SETTLED,
            InventoryAdjusted: EventType.INVENTORY_ADJUSTED}[type(payload)]
    event = Event(event_id, kind, 1, occurred_at, payload)
    assert canonical_text(event) == _generic_canonical(event)


def _units(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


@given(st.text(), st.integers(min_value=0, max_value=80))
def test_a_utf16_prefix_is_the_longest_that_fits(text: str, units: int) -> None:
    cut = events.utf16_prefix(text, units)
    assert text.startswith(cut) and _units(cut) <= units
    assert cut == text or _units(text[:len(cut) + 1]) > units


def test_an_invalid_message_s_id_fits_the_dead_letter_s_column_on_sql_server() -> None:
    """Before: cut to 64 characters, 64 beyond the Basic Multilingual Plane are 128 UTF-16
    units, which SQL Server's NVARCHAR(64) refuses."""
    identity = events.peek_identity(json.dumps({"eventId": "\U0001F600" * 64},
                                               ensure_ascii=False).encode())
    assert identity.event_id == "\U0001F600" * 32


@pytest.mark.parametrize("path", ["eventId", "data.userId"])
def test_an_id_ending_with_a_space_is_refused(path: str) -> None:
    """SQL Server compares text without its trailing spaces: `u-1 ` and `u-1` would be one
    user there and two elsewhere, and an event with id `e-1 ` would pass there for a
    duplicate of `e-1`, its payload lost."""
    document = mutated(user_created("u-1")[1], path, "x-1 ")
    with pytest.raises(InvalidEvent, match="must not end with a space"):
        parse_event(encode(document))
    parse_event(encode(mutated(user_created("u-1")[1], path, " x-1\t")))  # elsewhere: kept


def test_a_kafka_key_that_is_not_utf8_matches_no_id() -> None:
    """Before: read with replacement characters, the key b"\\xff" passed for the id "\\ufffd"."""
    key, document = user_created("\ufffd")
    parse_event(encode(document), key.encode())
    with pytest.raises(InvalidEvent, match="does not match"):
        parse_event(encode(document), b"\xff")


def _parsed(value: bytes) -> str:
    try:
        parse_event(value)
    except InvalidEvent as exc:
        return str(exc)
    return "valid"


def _called_from(frames: int, call: Any) -> Any:
    return call() if frames == 0 else _called_from(frames - 1, call)


@pytest.mark.parametrize("depth", [498, 499, 500, 700, 900, 950, 5000])
def test_how_deep_a_message_may_nest_does_not_depend_on_its_reader(depth: int) -> None:
    """Before: `json` stopped at a depth set by its caller's stack, so a message nesting 900
    deep was an event for a shallow caller and invalid 150 frames deeper (the worker, the
    fold of `verify`, a dead letter's restore each read it from another depth)."""
    document = user_created("u-1")[1]
    value = encode(document)[:-1] + b',"x":' + b"[" * depth + b'"[{"' + b"]" * depth + b"}"
    verdicts = {_called_from(frames, lambda: _parsed(value)) for frames in (0, 150, 300)}
    assert verdicts == {"valid" if depth < events.MAX_NESTING else
                        f"value: nested more than {events.MAX_NESTING} deep"}


@contextlib.contextmanager
def _int_max_str_digits(limit: int) -> Any:
    previous = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(limit)
    try:
        yield
    finally:
        sys.set_int_max_str_digits(previous)


@pytest.mark.parametrize("digits", [19, 21, 640, 641, 4301, 200_000])
def test_how_long_an_integer_may_be_does_not_depend_on_the_interpreter(digits: int) -> None:
    """Before: `json` took an integer of more digits than the interpreter converts
    (`sys.get_int_max_str_digits()`: 4300 unless a process sets it otherwise, down to 640)
    for malformed JSON, so a valid event with one in a field the contract ignores was
    dead-lettered, or applied by a process whose setting differed (`verify` then disagreed
    with the workers), and its dead letter named no event."""
    document = user_created("u-1", event_id="e-1")[1]
    value = encode(document)[:-1] + b',"traceId":-' + b"7" * digits + b"}"
    seen = set()
    for limit in (0, 640, 4300):
        with _int_max_str_digits(limit):
            seen.add((_parsed(value), peek_identity(value)))
    assert seen == {("valid", ("e-1", "UserCreated"))}


@pytest.mark.parametrize("digits", [641, 4301])
def test_an_integer_too_long_for_any_column_is_out_of_range(digits: int) -> None:
    _, document = inventory_adjusted("SKU-1", 1)
    value = encode(document).replace(b'"delta":1', b'"delta":' + b"9" * digits)
    for limit in (0, 640, 4300):
        with _int_max_str_digits(limit), pytest.raises(InvalidEvent) as caught:
            parse_event(value)
        assert (caught.value.field, caught.value.reason) == ("data.delta", "is out of range")


def test_an_unclosed_string_full_of_escapes_is_read_in_one_pass() -> None:
    """Before: counting the brackets of a message backtracked through such a string from
    every quote in it, in time growing with the square of its length: about 35 minutes for
    a message of 1 MiB, on a worker whose batch is ended after TASK_TIME_LIMIT_S."""
    prefix = b'{"a": [' + b"[], " * 499 + b'[]], "b": "'
    value = prefix + b'\\"' * ((events.MAX_MESSAGE_BYTES - len(prefix)) // 2)
    with pytest.raises(InvalidEvent, match="malformed JSON"):
        parse_event(value)
