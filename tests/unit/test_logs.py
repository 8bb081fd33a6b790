"""Log lines: JSON into files and pipes, one readable line on a terminal (a real pty here),
the event's context on both."""

from __future__ import annotations

import json
import logging
import os
import pty
import subprocess
import sys

import pytest

from eventpipe.kafka import HoldBackRepeats

SNIPPET = """
import logging
from eventpipe import logs
logs.configure("bridge", "INFO", {style!r})
logging.getLogger("bridge.service").warning("partition paused",
                                            extra={{"partition": 3, "eventId": "e-1"}})
"""


def _stderr_of(style: str, terminal: bool) -> str:
    command = [sys.executable, "-c", SNIPPET.format(style=style)]
    if not terminal:
        return subprocess.run(command, capture_output=True, text=True, timeout=30,
                              check=True).stderr
    leader, follower = pty.openpty()
    try:
        subprocess.run(command, stderr=follower, stdout=subprocess.DEVNULL, timeout=30,
                       check=True)
        return os.read(leader, 65536).decode()
    finally:
        os.close(leader)
        os.close(follower)


@pytest.mark.parametrize(("style", "terminal"), [("auto", False), ("json", True)])
def test_files_and_pipes_get_json_lines(style: str, terminal: bool) -> None:
    [line] = _stderr_of(style, terminal).splitlines()
    record = json.loads(line)
    assert (record["msg"], record["level"], record["role"]) == ("partition paused", "WARNING",
                                                                "bridge")
    assert (record["partition"], record["eventId"]) == (3, "e-1")


@pytest.mark.parametrize(("style", "terminal"), [("auto", True), ("text", False)])
def test_a_terminal_gets_one_readable_line_with_the_context(style: str, terminal: bool) -> None:
    [line] = _stderr_of(style, terminal).splitlines()
    assert not line.startswith("{")
    assert "WARNING bridge.service: partition paused  partition=3 eventId=e-1" in line


def test_control_characters_from_message_bytes_reach_a_terminal_as_escapes() -> None:
    snippet = (
        "import logging\n"
        "from eventpipe import logs\n"
        "logs.configure('worker', 'INFO', 'text')\n"
        "logging.getLogger('w').warning('bad \\x1b[2J\\nINFO forged', "
        "extra={'eventType': 'x\\x1b[31m'})\n")
    done = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True,
                          timeout=30, check=True)
    [line] = done.stderr.splitlines()
    assert "\x1b" not in line
    assert "bad \\x1b[2J\\x0aINFO forged  eventType=x\\x1b[31m" in line


def test_librdkafka_says_each_kind_of_failure_once_a_window_and_how_many_it_held_back() -> None:
    """A broker down: librdkafka says `Connect … failed` at each retry, tens a second."""
    now = [0.0]
    held = HoldBackRepeats(window_s=30, clock=lambda: now[0])

    def said(text: str, *args: object) -> str | None:
        record = logging.LogRecord("librdkafka", logging.ERROR, __file__, 1, text, args, None)
        return record.getMessage() if held.filter(record) else None

    refused = "FAIL [rdkafka#consumer-1]: 127.0.0.1:%d: Connect failed (after %dms)"
    assert said(refused, 9092, 0) == "FAIL [rdkafka#consumer-1]: 127.0.0.1:9092: Connect " \
                                     "failed (after 0ms)"
    assert [said(refused, 9092, ms) for ms in range(1, 200)] == [None] * 199
    assert said("another kind of message") == "another kind of message"
    # The same failure of another broker is news.
    assert said(refused, 9093, 0) is not None
    now[0] = 30.0
    assert said(refused, 9092, 3) == ("FAIL [rdkafka#consumer-1]: 127.0.0.1:9092: Connect "
                                      "failed (after 3ms) (199 alike held back)")
    assert said(refused, 9092, 4) is None
