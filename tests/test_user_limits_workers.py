"""A sending limit holds for the service as a whole with ``workers = 2`` (issue 14).

Two real worker processes share the port; eight sessions at once, spread over both by the
kernel, each try five messages for one user whose limit is 20 a day. The promise
(relay/store/usage.py): admission at the end of DATA is one write transaction on usage.db, which
every worker shares, so the bound on over-admission is zero: exactly 20 are accepted, whatever the
interleaving, and every other attempt gets the 451 (at MAIL FROM, or after DATA for a session that
passed MAIL FROM while a place was still free). Not 2 x 20 (per-process counters), not 20 / 2.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path

import pytest

from relay import userrules
from relay.store import shared, usage, users
from relay.store.users import SettingsChange
from tests.dialogue import Dialogue
from tests.sink import Sink
from tests.test_workers import LOGIN, workers_running

LIMIT = 20
SESSIONS = 8
EACH = 5


async def attempts(port: int, ca: Path, password: str) -> list[str]:
    """Every session's final reply per message (250, or the 451 wherever it came)."""
    ctx = ssl.create_default_context(cafile=str(ca))

    async def one(i: int) -> list[str]:
        d = await Dialogue.open(port, tls=ctx)
        await d.login(LOGIN, password)
        out = []
        for j in range(EACH):
            reply = await d.reply_after(f"MAIL FROM:<{LOGIN}>")
            if reply.startswith("250"):
                await d.expect_after("RCPT TO:<x@dest.test>", "250")
                await d.expect_after("DATA", "354")
                body = f"From: {LOGIN}\r\nTo: x@dest.test\r\nMessage-ID: <l{i}.{j}@example.com>"
                reply = await d.reply_after(body + "\r\n\r\nhi\r\n.")
            out.append(reply)
        await d.close()
        return out

    results = await asyncio.gather(*(one(i) for i in range(SESSIONS)))
    return [r for session in results for r in session]


async def test_a_daily_limit_admits_exactly_its_count_across_two_workers(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], sink: Sink
) -> None:
    day = userrules.day_key(time.time())
    async with workers_running(tmp_path, tls_files, sink, paused=True) as run:
        db = await shared.open_main(run.cfg)
        try:
            change = SettingsChange(limits={"messages_per_day": LIMIT, "messages_per_hour": 0})
            await users.update_settings(db, LOGIN, change, now=time.time(), actor="test")
        finally:
            await db.close()
        replies = await attempts(run.port, tls_files[2], run.password)
        accepted = [r for r in replies if r.startswith("250 2.0.0 queued as ")]
        refused = [r for r in replies if r.startswith("451 4.7.1 ")]
        if userrules.day_key(time.time()) != day:
            pytest.skip("the UTC day ended during the test: its window started again")
        assert len(accepted) == LIMIT, replies
        assert len(refused) == SESSIONS * EACH - LIMIT, replies
        assert all(f"limit of {LIMIT} messages per day reached" in r for r in refused)
        counts_db = await shared.open_counts(run.cfg)
        try:
            counts = await usage.snapshot(counts_db, LOGIN, time.time())
        finally:
            await counts_db.close()
        assert counts.messages_today == LIMIT
        limited = [x for x in run.server.lines if "limited user=" in x]
        assert len(limited) == 1, limited  # once per window for the service, not per worker
