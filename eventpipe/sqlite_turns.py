"""Writers to one SQLite file take turns at its write lock on a file lock beside it.

SQLite lets one transaction write at a time. A writer that finds the write lock taken is put
to sleep by SQLite's busy handler and tries again 1, 2, 5, 10, 15, 20, 25 … up to 100 ms
later, however soon the lock is free: the next worker process slept on while the lock sat
free, and its batch waited with it. Here a writer first takes an exclusive `flock` on
`<database>-writer`, looking again within a millisecond while another writer has it, and
gives it back as its transaction ends (commit, rollback, close), so the next writer begins
about as soon as the last one commits.

SQLite's own lock still guards the data: the file lock only orders the writers. A program
that does not take it is waited for by SQLite as before, and the kernel drops a dead
process's turn with its open files.
"""

from __future__ import annotations

import fcntl
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import OperationalError

_FIRST_PAUSE_S = 0.00005
_LONGEST_PAUSE_S = 0.001  # how late a waiter may notice that the turn is free


class TakesTurns(sqlite3.Connection):
    """A writer's connection (`sqlite3.connect(factory=…)`): `take_turn` before its
    transaction begins; the turn ends with the transaction, or waits `timeout` at most."""

    def __init__(self, database: str, timeout: float = 5.0, *args: Any,
                 **kwargs: Any) -> None:
        super().__init__(database, timeout, *args, **kwargs)
        self._timeout = timeout
        self._turn = open(f"{database}-writer", "ab")  # noqa: SIM115 - closed with the connection

    def take_turn(self) -> None:
        """Wait for the other writers' transactions to end; the error SQLite gives when its
        own wait runs out if they do not within the timeout."""
        deadline = time.monotonic() + self._timeout
        pause = _FIRST_PAUSE_S
        while True:
            try:
                fcntl.flock(self._turn, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise sqlite3.OperationalError(
                        f"database is locked: another writer kept its turn for more than "
                        f"{self._timeout:g} s") from None
            time.sleep(pause)
            pause = min(pause * 2, _LONGEST_PAUSE_S)

    def end_turn(self) -> None:
        if not self._turn.closed:
            fcntl.flock(self._turn, fcntl.LOCK_UN)

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self.end_turn()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self.end_turn()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._turn.close()


@contextmanager
def alone(path: str) -> Iterator[bool]:
    """An exclusive `flock` on `path` for the block if no one else holds it (True), else
    False at once: for work that must not overlap across its transactions, as a PostgreSQL
    advisory lock keeps it within one. The kernel drops a dead process's hold."""
    with open(path, "ab") as held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)


def begin_writing(conn: Connection) -> None:
    """Begin a writer's transaction: its turn first when its connection takes turns, then
    SQLite's write lock (`BEGIN IMMEDIATE`), so the batch's reads and writes never fail
    halfway on a lock upgrade."""
    raw = conn.connection.dbapi_connection
    if isinstance(raw, TakesTurns):
        try:
            raw.take_turn()
        except sqlite3.OperationalError as exc:  # as SQLite's own wait would have ended
            raise OperationalError("BEGIN IMMEDIATE", None, exc) from None
    try:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    except BaseException:
        if isinstance(raw, TakesTurns):
            raw.end_turn()
        raise
