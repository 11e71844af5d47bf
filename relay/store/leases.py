"""Leases: periodic work that one node (or worker) does for all, the ``leases`` table of the
shared store (migration 6): what, who took it last (host and process), and when."""

from __future__ import annotations

import os
import socket

from relay.store.engine import Store

DOMAIN_RECHECK = "domain-recheck"


async def claim(db: Store, name: str, now: float, interval: float) -> bool:
    """Whether this process does ``name``'s work now: the first to ask once ``interval`` has
    passed since the last one, so every node and worker asks on its own timer and one of them
    does it (read and claimed in one write transaction, which the store serialises across
    nodes: SQLite's write lock, PostgreSQL's advisory lock)."""
    holder = f"{socket.gethostname()} pid {os.getpid()}"
    async with db.transaction() as tx:
        row = await tx.fetchone("SELECT at FROM leases WHERE name = ?", (name,))
        if row is not None and float(row[0]) > now - interval * 0.9:
            return False
        await tx.execute(
            "INSERT INTO leases (name, holder, at) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, at = excluded.at",
            (name, holder, now),
        )
    return True


async def recheck_due(db: Store, now: float, interval: float) -> bool:
    """:func:`claim` of the periodic domain re-check (every ``dns.recheck_interval``)."""
    return await claim(db, DOMAIN_RECHECK, now, interval)
