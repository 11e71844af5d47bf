"""AUTH failures and lockouts that every worker sees: ``auth.max_failures`` for the service, not
for each process (relay/smtp/auth.py keeps its own copy of both for its synchronous checks).

Two tables of usage.db (the counts every worker of the node shares, relay/store/usage.py):
``auth_failures`` (key, time) within the failure window, and ``auth_lockouts`` (key, until). A
key is a throttle's name and its key there (``pair:192.0.2.7 app@example.com``). A failure is
one write transaction (``BEGIN IMMEDIATE``: one worker at a time), so the failure that reaches
the limit is exactly the limit-th, whichever workers saw the others. Failures are rare next to
messages, and an address or login that reaches its limit is shut out before any more argon2
work, so these writes cost little even under a guessing attack.
"""

from __future__ import annotations

from collections.abc import Sequence

from relay.config import Config
from relay.store.engine import Store
from relay.store.readcache import Generation

MIGRATION_SQL = """
CREATE TABLE auth_failures (
    key TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX auth_failures_key ON auth_failures(key, at);
CREATE TABLE auth_lockouts (
    key TEXT PRIMARY KEY,
    until REAL NOT NULL
) WITHOUT ROWID
"""


def generation(cfg: Config) -> Generation | None:
    """The 8 bytes beside usage.db that every new lockout moves once committed (readcache.py):
    a worker keeps what it read of the lockouts until another worker writes one (or 5 s pass).
    Not moved by the counts of messages, which write usage.db all the time. None on PostgreSQL
    (nodes a file cannot reach): every AUTH reads the lockouts."""
    if cfg.store.url:
        return None
    return Generation(cfg.usage_path.with_name(cfg.usage_path.name + "-lockouts"))


async def lockouts(db: Store, keys: Sequence[str], now: float) -> dict[str, float]:
    """The keys among ``keys`` locked out at ``now``, with the end of each lockout."""
    if not keys:
        return {}
    marks = ", ".join("?" * len(keys))
    rows = await db.fetchall(
        f"SELECT key, until FROM auth_lockouts WHERE key IN ({marks}) AND until > ?",
        (*keys, now),
    )
    return {str(r["key"]): float(r["until"]) for r in rows}


async def fail(
    db: Store, key: str, now: float, *, window: float, limit: int, lockout: float
) -> float | None:
    """Count a failure for ``key``; if it is the ``limit``-th within ``window`` seconds, lock
    ``key`` out until ``now + lockout`` and return that time (else None). The failures that led
    to a lockout are forgotten with it, as the in-process throttle does."""
    async with db.transaction() as conn:
        await conn.execute(
            "DELETE FROM auth_failures WHERE key = ? AND at <= ?", (key, now - window)
        )
        await conn.execute("INSERT INTO auth_failures (key, at) VALUES (?, ?)", (key, now))
        row = await conn.fetchone("SELECT count(*) FROM auth_failures WHERE key = ?", (key,))
        count = int(row[0]) if row else 1
        if count < limit:
            return None
        until = now + lockout
        await conn.execute(
            "INSERT INTO auth_lockouts (key, until) VALUES (?, ?) ON CONFLICT (key)"
            " DO UPDATE SET until = excluded.until",
            (key, until),
        )
        await conn.execute("DELETE FROM auth_failures WHERE key = ?", (key,))
        return until


async def prune(db: Store, now: float, window: float) -> None:
    """Forget failures older than the window and lockouts that ended."""
    async with db.transaction() as conn:
        await conn.execute("DELETE FROM auth_failures WHERE at <= ?", (now - window,))
        await conn.execute("DELETE FROM auth_lockouts WHERE until <= ?", (now,))
