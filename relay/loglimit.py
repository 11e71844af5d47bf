"""A log line that clients can cause at any rate: at most ``burst`` per interval, then a count.

Unauthenticated clients can fail TLS handshakes, or exhaust file descriptors, as fast as they can
connect. Each event is worth one line, but not a thousand a second: journald drops a service's
lines past its rate limit, and the ``auth failed`` lines fail2ban reads would go with them. So a
:class:`LogLimit` lets ``burst`` lines through per interval and counts the rest; once the interval
is over, :meth:`take_summary` gives that count once, for one summary line.

The caller says what a line and a summary say; :meth:`LogLimit.report` decides which is written
when, and writes a due summary from a timer, so a burst followed by silence is still counted.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

_MARGIN = 0.1  # a timer may fire a little early; the summary waits for its interval's end


class LogLimit:
    def __init__(
        self, burst: int, interval: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.burst = burst
        self.interval = interval
        self.clock = clock
        self.suppressed = 0  # lines held back in the current (or just ended) interval
        self._start = -math.inf
        self._said = 0
        self._timer: asyncio.TimerHandle | None = None

    def report(self, line: Callable[[], None], summary: Callable[[int], None]) -> None:
        """One occurrence (in the event loop): ``line()`` if allowed, else counted; a due
        ``summary(count)`` first, and one from a timer at the end of the interval."""
        self.flush(summary)
        if self.allow():
            line()
        elif self._timer is None:
            delay = self.remaining() + _MARGIN
            self._timer = asyncio.get_running_loop().call_later(delay, self.flush, summary)

    def flush(self, summary: Callable[[int], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        count = self.take_summary()
        if count:
            summary(count)

    def allow(self) -> bool:
        """May this line be written? If not, it is counted for the next summary."""
        now = self.clock()
        if now - self._start >= self.interval and not self.suppressed:
            self._start, self._said = now, 0
        if self._said < self.burst and now - self._start < self.interval:
            self._said += 1
            return True
        self.suppressed += 1
        return False

    def remaining(self) -> float:
        """Seconds until the current interval ends (when a summary becomes due)."""
        return max(0.0, self._start + self.interval - self.clock())

    def take_summary(self) -> int | None:
        """How many lines were held back, once their interval is over; else None."""
        if not self.suppressed or self.clock() - self._start < self.interval:
            return None
        count, self.suppressed = self.suppressed, 0
        return count
