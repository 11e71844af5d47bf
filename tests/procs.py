"""Processes the tests start: each in a process group of its own, and none outlives its test.

``spawn`` is ``asyncio.create_subprocess_exec`` with ``start_new_session=True``: the child and
everything it starts (a supervisor's workers, a client tool's helpers) share one group, which
``kill_group`` ends with one SIGKILL. An autouse fixture in conftest.py kills every group a test
left behind, whether the test passed, failed or timed out (pytest-timeout), and an atexit hook does
the same if the session itself is interrupted.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
from typing import Any

_groups: set[int] = set()


async def spawn(*argv: str, **kwargs: Any) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(*argv, start_new_session=True, **kwargs)
    _groups.add(proc.pid)
    return proc


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_group(pgid: int) -> None:
    """SIGKILL every process of the group (the leader may already be gone, its children not)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def kill_all() -> list[int]:
    """Kill every group still alive; the ones that were, for the caller to report."""
    alive = [g for g in sorted(_groups) if group_alive(g)]
    for pgid in alive:
        kill_group(pgid)
    _groups.clear()
    return alive


atexit.register(kill_all)
