"""``workers = N`` when the supervisor itself dies: its workers must not keep the port.

Outside systemd (or with KillMode=process) nothing else would stop them: they keep serving with
nobody to restart the service on the next failure, and a new ``relaybox serve`` cannot bind.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
from pathlib import Path

from tests.sink import Sink
from tests.test_workers import _worker_pids, workers_running


async def exited(pid: int, within: float) -> bool:
    """Whether process ``pid`` (not our child) ends within ``within`` seconds: a pidfd becomes
    readable when it exits, so this waits on the event, not on a poll loop."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    loop = asyncio.get_running_loop()
    gone = asyncio.Event()
    loop.add_reader(fd, gone.set)
    try:
        async with asyncio.timeout(within):
            await gone.wait()
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def nobody_listens(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED


def bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_workers_stop_when_the_supervisor_is_killed(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], sink: Sink
) -> None:
    async with workers_running(tmp_path, tls_files, sink) as run:
        server, port = run.server, run.port
        workers = [int(p) for p in _worker_pids(server)]
        assert len(workers) == 2 and not nobody_listens(port)
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGKILL)  # the supervisor alone, not its group
        assert await server.wait(within=10) == -signal.SIGKILL
        for pid in workers:
            assert await exited(pid, within=10), f"worker {pid} outlived its supervisor"
        assert nobody_listens(port)
        warned = [line for line in server.lines if "supervisor exited: stopping" in line]
        assert len(warned) == 2, server.lines[-20:]
    # With the test's own placeholder socket gone too, a new server could bind the port.
    assert bindable(port)
