"""The audit log: who did what, when. Never a secret: callers pass names, not passwords."""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass

import aiosqlite

from relay.store.db import Database


@dataclass(frozen=True)
class Event:
    id: int
    at: float
    actor: str
    action: str
    target: str
    detail: str


def current_actor() -> str:
    """The person behind an admin command: the sudo caller if any, else the process user."""
    sudo = os.environ.get("SUDO_USER")
    try:
        me = getpass.getuser()
    except (KeyError, OSError):
        me = f"uid:{os.getuid()}"
    return f"{sudo} (via sudo as {me})" if sudo else me


async def add(
    conn: aiosqlite.Connection,
    *,
    now: float,
    actor: str,
    action: str,
    target: str = "",
    detail: str = "",
) -> None:
    """Record an event inside the caller's write transaction (so it commits with the change)."""
    await conn.execute(
        "INSERT INTO events (at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
        (now, actor, action, target, detail),
    )


async def record(
    db: Database, *, now: float, actor: str, action: str, target: str = "", detail: str = ""
) -> None:
    async with db.transaction() as conn:
        await add(conn, now=now, actor=actor, action=action, target=target, detail=detail)


async def recent(db: Database, limit: int = 100, target: str | None = None) -> list[Event]:
    if target is None:
        rows = await db.fetchall("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,))
    else:
        rows = await db.fetchall(
            "SELECT * FROM events WHERE target = ? ORDER BY id DESC LIMIT ?", (target, limit)
        )
    return [
        Event(r["id"], r["at"], r["actor"], r["action"], r["target"], r["detail"]) for r in rows
    ]
