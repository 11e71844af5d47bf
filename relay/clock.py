"""Time as a value that tests can control.

Store functions take ``now`` (Unix seconds) from the caller; long-lived objects (the server, the
delivery loop, the auth cache) take a ``Clock``: any zero-argument callable returning Unix seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], float]


def system() -> float:
    return time.time()


class ManualClock:
    """A clock that only moves when told to (tests of grace windows, lockouts, expiry)."""

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds

    def set(self, now: float) -> None:
        self._now = now


def iso(ts: float | None) -> str | None:
    """ISO-8601 UTC with seconds precision, or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
