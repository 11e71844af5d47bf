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
from typing import Protocol

from relay import maillog, replies
from relay.config import LimitsConfig
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
    """Bytes of message data that may be held in memory at once, across all sessions."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self.peak = 0

    def try_reserve(self, n: int) -> bool:
        if self.used + n > self.total:
            return False
        self.used += n
        self.peak = max(self.peak, self.used)
        return True

    def release(self, n: int) -> None:
        self.used = max(0, self.used - n)


# Failed TLS handshakes: this many mail-log lines a minute, then one line with the count (a
# scanner must not flood the journal, whose rate limit would drop the auth lines fail2ban reads).
TLS_FAILURE_BURST = 10
TLS_FAILURE_INTERVAL = 60.0


class Gate:
    def __init__(self, limits: LimitsConfig, memory_total: int, metrics: Metrics) -> None:
        self.limits = limits
        self.memory = MemoryBudget(memory_total)
        self.metrics = metrics
        self.draining = False
        self.sessions: set[Connection] = set()
        self.per_ip: Counter[str] = Counter()
        self._no_sessions = asyncio.Event()
        self._no_sessions.set()
        self.tls_failures = LogLimit(TLS_FAILURE_BURST, TLS_FAILURE_INTERVAL)

    def configure(self, limits: LimitsConfig, memory_total: int) -> None:
        """Reload: new limits apply to new sessions (and to DATA started from now on)."""
        self.limits = limits
        self.memory.total = memory_total

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
