"""The rows of the spool (relay/store/spool.py): what is queued, claimed and recorded.

The claim of due recipients (with their messages' sizes) is here too. A message whose body DATA
put on disk (relay/smtp/spill.py) arrives as its header section and a
:class:`StreamedBody`; :func:`write_body` copies it into the row's room piece by piece."""

from __future__ import annotations

import base64
import secrets
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import aiosqlite


def write_body(msg_id: str, start: bytes, tail: StreamedBody, conn: sqlite3.Connection) -> None:
    """Fill the row's zeroblob: ``start``, then the tail piece by piece (in the writer's thread,
    inside its transaction: a piece at a time in memory, whatever the message's size)."""
    row = conn.execute("SELECT rowid FROM messages WHERE id = ?", (msg_id,)).fetchone()
    with conn.blobopen("messages", "body", row[0]) as blob:
        blob.write(start)
        for piece in tail.chunks():
            blob.write(piece)
        if blob.tell() != len(blob):
            raise sqlite3.DataError(f"message {msg_id}: its body was cut short on disk")


def new_id(now: float) -> str:
    """16 characters, sortable by time (ms) then random: short to quote, unique across workers."""
    raw = int(now * 1000).to_bytes(6, "big") + secrets.token_bytes(4)
    return base64.b32hexencode(raw).decode("ascii").lower()  # base32hex keeps sort order


@dataclass(frozen=True)
class DueRecipient:
    message_id: str
    idx: int
    address: str
    domain: str
    attempts: int
    capture: bool = False  # a sandbox message's: into the inbox, never out (relay/store/sandbox.py)
    size: int = 0  # its message's, in octets (what delivering it will hold in memory)


@dataclass(frozen=True)
class Message:
    id: str
    sender: str
    user: str | None
    size: int
    created_at: float
    body: bytes | None  # None once the message is done
    sandbox: str | None = None  # the sandbox domain it was sent from


@dataclass(frozen=True)
class Outcome:
    """The result of one delivery attempt for one recipient."""

    message_id: str
    idx: int
    state: str  # "delivered" | "deferred" | "bounced"
    code: int | None
    reply: str
    relay: str
    next_attempt_at: float | None = None  # for "deferred"


class StreamedBody(Protocol):
    """The rest of a message's body, on disk (relay/smtp/spill.py)."""

    @property
    def size(self) -> int: ...

    def chunks(self) -> Iterator[bytes]:
        """Its octets from the start, a piece at a time; blocking (read in the writer's thread)."""
        ...

    def close(self) -> None:
        """The spool is done with it (copied, or its write failed)."""
        ...


@dataclass(frozen=True)
class NewMessage:
    sender: str
    recipients: tuple[str, ...]
    body: bytes  # the message; with a tail, only its start (the header section)
    user: str | None = None
    sandbox: str | None = None  # from a sandbox domain: every recipient captured, except...
    allowed: frozenset[str] = frozenset()  # ...these (as in recipients), delivered as usual
    tail: StreamedBody | None = None  # the rest, copied into the row by the writer

    @property
    def size(self) -> int:
        return len(self.body) + (self.tail.size if self.tail is not None else 0)


# The inner SELECT walks the partial due index in time order; the outer one then takes every due
# recipient of those messages through the primary key ("+" keeps the planner off the due index
# there, which at a large backlog would mean scanning every due row).
CLAIM = """
    UPDATE recipients SET next_attempt_at = NULL, claimed_at = :now
    WHERE message_id IN (
        SELECT message_id FROM recipients WHERE next_attempt_at <= :now
        ORDER BY next_attempt_at LIMIT :limit)
      AND +next_attempt_at <= :now
    RETURNING message_id, idx, address, domain, attempts, capture
"""


async def claim(conn: aiosqlite.Connection, now: float, limit: int) -> list[DueRecipient]:
    """The due recipients claimed, in (message, index) order, with their messages' sizes (one
    query for the batch: delivery holds a large body to a budget before it reads it)."""
    rows = await conn.execute_fetchall(CLAIM, {"now": now, "limit": limit})
    ids = sorted({r[0] for r in rows})
    sizes: dict[str, int] = {}
    if ids:
        marks = ",".join("?" * len(ids))
        query = f"SELECT id, size FROM messages WHERE id IN ({marks})"  # noqa: S608 (marks only)
        sizes = {r[0]: r[1] for r in await conn.execute_fetchall(query, ids)}
    due = (DueRecipient(r[0], r[1], r[2], r[3], r[4], bool(r[5]), sizes[r[0]]) for r in rows)
    return sorted(due, key=lambda d: (d.message_id, d.idx))
