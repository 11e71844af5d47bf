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
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import config as config_mod
from relay.config import ConfigError
from tests.dialogue import Dialogue
from tests.faults.procserver import ServerProcess
from tests.sink import Sink
from tests.userhelpers import seed_user

LOGIN = "app@example.com"
CONFIG = """\
state_dir = "{state}"
public_hostname = "relay.test"
workers = {workers}

[[listen]]
address = "127.0.0.1"
port = {port}
mode = "tls"

[tls]
cert = "{cert}"
key = "{key}"

[auth]
failure_delay = "0s"
argon2 = {{ time_cost = 1, memory_kib = 1024, parallelism = 1 }}

[dns]
recheck_interval = "0s"

[limits]
drain_timeout = "5s"

[delivery]
mode = "smarthost"
paused = {paused}
connect_timeout = "2s"

[delivery.smarthost]
host = "127.0.0.1"
port = {sink_port}
security = "none"
"""


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
    tmp_path: Path, tls_files: tuple[Path, Path, Path], sink: Sink, *, port: int, **kw: object
) -> Path:
    cert, key, _ca = tls_files
    values = {"workers": 2, "paused": "false", "port": port, **kw}
    path = tmp_path / "relaybox.toml"
    path.write_text(
        CONFIG.format(state=tmp_path / "state", cert=cert, key=key, sink_port=sink.port, **values)
    )
    return path


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
    with held_port() as port:
        path = write_config(tmp_path, tls_files, sink, port=port)
        cfg = config_mod.load(path)
        password = await seed_user(cfg, LOGIN, now=time.time())
        server = ServerProcess(path, listeners=1)
        try:
            await server.start()
            await server.wait_for_line("all 2 workers ready")
            assert listening(server) == {"0": port, "1": port}
            await submit_many(port, tls_files[2], password, 24)
            got = await sink.wait_received(24, within=30)
            ids = sorted(re.search(rb"Message-ID: <(w\d+)@", m.data).group(1) for m in got)  # type: ignore[union-attr]
            assert ids == sorted(f"w{i}".encode() for i in range(24))  # each exactly once
            # Both spools took mail: the kernel spread the 24 connections over both workers.
            assert queued_in(cfg.spool_path(0)) > 0 and queued_in(cfg.spool_path(1)) > 0
            server.signal(signal.SIGTERM)
            assert await server.wait() == 0
            assert "stopped" in "\n".join(server.lines)
        finally:
            await server.ensure_stopped()


async def test_a_worker_dying_stops_the_service(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], sink: Sink
) -> None:
    with held_port() as port:
        path = write_config(tmp_path, tls_files, sink, port=port)
        await seed_user(config_mod.load(path), LOGIN, now=time.time())
        server = ServerProcess(path, listeners=1)
        try:
            await server.start()
            await server.wait_for_line("all 2 workers ready")
            assert listening(server) == {"0": port, "1": port}
            pids = [int(p) for p in _worker_pids(server)]
            assert len(pids) == 2
            os.kill(pids[1], signal.SIGKILL)
            assert await server.wait() == 1  # systemd's Restart=on-failure brings it all back
            await server.wait_for_line("exited on its own")
        finally:
            await server.ensure_stopped()


def _worker_pids(server: ServerProcess) -> list[str]:
    assert server.proc is not None
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text()
    return children.split()


async def test_fewer_workers_still_deliver_the_old_spools(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], sink: Sink
) -> None:
    """Mail queued by worker 1 is delivered after workers is lowered to 1 (worker 0 adopts it)."""
    with held_port() as port:
        path = write_config(tmp_path, tls_files, sink, paused="true", port=port)
        cfg = config_mod.load(path)
        password = await seed_user(cfg, LOGIN, now=time.time())
        server = ServerProcess(path, listeners=1)
        try:
            await server.start()
            await server.wait_for_line("all 2 workers ready")
            assert listening(server) == {"0": port, "1": port}
            await submit_many(port, tls_files[2], password, 16)
            server.signal(signal.SIGTERM)
            assert await server.wait() == 0
        finally:
            await server.ensure_stopped()
    assert queued_in(cfg.spool_path(1)) > 0
    write_config(tmp_path, tls_files, sink, workers=1, port=0)  # one process: it binds port 0
    single = ServerProcess(path, listeners=1)
    try:
        await single.start()
        await sink.wait_received(16, within=30)
        await single.wait_for_line("delivering what spool-1.db still holds")
        single.signal(signal.SIGTERM)
        assert await single.wait() == 0
    finally:
        await single.ensure_stopped()
