"""``auth.max_failures`` holds for the service with ``workers = 4`` (issue 15, item 3).

Each worker used to count failures itself and lock out after its share (ceil(5 / 4) = 2): which
attempt was refused depended on how the kernel spread the connections. Now failures and lockouts
are in usage.db, which every worker shares (relay/store/authfail.py): with ``max_failures = 5``
the first five wrong passwords from one address for one login get 535, the fifth locks the pair
out, and every later attempt gets 454 on whichever worker it lands, the right password too.
"""

from __future__ import annotations

import base64
import ssl
from pathlib import Path

from tests.dialogue import Dialogue
from tests.sink import Sink
from tests.test_workers import LOGIN, workers_running

WORKERS = 4
LIMIT = 5


async def attempt(port: int, ctx: ssl.SSLContext, password: str) -> str:
    d = await Dialogue.open(port, tls=ctx)
    await d.expect_after("EHLO client.test", "250")
    blob = base64.b64encode(f"\0{LOGIN}\0{password}".encode()).decode()
    reply = await d.reply_after(f"AUTH PLAIN {blob}")
    await d.close()
    return reply


async def test_max_failures_is_exact_across_four_workers(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], sink: Sink
) -> None:
    auth = {"max_failures": LIMIT, "failure_delay": "0s", "cache_ttl": "0s"}
    async with workers_running(tmp_path, tls_files, sink, workers=WORKERS, auth=auth) as run:
        ctx = ssl.create_default_context(cafile=str(tls_files[2]))
        wrong = "wrong-" + run.password
        replies = [await attempt(run.port, ctx, wrong) for _ in range(LIMIT)]
        assert all(r.startswith("535 5.7.8") for r in replies), replies
        later = [await attempt(run.port, ctx, wrong) for _ in range(6)]
        later.append(await attempt(run.port, ctx, run.password))
        assert all(r.startswith("454 4.7.0") for r in later), later
    lockouts = [x for x in run.server.lines if "auth lockout" in x and "scope=login" in x]
    assert len(lockouts) == 1, lockouts
