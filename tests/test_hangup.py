"""SIGHUP while `relaybox serve` is starting: held and done once serving, never fatal.

SIGHUP's default action ends a process. The relay's handler used to be installed only after
startup (store, spool, deliverer), and the supervisor's only once every worker was ready: a
reload asked in that window (a script reacting to the "listening" line, a config-management
run) killed the relay (exit by signal 1), or with ``workers = 2`` the supervisor. Now the CLI
latches a SIGHUP from the start of ``serve``, the handlers come before startup, and the
supervisor holds one until all its workers are ready, then forwards it.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.faults.procserver import ServerProcess
from tests.test_generated_cert import NEW, lines_with, san, served, unverified, write_config
from tests.test_workers import held_port


@pytest.mark.parametrize("round_", range(3))
async def test_a_sighup_right_after_the_first_listener_is_bound_reloads(
    tmp_path: Path, round_: int
) -> None:
    """The window that killed it: the first ``listening`` line is out, startup goes on. The
    relay lives, reloads once serving (the new name's certificate is served), stops with 0."""
    path, state = tmp_path / "relaybox.toml", tmp_path / "state"
    write_config(path, state)
    server = ServerProcess(path, listeners=2)
    try:
        await server.start()  # returns on the listening lines: startup goes on
        write_config(path, state, hostname=NEW)
        server.signal(signal.SIGHUP)
        await server.wait_for_line("reloaded config")
        cert = await served(server.ports["tls"], "tls", unverified(), NEW)
        assert NEW in san(cert)
        server.signal(signal.SIGTERM)
        assert await server.wait() == 0
    finally:
        await server.ensure_stopped()


async def test_the_supervisor_holds_a_sighup_until_its_workers_are_ready(tmp_path: Path) -> None:
    """``workers = 2``: a SIGHUP to the supervisor once a worker has bound, before "all 2
    workers ready": the supervisor lives, both workers reload after they are ready."""
    path, state = tmp_path / "relaybox.toml", tmp_path / "state"
    with held_port() as port:
        write_config(path, state, listen=((port, "tls"),), workers=2)
        server = ServerProcess(path, listeners=1)
        try:
            await server.start()  # the first worker's listening line
            assert not [x for x in server.lines if "workers ready" in x]
            server.signal(signal.SIGHUP)
            await server.wait_for_line("all 2 workers ready")
            await lines_with(server, "reloaded config", 2)
            server.signal(signal.SIGTERM)
            assert await server.wait() == 0
        finally:
            await server.ensure_stopped()
