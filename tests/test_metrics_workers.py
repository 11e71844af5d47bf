"""With ``workers = 2`` the metrics endpoint (worker 0's) counts what every worker did (issue 15,
item 3): prometheus-client's multiprocess mode, its files in the state dir.

Twelve connections, one message each, spread over both workers by the kernel: the scrape says
12 accepted, and 12 connections, whichever worker took them; both spools took some (so the test
cannot pass on one worker's counts)."""

from __future__ import annotations

import re
import signal
import time
import urllib.request
from pathlib import Path

from relay import config as config_mod
from tests.faults.procserver import ServerProcess
from tests.serverconf import smarthost, write_serve_config
from tests.sink import Sink
from tests.test_workers import (
    LOGIN,
    held_port,
    listening,
    queued_in,
    submit_many,
    until_ready,
)
from tests.userhelpers import seed_user

MESSAGES = 12


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def value(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    assert m, f"{name} not in the scrape"
    return float(m.group(1))


async def test_the_scrape_counts_every_worker(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], sink: Sink
) -> None:
    with held_port() as port:
        path = write_serve_config(
            tmp_path,
            tls_files,
            workers=2,
            listen=[(port, "tls")],
            delivery=smarthost(sink.port, paused=True),
            metrics="127.0.0.1:0",
        )
        cfg = config_mod.load(path)
        password = await seed_user(cfg, LOGIN, now=time.time())
        server = ServerProcess(path, listeners=1)
        try:
            await server.start()
            await until_ready(server)
            assert set(listening(server)) == {"0", "1"}
            line = await server.wait_for_line("metrics listening on")
            metrics_port = int(re.search(r":(\d+)/metrics", line).group(1))  # type: ignore[union-attr]
            await submit_many(port, tls_files[2], password, MESSAGES)
            assert queued_in(cfg.spool_path(0)) > 0 and queued_in(cfg.spool_path(1)) > 0
            text = scrape(metrics_port)
            assert value(text, "relaybox_messages_accepted_total") == MESSAGES
            assert value(text, 'relaybox_connections_total{listener="tls"}') == MESSAGES
            assert value(text, 'relaybox_auth_total{result="ok"}') == MESSAGES
            assert any((cfg.state_dir / "metrics").iterdir())  # in the state dir, not /tmp
            server.signal(signal.SIGTERM)
            assert await server.wait() == 0
            assert not (cfg.state_dir / "metrics").exists()
        finally:
            await server.ensure_stopped()
