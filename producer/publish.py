"""Publishing to Kafka with delivery confirmation, at a bounded rate, timing each message."""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from eventpipe import metrics
from eventpipe.progress import ProgressBar
from producer.stream import Planned

# Latencies kept for the percentiles: all of them up to this many, then a uniform sample of
# this size (reservoir sampling), so a run of any length fits in memory.
LATENCIES_KEPT = 100_000
FLUSH_TIMEOUT_S = 60.0
# Once interrupted, how long the messages the client still holds get to be confirmed.
INTERRUPTED_FLUSH_S = 5.0


@dataclass(slots=True)
class Delivery:
    delivered: int = 0
    failed: int = 0
    # Still unacknowledged when the final flush gave up: neither delivered nor refused.
    unconfirmed: int = 0
    handed: int = 0  # taken by the client, to be delivered or refused
    interrupted: bool = False  # by SIGINT or SIGTERM: the messages after `handed` were not sent
    signal_number: int = 0  # the one that interrupted it
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)  # each distinct error, how often
    # Per partition, the offset after the last delivered message: where a consumer that has
    # read everything sent stands (the broker's own "latest offset" answer is not trusted).
    ends: dict[int, int] = field(default_factory=dict)
    _sampler: random.Random = field(default_factory=lambda: random.Random(0))

    def timed(self, latency: float) -> None:
        if len(self.latencies) < LATENCIES_KEPT:
            self.latencies.append(latency)
        elif (slot := self._sampler.randrange(self.delivered)) < LATENCIES_KEPT:
            self.latencies[slot] = latency

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def publish(
    producer: Producer, topic: str, messages: Iterable[Planned], *, total: int,
    rate: float | None = None, progress: bool = True,
    stop_on: Collection[signal.Signals] = (signal.SIGINT,),
) -> Delivery:
    """Send every message; `rate` in messages per second (None: as fast as possible).

    An interruption by a signal of `stop_on` (SIGINT: Ctrl-C; SIGTERM too for a run that is
    the whole program, which an orchestrator or `timeout` stops so) ends it early: no message
    more is handed to the client, those it holds get `INTERRUPTED_FLUSH_S` to be confirmed,
    and the result says `interrupted`, and by which signal."""
    result = Delivery()
    started = time.monotonic()
    bar = ProgressBar("sending", total, "messages") if progress else None

    def acknowledged(sent_at: float) -> Any:
        def callback(error: KafkaError | None, message: Message) -> None:
            elapsed = time.monotonic() - sent_at
            if error is None:
                result.delivered += 1
                partition, offset = message.partition() or 0, message.offset() or 0
                result.ends[partition] = max(result.ends.get(partition, 0), offset + 1)
                result.timed(elapsed)
                metrics.KAFKA_PRODUCE.observe(elapsed)
            else:
                result.failed += 1
                result.errors[str(error)] += 1
        return callback

    with _interruptible(stop_on) as stop:
        try:
            for index, message in enumerate(messages, start=1):
                if rate:
                    # Pace against the schedule, not the previous send, so the rate holds on
                    # average. A message taken is sent even if the wait is interrupted (the
                    # caller's tally counted it), unless the client's queue stays full.
                    _wait(producer, started + index / rate, stop)
                while True:
                    try:
                        producer.produce(topic, value=message.value, key=message.key,
                                         on_delivery=acknowledged(time.monotonic()))
                        result.handed += 1
                        break
                    except BufferError:  # the local queue is full: let deliveries drain
                        if stop.is_set():
                            break
                        producer.poll(0.1)
                producer.poll(0)
                if bar is not None:
                    bar.update(index)
                if stop.is_set():
                    break
        except KeyboardInterrupt:  # raised in Python code: not in the main thread's handler
            stop.signal_number = signal.SIGINT
            stop.set()
        result.unconfirmed = _flush(producer, stop)
        result.interrupted, result.signal_number = stop.is_set(), stop.signal_number
    if bar is not None:
        bar.close()
    return result


# Slices of a wait in the Kafka client's C code, between which an interruption is seen.
WAIT_SLICE_S = 0.2


def _wait(producer: Producer, until: float, stop: threading.Event) -> None:
    """Serve deliveries until `until` (the monotonic clock), or an interruption."""
    while not stop.is_set() and (left := until - time.monotonic()) > 0:
        producer.poll(min(left, WAIT_SLICE_S))


def _flush(producer: Producer, stop: threading.Event) -> int:
    """Wait for the messages the client holds to be confirmed, up to `FLUSH_TIMEOUT_S`, or
    `INTERRUPTED_FLUSH_S` once interrupted; those still held then."""
    deadline = time.monotonic() + FLUSH_TIMEOUT_S
    cut = False
    while True:
        held = producer.flush(min(WAIT_SLICE_S, max(0.0, deadline - time.monotonic())))
        if not held:
            return 0
        if stop.is_set() and not cut:
            deadline, cut = min(deadline, time.monotonic() + INTERRUPTED_FLUSH_S), True
        if time.monotonic() >= deadline:
            return held


class _Stop(threading.Event):
    """Set by the signal that interrupts a run, which it names."""

    signal_number: int = 0


# The handler a Python program starts with, for each signal a run may stop on.
_DEFAULT_HANDLERS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


@contextmanager
def _interruptible(stop_on: Collection[signal.Signals]) -> Iterator[_Stop]:
    """An event the signals of `stop_on` set while the block runs, in the main thread,
    instead of raising KeyboardInterrupt where it lands (in the Kafka client's poll, which
    then returns NULL without an exception, a SystemError; or in a delivery callback), or
    ending the process at once. A signal given another handler is someone else's choice:
    left as it is."""
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def stopped(signum: int, _frame: object) -> None:
        stop.signal_number = signum
        stop.set()

    previous = {signum: signal.signal(signum, stopped) for signum in stop_on
                if signal.getsignal(signum) is _DEFAULT_HANDLERS[signum]}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
