"""Delivery against real SMTP sinks: smarthost and MX routing, outcomes, retries, bounces."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email
import email.policy
import logging
import sqlite3
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

import pytest
import trustme

from relay.clock import ManualClock
from relay.config import Config
from relay.config_sections import SmarthostConfig, SpoolConfig
from relay.delivery.budget import FACTOR
from relay.delivery.outbound import classify
from relay.delivery.scheduler import BACKOFF, DEPTH_INTERVAL, Deliverer, retry_at
from relay.errors import NotFound
from relay.metrics import Metrics
from relay.store import db as db_mod
from relay.store.spool import Spool
from relay.units import Duration, Size
from tests import leaks
from tests.dnsserver import TestDNSServer
from tests.faults.upstream import Upstream
from tests.sink import Received, Sink, SinkFactory

SENDER = "alice@example.com"


def body(subject: str = "hello") -> bytes:
    return (
        f"From: Alice <{SENDER}>\r\nTo: bob@example.net\r\nSubject: {subject}\r\n"
        "Message-ID: <m1@example.com>\r\n\r\nHi Bob.\r\n.leading dot\r\n"
    ).encode()


async def queue(spool: Spool, *recipients: str, sender: str = SENDER) -> str:
    """One message (``body()``) for ``recipients``, submitted by no user; its id."""
    return await spool.enqueue(sender=sender, recipients=list(recipients), body=body(), user=None)


def smarthost_cfg(cfg: Config, sink: Sink, **delivery: object) -> Config:
    """Delivery to ``sink`` as a plain smarthost, short timeouts unless ``delivery`` sets them."""
    timeouts: dict[str, object] = {"connect_timeout": Duration(2), "command_timeout": Duration(5)}
    d = dataclasses.replace(
        cfg.delivery,
        mode="smarthost",
        smarthost=SmarthostConfig(host="127.0.0.1", port=sink.port, security="none"),
        **(timeouts | delivery),  # type: ignore[arg-type]
    )
    return dataclasses.replace(cfg, delivery=d)


def mx_cfg(dns_cfg: Config, port: int, **delivery: object) -> Config:
    d = dataclasses.replace(
        dns_cfg.delivery,
        mode="mx",
        port=port,
        connect_timeout=Duration(2),
        command_timeout=Duration(5),
        **delivery,  # type: ignore[arg-type]
    )
    return dataclasses.replace(dns_cfg, delivery=d)


class Runner(Protocol):
    async def __call__(
        self, cfg: Config, *, start: bool = True, metrics: Metrics | None = None
    ) -> tuple[Spool, Deliverer]: ...


@pytest.fixture
async def run(clock: ManualClock) -> AsyncIterator[Runner]:
    """Open a spool and a deliverer for a config (started unless ``start=False``); at teardown
    the deliverer is stopped, then the spool closed, whatever the test did."""
    opened: list[tuple[Spool, Deliverer]] = []

    async def make(
        cfg: Config, *, start: bool = True, metrics: Metrics | None = None
    ) -> tuple[Spool, Deliverer]:
        spool = await Spool.open(cfg, clock=clock)
        deliverer = Deliverer(spool, cfg, clock=clock, metrics=metrics)
        opened.append((spool, deliverer))
        if start:
            deliverer.start()
        return spool, deliverer

    yield make
    for spool, deliverer in opened:
        try:
            await deliverer.stop()
        finally:
            await spool.close()


async def settle(deliverer: Deliverer) -> None:
    deliverer.wake()
    await deliverer.wait_idle()


def mail_log(caplog: pytest.LogCaptureFixture, prefix: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "relaybox.mail" and r.getMessage().startswith(prefix)
    ]


def parse_dsn(received: Received) -> email.message.EmailMessage:
    msg = email.message_from_bytes(received.data, policy=email.policy.SMTP)
    assert isinstance(msg, email.message.EmailMessage)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    return msg


def dsn_fields(msg: email.message.EmailMessage) -> str:
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    status = parts[1]
    return "\n".join(
        f"{k}: {v}"
        for block in status.get_payload()
        for k, v in block.items()  # type: ignore[union-attr]
    )


# --- smarthost -------------------------------------------------------------------------------


async def test_smarthost_delivers_each_message_once_with_all_recipients(
    cfg: Config, sink: Sink, run: Runner, caplog: pytest.LogCaptureFixture
) -> None:
    spool, deliverer = await run(smarthost_cfg(cfg, sink))
    rcpts = ["bob@example.net", "carol@example.org"]
    ids = [
        await spool.enqueue(sender=SENDER, recipients=rcpts, body=body(f"m{i}"), user="u")
        for i in range(3)
    ]
    await settle(deliverer)
    assert len(sink.received) == 3
    for got in sink.received:
        assert got.mail_from == SENDER and got.rcpt_tos == tuple(rcpts)
        assert got.helo == "relay.test"
    # exact bytes (the sink undoes dot-stuffing), each message once
    assert sorted(got.data for got in sink.received) == [body(f"m{i}") for i in range(3)]
    for msg_id in ids:
        info = await spool.show(msg_id)
        assert [(r.state, r.attempts, r.last_code) for r in info.recipients] == [
            ("delivered", 1, 250)
        ] * 2
        assert info.recipients[0].relay == "127.0.0.1[127.0.0.1]"
        assert info.done_at is not None
    lines = mail_log(caplog, "delivered")
    assert len(lines) == 6
    [line] = [x for x in lines if f"id={ids[0]} to=bob@" in x]
    assert line.startswith(f"delivered id={ids[0]} to=bob@example.net relay=127.0.0.1[127.0.0.1]")
    assert " delay=" in line and line.endswith("attempts=1")


@pytest.mark.parametrize(
    ("per_destination", "messages", "connections_ok"),
    [
        # one slot: one connection, reused across the messages
        (1, 5, lambda sink: sink.connections == 1 and sink.max_active == 1),
        # three slots: more than one at once, never more than three
        (3, 20, lambda sink: 1 < sink.max_active <= 3),
    ],
    ids=["connection-reused", "concurrency-bounded"],
)
async def test_connections_per_destination(
    cfg: Config,
    sink: Sink,
    run: Runner,
    per_destination: int,
    messages: int,
    connections_ok: Callable[[Sink], bool],
) -> None:
    spool, deliverer = await run(smarthost_cfg(cfg, sink, per_destination=per_destination))
    for i in range(messages):
        await spool.enqueue(
            sender=SENDER, recipients=["bob@example.net"], body=body(f"{i}"), user=None
        )
    await settle(deliverer)
    assert len(sink.received) == messages
    assert connections_ok(sink)


async def test_large_bodies_in_flight_are_held_to_the_delivery_memory_budget(
    cfg: Config, sink: Sink, run: Runner
) -> None:
    """delivery.memory_budget: six 2 MiB messages (charged 3x each, 6 MiB) with room for two at
    a time, and small ones beside them that never wait. Every message arrives whole; what was
    held never passed the budget, at least one large body was held, none is held at the end."""
    big = 2 * 1024 * 1024
    budget = 2 * FACTOR * big + big // 2
    spool, deliverer = await run(smarthost_cfg(cfg, sink, memory_budget=Size(budget)))
    bodies = [body(f"big {i}") + (b"x" * 998 + b"\r\n") * (big // 1000) for i in range(6)]
    bodies += [body(f"small {i}") for i in range(5)]
    for b in bodies:
        await spool.enqueue(sender=SENDER, recipients=["bob@example.net"], body=b, user=None)
    await settle(deliverer)
    assert sorted(got.data for got in sink.received) == sorted(bodies)
    assert FACTOR * big <= deliverer.bodies.peak <= budget
    assert deliverer.bodies.used == 0
    assert deliverer.bodies.charge(len(bodies[-1])) == 0  # small: never waits
    assert deliverer.bodies.charge(100 * big) == budget  # larger than it all: goes alone


async def test_deferral_then_success(
    cfg: Config, sink: Sink, run: Runner, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    sink.script_rcpt("bob@example.net", "451 4.3.0 Try again later")
    spool, deliverer = await run(smarthost_cfg(cfg, sink))
    msg_id = await queue(spool, "bob@example.net")
    await settle(deliverer)
    assert sink.received == []
    r = (await spool.show(msg_id)).recipients[0]
    assert (r.state, r.attempts, r.last_code) == ("deferred", 1, 451)
    assert r.last_reply == "451 4.3.0 Try again later"
    assert r.next_attempt_at == clock() + BACKOFF[0]
    [line] = mail_log(caplog, "deferred")
    assert f"id={msg_id}" in line and "reply=451?4.3.0?Try?again?later" in line
    assert f" retry_in={BACKOFF[0]:.0f} " in line
    assert " delay=0.00 " in line

    clock.advance(BACKOFF[0] - 1)
    await settle(deliverer)
    assert sink.received == []  # not due yet
    clock.advance(1)
    await settle(deliverer)
    assert len(sink.received) == 1
    r = (await spool.show(msg_id)).recipients[0]
    assert (r.state, r.attempts, r.last_code) == ("delivered", 2, 250)
    [line] = mail_log(caplog, "delivered")  # the delay counts from queueing, retries included
    assert line.endswith(f" delay={BACKOFF[0]:.2f} attempts=2")


async def test_permanent_refusal_bounces_at_once_with_a_dsn(
    cfg: Config, sink: Sink, run: Runner, caplog: pytest.LogCaptureFixture
) -> None:
    sink.script_rcpt("bob@example.net", "550 5.1.1 No such user here")
    spool, deliverer = await run(smarthost_cfg(cfg, sink))
    msg_id = await queue(spool, "bob@example.net")
    await settle(deliverer)
    r = (await spool.show(msg_id)).recipients[0]
    assert (r.state, r.attempts, r.last_code) == ("bounced", 1, 550)
    [dsn] = sink.received  # the DSN, delivered through the same path
    assert dsn.mail_from == "" and dsn.rcpt_tos == (SENDER,)
    msg = parse_dsn(dsn)
    assert msg["To"].addresses[0].addr_spec == SENDER and msg["Auto-Submitted"] == "auto-replied"
    fields = dsn_fields(msg)
    assert "Final-Recipient: rfc822; bob@example.net" in fields
    assert "Action: failed" in fields and "Status: 5.1.1" in fields
    assert "Diagnostic-Code: smtp; 550 5.1.1 No such user here" in fields
    assert "Remote-MTA: dns; 127.0.0.1" in fields
    headers = list(msg.iter_parts())[2].get_payload()
    assert "Subject: hello" in str(headers)
    assert mail_log(caplog, "bounced")[0].startswith(f"bounced id={msg_id} to=bob@example.net")
    assert len(mail_log(caplog, "bounce queued")) == 1


PERMANENT_500_549 = [
    "500 5.5.2 Syntax error, command unrecognized",
    "501 5.5.4 Syntax error in parameters",
    "503 5.5.1 Bad sequence of commands",
    "521 5.3.2 Host does not accept mail",
    "530 5.7.0 Authentication required",
    "541 5.7.1 Rejected by recipient policy",
    "549 5.7.1 Refused",
]


@pytest.mark.parametrize("stage", ["mail", "rcpt", "data"])
@pytest.mark.parametrize("reply", PERMANENT_500_549, ids=lambda r: r[:3])
async def test_permanent_replies_500_to_549_bounce_at_once(
    cfg: Config, sink: Sink, run: Runner, stage: str, reply: str
) -> None:
    """Any 5xx is permanent (RFC 5321 4.2.1), not only 550-554: no retry, a DSN at once."""
    if stage == "mail":
        sink.script_mail(reply)
    elif stage == "rcpt":
        sink.script_rcpt("bob@example.net", reply)
    else:
        sink.script_data(reply)
    spool, deliverer = await run(smarthost_cfg(cfg, sink))
    msg_id = await queue(spool, "bob@example.net")
    await settle(deliverer)
    r = (await spool.show(msg_id)).recipients[0]
    assert (r.state, r.attempts, r.last_code, r.last_reply) == ("bounced", 1, int(reply[:3]), reply)
    [dsn] = sink.received  # only the DSN: the message itself was refused
    assert dsn.mail_from == "" and dsn.rcpt_tos == (SENDER,)
    fields = dsn_fields(parse_dsn(dsn))
    assert "Action: failed" in fields and f"Diagnostic-Code: smtp; {reply}" in fields


@pytest.mark.parametrize(
    ("code", "kind"),
    [(250, "ok"), (251, "ok"), (421, "temp"), (451, "temp"), (499, "temp")]
    + [(c, "perm") for c in (500, 501, 503, 521, 530, 541, 549, 550, 554, 556, 599)],
)
def test_classify_by_reply_code(code: int, kind: str) -> None:
    result = classify(code, "some  reply\r\n text", "mx.test[192.0.2.1]")
    assert (result.kind, result.code, result.reply) == (kind, code, f"{code} some reply text")


async def test_partial_refusal_bounces_only_the_refused(
    cfg: Config, sink: Sink, run: Runner
) -> None:
    sink.script_rcpt("bad@example.net", "550 5.1.1 unknown")
    sink.script_rcpt("later@example.net", "452 4.2.2 mailbox full")
    spool, deliverer = await run(smarthost_cfg(cfg, sink))
    rcpts = ["ok@example.net", "bad@example.net", "later@example.net"]
    msg_id = await queue(spool, *rcpts)
    await settle(deliverer)
    states = [(r.address, r.state) for r in (await spool.show(msg_id)).recipients]
    assert states == [
        ("ok@example.net", "delivered"),
        ("bad@example.net", "bounced"),
        ("later@example.net", "deferred"),
    ]
    original, dsn = sink.received
    assert original.rcpt_tos == ("ok@example.net",)
    fields = dsn_fields(parse_dsn(dsn))
    assert "bad@example.net" in fields and "later@example.net" not in fields
    assert "ok@example.net" not in fields


async def test_data_replies_apply_to_every_accepted_recipient(
    cfg: Config, sink: Sink, run: Runner
) -> None:
    sink.script_data("451 4.3.0 queue full", "554 5.6.0 content rejected")
    spool, deliverer = await run(smarthost_cfg(cfg, sink))
    msg_id = await queue(spool, "a@example.net", "b@example.net", sender="")
    await settle(deliverer)
    assert [r.state for r in (await spool.show(msg_id)).recipients] == ["deferred"] * 2
    await spool.retry(msg_id, now=0)
    await settle(deliverer)
    info = await spool.show(msg_id)
    assert [(r.state, r.last_code) for r in info.recipients] == [("bounced", 554)] * 2


async def test_expiry_bounces_after_max_age(
    cfg: Config, sink: Sink, run: Runner, clock: ManualClock
) -> None:
    sink.script_rcpt("bob@example.net", *["451 4.3.0 still busy"] * 3)
    spool, deliverer = await run(smarthost_cfg(cfg, sink, max_age=Duration(3600)))
    msg_id = await queue(spool, "bob@example.net")
    await settle(deliverer)
    clock.advance(BACKOFF[0])
    await settle(deliverer)
    r = (await spool.show(msg_id)).recipients[0]
    assert (r.state, r.attempts) == ("deferred", 2)
    assert r.next_attempt_at == clock() + BACKOFF[1]
    clock.advance(3600)  # past max_age: the next temporary failure is final
    await settle(deliverer)
    r = (await spool.show(msg_id)).recipients[0]
    assert (r.state, r.attempts, r.last_code) == ("bounced", 3, 451)
    [dsn] = sink.received
    fields = dsn_fields(parse_dsn(dsn))
    assert "Status: 5.4.7" in fields and "Diagnostic-Code: smtp; 451 4.3.0 still busy" in fields


def test_backoff_schedule_and_deadline() -> None:
    t0, age = 1000.0, 5 * 86400.0
    got = [retry_at(n, t0, t0, age) for n in range(1, 10)]
    assert got == [t0 + s for s in (60, 300, 900, 1800, 3600, 7200, 14400, 14400, 14400)]
    assert retry_at(3, t0, t0 + age - 10, age) == t0 + age  # never past the deadline
    assert retry_at(3, t0, t0 + age, age) is None


async def test_no_bounce_for_a_bounce(
    cfg: Config, sink: Sink, run: Runner, caplog: pytest.LogCaptureFixture
) -> None:
    sink.script_rcpt(SENDER, "550 5.1.1 gone")
    spool, deliverer = await run(smarthost_cfg(cfg, sink))
    msg_id = await queue(spool, SENDER, sender="")
    await settle(deliverer)
    assert (await spool.show(msg_id)).recipients[0].state == "bounced"
    assert sink.received == []
    assert (await spool.stats()).messages == 1  # no DSN was queued
    [line] = mail_log(caplog, "bounce dropped")
    assert f"id={msg_id}" in line and "reason=null-sender" in line


async def test_unreachable_smarthost_defers_then_delivers(
    cfg: Config, sink: Sink, run: Runner, clock: ManualClock
) -> None:
    spool, deliverer = await run(smarthost_cfg(cfg, sink))
    await sink.stop()
    msg_id = await queue(spool, "bob@example.net")
    await settle(deliverer)
    r = (await spool.show(msg_id)).recipients[0]
    assert (
        r.state == "deferred" and r.last_reply is not None and r.last_reply.startswith("451 4.4.1")
    )
    await sink.start()
    clock.advance(BACKOFF[0])
    await settle(deliverer)
    assert len(sink.received) == 1
    assert (await spool.show(msg_id)).recipients[0].state == "delivered"


async def test_stop_hands_back_unstarted_work(cfg: Config, sink: Sink, clock: ManualClock) -> None:
    c = smarthost_cfg(cfg, sink)
    spool = await Spool.open(c, clock=clock)
    try:
        msg_id = await queue(spool, "b@example.net")
        deliverer = Deliverer(spool, c, clock=clock)
        await deliverer.stop()  # never started: nothing claimed, nothing lost
        assert (await spool.show(msg_id)).recipients[0].state == "queued"
        deliverer = Deliverer(spool, c, clock=clock)
        deliverer.start()
        await settle(deliverer)
        await deliverer.stop()
        assert len(sink.received) == 1
        assert not any(r.in_flight for r in (await spool.show(msg_id)).recipients)
    finally:
        await spool.close()


@pytest.fixture(scope="module")
def sink_ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx


SMARTHOST_PASSWORD = "smarthost-secret-pw"


@pytest.fixture
async def auth_smarthost(
    sink_factory: SinkFactory, sink_ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Sink:
    """A smarthost with STARTTLS and AUTH (relayuser, SMARTHOST_PASSWORD), its certificate
    trusted through SSL_CERT_FILE (the system trust store, for this test)."""
    password = leaks.add(SMARTHOST_PASSWORD)
    relay = await sink_factory(
        tls_context=server_context(sink_ca, "127.0.0.1"), credentials=("relayuser", password)
    )
    ca_file = tmp_path / "ca.pem"
    sink_ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    return relay


def login_cfg(cfg: Config, relay: Sink, password: str) -> Config:
    """Delivery to ``relay`` over STARTTLS, logging in as relayuser with ``password``."""
    sh = SmarthostConfig("127.0.0.1", relay.port, "starttls", "relayuser", password)
    c = smarthost_cfg(cfg, relay)
    return dataclasses.replace(c, delivery=dataclasses.replace(c.delivery, smarthost=sh))


async def test_smarthost_starttls_verified_with_auth(
    cfg: Config, auth_smarthost: Sink, run: Runner
) -> None:
    relay = auth_smarthost
    spool, deliverer = await run(login_cfg(cfg, relay, SMARTHOST_PASSWORD))
    msg_id = await queue(spool, "b@example.net")
    await settle(deliverer)
    [got] = relay.received
    assert got.tls and relay.logins == [("relayuser", True)]
    assert (await spool.show(msg_id)).recipients[0].state == "delivered"


async def test_smarthost_bad_password_or_untrusted_cert_defers(
    cfg: Config, auth_smarthost: Sink, run: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = auth_smarthost
    c = login_cfg(cfg, relay, leaks.add("a-wrong-password"))
    spool, deliverer = await run(c)
    msg_id = await queue(spool, "b@example.net")
    await settle(deliverer)
    r = (await spool.show(msg_id)).recipients[0]
    assert (r.state, r.last_code) == ("deferred", 535)  # our configuration, not the mail: defer
    tries = len(relay.logins)  # aiosmtplib tries each offered mechanism
    assert tries >= 1 and relay.logins == [("relayuser", False)] * tries
    assert relay.received == []

    monkeypatch.delenv("SSL_CERT_FILE")  # now the sink's certificate is not trusted
    c2 = dataclasses.replace(c, state_dir=cfg.state_dir / "untrusted")
    spool2, deliverer2 = await run(c2)
    msg2 = await queue(spool2, "b@example.net")
    await settle(deliverer2)
    r = (await spool2.show(msg2)).recipients[0]
    assert r.state == "deferred" and r.last_reply is not None
    assert r.last_reply.startswith("451 4.7.5 STARTTLS with 127.0.0.1 failed")
    assert len(relay.logins) == tries  # no password sent over an unverified channel


# --- MX routing ------------------------------------------------------------------------------


async def test_mx_mode_prefers_the_lowest_preference_and_falls_back(
    dns_cfg: Config,
    dns_server: TestDNSServer,
    sink_factory: SinkFactory,
    run: Runner,
    clock: ManualClock,
) -> None:
    primary = await sink_factory("127.0.0.2")
    backup = await sink_factory("127.0.0.3", primary.port)
    other = await sink_factory("127.0.0.4", primary.port)
    dns_server.add_mx("example.net", 10, "mx1.example.net")
    dns_server.add_mx("example.net", 20, "mx2.example.net")
    dns_server.add_a("mx1.example.net", "127.0.0.2")
    dns_server.add_a("mx2.example.net", "127.0.0.3")
    dns_server.add_a("example.org", "127.0.0.4")  # no MX: the implicit MX (RFC 5321 5.1)
    spool, deliverer = await run(mx_cfg(dns_cfg, primary.port))

    rcpts = ["a@example.net", "b@EXAMPLE.net", "c@example.org"]
    msg_id = await queue(spool, *rcpts)
    await settle(deliverer)
    assert [r.rcpt_tos for r in primary.received] == [("a@example.net", "b@EXAMPLE.net")]
    assert [r.rcpt_tos for r in other.received] == [("c@example.org",)]
    assert backup.received == []
    relays = {r.address: r.relay for r in (await spool.show(msg_id)).recipients}
    assert relays["a@example.net"] == "mx1.example.net[127.0.0.2]"
    assert relays["c@example.org"] == "example.org[127.0.0.4]"

    await primary.stop()
    await queue(spool, "d@example.net")
    await settle(deliverer)
    assert [r.rcpt_tos for r in backup.received] == [("d@example.net",)]


async def test_null_mx_bounces_at_once(
    dns_cfg: Config, dns_server: TestDNSServer, sink_factory: SinkFactory, run: Runner
) -> None:
    home = await sink_factory("127.0.0.2")
    dns_server.add_mx("nomail.test", 0, ".")  # RFC 7505
    dns_server.add_mx("example.com", 10, "mx.example.com")
    dns_server.add_a("mx.example.com", "127.0.0.2")
    spool, deliverer = await run(mx_cfg(dns_cfg, home.port))
    msg_id = await queue(spool, "x@nomail.test")
    await settle(deliverer)
    r = (await spool.show(msg_id)).recipients[0]
    assert (r.state, r.last_code) == ("bounced", 556)
    [dsn] = home.received  # the DSN went to the sender's domain
    assert dsn.rcpt_tos == (SENDER,)
    assert "Status: 5.1.10" in dsn_fields(parse_dsn(dsn))


async def test_dns_failure_defers_and_unknown_domain_bounces(
    dns_cfg: Config, dns_server: TestDNSServer, sink_factory: SinkFactory, run: Runner
) -> None:
    home = await sink_factory("127.0.0.2")
    dns_server.servfail("broken.test")
    dns_server.add_mx("example.com", 10, "mx.example.com")
    dns_server.add_a("mx.example.com", "127.0.0.2")
    spool, deliverer = await run(mx_cfg(dns_cfg, home.port))
    msg_id = await queue(spool, "x@broken.test", "y@nxdomain.test")
    await settle(deliverer)
    broken, missing = (await spool.show(msg_id)).recipients
    assert (broken.state, broken.last_code) == ("deferred", 451)
    assert (missing.state, missing.last_code) == ("bounced", 550)


async def test_opportunistic_starttls_is_used_when_offered(
    dns_cfg: Config,
    dns_server: TestDNSServer,
    sink_factory: SinkFactory,
    run: Runner,
    sink_ca: trustme.CA,
) -> None:
    tls_sink = await sink_factory(
        "127.0.0.2", tls_context=server_context(sink_ca, "mx.example.net")
    )
    dns_server.add_mx("example.net", 10, "mx.example.net")
    dns_server.add_a("mx.example.net", "127.0.0.2")
    spool, deliverer = await run(mx_cfg(dns_cfg, tls_sink.port))
    await queue(spool, "a@example.net")
    await settle(deliverer)
    [got] = tls_sink.received
    assert got.tls  # an unverified (self-signed) certificate does not stop opportunistic TLS


async def test_required_tls_defers_when_not_offered(
    dns_cfg: Config, dns_server: TestDNSServer, sink_factory: SinkFactory, run: Runner
) -> None:
    plain = await sink_factory("127.0.0.2")
    dns_server.add_mx("example.net", 10, "mx.example.net")
    dns_server.add_a("mx.example.net", "127.0.0.2")
    spool, deliverer = await run(mx_cfg(dns_cfg, plain.port, tls="required"))
    msg_id = await queue(spool, "a@example.net")
    await settle(deliverer)
    assert plain.received == []
    r = (await spool.show(msg_id)).recipients[0]
    assert r.state == "deferred" and r.last_reply is not None and "4.7.4" in r.last_reply


@pytest.fixture(autouse=True)
def _quiet_aiosmtpd(caplog: pytest.LogCaptureFixture) -> None:
    logging.getLogger("mail.log").setLevel(logging.WARNING)


async def test_metrics_count_outcomes_and_queue_depth(cfg: Config, sink: Sink, run: Runner) -> None:
    sink.script_rcpt("later@example.net", "451 4.3.0 later")
    sink.script_rcpt("bad@example.net", "550 5.1.1 unknown")
    metrics = Metrics()
    spool, deliverer = await run(smarthost_cfg(cfg, sink), start=False, metrics=metrics)
    rcpts = ["ok@example.net", "later@example.net", "bad@example.net"]
    await queue(spool, *rcpts, sender="")
    deliverer.start()
    await settle(deliverer)
    await deliverer.stop()  # the depth gauge is refreshed on the loop's next turn: restart
    deliverer.start()
    await settle(deliverer)
    text = metrics.render().decode()
    for outcome in ("delivered", "deferred", "bounced"):
        assert f'relaybox_recipients_total{{outcome="{outcome}"}} 1.0' in text
    assert 'relaybox_queue_depth{state="deferred"} 1.0' in text
    assert "relaybox_delivery_latency_seconds_count 1.0" in text


async def test_the_queue_depth_gauge_is_refreshed_at_most_every_depth_interval(
    cfg: Config, sink: Sink, run: Runner
) -> None:
    """The gauge costs a query: taken on the loop's first turn, then not again for
    DEPTH_INTERVAL (monotonic time), however often the loop turns meanwhile."""
    sink.script_rcpt("later@example.net", "451 4.3.0 later")
    metrics = Metrics()
    spool, deliverer = await run(smarthost_cfg(cfg, sink), start=False, metrics=metrics)
    started = time.monotonic()
    deliverer.start()
    await settle(deliverer)  # first turn: the empty queue
    await queue(spool, "later@example.net", sender="")
    await settle(deliverer)  # deferred, and the loop turned again since
    assert (await spool.depth())["deferred"] == 1
    text = metrics.render().decode()
    if time.monotonic() - started < DEPTH_INTERVAL:  # only an upper bound can make it due
        assert 'relaybox_queue_depth{state="deferred"} 0.0' in text


async def test_done_messages_are_purged_by_the_hourly_sweep_once_past_retention(
    cfg: Config, sink: Sink, run: Runner, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    c = smarthost_cfg(cfg, sink)
    c = dataclasses.replace(c, spool=SpoolConfig(retention=Duration(60)))
    spool, deliverer = await run(c)  # the first sweep runs on the loop's first turn
    msg_id = await queue(spool, "b@example.net")
    await settle(deliverer)
    assert (await spool.show(msg_id)).done_at == clock()
    clock.advance(3600 - 1)  # long past retention, but the next (hourly) sweep is not due
    await settle(deliverer)
    assert (await spool.show(msg_id)).recipients[0].state == "delivered"
    clock.advance(1)  # exactly an hour after the first sweep
    await settle(deliverer)
    with pytest.raises(NotFound):
        await spool.show(msg_id)
    assert any(
        r.getMessage() == "spool purge: 1 message(s) past retention removed" for r in caplog.records
    )


def sink_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The command lines the sinks read (aiosmtpd logs each at INFO on "mail.log")."""
    return [r.getMessage() for r in caplog.records if r.name == "mail.log" and " >> " in r.msg]


async def test_stop_quits_the_pooled_connections(
    cfg: Config, sink: Sink, run: Runner, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mail.log")
    spool, deliverer = await run(smarthost_cfg(cfg, sink))
    await queue(spool, "b@example.net")
    await settle(deliverer)
    assert len(sink.received) == 1
    assert not any("QUIT" in line for line in sink_lines(caplog))  # kept open for reuse
    await deliverer.stop()  # returns once the 221 came back: the sink has read the QUIT
    assert "QUIT" in sink_lines(caplog)[-1]


@pytest.fixture
async def held(run: Runner) -> AsyncIterator[Upstream]:
    """An upstream that answers each MAIL FROM only when the test lets one through. It depends
    on ``run`` so that it is released and stopped first at teardown: no deliverer is left
    draining a held job."""
    server = Upstream(extensions=("8BITMIME",), hold_mail=True)
    await server.start()
    yield server
    await server.stop()  # releases whatever still waits


def held_cfg(cfg: Config, server: Upstream, **delivery: object) -> Config:
    d = dataclasses.replace(
        cfg.delivery,
        mode="smarthost",
        smarthost=SmarthostConfig(host=server.host, port=server.port, security="none"),
        connect_timeout=Duration(2),
        command_timeout=Duration(30),
        **delivery,  # type: ignore[arg-type]
    )
    return dataclasses.replace(cfg, delivery=d)


async def test_stop_without_a_drain_window_hands_back_running_and_waiting_jobs(
    cfg: Config, held: Upstream, run: Runner, caplog: pytest.LogCaptureFixture
) -> None:
    """One transaction held open upstream, one job waiting for the destination's only slot:
    stop(timeout=0) cancels both, hands both recipients back unattempted, and logs no error."""
    spool, deliverer = await run(held_cfg(cfg, held, per_destination=1), start=False)
    ids = [await queue(spool, f"r{i}@example.net") for i in range(2)]
    deliverer.start()
    deliverer.wake()
    await held.wait_for(lambda h: h.held == 1)  # one MAIL waits; the other job, for the slot
    await deliverer.stop(timeout=0)
    for msg_id in ids:
        [r] = (await spool.show(msg_id)).recipients
        assert (r.state, r.attempts, r.in_flight) == ("queued", 0, False)
    assert len(held.senders) == 1 and held.messages == []
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def one_running_one_waiting(
    cfg: Config, held: Upstream, run: Runner
) -> tuple[Spool, Deliverer, dict[str, str], str, str]:
    """Two messages to one destination with one slot: the running one's MAIL waits upstream,
    the other job, claimed with it, waits for the slot. (spool, deliverer, message ids by
    sender, the running sender, the waiting sender.)"""
    spool, deliverer = await run(held_cfg(cfg, held, per_destination=1), start=False)
    senders = ["first@example.com", "second@example.com"]
    ids = {s: await queue(spool, "r@example.net", sender=s) for s in senders}
    deliverer.start()
    deliverer.wake()
    await held.wait_for(lambda h: h.held == 1)
    [running] = held.senders
    [waiting] = [s for s in senders if s != running]
    return spool, deliverer, ids, running, waiting


async def test_stop_lets_the_started_transaction_finish_and_hands_back_the_waiting_job(
    cfg: Config, held: Upstream, run: Runner
) -> None:
    spool, deliverer, ids, running, waiting = await one_running_one_waiting(cfg, held, run)
    # Let the started transaction go on only once stop() has ended the waiting job (the
    # deliverer names each job's task after its message).
    [task] = [t for t in asyncio.all_tasks() if t.get_name() == f"deliver-{ids[waiting]}"]
    task.add_done_callback(lambda _t: held.release_all())
    await deliverer.stop()  # the default drain window: the started transaction finishes
    [r] = (await spool.show(ids[running])).recipients
    assert (r.state, r.attempts) == ("delivered", 1)
    [w] = (await spool.show(ids[waiting])).recipients
    assert (w.state, w.attempts, w.in_flight) == ("queued", 0, False)
    assert held.senders == [running] and len(held.messages) == 1


async def test_a_message_deleted_while_its_job_waits_for_a_slot_is_not_delivered(
    cfg: Config, held: Upstream, run: Runner
) -> None:
    """A job reads its message once it has a slot, so a `queue delete` made while it waited
    holds (the operator's way to stop a message: it must not go out)."""
    spool, deliverer, ids, running, waiting = await one_running_one_waiting(cfg, held, run)
    await spool.delete(ids[waiting])
    held.release_all()
    await settle(deliverer)
    [r] = (await spool.show(ids[running])).recipients
    assert r.state == "delivered"
    assert held.senders == [running] and len(held.messages) == 1
    with pytest.raises(NotFound):
        await spool.show(ids[waiting])


async def test_a_job_claimed_later_waits_for_the_destination_slot(
    dns_cfg: Config,
    dns_server: TestDNSServer,
    sink_factory: SinkFactory,
    run: Runner,
) -> None:
    """per_destination=1 holds for jobs claimed while earlier ones of the destination still run
    or wait, not only for those claimed together."""
    gated = Upstream("127.0.0.2", extensions=("8BITMIME",), hold_mail=True)
    await gated.start()
    try:
        other = await sink_factory("127.0.0.3", gated.port)
        dns_server.add_mx("gated.test", 10, "mx.gated.test")
        dns_server.add_a("mx.gated.test", "127.0.0.2")
        dns_server.add_a("other.test", "127.0.0.3")
        spool, deliverer = await run(mx_cfg(dns_cfg, gated.port, per_destination=1))
        for rcpt in ("a@gated.test", "b@gated.test"):
            await queue(spool, rcpt)
        deliverer.wake()
        await gated.wait_for(lambda g: g.held == 1)  # a's MAIL; b waits for the slot
        # Queued meanwhile, claimed once a is done (its job's end wakes the loop): c must wait
        # for b, d (another destination) goes at once and marks when c would have started.
        for rcpt in ("c@gated.test", "d@other.test"):
            await queue(spool, rcpt)
        gated.release()
        await other.wait_received(1)
        gated.release_all()
        await settle(deliverer)
        assert len(gated.messages) == 3 and gated.max_open == 1
    finally:
        await gated.stop()  # releases whatever still waits


async def test_an_unexpected_error_while_delivering_defers_instead_of_stranding(
    cfg: Config, sink: Sink, run: Runner, caplog: pytest.LogCaptureFixture
) -> None:
    """aiosmtplib refuses to put an address with a space on a command line (ValueError, which
    outbound does not expect): the recipient is deferred with a 451, not left claimed."""
    spool, deliverer = await run(smarthost_cfg(cfg, sink))
    msg_id = await queue(spool, "bad address@example.net")
    await settle(deliverer)
    [r] = (await spool.show(msg_id)).recipients
    assert (r.state, r.attempts, r.in_flight) == ("deferred", 1, False)
    assert r.last_reply == "451 4.3.0 internal error in delivery"
    assert any(
        rec.getMessage() == f"delivery of {msg_id} failed unexpectedly" for rec in caplog.records
    )
    assert sink.received == []


class _Seen(logging.Handler):
    """Sets an event when a log message starting with ``prefix`` is emitted (in the loop's
    thread, where the deliverer logs): waiting for a log line, not for a time."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(self.prefix):
            self.event.set()


@contextlib.asynccontextmanager
async def locked_until_logged(c: Config, prefix: str) -> AsyncIterator[None]:
    """Hold the spool's write lock (BEGIN IMMEDIATE, as a long CLI transaction would) from the
    start of the block until, after it, the delivery logger says something starting with
    ``prefix``; then let go. Waiting for the log line, not for a time."""
    seen = _Seen(prefix)
    logger = logging.getLogger("relaybox.delivery")
    logger.addHandler(seen)
    lock = sqlite3.connect(c.spool_path(0), isolation_level=None, timeout=0)
    try:
        lock.execute("BEGIN IMMEDIATE")
        yield
        async with asyncio.timeout(10):
            await seen.event.wait()
        lock.execute("ROLLBACK")
    finally:
        lock.close()
        logger.removeHandler(seen)


async def test_recipients_whose_outcome_could_not_be_written_are_handed_back(
    cfg: Config, held: Upstream, run: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool is locked (a long CLI transaction) when the outcome is written: the recipient
    is not left claimed until a restart; once the store answers again it is delivered (again:
    at least once)."""
    monkeypatch.setattr(db_mod, "BUSY_TIMEOUT_MS", 200)  # give up on the lock quickly
    c = held_cfg(cfg, held)
    spool, deliverer = await run(c, start=False)
    msg_id = await queue(spool, "r@example.net")
    deliverer.start()
    deliverer.wake()
    await held.wait_for(lambda h: h.held == 1)
    async with locked_until_logged(c, "could not record delivery outcomes"):
        held.release_all()
    await settle(deliverer)
    [r] = (await spool.show(msg_id)).recipients
    assert (r.state, r.attempts, r.in_flight) == ("delivered", 1, False)
    assert len(held.messages) == 2


async def test_the_deliverer_claims_up_to_twice_its_concurrency(
    cfg: Config, held: Upstream, run: Runner
) -> None:
    """concurrency=1: one job runs, one more is claimed and waits for the slot, the rest stay
    queued (due, not in flight) until there is room."""
    spool, deliverer = await run(held_cfg(cfg, held, concurrency=1), start=False)
    for i in range(4):
        await queue(spool, f"r{i}@example.net")
    deliverer.start()
    await held.wait_for(lambda h: h.held == 1)
    stats = await spool.stats()
    assert stats.in_flight == 2 and stats.recipients["queued"] == 4
    held.release_all()
    await settle(deliverer)
    assert len(held.messages) == 4 and held.max_open == 1
    assert (await spool.stats()).recipients["delivered"] == 4


async def test_a_locked_spool_pauses_the_loop_and_it_carries_on_afterwards(
    cfg: Config, sink: Sink, run: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop's own spool writes (purge, claim) fail while a CLI transaction holds the lock:
    logged, and the loop goes on; once the lock is gone the queued mail is delivered."""
    monkeypatch.setattr(db_mod, "BUSY_TIMEOUT_MS", 200)
    c = smarthost_cfg(cfg, sink)
    spool, deliverer = await run(c, start=False)
    msg_id = await queue(spool, "r@example.net")
    async with locked_until_logged(c, "delivery: spool unavailable"):
        deliverer.start()
    await settle(deliverer)
    assert (await spool.show(msg_id)).recipients[0].state == "delivered"
    assert len(sink.received) == 1
