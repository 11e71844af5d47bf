"""Durability: `relaybox serve` killed (SIGKILL) or stopped (SIGTERM) in the middle of a burst
(issue 6 item 5, issue 4's durability test).

The server runs as a real subprocess delivering to a sink in this process. Clients submit
concurrently; each message has its own Message-ID. Mid-burst the server is signalled, restarted,
and the test waits until the sink has everything. Then what clients were told (a 250 with a queue
id) is compared with what the sink received:

- SIGKILL: zero lost; duplicates are possible (a message delivered but not yet recorded as
  delivered when the process died is sent again after the restart: at-least-once, RFC 5321 6.1)
  and are counted and printed.
- SIGTERM: the drain lets started transactions finish, so zero lost and zero duplicated.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from relay import config as config_mod
from relay import replies
from relay.config import Config
from relay.store.spool import Spool
from tests.dialogue import Dialogue, plain
from tests.faults.procserver import ServerProcess, relaybox_argv
from tests.hostile.kit import LOGIN, clean, message
from tests.serverconf import smarthost, write_serve_config
from tests.sink import Sink
from tests.userhelpers import seed_user

CLIENTS, PER_CLIENT, SIGNAL_AFTER = 8, 40, 120

_MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>\r$", re.M | re.I)


@dataclass
class Setup:
    config: Path
    cfg: Config
    password: str
    ctx: ssl.SSLContext


@dataclass
class Burst:
    acked: dict[str, str] = field(default_factory=dict)  # Message-ID -> queue id
    attempted: set[str] = field(default_factory=set)  # DATA sent, whatever the answer


@pytest.fixture
async def setup(tmp_path: Path, tls_files: tuple[Path, Path, Path], sink: Sink) -> Setup:
    path = write_serve_config(
        tmp_path,
        tls_files,
        dns={"dkim_key_type": "ed25519"},
        limits={"drain_timeout": "20s"},
        delivery=smarthost(sink.port, command_timeout="10s"),
    )
    cfg = config_mod.load(path)
    password = await seed_user(cfg, LOGIN, now=time.time())
    return Setup(path, cfg, password, ssl.create_default_context(cafile=str(tls_files[2])))


@pytest.fixture
async def server(setup: Setup) -> AsyncIterator[ServerProcess]:
    proc = ServerProcess(setup.config, listeners=1)
    yield proc
    await proc.ensure_stopped()
    for line in proc.lines:
        clean(line, "server log")


class Refused(Exception):
    """The server refused or went away in a way that is expected once it has been signalled."""


async def burst(
    setup: Setup, port: int, on_ack: Callable[[int], None], signalled: Callable[[], bool]
) -> Burst:
    """CLIENTS sessions of PER_CLIENT messages each. Before the signal every step must succeed:
    a refused connection, a failed login or any unexpected reply fails the test. After it, a
    session may end early, but only in the ways a killed or draining server ends it: the
    connection refused, reset or closed, or 421 4.3.2 (shutting down)."""
    result = Burst()
    shutting_down = str(replies.SHUTTING_DOWN)

    async def step(d: Dialogue, line: str | None, expected: str) -> str:
        """The reply to ``line`` (or to what was sent before, if None), which must start with
        ``expected``; Refused if the server is going away after the signal."""
        try:
            reply = await (d.reply() if line is None else d.reply_after(line))
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            if signalled():
                raise Refused from exc
            raise
        if reply.startswith(expected):
            return reply
        if signalled() and reply == shutting_down:
            raise Refused
        sent = "AUTH PLAIN (credentials)" if line and line.startswith("AUTH") else line
        raise AssertionError(f"expected {expected!r} after {sent!r}, got {reply!r}")

    async def client(c: int) -> None:
        try:
            d = await Dialogue.open(port, tls=setup.ctx, greeting="")
        except OSError:  # refused: the server is down (only expected after the signal)
            if signalled():
                return
            raise
        try:
            await step(d, None, "220 ")
            await step(d, "EHLO client.test", "250")
            await step(d, f"AUTH PLAIN {plain(LOGIN, setup.password)}", "235 2.7.0")
            for i in range(PER_CLIENT):
                mid = f"burst-{c}-{i}@example.com"
                await step(d, f"MAIL FROM:<{LOGIN}>", "250")
                await step(d, "RCPT TO:<bob@dest.test>", "250")
                await step(d, "DATA", "354")
                head = f"Message-ID: <{mid}>\r\n".encode()
                result.attempted.add(mid)
                d.send_raw(head + message(subject=mid) + b".\r\n")
                reply = await step(d, None, "250 2.0.0 queued as ")
                result.acked[mid] = reply.rsplit(" ", 1)[1]
                on_ack(len(result.acked))
        except Refused:
            return  # the server went away under us, as signalled
        finally:
            await d.close()

    async with asyncio.timeout(120), asyncio.TaskGroup() as tasks:
        for c in range(CLIENTS):
            tasks.create_task(client(c))
    return result


def received_ids(sink: Sink) -> Counter[str]:
    ids: Counter[str] = Counter()
    for r in sink.received:
        m = _MESSAGE_ID.search(r.data)
        assert m, r.data[:300]
        ids[m.group(1).decode()] += 1
    return ids


async def queue_settled(cfg: Config, within: float = 60) -> None:
    """Until the running server has nothing pending or in flight (read as the CLI reads)."""
    deadline = time.monotonic() + within
    while True:
        spool = await Spool.open(cfg, recover=False)
        try:
            stats = await spool.stats()
        finally:
            await spool.close()
        if stats.pending_messages == 0 and stats.in_flight == 0:
            return
        assert time.monotonic() < deadline, f"queue never settled: {stats}"
        await asyncio.sleep(0.2)  # sleep-ok: polling the queue with a deadline


async def check_records(cfg: Config, acked: dict[str, str]) -> None:
    """The relay's own records agree: every acknowledged queue id is delivered."""
    spool = await Spool.open(cfg, recover=False)
    try:
        for qid in acked.values():
            info = await spool.show(qid)
            assert [r.state for r in info.recipients] == ["delivered"], info
    finally:
        await spool.close()


def stats_json(config: Path) -> dict[str, object]:
    """`relaybox queue stats --json`: its output is checked for secrets too."""
    out = subprocess.run(
        [*relaybox_argv(), "--config", str(config), "queue", "stats", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    clean(out.stdout + out.stderr, "queue stats --json")
    data: dict[str, object] = json.loads(out.stdout)
    return data


def report(capsys: pytest.CaptureFixture[str], what: str, text: str) -> None:
    with capsys.disabled():
        print(f"\n[{what}] {text}", file=sys.stderr)


async def run_and_signal(
    setup: Setup, server: ServerProcess, sink: Sink, sig: signal.Signals
) -> tuple[Burst, int]:
    await server.start()
    sent = False

    def on_ack(n: int) -> None:
        nonlocal sent
        if n >= SIGNAL_AFTER and not sent:
            sent = True
            server.signal(sig)

    result = await burst(setup, server.ports["tls"], on_ack, lambda: sent)
    assert sent, f"the burst ended before {SIGNAL_AFTER} acknowledgements"
    rc = await server.wait()
    return result, rc


@pytest.mark.slow
async def test_sigkill_mid_burst_loses_nothing(
    setup: Setup,
    server: ServerProcess,
    sink: Sink,
    capsys: pytest.CaptureFixture[str],
    record_property: Callable[[str, object], None],
) -> None:
    result, rc = await run_and_signal(setup, server, sink, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    before_restart = sum(received_ids(sink).values())
    await server.start()
    acked = set(result.acked)
    await sink.wait_for(lambda s: acked <= set(received_ids(s)), within=60)
    await queue_settled(setup.cfg)
    got = received_ids(sink)
    lost = sorted(acked - set(got))
    duplicates = {mid: n for mid, n in got.items() if n > 1}
    unacked_delivered = sorted(set(got) - acked)
    assert not lost, f"acknowledged but never delivered: {lost}"
    assert set(got) <= result.attempted
    await check_records(setup.cfg, result.acked)
    stats = stats_json(setup.config)
    assert stats["pending_messages"] == 0
    record_property("sigkill_acked", len(acked))
    record_property("sigkill_duplicates", sum(n - 1 for n in duplicates.values()))
    report(
        capsys,
        "crash SIGKILL",
        f"{len(acked)} acknowledged, {len(result.attempted) - len(acked)} unanswered when killed;"
        f" {before_restart} delivered before the kill; after restart: lost 0, delivered twice"
        f" {len(duplicates)} {sorted(duplicates)},"
        f" delivered without a 250 (client would retry) {len(unacked_delivered)}",
    )


@pytest.mark.slow
async def test_sigterm_mid_burst_loses_and_duplicates_nothing(
    setup: Setup,
    server: ServerProcess,
    sink: Sink,
    capsys: pytest.CaptureFixture[str],
) -> None:
    result, rc = await run_and_signal(setup, server, sink, signal.SIGTERM)
    assert rc == 0, server.lines[-20:]
    assert any(line.endswith("relaybox.server: stopped") for line in server.lines)
    assert not [line for line in server.lines if "Traceback" in line or " ERROR " in line]
    await server.start()
    acked = set(result.acked)
    await sink.wait_for(lambda s: acked <= set(received_ids(s)), within=60)
    await queue_settled(setup.cfg)
    got = received_ids(sink)
    duplicates = {mid: n for mid, n in got.items() if n > 1}
    assert not sorted(acked - set(got)), "acknowledged but never delivered"
    assert not duplicates, f"delivered more than once: {duplicates}"
    # A drained server answers every DATA it read: nothing stored without its client told.
    assert set(got) == acked
    await check_records(setup.cfg, result.acked)
    report(
        capsys,
        "crash SIGTERM",
        f"{len(acked)} acknowledged before/while draining; lost 0, duplicated 0",
    )
