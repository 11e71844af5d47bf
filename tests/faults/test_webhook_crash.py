"""No webhook event lost (issue 16, item 3): `relaybox serve` SIGKILLed with events pending.

The server runs as a real subprocess delivering to a sink in this process, with one endpoint: a
loopback receiver that answers 503 to everything at first, so every event stays pending in the
outbox (and is posted again and again, under its one ``webhook-id``). Once every event of the
messages sent has been seen, the server is SIGKILLed, the receiver turns to 200, the server is
started again: every event arrives, signed, with the id it had before the kill (duplicates
allowed), and the outbox then holds them all as delivered.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import time
from pathlib import Path

from click.testing import CliRunner
from standardwebhooks.webhooks import Webhook

from admin.cli import cli
from relay import config as config_mod
from relay.store import outbox
from relay.store.db import Database
from relay.store.spool import SPOOL_MIGRATIONS
from tests import leaks
from tests.dialogue import Dialogue
from tests.faults.procserver import ServerProcess
from tests.hostile.kit import LOGIN, clean, message
from tests.serverconf import smarthost, write_serve_config
from tests.sink import Sink
from tests.userhelpers import json_of, seed_user
from tests.webhookreceiver import running

MESSAGES = 6  # each: message.accepted and message.delivered


async def test_sigkill_with_events_pending_then_restart_posts_every_event(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], sink: Sink
) -> None:
    path = write_serve_config(
        tmp_path,
        tls_files,
        dns={"dkim_key_type": "ed25519"},
        delivery=smarthost(sink.port),
        webhooks={"backoff": "200ms"},
    )
    cfg = config_mod.load(path)
    password = await seed_user(cfg, LOGIN, now=time.time())
    ctx = ssl.create_default_context(cafile=str(tls_files[2]))
    async with running() as receiver:
        receiver.default = 503
        args = ["--config", str(path), "webhook", "add", receiver.url, "--json"]
        made = json_of(await asyncio.to_thread(CliRunner().invoke, cli, args))
        secret = leaks.add(made["secret"])
        server = ServerProcess(path, listeners=1)
        try:
            await server.start()
            d = await Dialogue.open(server.ports["tls"], tls=ctx)
            await d.login(LOGIN, password)
            for i in range(MESSAGES):
                await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250")
                await d.expect_after(f"RCPT TO:<rcpt{i}@dest.test>", "250")
                await d.expect_after("DATA", "354")
                d.send_raw(message(to=f"rcpt{i}@dest.test") + b".\r\n")
                await d.expect("250 2.0.0 queued as ")
            await d.close()
            await sink.wait_received(MESSAGES)
            seen = await receiver.wait_for(
                lambda reqs: len({r.event_id for r in reqs}) >= 2 * MESSAGES
            )
            assert all(r.status == 503 for r in seen)  # every event still pending
            server.signal(signal.SIGKILL)
            assert await server.wait() == -signal.SIGKILL
            before = {r.event_id for r in receiver.requests}
            assert len(before) == 2 * MESSAGES

            receiver.default = 200
            await server.start()
            ok = await receiver.wait_for(
                lambda reqs: {r.event_id for r in reqs if r.status == 200} >= before
            )
            server.signal(signal.SIGTERM)
            assert await server.wait() == 0
        finally:
            await server.ensure_stopped()
        for line in server.lines:
            clean(line, "server log")
            assert secret not in line
    delivered = [r for r in ok if r.status == 200]
    assert {r.event_id for r in delivered} == before  # the same ids, each at least once
    kinds: dict[str, int] = {}
    for r in delivered:
        kind = Webhook(secret).verify(r.body, r.headers)["type"]
        kinds[kind] = kinds.get(kind, 0) + 1
    assert set(kinds) == {"message.accepted", "message.delivered"}
    db = await Database.open(cfg.spool_path(0), SPOOL_MIGRATIONS)
    try:
        rows = await outbox.deliveries(db, limit=1000)
    finally:
        await db.close()
    assert {r.event_id for r in rows} == before
    assert {r.state for r in rows} == {"delivered"}
