"""What delivery may hold of large messages in memory at once (``delivery.memory_budget``).

A job reads its message's body from the spool whole, and aiosmtplib makes copies of it as it sends
(line endings, dot-stuffing): about FACTOR times the body while it is in flight. With
``delivery.concurrency`` jobs at once that is fine for mail of a few KiB and not for a queue of
10 MiB messages (DATA takes those at any rate, relay/smtp/spill.py), so a job whose message is
LARGE or more waits for room before it reads the body, in the order they asked; smaller ones
never wait. A message larger than the whole budget is charged the whole budget: it goes alone.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

LARGE = 1024 * 1024  # octets from which a body is held to the budget
FACTOR = 3  # the body, and aiosmtplib's copies of it as it sends


class BodyBudget:
    """Room granted in the order asked (first come, first served: a large body waiting at the
    head is not passed by smaller ones arriving after it, so none waits for ever)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self.peak = 0
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def charge(self, size: int) -> int:
        return 0 if size < LARGE else min(FACTOR * size, self.total)

    @asynccontextmanager
    async def held(self, size: int) -> AsyncIterator[None]:
        """Room for a body of ``size`` octets while the block runs (none needed when small)."""
        n = self.charge(size)
        if n == 0:
            yield
            return
        await self._acquire(n)
        try:
            yield
        finally:
            self.used -= n
            self._grant()

    async def _acquire(self, n: int) -> None:
        if not self._waiting and self.used + n <= self.total:
            self._take(n)
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append((n, turn))
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # granted, then cancelled: give it back
                self.used -= n
            else:
                self._waiting.remove((n, turn))
            self._grant()
            raise

    def _grant(self) -> None:
        while self._waiting and self.used + self._waiting[0][0] <= self.total:
            n, turn = self._waiting.popleft()
            self._take(n)
            turn.set_result(None)

    def _take(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)
