"""A child process kept running: started again after it exits, with a doubling delay.

The webhook poster (relay/service/webhooks.py) and the DKIM key process (relay/signproc.py) are
children of a worker that must come back when they die, without a crash loop taking a core: the
first restart waits RESTART_DELAY, each quick one twice as long up to MAX_RESTART, and a child
that ran for a while starts the count again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

RESTART_DELAY = 1.0  # seconds after a child ended on its own; doubling, at most MAX_RESTART
MAX_RESTART = 30.0


async def keep_running(
    once: Callable[[], Awaitable[int]],
    done: Callable[[], bool],
    log: logging.Logger,
    name: str,
    meanwhile: str,
) -> None:
    """Run ``once`` (a child's whole life: its exit status) again and again until ``done()``
    says to stop after it, logging each exit as "NAME exited (CODE); MEANWHILE, starting it
    again in N s" and an OSError at start as "NAME: cannot start it: ...\""""
    delay = RESTART_DELAY
    while True:
        began = time.monotonic()
        try:
            code: int | None = await once()
        except OSError as exc:
            code = None
            log.error("%s: cannot start it: %s", name, exc)
        if done():
            return
        if time.monotonic() - began > 2 * MAX_RESTART:  # it ran a while: not a crash loop
            delay = RESTART_DELAY
        log.error("%s exited (%s); %s, starting it again in %.0f s", name, code, meanwhile, delay)
        await asyncio.sleep(delay)  # sleep-ok: a restart delay, not a poll
        delay = min(MAX_RESTART, delay * 2)
