"""End to end: client -> relaybox (real server) -> upstream aiosmtpd sink, smarthost and MX mode.

The domain is verified for real against the loopback DNS server (relaybox's own records published
there), and the sink must receive the exact message with a DKIM signature that dkimpy's
``dkim.verify`` accepts against the key published in that DNS.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import dkim
import dns.resolver

from relay.clock import ManualClock
from relay.config import Config
from relay.store import domains
from relay.units import Duration
from tests.dialogue import Dialogue
from tests.dnsserver import TestDNSServer
from tests.relayserver import RelayHandle, start_relay
from tests.sink import Sink, SinkFactory

LOGIN = "app@example.com"


def body(to: str) -> bytes:
    return (
        f"From: App <{LOGIN}>\r\nTo: <{to}>\r\nSubject: e2e\r\n"
        "Message-ID: <e2e-1@example.com>\r\nDate: Thu, 26 Nov 2026 10:00:00 +0000\r\n\r\n"
        "Line one.\r\n.Line with a leading dot.\r\n"
    ).encode()


def dnsfunc_for(port: int):  # type: ignore[no-untyped-def]
    """dkimpy's DNS hook, asking the loopback DNS server (TXT, strings joined)."""
    res = dns.resolver.Resolver(configure=False)
    res.nameservers = ["127.0.0.1"]
    res.port = port

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        answer = res.resolve(name.decode().rstrip("."), "TXT")
        return b"".join(answer[0].strings)

    return lookup


async def verified_relay(
    cfg: Config, ca: Path, clock: ManualClock, dns_server: TestDNSServer
) -> RelayHandle:
    """Start the relay, add example.com, publish its records, and verify it for real."""
    relay = await start_relay(cfg, ca, clock)
    db = relay.server.db
    assert db is not None
    d = await domains.add(db, "example.com", cfg=cfg, now=clock(), actor="test")
    dns_server.publish(domains.records(d, cfg))
    verified = await domains.verify(
        db, "example.com", resolver=relay.server.resolver, cfg=cfg, now=clock(), actor="test"
    )
    assert verified.state == "verified", verified.checks
    return relay


async def submit(relay: RelayHandle, password: str, rcpts: list[str]) -> str:
    d = await Dialogue.open(relay.tls_port, tls=relay.client_context())
    await d.login(LOGIN, password)
    await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250")
    for r in rcpts:
        await d.expect_after(f"RCPT TO:<{r}>", "250")
    await d.expect_after("DATA", "354")
    reply = await d.expect_after(
        body(rcpts[0]).replace(b"\r\n.", b"\r\n..") + b".\r\n", "250 2.0.0 queued as"
    )
    await d.close()
    return reply.split()[-1]


def check_signed(received: bytes, dns_port: int) -> None:
    assert received.startswith(b"DKIM-Signature:")
    assert dkim.verify(received, dnsfunc=dnsfunc_for(dns_port))
    # The message itself arrives exactly as submitted (after relaybox's own trace headers).
    assert received.endswith(body("x@dest.test").split(b"\r\n\r\n", 1)[1])
    assert b"\r\n.Line with a leading dot.\r\n" in received


async def test_smarthost_mode_delivers_signed(
    dns_cfg: Config,
    relay_cfg: Config,
    tls_files: tuple[Path, Path, Path],
    clock: ManualClock,
    dns_server: TestDNSServer,
    sink: Sink,
) -> None:
    cfg = dataclasses.replace(
        relay_cfg,
        dns=dns_cfg.dns,
        delivery=dataclasses.replace(
            relay_cfg.delivery,
            paused=False,
            mode="smarthost",
            smarthost=dataclasses.replace(
                relay_cfg.delivery.smarthost, host="127.0.0.1", port=sink.port, security="none"
            ),
        ),
    )
    relay = await verified_relay(cfg, tls_files[2], clock, dns_server)
    try:
        password = await relay.add_user(LOGIN)
        queue_id = await submit(relay, password, ["x@dest.test", "y@other.test"])
        (got,) = await sink.wait_received(1)
        assert got.mail_from == LOGIN
        assert sorted(got.rcpt_tos) == ["x@dest.test", "y@other.test"]
        check_signed(got.data, dns_server.port)
        await relay.server.deliverer.wait_idle()
        assert relay.server.spool is not None
        shown = await relay.server.spool.show(queue_id)
        assert shown is not None
        assert {r.state for r in shown.recipients} == {"delivered"}
    finally:
        await relay.server.shutdown()
        relay.close()


async def test_mx_mode_routes_by_mx_and_signs(
    dns_cfg: Config,
    relay_cfg: Config,
    tls_files: tuple[Path, Path, Path],
    clock: ManualClock,
    dns_server: TestDNSServer,
    sink_factory: SinkFactory,
) -> None:
    primary = await sink_factory(host="127.0.0.2")
    backup = await sink_factory(host="127.0.0.3", port=primary.port)
    other = await sink_factory(host="127.0.0.4", port=primary.port)
    dns_server.add_mx("dest.test", 10, "mx1.dest.test")
    dns_server.add_mx("dest.test", 20, "mx2.dest.test")
    dns_server.add_a("mx1.dest.test", "127.0.0.2")
    dns_server.add_a("mx2.dest.test", "127.0.0.3")
    dns_server.add_a("other.test", "127.0.0.4")  # no MX: the implicit MX (RFC 5321 5.1)
    cfg = dataclasses.replace(
        relay_cfg,
        dns=dns_cfg.dns,
        delivery=dataclasses.replace(
            relay_cfg.delivery,
            paused=False,
            mode="mx",
            port=primary.port,
            connect_timeout=Duration(2),
        ),
    )
    relay = await verified_relay(cfg, tls_files[2], clock, dns_server)
    try:
        password = await relay.add_user(LOGIN)
        await submit(relay, password, ["x@dest.test", "y@dest.test", "z@other.test"])
        (got,) = await primary.wait_received(1)
        assert sorted(got.rcpt_tos) == ["x@dest.test", "y@dest.test"]  # one transaction
        check_signed(got.data, dns_server.port)
        (got_other,) = await other.wait_received(1)
        assert got_other.rcpt_tos == ("z@other.test",)
        assert backup.received == []
        # The preferred MX goes down: the next message goes to the backup.
        await primary.stop()
        await submit(relay, password, ["w@dest.test"])
        (got_backup,) = await backup.wait_received(1)
        assert got_backup.rcpt_tos == ("w@dest.test",)
    finally:
        await relay.server.shutdown()
        relay.close()
