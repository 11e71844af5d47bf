"""relay/outbound.py through its public API (``Outbound``, ``classify``) against real peers on
loopback: the aiosmtpd sink (tests/sink.py), the DNS server (tests/dnsserver.py) and, where a peer
must misbehave at an exact point (drop the connection at a given command, refuse STARTTLS), the
scripted SMTP server of tests/faults/upstream.py. These guard what the first mutation run of
outbound.py found unguarded.

Idle connections age by ``time.monotonic``, which outbound.py reads through its module-level
``time``; the pool tests swap that name for a manual monotonic clock (the stdlib and the event loop
keep the real one), so ageing is a clock step, not a wait.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trustme

from relay.config import Config
from relay.config_sections import SmarthostConfig
from relay.delivery import outbound
from relay.delivery.outbound import Outbound, Result, classify
from relay.units import Duration
from tests.dnsserver import TestDNSServer
from tests.faults.upstream import Upstream
from tests.sink import SinkFactory

SENDER = "alice@example.com"
KEEP = 5.0  # seconds an idle connection is kept (outbound.CONN_KEEP, the documented value)
MAX_ADDRESSES = 6  # MX addresses tried per attempt (outbound.MAX_ADDRESSES)
BODY = b"From: <alice@example.com>\r\nSubject: hi\r\n\r\nHello.\r\n"


UpstreamFactory = Callable[..., Awaitable[Upstream]]


@pytest.fixture
async def upstream_factory() -> AsyncIterator[UpstreamFactory]:
    started: list[Upstream] = []

    async def make(host: str = "127.0.0.1", port: int = 0, **kw: object) -> Upstream:
        up = Upstream(host, port, **kw)  # type: ignore[arg-type]
        await up.start()
        started.append(up)
        return up

    yield make
    for up in started:
        await up.stop()


@pytest.fixture
async def upstream(upstream_factory: UpstreamFactory) -> Upstream:
    return await upstream_factory()


OutboundFactory = Callable[[Config], Awaitable[Outbound]]


@pytest.fixture
async def outbound_for() -> AsyncIterator[OutboundFactory]:
    """Started Outbound objects; every pooled connection is closed at teardown."""
    made: list[Outbound] = []

    async def make(cfg: Config) -> Outbound:
        out = Outbound(cfg)
        await out.start()
        made.append(out)
        return out

    yield make
    for out in made:
        await out.close_idle(everything=True)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def smarthost_cfg(cfg: Config, port: int, security: str = "none") -> Config:
    d = dataclasses.replace(
        cfg.delivery,
        mode="smarthost",
        smarthost=SmarthostConfig(host="127.0.0.1", port=port, security=security),
        connect_timeout=Duration(2),
        command_timeout=Duration(5),
    )
    return dataclasses.replace(cfg, delivery=d)


def mx_cfg(dns_cfg: Config, port: int, tls: str = "opportunistic") -> Config:
    d = dataclasses.replace(
        dns_cfg.delivery,
        mode="mx",
        port=port,
        tls=tls,
        connect_timeout=Duration(2),
        command_timeout=Duration(5),
    )
    return dataclasses.replace(dns_cfg, delivery=d)


# --- classify ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "kind"),
    [(199, "temp"), (200, "ok"), (299, "ok"), (300, "temp"), (399, "temp"), (400, "temp")]
    + [(499, "temp"), (500, "perm"), (599, "perm"), (600, "temp"), (601, "temp"), (999, "temp")],
)
def test_classify_boundaries(code: int, kind: str) -> None:
    """2xx is success from 200 on; 5xx is permanent; everything else is temporary."""
    assert classify(code, "x", "r") == Result(kind, f"{code} x", "r")


@pytest.fixture
async def closed_port(upstream: Upstream) -> int:
    """A loopback port nobody listens on any more: the upstream's, once stopped."""
    port = upstream.port
    await upstream.stop()
    return port


async def test_a_result_shared_by_several_recipients_is_immutable(
    cfg: Config, closed_port: int, outbound_for: OutboundFactory
) -> None:
    """A failed dial gives every recipient the same Result object: it must be a frozen value."""
    out = await outbound_for(smarthost_cfg(cfg, closed_port))
    first, second = await out.deliver("smarthost", SENDER, BODY, ["b@x.test", "c@x.test"])
    assert first == second and first.kind == "temp"
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.kind = "ok"  # type: ignore[misc]
    assert second.kind == "temp" and len({first, second}) == 1


# --- the connection pool -----------------------------------------------------------------------


class ManualMonotonic:
    """Stands in for the ``time`` module inside relay/outbound.py only."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def mono(monkeypatch: pytest.MonkeyPatch) -> ManualMonotonic:
    m = ManualMonotonic()
    monkeypatch.setattr(outbound, "time", m)
    return m


async def test_a_new_outbound_reuses_its_connection(
    cfg: Config, upstream: Upstream, outbound_for: OutboundFactory
) -> None:
    out = await outbound_for(smarthost_cfg(cfg, upstream.port))
    for _ in range(3):
        assert [r.kind for r in await out.deliver("smarthost", SENDER, BODY, ["b@x.test"])] == [
            "ok"
        ]
    assert upstream.connections == 1 and len(upstream.messages) == 3


async def test_once_closing_a_connection_is_not_kept_after_its_transaction(
    cfg: Config, upstream: Upstream, outbound_for: OutboundFactory
) -> None:
    """``closing`` (set by the deliverer's stop): transactions still finish, but no connection
    goes back to the pool."""
    out = await outbound_for(smarthost_cfg(cfg, upstream.port))
    out.closing = True
    for _ in range(2):
        assert [r.kind for r in await out.deliver("smarthost", SENDER, BODY, ["b@x.test"])] == [
            "ok"
        ]
    assert upstream.connections == 2 and [n for n, _ in upstream.messages] == [1, 2]


async def test_an_idle_connection_is_kept_for_conn_keep_seconds(
    cfg: Config, upstream: Upstream, outbound_for: OutboundFactory, mono: ManualMonotonic
) -> None:
    out = await outbound_for(smarthost_cfg(cfg, upstream.port))
    await out.deliver("smarthost", SENDER, BODY, ["b@x.test"])
    mono.now += KEEP - 0.5  # still fresh: neither the sweep nor the next message drops it
    await out.close_idle()
    assert "QUIT" not in upstream.commands(1)
    assert [r.kind for r in await out.deliver("smarthost", SENDER, BODY, ["b@x.test"])] == ["ok"]
    assert upstream.connections == 1 and len(upstream.messages) == 2


@pytest.mark.parametrize("sweep", [False, True], ids=["next-message", "after-the-sweep"])
@pytest.mark.parametrize("idle", [KEEP, KEEP + 1], ids=["exactly-keep", "past-keep"])
async def test_a_connection_idle_too_long_is_not_reused(
    cfg: Config,
    upstream: Upstream,
    outbound_for: OutboundFactory,
    mono: ManualMonotonic,
    idle: float,
    sweep: bool,
) -> None:
    """Idle for CONN_KEEP or longer, the connection is not used again: the next message goes on
    a new one, and a sweep before it QUITs the old one politely (RFC 5321 4.1.1.10)."""
    out = await outbound_for(smarthost_cfg(cfg, upstream.port))
    await out.deliver("smarthost", SENDER, BODY, ["b@x.test"])
    mono.now += idle
    if sweep:
        await out.close_idle()  # close_idle awaits the 221
        assert upstream.commands(1)[-1] == "QUIT"
    assert [r.kind for r in await out.deliver("smarthost", SENDER, BODY, ["b@x.test"])] == ["ok"]
    assert upstream.connections == 2
    assert [n for n, _ in upstream.messages] == [1, 2]


async def test_the_sweep_waits_two_seconds_for_an_unanswered_quit(
    cfg: Config,
    upstream_factory: UpstreamFactory,
    outbound_for: OutboundFactory,
    mono: ManualMonotonic,
) -> None:
    """A peer slow to answer QUIT gets 2 s before the connection is dropped (a lower bound
    only: load can only make it later)."""
    up = await upstream_factory(answer_quit=False)
    out = await outbound_for(smarthost_cfg(cfg, up.port))
    await out.deliver("smarthost", SENDER, BODY, ["b@x.test"])
    mono.now += KEEP + 1
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await out.close_idle()
    assert loop.time() - t0 >= 2.0
    assert up.commands(1)[-1] == "QUIT"


# --- a connection lost: stale pooled connections are retried, nothing else ---------------------


async def test_a_pooled_connection_lost_before_mail_is_retried_on_a_new_one(
    cfg: Config, upstream: Upstream, outbound_for: OutboundFactory
) -> None:
    out = await outbound_for(smarthost_cfg(cfg, upstream.port))
    await out.deliver("smarthost", SENDER, BODY, ["b@x.test"])
    upstream.drop_at.add((1, "MAIL", 2))  # the server went away while the connection was idle
    results = await out.deliver("smarthost", SENDER, BODY, ["b@x.test", "c@x.test"])
    assert [r.kind for r in results] == ["ok", "ok"]
    assert results[0].reply == "250 2.0.0 accepted"
    assert upstream.connections == 2 and [n for n, _ in upstream.messages] == [1, 2]


async def test_a_new_connection_lost_at_mail_is_a_temporary_failure(
    cfg: Config, upstream: Upstream, outbound_for: OutboundFactory
) -> None:
    upstream.drop_at.add((1, "MAIL", 1))
    out = await outbound_for(smarthost_cfg(cfg, upstream.port))
    results = await out.deliver("smarthost", SENDER, BODY, ["b@x.test", "c@x.test"])
    assert [r.kind for r in results] == ["temp", "temp"]
    assert results[0].reply.startswith("451 4.4.2 connection lost (")
    assert results[0].relay == "127.0.0.1[127.0.0.1]"
    assert upstream.connections == 1 and upstream.messages == []


@pytest.mark.parametrize(
    ("verb", "copies"),
    [(".", [1, 1]), ("RCPT", [1])],
    ids=["after-the-message", "at-rcpt"],
)
async def test_a_pooled_connection_lost_after_mail_is_not_retried(
    cfg: Config, upstream: Upstream, outbound_for: OutboundFactory, verb: str, copies: list[int]
) -> None:
    """Lost once the transaction is under way (at RCPT, or after the content went out: the
    server may have it): a temporary failure, no new connection, never a second copy in the
    same attempt."""
    out = await outbound_for(smarthost_cfg(cfg, upstream.port))
    await out.deliver("smarthost", SENDER, BODY, ["b@x.test"])
    upstream.drop_at.add((1, verb, 2))
    results = await out.deliver("smarthost", SENDER, BODY, ["b@x.test"])
    assert [r.kind for r in results] == ["temp"]
    assert results[0].reply.startswith("451 4.4.2 connection lost (")
    assert upstream.connections == 1 and [n for n, _ in upstream.messages] == copies


async def test_a_421_at_mail_is_a_temporary_failure_for_every_recipient(
    cfg: Config, upstream: Upstream, outbound_for: OutboundFactory
) -> None:
    """421 closes the connection (aiosmtplib does): the RSET that follows a refused MAIL then
    fails too, and still nothing raises."""
    upstream.replies["MAIL"] = b"421 4.3.2 shutting down\r\n"
    out = await outbound_for(smarthost_cfg(cfg, upstream.port))
    results = await out.deliver("smarthost", SENDER, BODY, ["b@x.test", "c@x.test"])
    assert [(r.kind, r.reply) for r in results] == [("temp", "421 4.3.2 shutting down")] * 2
    assert upstream.messages == []


async def test_a_peer_that_stops_answering_mid_transaction_is_a_temporary_failure(
    cfg: Config, upstream: Upstream, outbound_for: OutboundFactory
) -> None:
    upstream.hang_at.add((1, "RCPT", 1))
    c = smarthost_cfg(cfg, upstream.port)
    c = dataclasses.replace(
        c, delivery=dataclasses.replace(c.delivery, command_timeout=Duration(0.5))
    )
    out = await outbound_for(c)
    [result] = await out.deliver("smarthost", SENDER, BODY, ["b@x.test"])
    assert result.kind == "temp" and result.reply.startswith("451 4.4.2 ")
    assert "Timed out" in result.reply and upstream.messages == []


# --- MAIL parameters -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "rcpt"),
    [(SENDER, "bø@x.test"), ("ålice@example.com", "b@x.test")],
    ids=["utf8-recipient", "utf8-sender"],
)
async def test_an_utf8_address_on_either_side_uses_smtputf8(
    cfg: Config, upstream: Upstream, outbound_for: OutboundFactory, sender: str, rcpt: str
) -> None:
    out = await outbound_for(smarthost_cfg(cfg, upstream.port))
    [result] = await out.deliver("smarthost", sender, BODY, [rcpt])
    assert result.kind == "ok"
    mail = next(c for c in upstream.commands(1) if c.startswith("MAIL"))
    assert mail == f"MAIL FROM:<{sender}> SIZE={len(BODY)} SMTPUTF8"
    assert f"RCPT TO:<{rcpt}>" in upstream.commands(1)


async def test_an_ascii_envelope_does_not_ask_for_smtputf8(
    cfg: Config, upstream: Upstream, outbound_for: OutboundFactory
) -> None:
    out = await outbound_for(smarthost_cfg(cfg, upstream.port))
    await out.deliver("smarthost", SENDER, BODY, ["b@x.test"])
    assert f"MAIL FROM:<{SENDER}> SIZE={len(BODY)}" in upstream.commands(1)


@pytest.mark.parametrize(
    ("extensions", "body", "mail"),
    [
        (("8BITMIME",), "Grüße\r\n".encode(), f"MAIL FROM:<{SENDER}> BODY=8BITMIME"),
        (("8BITMIME",), b"Hello\r\n", f"MAIL FROM:<{SENDER}>"),
        ((), "Grüße\r\n".encode(), f"MAIL FROM:<{SENDER}>"),
    ],
    ids=["8bit-offered", "7bit-offered", "8bit-not-offered"],
)
async def test_body_8bitmime_only_for_an_8bit_body_when_offered(
    cfg: Config,
    upstream_factory: UpstreamFactory,
    outbound_for: OutboundFactory,
    extensions: tuple[str, ...],
    body: bytes,
    mail: str,
) -> None:
    up = await upstream_factory(extensions=extensions)
    out = await outbound_for(smarthost_cfg(cfg, up.port))
    [result] = await out.deliver("smarthost", SENDER, body, ["b@x.test"])
    assert result.kind == "ok"
    assert [c for c in up.commands(1) if c.startswith("MAIL")] == [mail]


# --- failure reasons -----------------------------------------------------------------------------


async def test_an_unreachable_smarthost_says_why(
    cfg: Config, closed_port: int, outbound_for: OutboundFactory
) -> None:
    out = await outbound_for(smarthost_cfg(cfg, closed_port))
    [result] = await out.deliver("smarthost", SENDER, BODY, ["b@x.test"])
    assert result.kind == "temp"
    assert result.reply.startswith(f"451 4.4.1 Error connecting to 127.0.0.1 on port {closed_port}")


async def test_a_server_that_refuses_ehlo_gets_helo(
    cfg: Config, upstream_factory: UpstreamFactory, outbound_for: OutboundFactory
) -> None:
    """RFC 5321 3.2: an old server answers EHLO with 502; the client falls back to HELO."""
    up = await upstream_factory(ehlo_reply=b"502 5.5.2 EHLO not recognized\r\n")
    out = await outbound_for(smarthost_cfg(cfg, up.port))
    [result] = await out.deliver("smarthost", SENDER, BODY, ["b@x.test"])
    assert result.kind == "ok"
    assert up.commands(1)[:3] == ["EHLO relay.test", "HELO relay.test", f"MAIL FROM:<{SENDER}>"]
    assert len(up.messages) == 1


async def test_smarthost_implicit_tls_is_verified_and_needs_no_starttls(
    cfg: Config,
    upstream_factory: UpstreamFactory,
    outbound_for: OutboundFactory,
    ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """security = "tls" (RFC 8314): TLS from the first byte, certificate verified; the
    connection is already private, so no STARTTLS is asked for (nor refused for lack of it)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    up = await upstream_factory(tls_context=ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # the system trust store, for this test
    out = await outbound_for(smarthost_cfg(cfg, up.port, security="tls"))
    [result] = await out.deliver("smarthost", SENDER, BODY, ["b@x.test"])
    assert (result.kind, result.relay) == ("ok", "127.0.0.1[127.0.0.1]")
    assert up.tls == [True] and "STARTTLS" not in up.commands(1)
    assert len(up.messages) == 1


async def test_a_long_failure_reason_is_cut_to_200_characters(
    dns_cfg: Config,
    dns_server: TestDNSServer,
    upstream_factory: UpstreamFactory,
    outbound_for: OutboundFactory,
) -> None:
    text = "4.7.0 " + "x" * 400
    up = await upstream_factory("127.0.0.2", starttls_reply=f"454 {text}\r\n".encode())
    dns_server.add_mx("example.net", 10, "mx.example.net")
    dns_server.add_a("mx.example.net", "127.0.0.2")
    out = await outbound_for(mx_cfg(dns_cfg, up.port, tls="required"))
    [result] = await out.deliver("example.net", SENDER, BODY, ["b@example.net"])
    prefix = "451 4.7.5 STARTTLS with mx.example.net failed: "
    assert result.reply.startswith(prefix) and "x" * 100 in result.reply
    assert len(result.reply) == len(prefix) + 200


# --- MX routing ------------------------------------------------------------------------------


async def test_mx_mode_routes_every_domain_by_mx(
    dns_cfg: Config,
    dns_server: TestDNSServer,
    upstream_factory: UpstreamFactory,
    outbound_for: OutboundFactory,
) -> None:
    """Only the key "smarthost" means the smarthost; any domain (whatever it sorts after) is
    routed by its MX."""
    up = await upstream_factory("127.0.0.2")
    dns_server.add_a("mx.route.test", "127.0.0.2")
    out = await outbound_for(mx_cfg(dns_cfg, up.port))
    for domain in ("alpha.test", "smarthost.test", "zulu.test"):
        dns_server.add_mx(domain, 10, "mx.route.test")
        [result] = await out.deliver(domain, SENDER, BODY, [f"b@{domain}"])
        assert (result.kind, result.relay) == ("ok", "mx.route.test[127.0.0.2]")


@pytest.fixture
async def mx_chain(
    dns_server: TestDNSServer, upstream_factory: UpstreamFactory
) -> Callable[[int], Awaitable[Upstream]]:
    """``chain(n)``: example.net has n+1 MX hosts, one address each, lowest preference first;
    only the last one listens (the others refuse connections on that port)."""

    async def chain(n: int) -> Upstream:
        up = await upstream_factory(f"127.0.0.{n + 2}")
        for i in range(n + 1):
            dns_server.add_mx("example.net", 10 * (i + 1), f"mx{i}.example.net")
            dns_server.add_a(f"mx{i}.example.net", f"127.0.0.{i + 2}")
        return up

    return chain


async def test_mx_tries_max_addresses_addresses(
    dns_cfg: Config, mx_chain: Callable[[int], Awaitable[Upstream]], outbound_for: OutboundFactory
) -> None:
    up = await mx_chain(MAX_ADDRESSES - 1)  # the last address allowed answers
    out = await outbound_for(mx_cfg(dns_cfg, up.port))
    [result] = await out.deliver("example.net", SENDER, BODY, ["b@example.net"])
    assert (result.kind, result.relay) == ("ok", f"mx{MAX_ADDRESSES - 1}.example.net[{up.host}]")


async def test_mx_gives_up_after_max_addresses_addresses(
    dns_cfg: Config, mx_chain: Callable[[int], Awaitable[Upstream]], outbound_for: OutboundFactory
) -> None:
    up = await mx_chain(MAX_ADDRESSES)  # one address too far
    out = await outbound_for(mx_cfg(dns_cfg, up.port))
    [result] = await out.deliver("example.net", SENDER, BODY, ["b@example.net"])
    assert result.kind == "temp" and result.reply.startswith("451 4.4.1 Error connecting to")
    assert result.relay == f"mx{MAX_ADDRESSES - 1}.example.net"  # the last one tried
    assert up.connections == 0


# --- STARTTLS policy to MX hosts -------------------------------------------------------------


async def test_tls_none_does_not_use_offered_starttls(
    dns_cfg: Config,
    dns_server: TestDNSServer,
    sink_factory: SinkFactory,
    outbound_for: OutboundFactory,
    ca: trustme.CA,
) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.example.net").configure_cert(ctx)
    sink = await sink_factory("127.0.0.2", tls_context=ctx)
    dns_server.add_mx("example.net", 10, "mx.example.net")
    dns_server.add_a("mx.example.net", "127.0.0.2")
    out = await outbound_for(mx_cfg(dns_cfg, sink.port, tls="none"))
    [result] = await out.deliver("example.net", SENDER, BODY, ["b@example.net"])
    assert result.kind == "ok"
    [got] = sink.received
    assert not got.tls


@pytest.fixture
async def starttls_refused(
    dns_server: TestDNSServer, upstream_factory: UpstreamFactory
) -> Upstream:
    """example.net's only MX offers STARTTLS and answers it with a 454."""
    up = await upstream_factory("127.0.0.2", starttls_reply=b"454 4.7.0 TLS not available\r\n")
    dns_server.add_mx("example.net", 10, "mx.example.net")
    dns_server.add_a("mx.example.net", "127.0.0.2")
    return up


async def test_opportunistic_tls_falls_back_to_plain_when_starttls_fails(
    dns_cfg: Config, starttls_refused: Upstream, outbound_for: OutboundFactory
) -> None:
    up = starttls_refused
    out = await outbound_for(mx_cfg(dns_cfg, up.port))
    [result] = await out.deliver("example.net", SENDER, BODY, ["b@example.net"])
    assert (result.kind, result.relay) == ("ok", "mx.example.net[127.0.0.2]")
    assert "STARTTLS" in up.commands(1) and up.messages and up.messages[0][0] == 2
    assert "STARTTLS" not in up.commands(2)  # the retry is plain, as RFC 7435 allows


async def test_required_tls_defers_when_starttls_fails(
    dns_cfg: Config, starttls_refused: Upstream, outbound_for: OutboundFactory
) -> None:
    up = starttls_refused
    out = await outbound_for(mx_cfg(dns_cfg, up.port, tls="required"))
    [result] = await out.deliver("example.net", SENDER, BODY, ["b@example.net"])
    assert result.kind == "temp"
    assert result.reply.startswith("451 4.7.5 STARTTLS with mx.example.net failed: ")
    assert "454" in result.reply and "TLS not available" in result.reply
    assert up.connections == 1 and up.messages == []
