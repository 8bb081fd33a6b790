"""The embedded SQLite database as a file: a process keeps the file it opened, even once it
is deleted or another is put in its place, and would go on writing where nobody reads.
What it opened is told apart from what the path names now by the file's identity; the
files beside it (its WAL), which SQLite makes and deletes as connections come and go, by
what the process holds open."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from sqlalchemy.engine import make_url


class FileIdentity(NamedTuple):
    device: int
    inode: int


def in_a_file(database: str | None) -> bool:
    """Whether a SQLite URL's database is a file of its own name (not in memory, not a
    `file:` URI)."""
    return database not in (None, "", ":memory:") and not str(database).startswith("file:")


def path_of(url: str) -> Path | None:
    """The file a SQLite URL names; None for another database, or one in memory."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not in_a_file(parsed.database):
        return None
    return Path(str(parsed.database))


def identity(path: Path) -> FileIdentity | None:
    """The file at `path` now; None when there is none."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return FileIdentity(found.st_dev, found.st_ino)


def held_deleted(paths: Iterable[Path]) -> set[Path]:
    """Those of `paths` whose file this process holds open though it is deleted now (a WAL or
    its index deleted by hand: the commits written through it go where no new connection
    reads). On Linux, from what its descriptors name, read once; none where that cannot be
    told."""
    wanted = {f"{path.resolve()} (deleted)": path for path in paths}
    try:
        descriptors = os.listdir("/proc/self/fd")
    except OSError:
        return set()
    found: set[Path] = set()
    for descriptor in descriptors:
        try:
            target = os.readlink(f"/proc/self/fd/{descriptor}")
        except OSError:  # closed since it was listed
            continue
        if target in wanted:
            found.add(wanted[target])
    return found


def beside(path: Path) -> dict[str, Path]:
    """The files SQLite keeps beside a database in WAL mode, by what they hold: a process
    holding either once it is deleted commits where processes started since do not read."""
    return {"write-ahead log": path.with_name(f"{path.name}-wal"),
            "shared-memory index": path.with_name(f"{path.name}-shm")}


class Watch:
    """The embedded database's file as a process found it (`url`'s, none for another
    database): `lost` says when what the process writes goes where no process started since
    reads, the file deleted or another in its place, or a file beside it it writes through
    deleted (looked for at most every `beside_every_s`: it reads the process's descriptors)."""

    def __init__(self, url: str, *, beside_every_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path_of(url)
        self.identity = None if self.path is None else identity(self.path)
        self.beside_every_s = beside_every_s
        self.clock = clock
        self._next_beside = 0.0

    def lost(self) -> str | None:
        """What happened to the file, in words; None if nothing did."""
        if self.path is None:
            return None
        if identity(self.path) != self.identity:
            return f"the database file {self.path.absolute()} was deleted or replaced"
        now = self.clock()
        if now < self._next_beside:
            return None
        self._next_beside = now + self.beside_every_s
        files = beside(self.path)
        held = held_deleted(files.values())
        if not (deleted := [f"{what} {path.absolute()}" for what, path in files.items()
                            if path in held]):
            return None
        return f"the database's {' and '.join(deleted)} " + (
            "were deleted" if len(deleted) > 1 else "was deleted")
