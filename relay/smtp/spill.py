"""The body of a message too large to hold in memory, on disk while DATA reads it.

Once a message being read passes SPILL_AT octets (its header section complete), DataReader
(relay/smtp/data.py) keeps only the header section in memory and hands the body here in pieces: each
is written to an unnamed temporary file in the state directory and fed to the DKIM body hash
(relay.dkimbody), in a thread, so the loop only waits for it. The spool copies the file into the
message's row (relay.store.spool: incremental blob I/O, in its writer's thread) in the transaction
that queues it, so a 250 still means committed; the file itself never needs to survive anything.
It reads through a descriptor of its own (:meth:`Spill.handoff`), so a session cut off while its
message waits for the writer can close its end without taking the body from under the copy.
It has no name from the moment it is made (``tempfile.TemporaryFile``), so a crash or a
refusal leaves nothing behind, and its octets are in the page cache and on disk, not in the
process's memory.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from relay.dkimbody import BodyHash

SPILL_AT = 256 * 1024  # message octets held in memory before the body goes to disk
CHUNK = 256 * 1024  # octets written (and copied into the spool) at a time


class Spill:
    """A body on its way to the spool: its file, its size and its DKIM body hash.

    A session cancelled mid-write (the client went away: aiosmtpd cancels its task) leaves that
    write running in its thread; the lock makes ``close`` wait for it, and a write that comes after
    ``close`` opens nothing, so no file is left open whatever the order."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.size = 0
        self.body_hash = BodyHash()
        self._file: IO[bytes] | None = None
        self._lock = threading.Lock()
        self._closed = False

    async def write(self, data: bytes) -> None:
        """Append the next octets of the body (hashed on the way)."""
        self.size += len(data)
        await asyncio.to_thread(self._write, data)

    def _write(self, data: bytes) -> None:
        with self._lock:
            if self._closed:
                return
            if self._file is None:  # unbuffered: every write is in the file at once
                self._file = tempfile.TemporaryFile(dir=self.directory, prefix="data-", buffering=0)
            self._file.write(data)
            self.body_hash.update(data)

    def handoff(self) -> SpilledBody:
        """A handle of the spool's own on the file (a duplicate descriptor): the spool closes it
        once the body is copied, whenever that is, and the session closes its own at the end of
        DATA, even if it was cut off before the copy ran (the file lives until both are)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the spill is closed")
            fd = os.dup(self._file.fileno()) if self._file is not None else -1
        return SpilledBody(fd, self.size)

    async def close(self) -> None:
        """Give the file's space back (its name is gone already)."""
        try:
            await asyncio.to_thread(self._close)
        except asyncio.CancelledError:
            self._close()  # the thread may not have started: here then, at most one write's wait
            raise

    def _close(self) -> None:
        with self._lock:
            self._closed = True
            f, self._file = self._file, None
        if f is not None:
            f.close()


class SpilledBody:
    """The spool's handle on a spilled body (relay.store.spool.StreamedBody): read by position,
    so it shares no file offset with anyone; closed by the spool once copied."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self.size = size

    def chunks(self) -> Iterator[bytes]:
        """The body from its start, CHUNK octets at a time. Blocking: for a thread."""
        offset = 0
        while offset < self.size and self._fd >= 0:
            piece = os.pread(self._fd, min(CHUNK, self.size - offset), offset)
            if not piece:
                return
            offset += len(piece)
            yield piece

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
