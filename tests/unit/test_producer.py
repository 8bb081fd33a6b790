"""The stream generator: the requested mix, every event valid except the poison."""

from __future__ import annotations

import io
import itertools
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from eventpipe.errors import InvalidEvent
from eventpipe.events import parse_event
from eventpipe.samples import Story, encode
from producer import publish as publish_module
from producer.menu import Menu
from producer.publish import publish
from producer.stream import MAX_COUNT, POISON_KINDS, Planned, generate, plan_stream


def test_a_clean_stream_is_all_valid_events_with_their_keys() -> None:
    plan = plan_stream(500, seed=3)
    assert len(plan.messages) == 500
    for message in plan.messages:
        event = parse_event(message.value, message.key)
        assert message.kind == event.event_type.value
    assert set(plan.counts) == {"UserCreated", "OrderPlaced", "PaymentSettled",
                                "InventoryAdjusted"}


_CROSS_KEY = {"poison:orphan-order", "poison:email-clash", "poison:reused-id"}


def test_duplicates_poison_and_disorder_in_the_asked_proportions() -> None:
    plan = plan_stream(4000, duplicates=0.1, out_of_order=0.1, poison=0.05, seed=9)
    assert len(plan.messages) == 4000
    poison = [m for m in plan.messages if m.kind.startswith("poison:")]
    assert 120 < len(poison) < 280
    assert {m.kind.removeprefix("poison:") for m in poison} == set(POISON_KINDS)
    now = datetime.now(UTC)
    for message in poison:
        if message.kind in _CROSS_KEY:  # valid events the rules between keys reject
            parse_event(message.value, message.key)
            continue
        with pytest.raises(InvalidEvent):
            parse_event(message.value, message.key, received_at=now,
                        max_future=timedelta(minutes=5))
    values = [m.value for m in plan.messages if not m.kind.startswith("poison:")]
    assert 280 < len(values) - len(set(values)) < 520  # resent byte for byte
    occurred = [parse_event(v).occurred_at for v in dict.fromkeys(values)]
    late = sum(1 for a, b in itertools.pairwise(occurred) if b < a)
    assert late > 100  # held-back events arrive after newer ones


def test_ratios_are_checked() -> None:
    with pytest.raises(ValueError, match="--poison"):
        plan_stream(10, poison=1.5)


class _Delivered:
    def __init__(self, offset: int) -> None:
        self._offset = offset

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset


class _Producer:
    """Stands in for Kafka in this unit test of the menu's dialogue only."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes | None, bytes]] = []
        self._callbacks: list[object] = []

    def produce(self, topic: str, value: bytes, key: bytes | None, on_delivery: object) -> None:
        self.sent.append((key, value))
        self._callbacks.append(on_delivery)

    def poll(self, _timeout: float = 0) -> int:
        return 0

    def flush(self, _timeout: float = 0) -> int:
        for offset, callback in enumerate(self._callbacks):
            callback(None, _Delivered(offset))  # type: ignore[operator]
        self._callbacks.clear()
        return 0


def test_the_menu_prompts_with_defaults_and_sends_valid_events() -> None:
    answers: Iterator[str] = iter(["1", "u-menu", "", "Grace",  # user: id, email, name
                                   "2", "", "", "", "3", "", "",  # order: all but quantity
                                   "q"])
    producer = _Producer()
    out = io.StringIO()
    menu = Menu(producer, "events", lambda _prompt: next(answers), out)  # type: ignore[arg-type]
    assert menu.run() == 0
    events = [parse_event(value, key) for key, value in producer.sent]
    assert [e.event_type.value for e in events] == ["UserCreated", "OrderPlaced"]
    assert events[0].key == "u-menu" and events[1].data.user_id == "u-menu"  # type: ignore[union-attr]
    assert events[1].data.items[0].quantity == 3  # type: ignore[union-attr]
    assert "sent: UserCreated" in out.getvalue()


def _typed(*answers: str) -> Callable[[str], str]:
    """The answers in turn, then the end of input, as `input` raises it."""
    remaining = iter(answers)

    def read(_prompt: str) -> str:
        try:
            return next(remaining)
        except StopIteration:
            raise EOFError from None
    return read


def test_a_mistyped_number_is_named_and_asked_again() -> None:
    producer = _Producer()
    out = io.StringIO()
    read = _typed("2", "", "", "", "two", "0", "1,99", "Infinity", "1.99", "",  # 0: invalid
                  "4", "", "ten", "-2", "",
                  "5", "many", "0", "3",
                  "q")
    menu = Menu(producer, "events", read, out)  # type: ignore[arg-type]
    assert menu.run() == 0
    said = out.getvalue().splitlines()
    assert "  quantity: 'two' is not a whole number" in said
    assert "  unitPrice: '1,99' is not a decimal number" in said
    assert "  unitPrice: 'Infinity' times 0 gives no total" in said
    assert "  delta: 'ten' is not a whole number" in said
    assert "  how many events: 'many' is not a whole number from 1 to 1,000,000,000" in said
    assert "  how many events: '0' is not a whole number from 1 to 1,000,000,000" in said
    order, stock = (json.loads(value)["data"] for _key, value in producer.sent[:2])
    assert order["items"] == [{"sku": "SKU-0001", "quantity": 0, "unitPrice": "1.99"}]
    assert any(line.startswith("  note: this event is invalid") for line in said)
    assert stock["delta"] == -2
    assert len(producer.sent) == 2 + 3


def test_the_end_of_input_while_a_number_is_asked_again_ends_the_session() -> None:
    producer = _Producer()
    out = io.StringIO()
    menu = Menu(producer, "events", _typed("2", "", "", "", "two"), out)  # type: ignore[arg-type]
    assert menu.run() == 0
    assert out.getvalue().endswith("  quantity: 'two' is not a whole number\n")
    assert producer.sent == []


def test_the_same_seed_and_clock_give_the_same_stream() -> None:
    now = datetime.now(UTC)
    first = plan_stream(2000, duplicates=0.1, out_of_order=0.1, poison=0.1, seed=5, now=now)
    again = plan_stream(2000, duplicates=0.1, out_of_order=0.1, poison=0.1, seed=5, now=now)
    assert first.messages == again.messages
    other = plan_stream(2000, duplicates=0.1, out_of_order=0.1, poison=0.1, seed=6, now=now)
    assert first.messages != other.messages


def test_a_stream_is_made_as_it_is_taken_however_long() -> None:
    now = datetime.now(UTC)
    longest = generate(MAX_COUNT, duplicates=0.1, out_of_order=0.1, poison=0.1, seed=5,
                       now=now)
    first = list(itertools.islice(longest, 300))
    assert len(first) == 300 and all(isinstance(m, Planned) for m in first)
    with pytest.raises(ValueError, match="--count must be at most 1,000,000,000"):
        generate(MAX_COUNT + 1)


def test_a_long_story_keeps_a_bounded_cast_and_stays_valid() -> None:
    story = Story(seed=3)
    story.KEPT = 40
    for _ in range(3000):
        key, document = story.next()
        parse_event(encode(document), key.encode())
    # Payments take unpaid orders away; new users and orders replace the oldest in turn.
    assert len(set(story.users)) == 40 and 0 < len(story.unpaid) <= 40


def test_a_long_run_keeps_a_bounded_sample_of_its_latencies(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publish_module, "LATENCIES_KEPT", 25)
    producer = _Producer()
    messages = (Planned(b"k", b"v", "manual") for _ in range(2000))
    result = publish(producer, "events", messages, total=2000,  # type: ignore[arg-type]
                     progress=False)
    assert result.delivered == 2000 and len(result.latencies) == 25


class _Silent(_Producer):
    """A broker that never answers: every message stays unconfirmed at the final flush."""

    def flush(self, _timeout: float = 0) -> int:
        return len(self._callbacks)


def test_messages_left_unconfirmed_by_the_final_flush_are_counted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The final flush waits in slices until FLUSH_TIMEOUT_S: a stand-in's return at once.
    monkeypatch.setattr(publish_module, "FLUSH_TIMEOUT_S", 0.3)
    messages = [Planned(b"k", b"v", "manual")] * 3
    result = publish(_Silent(), "events", messages, total=3,  # type: ignore[arg-type]
                     progress=False)
    assert (result.delivered, result.failed, result.unconfirmed) == (0, 0, 3)
    out = io.StringIO()
    menu = Menu(_Silent(), "events", _typed("4", "", "", ""), out)  # type: ignore[arg-type]
    assert menu.run() == 0
    assert "FAILED (unconfirmed after 60 s)" in out.getvalue()


def _taken(count: int, drawn: list[int]) -> Iterator[Planned]:
    for index in range(count):
        drawn.append(index)
        yield Planned(b"k", b"v", "manual")


class _InterruptedAt(_Producer):
    """Ctrl-C as the `at`-th message is handed over."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def produce(self, topic: str, value: bytes, key: bytes | None, on_delivery: object) -> None:
        super().produce(topic, value, key, on_delivery)
        if len(self.sent) == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def test_an_interruption_ends_a_publish_with_what_was_handed_over_confirmed() -> None:
    """A review's finding: Ctrl-C landed in the Kafka client's poll, which returned NULL (a
    SystemError), or ended the command in silence with the client's queue dropped."""
    drawn: list[int] = []
    result = publish(_InterruptedAt(3), "events", _taken(1000, drawn),  # type: ignore[arg-type]
                     total=1000, progress=False)
    assert result.interrupted and (result.handed, result.delivered, len(drawn)) == (3, 3, 3)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


class _InterruptedWaiting(_Producer):
    """Ctrl-C while the paced publish waits in the client's poll."""

    def poll(self, timeout: float = 0) -> int:
        if timeout > 0:
            os.kill(os.getpid(), signal.SIGINT)
        return 0


def test_an_interruption_of_a_paced_publish_is_seen_within_a_slice_of_its_wait() -> None:
    drawn: list[int] = []
    started = time.monotonic()
    result = publish(_InterruptedWaiting(), "events", _taken(10, drawn),  # type: ignore[arg-type]
                     total=10, rate=0.01, progress=False)  # 100 s between messages
    assert time.monotonic() - started < 5
    # The message taken for the slot it waited for is sent: the caller's tally counted it.
    assert result.interrupted and (result.handed, result.delivered, len(drawn)) == (1, 1, 1)


def _answers(*answers: str | Exception) -> Callable[[str], str]:
    remaining = iter(answers)

    def read(_prompt: str) -> str:
        answer = next(remaining, EOFError())
        if isinstance(answer, Exception):
            raise answer
        return answer
    return read


def test_an_answer_that_is_not_utf8_is_named_and_asked_again() -> None:
    """A review's finding: bytes that are not UTF-8 (lone surrogates from a POSIX locale's
    stdin, a decoding error from a UTF-8 one) ended the session with a traceback."""
    producer = _Producer()
    out = io.StringIO()
    undecodable = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
    read = _answers(undecodable, "1", "u-\udcff\udcfe", "u-ok", "", "", "q")
    assert Menu(producer, "events", read, out).run() == 0  # type: ignore[arg-type]
    said = out.getvalue().splitlines()
    assert said.count("  choice: not UTF-8 text") == 1
    assert said.count("  userId: not UTF-8 text") == 1
    assert [parse_event(value, key).key for key, value in producer.sent] == ["u-ok"]


class _Watching(_Producer):
    """Notes the SIGTERM handler while a publish runs."""

    def produce(self, topic: str, value: bytes, key: bytes | None, on_delivery: object) -> None:
        super().produce(topic, value, key, on_delivery)
        self.sigterm = signal.getsignal(signal.SIGTERM)


def test_only_a_publish_that_is_the_whole_program_stops_on_sigterm() -> None:
    """A review's finding: the interactive menu, whose publish stopped on SIGTERM as well,
    went back to its prompt when an orchestrator stopped it."""
    for stop_on, taken in (((signal.SIGINT,), False), ((signal.SIGINT, signal.SIGTERM), True)):
        producer = _Watching()
        publish(producer, "events", _taken(1, []), total=1,  # type: ignore[arg-type]
                progress=False, stop_on=stop_on)
        assert (producer.sigterm is not signal.SIG_DFL) == taken
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
