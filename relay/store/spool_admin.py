"""The spool's read and maintenance side: what `relaybox queue`, metrics and the purge use.

Split from relay/store/spool.py (the hot path: enqueue, claim, outcomes through the group-commit
writer) to keep modules small; it is the same store module's SQL. These run as plain transactions,
never through the writer: they are rare, and the CLI runs them from another process while the server
delivers (WAL + busy_timeout + BEGIN IMMEDIATE make that safe).

:func:`retry` and :func:`delete` are the operator's changes across every worker's spool: each writes
its ``queue.*`` audit event to the shared database (relay/store/events.py) once the change is made.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

import aiosqlite

from relay.errors import Invalid, NotFound
from relay.store import events
from relay.store.db import Database
from relay.store.engine import Store

PENDING = ("queued", "deferred")
FINAL = ("delivered", "bounced")
STATES = PENDING + FINAL
PURGE_CHUNK = 500
NEXT_DUE = "SELECT min(next_attempt_at) AS t FROM recipients WHERE next_attempt_at IS NOT NULL"


@dataclass(frozen=True)
class RecipientInfo:
    idx: int
    address: str
    state: str
    attempts: int
    next_attempt_at: float | None
    last_attempt_at: float | None
    last_code: int | None
    last_reply: str | None
    relay: str | None
    in_flight: bool


@dataclass(frozen=True)
class MessageInfo:
    id: str
    sender: str
    user: str | None
    size: int
    created_at: float
    done_at: float | None
    recipients: tuple[RecipientInfo, ...]

    def count(self, state: str) -> int:
        return sum(1 for r in self.recipients if r.state == state)


@dataclass(frozen=True)
class Stats:
    messages: int
    pending_messages: int
    recipients: dict[str, int]  # state -> count
    in_flight: int
    oldest_pending_at: float | None
    next_attempt_at: float | None


class SpoolAdmin:
    """Mixed into :class:`relay.spool.Spool`."""

    db: Database

    async def next_due(self) -> float | None:
        """When the earliest not-in-flight pending recipient is due (index lookup)."""
        r = await self.db.fetchone(NEXT_DUE)
        return None if r is None or r["t"] is None else float(r["t"])

    async def depth(self) -> dict[str, int]:
        """Pending recipients by state (queued, deferred), from the state index: cheap enough
        for a metrics gauge at any queue size."""
        counts = dict.fromkeys(PENDING, 0)
        rows = await self.db.fetchall(
            "SELECT state, count(*) AS n FROM recipients "
            "WHERE state IN ('queued', 'deferred') GROUP BY state"
        )
        for r in rows:
            counts[r["state"]] = r["n"]
        return counts

    async def show(self, message_id: str) -> MessageInfo:
        m = await self.db.fetchone(
            "SELECT id, sender, user, size, created_at, done_at FROM messages WHERE id = ?",
            (message_id,),
        )
        if m is None:
            raise NotFound(f"no message {message_id} in the queue")
        rows = await self.db.fetchall(
            "SELECT * FROM recipients WHERE message_id = ? ORDER BY idx", (message_id,)
        )
        return _info(m, rows)

    async def list_messages(
        self, states: Sequence[str] = PENDING, limit: int = 1000
    ) -> list[MessageInfo]:
        """Messages with at least one recipient in one of ``states``, oldest first."""
        for s in states:
            if s not in STATES:
                raise Invalid(f"unknown state {s!r} (use one of {', '.join(STATES)})")
        marks = ", ".join("?" for _ in states)
        msgs = await self.db.fetchall(
            "SELECT id, sender, user, size, created_at, done_at FROM messages WHERE id IN "
            f"(SELECT message_id FROM recipients WHERE state IN ({marks})) "
            "ORDER BY created_at, id LIMIT ?",
            (*states, limit),
        )
        if not msgs:
            return []
        ids = [m["id"] for m in msgs]
        rows = await self.db.fetchall(
            "SELECT * FROM recipients WHERE message_id IN "
            f"({', '.join('?' for _ in ids)}) ORDER BY message_id, idx",
            ids,
        )
        by_id: dict[str, list[sqlite3.Row]] = {}
        for r in rows:
            by_id.setdefault(r["message_id"], []).append(r)
        return [_info(m, by_id.get(m["id"], [])) for m in msgs]

    async def stats(self) -> Stats:
        counts = dict.fromkeys(STATES, 0)
        for r in await self.db.fetchall(
            "SELECT state, count(*) AS n FROM recipients GROUP BY state"
        ):
            counts[r["state"]] = r["n"]
        m = await self.db.fetchone(
            "SELECT count(*) AS n, count(*) - count(done_at) AS pending, "
            "min(CASE WHEN done_at IS NULL THEN created_at END) AS oldest FROM messages"
        )
        c = await self.db.fetchone(
            "SELECT count(*) AS n FROM recipients WHERE claimed_at IS NOT NULL"
        )
        assert m is not None and c is not None
        return Stats(m["n"], m["pending"], counts, c["n"], m["oldest"], await self.next_due())

    # --- admin writes (rare; straight transactions, safe from the CLI while the server runs) ----

    async def retry(self, message_id: str | None, *, now: float) -> int:
        """Make pending recipients (of one message, or all) due now; returns how many. This
        spool only, not audited: the operator's retry is :func:`retry`."""
        async with self.db.transaction() as conn:
            if message_id is None:
                cur = await conn.execute(
                    "UPDATE recipients SET next_attempt_at = ? WHERE next_attempt_at > ?",
                    (now, now),
                )
                return cur.rowcount
            await _require(conn, message_id)
            cur = await conn.execute(
                "UPDATE recipients SET next_attempt_at = ? "
                "WHERE message_id = ? AND next_attempt_at IS NOT NULL",
                (now, message_id),
            )
            return cur.rowcount

    async def delete(self, message_id: str) -> MessageInfo:
        """Remove a message and its recipients outright (no bounce); returns what was removed.
        This spool only, not audited: the operator's delete is :func:`delete`."""
        info = await self.show(message_id)
        async with self.db.transaction() as conn:
            await _require(conn, message_id)
            await conn.execute("DELETE FROM messages WHERE id = ?", (message_id,))
        return info

    async def purge(self, *, now: float, retention: float) -> int:
        """Delete done messages older than the retention window, in small transactions."""
        total = 0
        while True:
            async with self.db.transaction() as conn:
                cur = await conn.execute(
                    "DELETE FROM messages WHERE id IN (SELECT id FROM messages "
                    "WHERE done_at < ? LIMIT ?)",
                    (now - retention, PURGE_CHUNK),
                )
                n = cur.rowcount
            total += n
            if n < PURGE_CHUNK:
                return total


async def find(spools: Sequence[SpoolAdmin], message_id: str) -> tuple[SpoolAdmin, MessageInfo]:
    """The spool holding ``message_id`` (each worker has its own) and the message in it."""
    for sp in spools:
        try:
            return sp, await sp.show(message_id)
        except NotFound:
            continue
    raise NotFound(f"no message {message_id} in the queue")


async def retry(
    spools: Sequence[SpoolAdmin], message_id: str | None, *, now: float, audit: Store, actor: str
) -> int:
    """Make pending recipients due now, of one message or (``None``) of every message in every
    spool; returns how many. Audited once in ``audit`` as ``queue.retry`` (target: the id or
    "all")."""
    if message_id is None:
        n = sum([await sp.retry(None, now=now) for sp in spools])
    else:
        sp, _info = await find(spools, message_id)
        n = await sp.retry(message_id, now=now)
    await events.record(
        audit,
        now=now,
        actor=actor,
        action="queue.retry",
        target=message_id or "all",
        detail=f"recipients={n}",
    )
    return n


async def delete(
    spools: Sequence[SpoolAdmin], message_id: str, *, now: float, audit: Store, actor: str
) -> MessageInfo:
    """Remove a message from whichever spool holds it (no bounce); returns what was removed.
    Audited in ``audit`` as ``queue.delete``."""
    sp, _info = await find(spools, message_id)
    removed = await sp.delete(message_id)
    await events.record(
        audit,
        now=now,
        actor=actor,
        action="queue.delete",
        target=message_id,
        detail=f"from={removed.sender or '<>'} recipients={len(removed.recipients)}",
    )
    return removed


async def _require(conn: aiosqlite.Connection, message_id: str) -> None:
    async with conn.execute("SELECT 1 FROM messages WHERE id = ?", (message_id,)) as cur:
        if await cur.fetchone() is None:
            raise NotFound(f"no message {message_id} in the queue")


def _info(m: sqlite3.Row, rows: Sequence[sqlite3.Row]) -> MessageInfo:
    rcpts = tuple(
        RecipientInfo(
            r["idx"],
            r["address"],
            r["state"],
            r["attempts"],
            r["next_attempt_at"],
            r["last_attempt_at"],
            r["last_code"],
            r["last_reply"],
            r["relay"],
            r["claimed_at"] is not None,
        )
        for r in rows
    )
    return MessageInfo(
        m["id"], m["sender"], m["user"], m["size"], m["created_at"], m["done_at"], rcpts
    )
