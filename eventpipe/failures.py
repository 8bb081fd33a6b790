"""What to do when applying a batch fails: one pure decision, which the worker carries out.

- A failure of the world (`errors.classify` says TRANSIENT: the database or Redis unreachable,
  a deadlock, a timeout) → `RetryLater`: the same messages again after an exponential backoff
  with jitter, for as long as it takes. Such failures never dead-letter an event.
- Anything else, in a batch of several messages → `Split`: apply each half on its own, so
  one bad message cannot hold back the others; halving again finds it in log2(n) steps.
- One message the database refuses (a value it cannot store, a constraint) → `GiveUp`:
  dead-lettered at once; retrying cannot change the answer.
- One message that fails with an error nobody foresaw → `RetryAlone` with backoff, and
  `GiveUp` once `max_attempts` are spent (it may be a bug fixed by the next deploy).
- A message during which the worker process died (killed, out of memory, a crash in a
  driver): counted across processes by `eventpipe.offset_ledger`; `after_crashes` splits the
  range that was being applied and gives up on a single message after `crash_max_attempts`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from eventpipe.dlq.letter import WORKER_CRASHED
from eventpipe.errors import FailureKind, classify, schema_out_of_step
from eventpipe.settings import Settings


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    backoff_base_s: float
    backoff_max_s: float
    max_attempts: int
    crash_max_attempts: int

    @classmethod
    def of(cls, settings: Settings) -> RetryPolicy:
        return cls(settings.retry_backoff_base_s, settings.retry_backoff_max_s,
                   settings.retry_max_attempts, settings.crash_max_attempts)

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay before try number `attempt + 1` (attempt ≥ 1): doubling from the base, capped,
        drawn from its upper half so retries of many batches spread out."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2.0 ** max(0, attempt - 1))
        draw: float = (rng or random).random()
        return ceiling / 2 + draw * ceiling / 2


@dataclass(frozen=True, slots=True)
class RetryLater:
    delay_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class Split:
    reason: str


@dataclass(frozen=True, slots=True)
class RetryAlone:
    delay_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class GiveUp:
    error_class: str
    reason: str


Decision = RetryLater | Split | RetryAlone | GiveUp


# Waited for, not blamed on the events: the message the database adds names what is missing,
# for an operator to tell a schema behind (migrate) from a table dropped or a view changed.
SCHEMA_OUT_OF_STEP = ("the database lacks a table, column or key this code uses: run "
                      "`eventpipe migrate` if its schema is behind")


def describe(exc: BaseException) -> str:
    """The first line of an exception's message, bounded: what a dead letter, or a retry's
    log line, says."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    said = f"{type(exc).__name__}: {text}"
    if schema_out_of_step(exc):
        said = f"{SCHEMA_OUT_OF_STEP} ({said})"
    return said[:500]


def decide(exc: BaseException, *, size: int, attempts: int, retries: int, policy: RetryPolicy,
           rng: random.Random | None = None) -> Decision:
    """`size`: messages that failed together; `attempts`: times a single message was already
    tried alone; `retries`: times this work already waited for the world."""
    kind = classify(exc)
    if kind is FailureKind.TRANSIENT:
        return RetryLater(policy.backoff(retries + 1, rng), describe(exc))
    if size > 1:
        return Split(describe(exc))
    if kind in (FailureKind.DATA, FailureKind.CONSTRAINT):
        return GiveUp(type(exc).__name__, f"the database refused the event: {describe(exc)}")
    if attempts + 1 >= policy.max_attempts:
        return GiveUp(type(exc).__name__, f"failed {attempts + 1} times: {describe(exc)}")
    return RetryAlone(policy.backoff(attempts + 1, rng), describe(exc))


def after_crashes(crashes: int, *, size: int, policy: RetryPolicy) -> Split | GiveUp | None:
    """`crashes`: earlier attempts at these messages that never finished (the process died)."""
    if crashes == 0:
        return None
    if size > 1:
        return Split(f"the worker died {crashes} time(s) applying these messages")
    if crashes >= policy.crash_max_attempts:
        return GiveUp(WORKER_CRASHED, f"the worker process died {crashes} times while applying "
                      "this message")
    return None
