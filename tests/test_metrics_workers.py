"""With ``workers = 2`` the metrics endpoint (worker 0's) counts what every worker did (issue 15,
item 3): prometheus-client's multiprocess mode, its files in the state dir.

Twelve connections, one message each, spread over both workers by the kernel: the scrape says
12 accepted, and 12 connections, whichever worker took them; both spools took some (so the test
cannot pass on one worker's counts)."""

from __future__ import annotations

import re
import signal
import urllib.request
from pathlib import Path

from tests.sink import Sink
from tests.test_workers import queued_in, submit_many, workers_running

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
    async with workers_running(
        tmp_path, tls_files, sink, paused=True, metrics="127.0.0.1:0"
    ) as run:
        line = await run.server.wait_for_line("metrics listening on")
        metrics_port = int(re.search(r":(\d+)/metrics", line).group(1))  # type: ignore[union-attr]
        await submit_many(run.port, tls_files[2], run.password, MESSAGES)
        cfg = run.cfg
        assert queued_in(cfg.spool_path(0)) > 0 and queued_in(cfg.spool_path(1)) > 0
        text = scrape(metrics_port)
        assert value(text, "relaybox_messages_accepted_total") == MESSAGES
        assert value(text, 'relaybox_connections_total{listener="tls"}') == MESSAGES
        assert value(text, 'relaybox_auth_total{result="ok"}') == MESSAGES
        assert any((cfg.state_dir / "metrics").iterdir())  # in the state dir, not /tmp
        run.server.signal(signal.SIGTERM)
        assert await run.server.wait() == 0
        assert not (cfg.state_dir / "metrics").exists()
