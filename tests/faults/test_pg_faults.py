"""The PostgreSQL store going away under a running node, and coming back (issue 15, item 5).

A real ``relaybox serve`` on a PostgreSQL cluster of this test's own (tests/pgserver.py), stopped
with ``pg_ctl stop`` and started again. While it is away: AUTH answers 454 4.7.0, MAIL 451 4.3.0,
nothing acknowledged is lost and the local spool is still delivered; once it is back, the node
serves again by itself (no restart).
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import time
from pathlib import Path

from relay import config as config_mod
from relay.store import shared, users
from relay.store.passwords import Hasher
from tests import leaks
from tests.dialogue import Dialogue, plain
from tests.faults.procserver import ServerProcess
from tests.hostile.kit import message
from tests.pgserver import PgServer, own_cluster
from tests.serverconf import serve_config, smarthost, toml
from tests.sink import Sink
from tests.userhelpers import make_domain

LOGIN = "app@example.com"
PASSWORD = "Pg-fault-password-00001"


async def _session(port: int, ca: Path) -> Dialogue:
    return await Dialogue.open(port, tls=ssl.create_default_context(cafile=str(ca)))


async def _auth(d: Dialogue) -> str:
    await d.expect_after("EHLO client.test", "250")
    return await d.reply_after(f"AUTH PLAIN {plain(LOGIN, PASSWORD)}")


async def _send(d: Dialogue, subject: str) -> str:
    await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250")
    await d.expect_after("RCPT TO:<bob@dest.test>", "250")
    await d.expect_after("DATA", "354")
    d.send_raw(message(subject=subject) + b".\r\n")
    return await d.reply(within=30)


async def test_the_database_away_and_back(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], sink: Sink
) -> None:
    leaks.add(PASSWORD)
    leaks.add_auth_payload(LOGIN, PASSWORD)
    with own_cluster() as cluster:
        await _run(tmp_path, tls_files, sink, cluster)


async def _run(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], sink: Sink, cluster: PgServer
) -> None:
    cert, key, ca = tls_files
    store: dict[str, object] = {**_store(cluster), "connect_timeout": "1s"}
    path = tmp_path / "relaybox.toml"

    def write(paused: bool) -> None:
        text = serve_config(
            state=tmp_path / "state",
            cert=cert,
            key=key,
            listen=[(0, "tls")],
            delivery=smarthost(sink.port, paused=paused),
        )
        path.write_text(text + "\n" + toml(store, "store"))

    write(paused=True)
    cfg = config_mod.load(path)
    db = await shared.open_main(cfg)
    try:
        await make_domain(db, cfg, now=time.time())
        hasher = Hasher(cfg.auth)
        try:
            await users.create(
                db, LOGIN, PASSWORD, hasher=hasher, cfg=cfg, now=time.time(), actor="test"
            )
        finally:
            hasher.close()
    finally:
        await db.close()
    server = ServerProcess(path, listeners=1)
    await server.start()
    try:
        port = server.ports["tls"]
        early = await _session(port, ca)
        assert (await _auth(early)).startswith("235")
        assert (await _send(early, "before")).startswith("250 2.0.0 queued as")
        open_session = await _session(port, ca)
        assert (await _auth(open_session)).startswith("235")

        await asyncio.to_thread(cluster.stop)  # the database goes away
        late = await _session(port, ca)
        assert (await _auth(late)).startswith("454 4.7.0")
        await late.close()
        reply = await open_session.reply_after(f"MAIL FROM:<{LOGIN}>")
        assert reply.startswith("451 4.3.0"), reply
        await open_session.close()
        # The local spool is still delivered: lift the pause (a reload), the message goes out.
        write(paused=False)
        server.signal(signal.SIGHUP)
        got = await sink.wait_received(1, within=30)
        assert b"Subject: before" in got[0].data

        await asyncio.to_thread(cluster.start)  # it comes back: the node serves by itself
        async with asyncio.timeout(30):  # a hang guard only
            while True:
                again = await _session(port, ca)
                answer = await _auth(again)
                if answer.startswith("235"):
                    break
                assert answer.startswith("454 4.7.0"), answer
                await again.close()
                await asyncio.sleep(0.2)  # sleep-ok: the pool reconnects on its own schedule
        assert (await _send(again, "after")).startswith("250 2.0.0 queued as")
        await again.close()
        await sink.wait_received(2, within=30)
        assert not [x for x in server.lines if "Traceback" in x], server.lines
    finally:
        await server.ensure_stopped()


def _store(cluster: PgServer) -> dict[str, object]:
    return {
        "url": cluster.url("postgres"),
        "password_file": str(cluster.password_file),
        "sslmode": "disable",
    }
