"""``workers = N``: N relay processes on one port, each with its own spool, under one supervisor.

Real ``relaybox serve`` processes, real clients, a real upstream sink in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sqlite3
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relay import config as config_mod
from relay.config import Config, ConfigError
from tests.dialogue import Dialogue
from tests.faults.procserver import ServerProcess
from tests.serverconf import smarthost, write_serve_config
from tests.sink import Sink
from tests.userhelpers import seed_user

LOGIN = "app@example.com"


@contextlib.contextmanager
def held_port() -> Iterator[int]:
    """A port for workers that must share it, held by this process while they run.

    Workers cannot each bind port 0 (each would get a port of its own), so the kernel picks one
    here (bind to 0) and this socket keeps it bound with SO_REUSEPORT, not listening: the workers
    (same user, SO_REUSEPORT) bind it too, nobody else can take it in between, and connections
    only ever go to listening sockets, the workers'. The test then checks that every worker
    reports this port in its ``listening`` line.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


_LISTENING = re.compile(r"listening address=\S+ port=(\d+) mode=\w+ worker=(\d+)")


def listening(server: ServerProcess) -> dict[str, int]:
    """worker index -> the port it says it bound."""
    found = [_LISTENING.search(line) for line in server.lines]
    return {m.group(2): int(m.group(1)) for m in found if m}


def write_config(
    tmp_path: Path,
    tls_files: tuple[Path, Path, Path],
    sink: Sink,
    *,
    port: int,
    workers: int = 2,
    paused: bool = False,
    **tables: Any,
) -> Path:
    """``tables``: more of serve_config's keywords (``auth``, ``metrics``...)."""
    return write_serve_config(
        tmp_path,
        tls_files,
        workers=workers,
        listen=[(port, "tls")],
        limits={"drain_timeout": "5s"},
        delivery=smarthost(sink.port, paused=paused),
        **tables,
    )


async def until_ready(server: ServerProcess, workers: int = 2) -> None:
    """Until the supervisor says every worker is ready; fails at once if it exits first (a
    worker that could not start), with its last lines, rather than when the wait times out."""
    assert server.proc is not None
    ready = asyncio.ensure_future(server.wait_for_line(f"all {workers} workers ready"))
    exited = asyncio.ensure_future(server.proc.wait())
    try:
        await asyncio.wait([ready, exited], return_when=asyncio.FIRST_COMPLETED)
    finally:
        exited.cancel()
    if not ready.done():
        ready.cancel()
        raise AssertionError(
            f"exited ({server.proc.returncode}) before its workers were ready:\n"
            + "\n".join(server.lines[-30:])
        )
    ready.result()


@dataclass
class Running:
    server: ServerProcess
    port: int
    cfg: Config
    password: str  # of LOGIN, seeded before the start


@contextlib.asynccontextmanager
async def workers_running(
    tmp_path: Path,
    tls_files: tuple[Path, Path, Path],
    sink: Sink,
    *,
    paused: bool = False,
    workers: int = 2,
    **tables: Any,
) -> AsyncIterator[Running]:
    """``workers`` workers on a held port, all ready and each listening on that port; LOGIN
    seeded; ``tables`` as for :func:`write_config`. Whatever happens, no process is left once
    the block ends, and the port is released."""
    with held_port() as port:
        path = write_config(
            tmp_path, tls_files, sink, port=port, paused=paused, workers=workers, **tables
        )
        cfg = config_mod.load(path)
        password = await seed_user(cfg, LOGIN, now=time.time())
        server = ServerProcess(path, listeners=1)
        try:
            await server.start()
            await until_ready(server, workers)
            assert listening(server) == {str(i): port for i in range(workers)}
            yield Running(server, port, cfg, password)
        finally:
            await server.ensure_stopped()


async def submit_many(port: int, ca: Path, password: str, n: int) -> list[str]:
    """n sessions, one message each (new connections spread over the workers)."""
    ctx = ssl.create_default_context(cafile=str(ca))

    async def one(i: int) -> str:
        d = await Dialogue.open(port, tls=ctx)
        await d.login(LOGIN, password)
        await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250")
        await d.expect_after("RCPT TO:<x@dest.test>", "250")
        await d.expect_after("DATA", "354")
        msg = f"From: {LOGIN}\r\nTo: x@dest.test\r\nMessage-ID: <w{i}@example.com>\r\n\r\nhi\r\n."
        reply = await d.expect_after(msg, "250 2.0.0 queued as")
        await d.close()
        return reply

    return await asyncio.gather(*(one(i) for i in range(n)))


def queued_in(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])


def test_port_zero_cannot_be_shared() -> None:
    with pytest.raises(ConfigError, match="workers: listeners must name their port"):
        config_mod.from_dict({"workers": 2, "listen": [{"port": 0}]})


async def test_workers_share_the_port_and_each_delivers_its_spool(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], sink: Sink
) -> None:
    async with workers_running(tmp_path, tls_files, sink) as run:
        await submit_many(run.port, tls_files[2], run.password, 24)
        got = await sink.wait_received(24, within=30)
        ids = sorted(re.search(rb"Message-ID: <(w\d+)@", m.data).group(1) for m in got)  # type: ignore[union-attr]
        assert ids == sorted(f"w{i}".encode() for i in range(24))  # each exactly once
        # Both spools took mail: the kernel spread the 24 connections over both workers.
        assert queued_in(run.cfg.spool_path(0)) > 0 and queued_in(run.cfg.spool_path(1)) > 0
        run.server.signal(signal.SIGTERM)
        assert await run.server.wait() == 0
        assert "stopped" in "\n".join(run.server.lines)


async def test_a_worker_dying_stops_the_service(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], sink: Sink
) -> None:
    async with workers_running(tmp_path, tls_files, sink) as run:
        pids = [int(p) for p in _worker_pids(run.server)]
        assert len(pids) == 2
        os.kill(pids[1], signal.SIGKILL)
        assert await run.server.wait() == 1  # systemd's Restart=on-failure brings it all back
        await run.server.wait_for_line("exited on its own")


def _worker_pids(server: ServerProcess) -> list[str]:
    assert server.proc is not None
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text()
    return children.split()


async def test_fewer_workers_still_deliver_the_old_spools(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], sink: Sink
) -> None:
    """Mail queued by worker 1 is delivered after workers is lowered to 1 (worker 0 adopts it)."""
    async with workers_running(tmp_path, tls_files, sink, paused=True) as run:
        await submit_many(run.port, tls_files[2], run.password, 16)
        run.server.signal(signal.SIGTERM)
        assert await run.server.wait() == 0
    assert queued_in(run.cfg.spool_path(1)) > 0
    path = write_config(tmp_path, tls_files, sink, workers=1, port=0)  # one process: port 0
    single = ServerProcess(path, listeners=1)
    try:
        await single.start()
        await sink.wait_received(16, within=30)
        await single.wait_for_line("delivering what spool-1.db still holds")
        single.signal(signal.SIGTERM)
        assert await single.wait() == 0
    finally:
        await single.ensure_stopped()
