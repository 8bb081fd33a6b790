"""Calls the bridge waits for no longer than a few seconds, made on a thread of their own.

A database behind something that answers for it at the network's level (a connection pooler
that holds queries while its server is away, a proxy that hangs) never lets the driver's own
timeouts fire: the socket stays open and acknowledged, and a call on the bridge's loop would
hold it, and every partition's reading, until the database answered. The loop instead waits
`wait_s` at most; the call goes on alone, and while it has not ended the next one is refused
at once, rather than queued behind it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class Bounded:
    def __init__(self, wait_s: float, name: str = "bounded") -> None:
        self.wait_s = wait_s
        self._calls: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]]] = \
            queue.SimpleQueue()
        self._last: Future[Any] | None = None
        # A daemon: a call the database never answers must not keep the process from ending.
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def call(self, function: Callable[[], T]) -> T:
        """`function()`'s result, or its exception; TimeoutError (an OSError) when it has not
        ended within `wait_s`, or the call before it has not ended yet."""
        if self._last is not None and not self._last.done():
            raise TimeoutError(f"the last call has not ended after {self.wait_s:g} s, nor since")
        future: Future[T] = Future()
        self._last = future
        self._calls.put((future, function))
        try:
            return future.result(timeout=self.wait_s)
        except TimeoutError:
            if future.done():  # the call's own
                raise
            raise TimeoutError(f"no answer within {self.wait_s:g} s") from None

    def _serve(self) -> None:
        while True:
            future, function = self._calls.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function())
            except BaseException as exc:  # handed to the caller, whatever it is
                future.set_exception(exc)
