"""Who may hold a connection, and how much mail may be held in memory at once.

The gate counts sessions, in total and per client IP, from accept (a TLS handshake in progress
counts), refuses a new connection over the limits (421 at once; on the implicit-TLS listener a
close before any handshake), drains on shutdown (idle sessions go at once, a session
mid-transaction may finish within the drain window), and holds the DATA memory budget every
session reserves from. Failed TLS handshakes are logged here: one line each, rate-limited.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from pathlib import Path
from typing import Protocol

from relay import maillog, replies
from relay.config_sections import LimitsConfig
from relay.loglimit import LogLimit
from relay.metrics import Metrics
from relay.replies import Reply


class Connection(Protocol):
    """What the gate needs of a session (relay.smtp.session.RelaySMTP)."""

    @property
    def listener_mode(self) -> str: ...

    def is_idle(self) -> bool: ...

    async def close_with(self, reply: Reply) -> None: ...


class MemoryBudget:
    """Bytes of message data that may be held in memory (or, for the disk budget, on disk) at
    once, across all sessions, and the share of it one user and one client address may hold
    (fractions of the total).

    A reservation names its user and address ("" for none: only the total counts); it must be
    released with the same names. Keys holding nothing are forgotten, so a spray of addresses
    leaves nothing behind.
    """

    def __init__(self, total: int, user_share: float = 1.0, ip_share: float = 1.0) -> None:
        self.total = total
        self.user_share = user_share
        self.ip_share = ip_share
        self.used = 0
        self.peak = 0
        self.by_user: Counter[str] = Counter()
        self.by_ip: Counter[str] = Counter()

    def try_reserve(self, n: int, user: str = "", ip: str = "") -> bool:
        if self.used + n > self.total:
            return False
        if user and self.by_user[user] + n > self.total * self.user_share:
            return False
        if ip and self.by_ip[ip] + n > self.total * self.ip_share:
            return False
        self.used += n
        self.peak = max(self.peak, self.used)
        if user:
            self.by_user[user] += n
        if ip:
            self.by_ip[ip] += n
        return True

    def release(self, n: int, user: str = "", ip: str = "") -> None:
        self.used = max(0, self.used - n)
        for held, key in ((self.by_user, user), (self.by_ip, ip)):
            if key:
                held[key] -= n
                if held[key] <= 0:
                    del held[key]

    def hold(self, user: str, ip: str) -> MemoryHold:
        """A reservation for one DATA of ``user`` from ``ip``, empty to start with."""
        return MemoryHold(self, user, ip)


class MemoryHold:
    """What one DATA holds of the budget: grown as its message grows, given back once."""

    def __init__(self, budget: MemoryBudget, user: str, ip: str) -> None:
        self.budget = budget
        self.user = user
        self.ip = ip
        self.reserved = 0

    def grow_to(self, n: int) -> bool:
        """Hold at least ``n`` bytes; False (holding what it held) if the budget or a share
        has no room for the rest."""
        extra = n - self.reserved
        if extra <= 0:
            return True
        if not self.budget.try_reserve(extra, self.user, self.ip):
            return False
        self.reserved = n
        return True

    def release(self) -> None:
        self.budget.release(self.reserved, self.user, self.ip)
        self.reserved = 0


# Failed TLS handshakes: this many mail-log lines a minute, then one line with the count (a
# scanner must not flood the journal, whose rate limit would drop the auth lines fail2ban reads).
TLS_FAILURE_BURST = 10
TLS_FAILURE_INTERVAL = 60.0


class Gate:
    def __init__(
        self, limits: LimitsConfig, metrics: Metrics, *, workers: int = 1, spill_dir: Path | None
    ) -> None:
        """The DATA budgets are the service's: with ``workers``, each process gets its share.
        ``spill_dir``: where the body of a large message goes while DATA reads it
        (relay/smtp/spill.py; the state directory), within ``limits.data_disk_budget`` at once
        (the same shares as memory); None: every message is held in memory."""
        self.spill_dir = spill_dir
        self.memory = MemoryBudget(0)
        self.disk = MemoryBudget(0)
        self.configure(limits, workers)
        self.metrics = metrics
        self.draining = False
        self.sessions: set[Connection] = set()
        self.per_ip: Counter[str] = Counter()
        self._no_sessions = asyncio.Event()
        self._no_sessions.set()
        self.tls_failures = LogLimit(TLS_FAILURE_BURST, TLS_FAILURE_INTERVAL)

    def configure(self, limits: LimitsConfig, workers: int = 1) -> None:
        """Reload: new limits apply to new sessions (and to DATA started from now on)."""
        self.limits = limits
        totals = (limits.data_memory_budget, limits.data_disk_budget)
        for budget, total in zip((self.memory, self.disk), totals, strict=True):
            budget.total = int(total) // workers
            budget.user_share = limits.data_memory_share_per_user
            budget.ip_share = limits.data_memory_share_per_ip

    def opened(self, conn: Connection, ip: str) -> None:
        self.sessions.add(conn)
        self._no_sessions.clear()
        self.per_ip[ip] += 1
        self.metrics.connection_opened(conn.listener_mode)

    def closed(self, conn: Connection, ip: str) -> None:
        self.sessions.discard(conn)
        if not self.sessions:
            self._no_sessions.set()
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]
        self.metrics.connection_closed(conn.listener_mode)

    def admission(self, ip: str) -> Reply | None:
        """Refuse a new connection over the limits (it is already counted)."""
        if self.draining:
            return replies.SHUTTING_DOWN
        if len(self.sessions) > self.limits.max_connections:
            return replies.TOO_MANY_CONNECTIONS
        if self.per_ip[ip] > self.limits.max_connections_per_ip:
            return replies.TOO_MANY_FROM_IP
        return None

    def handshake_failed(self, ip: str, listener: str, reason: str) -> None:
        """A TLS handshake failed (relay/smtp/tls.py names the reason): one INFO line in the mail
        log, TLS_FAILURE_BURST a minute at most, then one line with the count of the rest."""
        if self.draining:
            return  # cut by the shutdown, not the client's failure

        def line() -> None:
            maillog.event("tls failed", ip=ip, listener=listener, reason=reason)

        def summary(count: int) -> None:
            interval = f"{TLS_FAILURE_INTERVAL:.0f}s"
            maillog.event("tls failures not logged", count=count, interval=interval)

        self.tls_failures.report(line, summary)

    async def drain(self, window: float) -> None:
        """Refuse new sessions; idle ones get 421 at once, busy ones within ``window`` seconds."""
        self.draining = True
        for conn in list(self.sessions):
            if conn.is_idle():
                await conn.close_with(replies.SHUTTING_DOWN)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_sessions.wait(), window)
        for conn in list(self.sessions):
            await conn.close_with(replies.SHUTTING_DOWN)
        with contextlib.suppress(TimeoutError):  # let the cut connections finish closing
            await asyncio.wait_for(self._no_sessions.wait(), 2)
