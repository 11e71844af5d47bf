"""Denial of service through TLS against the real server (issue 12, items 1 and 2).

A connection is counted from accept, before its TLS handshake: silent TCP connections to the
implicit-TLS port count against ``limits.max_connections_per_ip`` and ``limits.max_connections``,
and a handshake (implicit, or after STARTTLS) is cut after ``limits.tls_handshake_timeout``.
A failed handshake is one INFO line in the mail log, rate-limited, never a traceback. Out of file
descriptors, the server stops accepting for a moment and says so once per interval, while the
sessions already open go on (``relaybox serve`` in a subprocess with its RLIMIT_NOFILE lowered).

Durations are bounded from below tightly and from above loosely (``NEVER`` times the configured
timeout), as in test_resources.py: load can only make a close later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import ssl
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from relay import config as config_mod
from relay import replies
from relay.clock import ManualClock
from relay.config import Config
from relay.loglimit import LogLimit
from tests.dialogue import Dialogue
from tests.faults.procserver import ServerProcess, nofile_argv
from tests.hostile.kit import (
    LOGIN,
    eventually,
    message,
    no_errors_logged,
    started,
    stopped,
    with_limits,
)
from tests.relayserver import RelayHandle
from tests.serverconf import serve_config
from tests.userhelpers import seed_user

NEVER = 10  # times the configured timeout: a timeout that never fires fails on this bound
FAILED_LINE = "tls failed "


async def silent(port: int) -> Dialogue:
    """A TCP connection that never says anything (no ClientHello, no command)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return Dialogue(reader, writer)


def old_tls_hello() -> bytes:
    """The first flight of a TLS 1.0-only client (the server's minimum is TLS 1.2)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():  # TLSVersion.TLSv1 is deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="relay.test")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert hello[:3] == b"\x16\x03\x01" and hello[9:11] == b"\x03\x01", hello[:11]
    return hello


def failed_lines(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in records if r.getMessage().startswith(FAILED_LINE)]


@pytest.fixture
async def guarded(
    relay_cfg: Config, tls_files: tuple[Path, Path, Path], clock: ManualClock
) -> RelayHandle:
    """Three connections per address; a long handshake timeout, so that "refused at once" and
    "held until the handshake timeout" cannot be mistaken for each other."""
    cfg = with_limits(relay_cfg, max_connections_per_ip=3, tls_handshake_timeout=60)
    relay = await started(cfg, tls_files, clock)
    yield relay  # type: ignore[misc]
    await stopped(relay)


@pytest.fixture
async def hasty(
    relay_cfg: Config, tls_files: tuple[Path, Path, Path], clock: ManualClock
) -> RelayHandle:
    relay = await started(with_limits(relay_cfg, tls_handshake_timeout=1), tls_files, clock)
    yield relay  # type: ignore[misc]
    await stopped(relay)


# --- counted from accept ------------------------------------------------------------------------


async def test_silent_tls_connections_count_against_the_per_ip_limit(guarded: RelayHandle) -> None:
    """Three silent TCP connections to the TLS port fill the address's share: a fourth is closed
    at once, before any handshake (no TLS is spent on an address over its share, so no 421 can be
    said: a 421 needs the handshake the limit exists to save), and the STARTTLS port says 421."""
    relay = guarded
    held = [await silent(relay.tls_port) for _ in range(3)]
    fourth = await silent(relay.tls_port)
    assert await fourth.closed(within=5), "over the per-IP limit, yet held for the handshake"
    assert fourth.tail == b""  # closed before TLS: nothing said
    await fourth.close()
    with pytest.raises((ssl.SSLError, ConnectionError)):  # a real TLS client: refused the same
        await Dialogue.open(relay.tls_port, tls=relay.client_context())
    plain = await Dialogue.open(relay.starttls_port, greeting="")
    assert await plain.reply() == str(replies.TOO_MANY_FROM_IP)
    assert await plain.closed()
    await plain.close()
    # One silent connection goes: its handshake ends (EOF), its place is free again.
    await held.pop().close()
    await eventually(lambda: relay.server.gate.per_ip["127.0.0.1"] == 2, what="close counted")
    d = await Dialogue.open(relay.tls_port, tls=relay.client_context())
    await d.expect_after("NOOP", "250")
    await d.close()
    for h in held:
        await h.close()
    await eventually(lambda: relay.server.gate.per_ip == {}, what="every close counted")


async def test_silent_tls_connections_count_against_the_total_limit(
    relay_cfg: Config, tls_files: tuple[Path, Path, Path], clock: ManualClock
) -> None:
    cfg = with_limits(relay_cfg, max_connections=2, tls_handshake_timeout=60)
    relay = await started(cfg, tls_files, clock)
    try:
        held = [await silent(relay.tls_port) for _ in range(2)]
        third = await silent(relay.tls_port)
        assert await third.closed(within=5)
        await third.close()
        d = await Dialogue.open(relay.starttls_port, greeting="")
        assert await d.reply() == str(replies.TOO_MANY_CONNECTIONS)
        await d.close()
        for h in held:
            await h.close()
    finally:
        await stopped(relay)


async def test_a_silent_handshake_is_cut_at_tls_handshake_timeout(
    hasty: RelayHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    timeout = hasty.server.cfg.limits.tls_handshake_timeout
    opened_at = time.monotonic()
    d = await silent(hasty.tls_port)
    assert await d.closed(within=NEVER * timeout), "the handshake was never cut"
    assert time.monotonic() - opened_at >= timeout
    await d.close()
    await eventually(lambda: hasty.server.gate.per_ip == {}, what="close counted")
    (line,) = failed_lines(caplog.records)
    assert line.getMessage() == "tls failed ip=127.0.0.1 listener=tls reason=timeout"


async def test_a_silent_starttls_handshake_is_cut_at_tls_handshake_timeout(
    hasty: RelayHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    timeout = hasty.server.cfg.limits.tls_handshake_timeout
    assert timeout < hasty.server.cfg.limits.idle_timeout  # else the idle timer could do it
    d = await Dialogue.open(hasty.starttls_port)
    await d.expect_after("EHLO c", "250")
    sent_at = time.monotonic()
    await d.expect_after("STARTTLS", "220")
    assert await d.closed(within=NEVER * timeout), "the STARTTLS handshake was never cut"
    assert time.monotonic() - sent_at >= timeout
    await d.close()
    await eventually(lambda: hasty.server.gate.per_ip == {}, what="close counted")
    (line,) = failed_lines(caplog.records)
    assert line.getMessage() == "tls failed ip=127.0.0.1 listener=starttls reason=timeout"
    no_errors_logged(caplog.records)


# --- failed handshakes: one line each, rate-limited ---------------------------------------------


async def _fail_starttls(relay: RelayHandle, how: str) -> None:
    d = await Dialogue.open(relay.starttls_port)
    await d.expect_after("EHLO c", "250")
    await d.expect_after("STARTTLS", "220")
    if how == "garbage":
        d.send_raw(b"this is not a ClientHello\r\n" * 4)
    elif how == "old-tls":
        d.send_raw(old_tls_hello())
    # "close": nothing, the client just goes
    if how == "close":
        await d.close()
        return
    await d.writer.drain()
    assert await d.closed(), "a failed handshake left the connection open"
    await d.close()


async def _fail_implicit(relay: RelayHandle, how: str) -> None:
    d = await silent(relay.tls_port)
    if how == "close":
        await d.close()
        return
    d.send_raw(b"EHLO I forgot the TLS\r\n" if how == "garbage" else old_tls_hello())
    await d.writer.drain()
    assert await d.closed(), "a failed handshake left the connection open"
    await d.close()


@pytest.mark.parametrize("listener", ["starttls", "tls"])
@pytest.mark.parametrize("how", ["garbage", "old-tls", "close"])
async def test_a_failed_handshake_is_one_info_line(
    relay: RelayHandle, caplog: pytest.LogCaptureFixture, listener: str, how: str
) -> None:
    caplog.set_level(logging.INFO)
    fail = _fail_starttls if listener == "starttls" else _fail_implicit
    await fail(relay, how)
    await eventually(lambda: relay.server.gate.per_ip == {}, what="close counted")
    await eventually(lambda: bool(failed_lines(caplog.records)), what="the failure logged")
    (line,) = failed_lines(caplog.records)
    assert line.levelno == logging.INFO and line.exc_info is None
    text = line.getMessage()
    assert re.fullmatch(rf"tls failed ip=127\.0\.0\.1 listener={listener} reason=[a-z0-9_]+", text)
    reasons = {"garbage": "wrong_version_number", "old-tls": "unsupported_protocol"}
    assert text.endswith("reason=" + reasons.get(how, "closed")), text
    no_errors_logged(caplog.records)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    # The server is fine: a real client is served on the same listener.
    d = await Dialogue.open(relay.port(listener), tls=None if listener == "starttls" else
                            relay.client_context())  # fmt: skip
    await d.expect_after("NOOP", "250")
    await d.close()


async def finished_then_closed(port: int, ctx: ssl.SSLContext, then: bytes = b"") -> None:
    """An implicit-TLS client whose last handshake flight, ``then`` (encrypted) and its
    close_notify leave in one write, then EOF: the server's TLS layer completes the handshake and
    reads the close in one go, before the session has had its turn to start."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="relay.test")
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            writer.write(outgoing.read())
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "closed during the handshake"
            incoming.write(data)
    if then:
        obj.write(then)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.unwrap()
    writer.write(outgoing.read())  # Finished (+ data) + close_notify
    writer.write_eof()
    while await asyncio.wait_for(reader.read(65536), 10):
        pass  # until the server closes
    writer.close()


@pytest.mark.parametrize("then", [b"", b"EHLO client.test\r\n"])
async def test_a_client_closing_with_its_last_handshake_flight_is_released_quietly(
    relay: RelayHandle, caplog: pytest.LogCaptureFixture, then: bytes
) -> None:
    """Regression: aiosmtpd's eof_received ran before its session existed (asyncio logged "Error
    calling eof_received()" with an AssertionError traceback; seen with a client that only
    fetched the certificate). Now the close waits for the session and ends it; the place is
    given back each time and a real client is served after."""
    caplog.set_level(logging.INFO)
    for _ in range(5):
        await finished_then_closed(relay.tls_port, relay.client_context(), then)
    await eventually(lambda: relay.server.gate.per_ip == {}, what="every close counted")
    no_errors_logged(caplog.records)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    d = await Dialogue.open(relay.tls_port, tls=relay.client_context())
    await d.expect_after("NOOP", "250")
    await d.close()


async def test_failed_handshakes_are_rate_limited(
    relay: RelayHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    limit = relay.server.gate.tls_failures.burst
    for i in range(limit + 5):
        await (_fail_starttls if i % 2 else _fail_implicit)(relay, "garbage")
    await eventually(lambda: relay.server.gate.per_ip == {}, what="every close counted")
    assert len(failed_lines(caplog.records)) == limit
    assert relay.server.gate.tls_failures.suppressed == 5
    no_errors_logged(caplog.records)


def test_log_limit_says_how_many_it_held_back() -> None:
    """N lines per interval, then nothing until the interval ends; then one summary line."""
    now = [0.0]
    said: list[str] = []
    limit = LogLimit(burst=3, interval=60, clock=lambda: now[0])
    for _ in range(5):
        if limit.allow():
            said.append("line")
    assert said == ["line"] * 3 and limit.suppressed == 2
    now[0] = 59.9
    assert not limit.allow() and limit.take_summary() is None  # the interval is not over
    now[0] = 60.0
    assert limit.take_summary() == 3  # held back in the interval just ended
    assert limit.allow() and limit.suppressed == 0


# --- STARTTLS inside TLS ------------------------------------------------------------------------


async def test_starttls_inside_tls_is_503(relay: RelayHandle) -> None:
    """RFC 3207 4.2: no second TLS layer. After STARTTLS, and on the implicit-TLS port."""
    d = await Dialogue.open(relay.starttls_port)
    await d.expect_after("EHLO c", "250")
    await d.starttls(relay.client_context())
    ehlo = await d.expect_after("EHLO c", "250")
    assert "STARTTLS" not in ehlo
    assert await d.reply_after("STARTTLS") == str(replies.TLS_ALREADY)
    await d.expect_after("NOOP", "250")
    await d.close()
    d = await Dialogue.open(relay.tls_port, tls=relay.client_context())
    await d.expect_after("EHLO c", "250")
    assert await d.reply_after("STARTTLS") == str(replies.TLS_ALREADY)
    await d.expect_after("NOOP", "250")
    await d.close()


# --- out of file descriptors --------------------------------------------------------------------

EXHAUSTED = "Too many open files"


async def test_out_of_file_descriptors_is_logged_once_per_interval(
    tmp_path: Path, tls_files: tuple[Path, Path, Path]
) -> None:
    """``relaybox serve`` with 30 file descriptors to spare, and 60 silent connections: it runs
    out, says so a bounded number of times (asyncio alone logs a traceback per accept attempt,
    thousands a second), an open session goes on working, and once the silent connections are
    gone both listeners serve again."""
    cert, key, ca = tls_files
    path = tmp_path / "relaybox.toml"
    limits = {"tls_handshake_timeout": "2s", "max_connections_per_ip": 1000}
    path.write_text(
        serve_config(
            state=tmp_path / "state",
            cert=cert,
            key=key,
            listen=[(0, "tls"), (0, "starttls")],
            limits=limits,
            delivery={"paused": True},
        )
    )
    cfg = config_mod.load(path)
    password = await seed_user(cfg, LOGIN, now=time.time())
    server = ServerProcess(path, listeners=2, nofile=48)  # it uses 18 when idle
    ctx = ssl.create_default_context(cafile=str(ca))
    held: list[Dialogue] = []
    try:
        await server.start()
        tls_port, starttls_port = server.ports["tls"], server.ports["starttls"]
        session = await Dialogue.open(tls_port, tls=ctx)
        await session.login(LOGIN, password)
        started_at = time.monotonic()
        for _ in range(60):  # the kernel completes them (backlog) whether or not they are accepted
            held.append(await silent(tls_port))
        await server.wait_for_line(EXHAUSTED)
        # Sessions already open keep working while no new one can be accepted.
        await session.expect_after("NOOP", "250")
        await session.expect_after(f"MAIL FROM:<{LOGIN}>", "250 2.1.0")
        await session.expect_after("RCPT TO:<someone@dest.test>", "250 2.1.5")
        await session.expect_after("DATA", "354")
        await session.expect_after(message() + b".\r\n", "250 2.0.0 queued as")
        for h in held:
            await h.close()
        held.clear()
        # Both listeners serve again (accepting resumes; what the backlog still held is silent
        # and ends at once: its clients are gone).
        async with asyncio.timeout(30):
            while True:
                try:
                    d = await Dialogue.open(tls_port, tls=ctx)
                    break
                except (ssl.SSLError, ConnectionError, TimeoutError):
                    continue  # one of the closed ones' places, not yet freed: try again
        await d.expect_after("NOOP", "250")
        await d.close()
        d = await Dialogue.open(starttls_port)
        await d.expect_after("EHLO c", "250")
        await d.close()
        await session.expect_after("QUIT", "221")
        await session.close()
        elapsed = time.monotonic() - started_at
        server.signal(signal.SIGTERM)
        assert await server.wait() == 0
    finally:
        for h in held:
            await h.close()
        await server.ensure_stopped()
    text = "\n".join(server.lines)
    assert "Traceback" not in text
    said = [line for line in server.lines if EXHAUSTED in line]
    # Once per interval (10 s) per process, whatever the number of attempts.
    assert 1 <= len(said) <= 2 + elapsed / 10, said


def test_the_nofile_wrapper_really_limits_the_process() -> None:
    """The ``nofile`` of ServerProcess reaches the process it starts (else the test above would
    prove nothing): a child started through the same wrapper sees the limit."""
    script = "import resource; print(resource.getrlimit(resource.RLIMIT_NOFILE))"
    out = subprocess.run(
        nofile_argv(48, [sys.executable, "-c", script]), capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "(48, 48)"
