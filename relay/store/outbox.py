"""The webhook outbox: events waiting to be posted, in each worker's own spool file (issue 16).

An event row is written in the same transaction as the change it reports (relay/store/spool.py
calls :func:`insert` inside its writer's transaction: the enqueue for ``message.accepted``, the
outcome for ``delivered``/``deferred``/``bounced``; a ``message.suppressed`` is a small write of
its own), so no reported change is without its event and no event without its change, whatever
kills the process. One row per (event, endpoint); the body is fixed at writing, so every retry
sends the same bytes under the same ``webhook-id``.

The ``outbox`` table (relay/store/spool_schema.py, migration 3), which only this module reads
and writes: ``state`` is ``pending`` (``next_attempt_at`` set: due then), ``delivered`` (a 2xx)
or ``failed`` (given up after ``[webhooks] max_age`` from ``retry_from``: the event's time, or
its replay's). The poster (relay/delivery/poster.py) reads due rows without claiming them: what
it has in flight it keeps in memory, so a crash leaves them pending, posted again after the
restart (at least once). Delivered rows go with the spool's retention.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from relay import clock
from relay.maillog import printable
from relay.store.db import Database, Statement, StoreError
from relay.store.spool_schema import SPOOL_MIGRATIONS

__all__ = [
    "Attempt", "Delivery", "EventRow", "OutboxFile", "Pending", "backlog", "deliveries", "insert",
]  # fmt: skip

ERROR_LIMIT = 200
_INSERT = (
    "INSERT INTO outbox (event_id, endpoint_id, type, body, created_at, retry_from, "
    "next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (event_id, endpoint_id) DO NOTHING"
)
_RECORD = (
    "UPDATE outbox SET state = ?, attempts = attempts + 1, last_attempt_at = ?, "
    "last_status = ?, last_error = ?, next_attempt_at = ? "
    "WHERE event_id = ? AND endpoint_id = ? AND state = 'pending'"
)
_LISTED = (
    "event_id, endpoint_id, type, state, attempts, created_at, last_attempt_at, "
    "next_attempt_at, last_status, last_error"
)


@dataclass(frozen=True)
class EventRow:
    """An event for one endpoint, as written with the change it reports."""

    event_id: str
    endpoint_id: str
    type: str
    body: str
    created_at: float


@dataclass(frozen=True)
class Pending:
    """A due row, as the poster reads it."""

    event_id: str
    endpoint_id: str
    type: str
    body: str
    created_at: float
    retry_from: float
    attempts: int

    @property
    def key(self) -> tuple[str, str]:
        return (self.event_id, self.endpoint_id)


@dataclass(frozen=True)
class Attempt:
    """What one post came to: ``state`` "delivered", "pending" (again at ``next_attempt_at``)
    or "failed"; ``status`` the HTTP status (None: no answer), ``error`` why, if it failed."""

    event_id: str
    endpoint_id: str
    state: str
    at: float
    status: int | None
    error: str = ""
    next_attempt_at: float | None = None


@dataclass(frozen=True)
class Delivery:
    event_id: str
    endpoint_id: str
    type: str
    state: str
    attempts: int
    created_at: float
    last_attempt_at: float | None
    next_attempt_at: float | None
    last_status: int | None
    last_error: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "endpoint_id": self.endpoint_id,
            "type": self.type,
            "state": self.state,
            "attempts": self.attempts,
            "created_at": clock.iso(self.created_at),
            "last_attempt_at": clock.iso(self.last_attempt_at),
            "next_attempt_at": clock.iso(self.next_attempt_at),
            "last_status": self.last_status,
            "last_error": self.last_error,
        }


def insert_statement(rows: Sequence[EventRow]) -> Statement:
    """The statement that writes ``rows``, due at once (for Database.write_statements)."""
    return _INSERT, [
        (r.event_id, r.endpoint_id, r.type, r.body, r.created_at, r.created_at, r.created_at)
        for r in rows
    ]


async def insert(conn: aiosqlite.Connection, rows: Sequence[EventRow]) -> None:
    """Write ``rows`` inside the caller's write transaction (so they commit with its change),
    due at once."""
    await conn.executemany(*insert_statement(rows))


async def due(db: Database, now: float, limit: int) -> list[Pending]:
    """Up to ``limit`` pending rows due by ``now``, the longest due first (the partial index)."""
    rows = await db.fetchall(
        "SELECT event_id, endpoint_id, type, body, created_at, retry_from, attempts "
        "FROM outbox WHERE next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?",
        (now, limit),
    )
    return [Pending(*(r[i] for i in range(7))) for r in rows]


async def next_due(db: Database) -> float | None:
    row = await db.fetchone("SELECT MIN(next_attempt_at) FROM outbox")
    return None if row is None or row[0] is None else float(row[0])


def record_statement(attempts: Sequence[Attempt]) -> Statement:
    """The statement that records the outcomes of posts (for Database.write_statements)."""
    return _RECORD, [
        (a.state, a.at, a.status, printable(a.error, ERROR_LIMIT) or None,
         a.next_attempt_at if a.state == "pending" else None, a.event_id, a.endpoint_id)
        for a in attempts
    ]  # fmt: skip


async def record_in(conn: aiosqlite.Connection, attempts: Sequence[Attempt]) -> None:
    """The outcomes of posts, inside the caller's transaction (the spool writer's: group
    commit with the hot path's writes, no transaction of their own)."""
    await conn.executemany(*record_statement(attempts))


def _delivery(r: Any) -> Delivery:
    return Delivery(*(r[i] for i in range(10)))


async def deliveries(db: Database, *, failed: bool = False, limit: int = 100) -> list[Delivery]:
    """The latest rows (every state, or failed only), newest first."""
    where = "WHERE state = 'failed' " if failed else ""
    rows = await db.fetchall(
        f"SELECT {_LISTED} FROM outbox {where}ORDER BY created_at DESC, event_id LIMIT ?",
        (limit,),
    )
    return [_delivery(r) for r in rows]


async def replay(db: Database, event_id: str, now: float) -> list[Delivery]:
    """Queue ``event_id`` again for each of its endpoints (failed or delivered alike): pending,
    due now, a new ``max_age`` from now. The rows as they were; none: not in this outbox."""
    async with db.transaction() as conn:
        rows = await conn.execute_fetchall(
            f"SELECT {_LISTED} FROM outbox WHERE event_id = ? ORDER BY endpoint_id", (event_id,)
        )
        found = [_delivery(r) for r in rows]
        if found:
            await conn.execute(
                "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?, "
                "retry_from = ? WHERE event_id = ?",
                (now, now, event_id),
            )
    return found


async def backlog(db: Database) -> tuple[int, float | None]:
    """Pending rows, and the time of the oldest one's event (None: none pending)."""
    row = await db.fetchone(
        "SELECT COUNT(*), MIN(created_at) FROM outbox WHERE next_attempt_at IS NOT NULL"
    )
    if row is None:
        return 0, None
    return int(row[0]), (None if row[1] is None else float(row[1]))


async def purge(db: Database, before: float) -> int:
    """Drop delivered rows whose event is older than ``before`` (failed ones stay for replay)."""
    async with db.transaction() as conn:
        cur = await conn.execute(
            "DELETE FROM outbox WHERE state = 'delivered' AND created_at < ?", (before,)
        )
        return int(cur.rowcount)


class OutboxFile:
    """The outbox of a spool file, opened by the poster process (relay/service/posterproc.py)
    beside the worker that owns the file: it reads due rows and records outcomes in small
    transactions of its own. ``synchronous = NORMAL``: a posted mark lost to a power cut only
    posts that event once more (at least once); the events themselves are written by the
    worker, with ``FULL``. SQLite serialises its writes with the worker's."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @classmethod
    async def open(cls, path: Path) -> OutboxFile:
        # Never create one: a spool file is the worker's to create (one stat, at start).
        if not path.exists():  # noqa: ASYNC240
            raise StoreError(f"no spool file {path}")
        return cls(await Database.open(path, SPOOL_MIGRATIONS, synchronous="NORMAL"))

    async def write_outbox(
        self, events: Sequence[EventRow] = (), posted: Sequence[Attempt] = ()
    ) -> None:
        try:
            async with self.db.transaction() as conn:
                if events:
                    await insert(conn, events)
                if posted:
                    await record_in(conn, posted)
        except sqlite3.Error as exc:
            raise StoreError(f"outbox write: {exc}") from exc

    async def close(self) -> None:
        await self.db.close()
