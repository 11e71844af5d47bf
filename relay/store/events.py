"""The audit log: who did what, when. Never a secret: callers pass names, not passwords.

Every field is stored printable (:func:`relay.maillog.printable`): a login or a sender chosen by
a client cannot carry a newline or a terminal escape into what `relaybox audit` shows.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass

from relay.maillog import printable
from relay.store.engine import Store, Tx

FIELD_LIMIT = 512  # characters kept of a field (a login is at most 320)


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
    conn: Tx,
    *,
    now: float,
    actor: str,
    action: str,
    target: str = "",
    detail: str = "",
) -> None:
    """Record an event inside the caller's write transaction (so it commits with the change).
    Each text field is stored printable, cut at ``FIELD_LIMIT``."""
    fields = [printable(v, FIELD_LIMIT) for v in (actor, action, target, detail)]
    await conn.execute(
        "INSERT INTO events (at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
        (now, *fields),
    )


async def record(
    db: Store, *, now: float, actor: str, action: str, target: str = "", detail: str = ""
) -> None:
    async with db.transaction() as conn:
        await add(conn, now=now, actor=actor, action=action, target=target, detail=detail)


async def recent(db: Store, limit: int = 100, target: str | None = None) -> list[Event]:
    if target is None:
        rows = await db.fetchall("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,))
    else:
        rows = await db.fetchall(
            "SELECT * FROM events WHERE target = ? ORDER BY id DESC LIMIT ?", (target, limit)
        )
    return [
        Event(r["id"], r["at"], r["actor"], r["action"], r["target"], r["detail"]) for r in rows
    ]
