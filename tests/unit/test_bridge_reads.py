"""The bridge's reads from Kafka: what the client holds goes at once; a read waits only while
it holds nothing, and no longer than until the first message arrives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from bridge.service import read_ready


@dataclass
class _Client:
    """A Kafka client on a clock of its own: `arrivals` are the times messages come in; a
    call that waits moves the clock as librdkafka's would (`consume` until `num_messages`
    have come or its timeout is out, `poll` until one has)."""

    arrivals: list[float]
    now: float = 0.0
    taken: int = 0
    waits: list[float] = field(default_factory=list)

    def _held(self) -> int:
        return sum(1 for at in self.arrivals if at <= self.now) - self.taken

    def _take(self, count: int) -> list[int]:
        taken = list(range(self.taken, self.taken + count))
        self.taken += count
        return taken

    def consume(self, num_messages: int, timeout: float) -> list[int]:
        due = self.arrivals[self.taken + num_messages - 1:self.taken + num_messages]
        until = min(self.now + timeout, max(due[0], self.now)) if due else self.now + timeout
        self._wait(until)
        return self._take(min(num_messages, self._held()))

    def poll(self, timeout: float) -> int | None:
        coming = self.arrivals[self.taken:self.taken + 1]
        self._wait(min(self.now + timeout, max(coming[0], self.now)) if coming
                   else self.now + timeout)
        return self._take(1)[0] if self._held() else None

    def _wait(self, until: float) -> None:
        if until > self.now:
            self.waits.append(until - self.now)
            self.now = until


def _read(client: _Client, limit: int = 500, wait_s: float = 0.05) -> list[int]:
    return cast(list[int], read_ready(cast(Any, client), limit, wait_s))


def test_a_message_that_arrives_goes_without_waiting_out_the_read() -> None:
    client = _Client(arrivals=[0.004, 0.030])
    assert _read(client) == [0]
    assert client.now == 0.004  # not 0.05: the first message ended the wait
    assert _read(client) == [1]
    assert client.now == 0.030


def test_what_the_client_holds_is_read_at_once_up_to_the_limit() -> None:
    client = _Client(arrivals=[0.0] * 700)
    assert _read(client) == list(range(500))
    assert _read(client) == list(range(500, 700))
    assert client.waits == []


def test_messages_that_came_with_the_first_go_with_it() -> None:
    client = _Client(arrivals=[0.010, 0.010, 0.010, 0.020])
    assert _read(client) == [0, 1, 2]
    assert client.now == 0.010


def test_a_read_waits_its_time_when_nothing_comes() -> None:
    client = _Client(arrivals=[])
    assert _read(client, wait_s=0.02) == []
    assert client.waits == [0.02]


def test_one_message_at_a_time_when_the_limit_is_one() -> None:
    client = _Client(arrivals=[0.0, 0.0, 0.005])
    assert [_read(client, limit=1) for _ in range(3)] == [[0], [1], [2]]
    assert client.now == 0.005
