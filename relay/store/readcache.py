"""Answers of the hot reads of the main store, kept while nothing has been written since.

Every SMTP transaction read the main store twice through its thread: the credential recheck at
MAIL FROM and the suppression list at each RCPT TO. A trip costs ~50 us of the loop's CPU and, at
a few concurrent sessions, a turn of the loop in latency (bench/README.md, "Kept after that").
:class:`ReadCache` keeps such answers, and uses one again only while the store's
:class:`Generation` is still the one it noted *before* reading.

The generation is 8 bytes in a file beside the SQLite database (``relaybox.db-generation``),
mapped into memory by every process of the node that opens the store: the workers and the CLI.
The embedded store (relay/store/engine.py, ``SqliteStore``) writes a fresh random value there
after each of its write transactions has committed (or failed): an operator's ``relaybox user
reset`` / ``disable`` / ``delete`` / ``allow`` / ``suppression add``, a bounce's suppression, a
last-login flush. So when the CLI has returned, the next lookup in every worker reads again, and
a revocation takes effect at the next MAIL FROM as when every MAIL read the store.

Why random values and not a counter: two writers committing at once would both raise a counter
from n to n+1, and a read made between their commits could be kept under n+1 though it missed the
second. A value drawn after a commit is none that any reader noted before it (2^-64).

What the generation cannot see is bounded by ``MAX_AGE`` (an answer is read again after that,
whatever the generation): a writer killed between its COMMIT and the new value, a write made with
another tool (``sqlite3`` on the file). On PostgreSQL the store is shared by nodes a file cannot
reach: there is no generation (``None``) and every lookup reads, as before.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path
from typing import Generic, TypeVar

from relay.store.db import StoreError

__all__ = ["MAX_AGE", "Generation", "ReadCache", "generation_path"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

SIZE = 8
MAX_AGE = 5.0  # seconds an answer is used at most, whatever the generation
MAX_ENTRIES = 10_000  # per cache; the oldest goes first


def generation_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + "-generation")


class Generation:
    """The shared 8 bytes: :meth:`value` to compare, :meth:`advance` after a commit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            # The database beside it opened, so this is not expected; without it a write here
            # would not reach the other processes' caches: refuse rather than serve stale answers.
            raise StoreError(f"cannot open {path}: {exc.strerror}") from exc
        try:
            if os.fstat(fd).st_size < SIZE:
                os.ftruncate(fd, SIZE)  # new bytes are zeros; a size already there is kept
            self._map = mmap.mmap(fd, SIZE)
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot map {path}: {exc}") from exc
        finally:
            os.close(fd)

    def value(self) -> bytes:
        """The current value: a read of shared memory, no system call."""
        return self._map[:SIZE]

    def advance(self) -> None:
        """A value no reader has seen (call after the write has committed)."""
        self._map[:SIZE] = os.urandom(SIZE)

    def close(self) -> None:
        self._map.close()


class ReadCache(Generic[K, V]):
    """Answers by key, valid while ``generation`` keeps the value noted before they were read
    (and ``max_age`` seconds at most). ``generation`` None: every lookup reads.

    The answers must be immutable (frozen dataclasses, None, bools): they are shared by every
    session that asks. A read that raises keeps nothing."""

    def __init__(
        self,
        generation: Generation | None,
        *,
        max_age: float = MAX_AGE,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._generation = generation
        self._max_age = max_age
        self._max_entries = max_entries
        self._clock = clock
        self._seen = b""
        self._entries: dict[K, tuple[float, V]] = {}  # key -> (used until, answer)
        self.lookups = 0
        self.reads = 0

    async def get(self, key: K, read: Callable[[], Awaitable[V]]) -> V:
        self.lookups += 1
        if self._generation is None:
            self.reads += 1
            return await read()
        seen = self._generation.value()
        if seen != self._seen:  # something was written: nothing kept holds
            self._entries.clear()
            self._seen = seen
        now = self._clock()
        kept = self._entries.get(key)
        if kept is not None and now < kept[0]:
            return kept[1]
        self.reads += 1
        answer = await read()
        # Kept only if no lookup saw the generation move while this read ran: else the entries
        # now stand for the new value, and this answer may predate the write that moved it. (A
        # move nobody has seen yet clears it at the next lookup.)
        if self._seen == seen:
            self._entries.pop(key, None)
            if len(self._entries) >= self._max_entries:
                del self._entries[next(iter(self._entries))]
            self._entries[key] = (now + self._max_age, answer)
        return answer

    def forget(self) -> None:
        self._entries.clear()
