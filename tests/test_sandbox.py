"""Sandbox domains: verified without DNS, their mail captured into the local inbox, never out.

End to end through the real server (in this loop, port 0) with smtplib and with the real swaks,
then the real `relaybox` console script reads the inbox (`inbox list/show --json`, the DKIM check
against the domain's key in the store). Whatever ``delivery.mode`` says (mx, smarthost), a
recipient outside the allow list never reaches the upstream sink, which is set up so that it WOULD
receive the message were it sent out; an allowed recipient is delivered there. Then the spool's
mark alone decides (a queued message stays captured whatever becomes of its domain), the bound,
the DSN of a sandbox message, the recheck, and the CLI's markers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import smtplib
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from admin.cli import cli
from relay import config as config_mod
from relay import dnscheck
from relay.clock import ManualClock
from relay.config import Config
from relay.config_sections import SandboxConfig, SmarthostConfig
from relay.delivery.scheduler import Deliverer
from relay.dkim import Signer
from relay.errors import Conflict, Invalid, NotFound
from relay.service import doctor
from relay.store import domains, inbox, sandbox
from relay.store.db import MAIN_MIGRATIONS, Database, Migration
from relay.store.engine import SqliteStore, Store
from relay.store.inbox import Inbox
from relay.store.spool import Spool
from relay.units import Duration
from tests import leaks, procs
from tests.dnsserver import TestDNSServer
from tests.relayserver import RelayHandle, start_relay
from tests.sink import Sink
from tests.userhelpers import make_domain

DOMAIN = "try.local"
LOGIN = f"app@{DOMAIN}"
OUTSIDE = "someone@dest.test"
ALLOWED = "me@dest.test"
CONSOLE = Path(sys.executable).parent / "relaybox"


def message(to: str = OUTSIDE, subject: str = "first message") -> str:
    return (
        f"From: App <{LOGIN}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n\r\n"
        "Hello from the sandbox.\r\n.a line with a leading dot\r\n"
    )


def smtplib_send(port: int, ctx: ssl.SSLContext, password: str, rcpts: list[str]) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.test")
        s.starttls(context=ctx)
        s.ehlo("client.test")
        s.login(LOGIN, password)
        s.mail(LOGIN)
        for r in rcpts:
            s.rcpt(r)
        code, text = s.data(message(rcpts[0]))
    assert code == 250, (code, text)
    return text.decode().split()[-1]


async def run(*argv: str) -> tuple[int, str, str]:
    if shutil.which(argv[0]) is None:
        pytest.fail(f"{argv[0]} is not installed (scripts/test installs it with apt-get)")
    proc = await procs.spawn(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


Cli = Callable[..., Awaitable[Any]]


@pytest.fixture
def cli_json(cfg: Config, tmp_path: Path) -> Cli:
    """The real console script on the test's state dir; returns the parsed --json output."""
    conf = tmp_path / "cli.toml"
    conf.write_text(f'state_dir = "{cfg.state_dir}"\n')

    async def invoke(*args: str) -> Any:
        rc, out, err = await run(str(CONSOLE), "--config", str(conf), *args, "--json")
        assert rc == 0, err
        return json.loads(out)

    return invoke


def relay_config(relay_cfg: Config, dns_cfg: Config, sink: Sink, mode: str) -> Config:
    """Delivery on; in both modes the sink is where an outside recipient's mail WOULD go."""
    delivery = dataclasses.replace(
        relay_cfg.delivery,
        paused=False,
        mode=mode,
        port=sink.port,
        connect_timeout=Duration(2),
        smarthost=SmarthostConfig(host="127.0.0.1", port=sink.port, security="none"),
    )
    return dataclasses.replace(relay_cfg, dns=dns_cfg.dns, delivery=delivery)


@pytest.fixture(params=["mx", "smarthost"])
async def box(
    request: pytest.FixtureRequest,
    relay_cfg: Config,
    dns_cfg: Config,
    dns_server: TestDNSServer,
    sink: Sink,
    tls_files: tuple[Path, Path, Path],
    clock: ManualClock,
) -> AsyncIterator[tuple[RelayHandle, str]]:
    """A relay delivering in mx or smarthost mode, a sandbox domain allowing ALLOWED, a user
    (its password)."""
    dns_server.add_mx("dest.test", 10, "mx.dest.test")
    dns_server.add_a("mx.dest.test", "127.0.0.1")
    relay = await start_relay(relay_config(relay_cfg, dns_cfg, sink, request.param), tls_files[2])
    try:
        assert relay.server.db is not None
        await sandbox.add(
            relay.server.db, DOMAIN, allow_rcpt=[ALLOWED], cfg=relay.server.cfg, now=clock(),
            actor="test",
        )  # fmt: skip
        relay.server.acceptor.forget()
        yield relay, await relay.add_user(LOGIN)
    finally:
        await relay.server.shutdown()
        relay.close()


async def settle(relay: RelayHandle) -> None:
    assert relay.server.deliverer is not None
    relay.server.deliverer.wake()
    await relay.server.deliverer.wait_idle()


def mail_log(caplog: pytest.LogCaptureFixture, prefix: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "relaybox.mail" and r.getMessage().startswith(prefix)
    ]


# --- end to end ---------------------------------------------------------------------------------


async def test_smtplib_into_the_inbox_and_never_out(
    box: tuple[RelayHandle, str], sink: Sink, cli_json: Cli, caplog: pytest.LogCaptureFixture
) -> None:
    relay, password = box
    queue_id = await asyncio.to_thread(
        smtplib_send, relay.starttls_port, relay.client_context(), password, [OUTSIDE]
    )
    await settle(relay)
    assert sink.connections == 0 and sink.received == []
    assert relay.server.spool is not None
    shown = await relay.server.spool.show(queue_id)
    assert [(r.state, r.relay) for r in shown.recipients] == [("delivered", "inbox")]
    assert mail_log(caplog, "sandbox ") == [
        f"sandbox id={queue_id} domain={DOMAIN} captured=1 allowed=0"
    ]
    [delivered] = mail_log(caplog, "delivered ")
    assert f"id={queue_id} to={OUTSIDE} relay=inbox " in delivered
    metrics = relay.server.metrics.render().decode()
    assert "relaybox_sandbox_messages_total 1.0" in metrics
    assert "relaybox_sandbox_captured_total 1.0" in metrics

    [listed] = await cli_json("inbox", "list")
    assert listed["queue_id"] == queue_id
    assert (listed["domain"], listed["from"], listed["to"]) == (DOMAIN, LOGIN, [OUTSIDE])
    assert listed["subject"] == "first message"
    shown_json = await cli_json("inbox", "show", str(listed["id"]))
    assert shown_json["dkim"] == {
        "result": "pass", "domain": DOMAIN, "selector": "relaybox", "reason": "",
    }  # fmt: skip
    names = [h["name"].lower() for h in shown_json["headers"]]
    assert not [h for h in shown_json["headers"] if set(h["value"]) & set("\r\n\t")]  # unfolded
    assert names[0] == "dkim-signature" and "received" in names and "subject" in names
    assert shown_json["body"] == "Hello from the sandbox.\r\n.a line with a leading dot\r\n"


async def test_swaks_into_the_inbox(
    box: tuple[RelayHandle, str], sink: Sink, cli_json: Cli
) -> None:
    relay, password = box
    rc, out, err = await run(
        "swaks",
        "--server", "127.0.0.1", "--port", str(relay.starttls_port),
        "--tls", "--tls-verify", "--tls-ca-path", str(relay.ca_path),
        "--auth", "PLAIN", "--auth-user", LOGIN, "--auth-password", password,
        "--from", LOGIN, "--to", OUTSIDE, "--h-From", LOGIN, "--h-Subject", "from swaks",
        "--ehlo", "client.test", "--timeout", "20",
    )  # fmt: skip
    assert rc == 0, out + err
    assert "250 2.0.0 queued as" in out
    await settle(relay)
    assert sink.connections == 0
    [listed] = await cli_json("inbox", "list")
    assert (listed["to"], listed["subject"]) == ([OUTSIDE], "from swaks")
    shown = await cli_json("inbox", "show", str(listed["id"]))
    assert shown["dkim"]["result"] == "pass", shown["dkim"]


async def test_an_allowed_recipient_is_delivered_the_others_captured(
    box: tuple[RelayHandle, str], sink: Sink, cli_json: Cli
) -> None:
    relay, password = box
    await asyncio.to_thread(
        smtplib_send, relay.starttls_port, relay.client_context(), password,
        [ALLOWED, OUTSIDE, "other@elsewhere.test"],
    )  # fmt: skip
    (got,) = await sink.wait_received(1)
    assert got.rcpt_tos == (ALLOWED,)
    assert got.data.startswith(b"DKIM-Signature:")
    await settle(relay)
    assert len(sink.received) == 1
    [listed] = await cli_json("inbox", "list")
    assert listed["to"] == [OUTSIDE, "other@elsewhere.test"]


async def test_a_changed_allow_list_applies_to_mail_accepted_after_it(
    box: tuple[RelayHandle, str], sink: Sink, clock: ManualClock
) -> None:
    relay, password = box
    assert relay.server.db is not None
    await sandbox.set_allowed(relay.server.db, DOMAIN, clear=True, now=clock(), actor="test")
    relay.server.acceptor.forget()
    await asyncio.to_thread(
        smtplib_send, relay.starttls_port, relay.client_context(), password, [ALLOWED]
    )
    await settle(relay)
    assert sink.connections == 0


async def test_the_recheck_leaves_the_sandbox_domain_verified_and_sending(
    box: tuple[RelayHandle, str], clock: ManualClock
) -> None:
    relay, password = box
    assert relay.server.db is not None
    for _ in range(3):  # nothing is published for try.local: a checked domain would fail
        clock.advance(2 * float(relay.server.cfg.dns.failure_grace))
        await relay.server.recheck_domains()
    d = await domains.get(relay.server.db, DOMAIN)
    assert d is not None and (d.state, d.sandbox, d.last_checked_at, d.checks) == (
        "verified",
        True,
        None,
        (),
    )
    await asyncio.to_thread(
        smtplib_send, relay.starttls_port, relay.client_context(), password, [OUTSIDE]
    )


# --- delivery reads the spool's mark only -------------------------------------------------------


def smarthost_cfg(cfg: Config, sink: Sink, **sandbox_keys: Any) -> Config:
    delivery = dataclasses.replace(
        cfg.delivery,
        mode="smarthost",
        smarthost=SmarthostConfig(host="127.0.0.1", port=sink.port, security="none"),
        connect_timeout=Duration(2),
    )
    return dataclasses.replace(
        cfg, delivery=delivery, sandbox=dataclasses.replace(cfg.sandbox, **sandbox_keys)
    )


Deliver = Callable[[Config], Awaitable[tuple[Spool, Deliverer]]]


@pytest.fixture
async def deliver(clock: ManualClock) -> AsyncIterator[Deliver]:
    """A spool and a started deliverer for a config; both stopped at teardown."""
    opened: list[tuple[Spool, Deliverer]] = []

    async def make(cfg: Config) -> tuple[Spool, Deliverer]:
        spool = await Spool.open(cfg, clock=clock)
        deliverer = Deliverer(spool, cfg, clock=clock)
        opened.append((spool, deliverer))
        deliverer.start()
        return spool, deliverer

    yield make
    for spool, deliverer in opened:
        await deliverer.stop()
        await spool.close()


async def idle(deliverer: Deliverer) -> None:
    """Until nothing is due and no job runs (a DSN queued by a job is due before it ends)."""
    deliverer.wake()
    await deliverer.wait_idle()


async def test_a_queued_sandbox_message_is_captured_with_no_domain_left_at_all(
    cfg: Config, sink: Sink, deliver: Deliver
) -> None:
    """No domains table is read: a message queued as a sandbox one stays captured whatever its
    domain became since (removed, or added again as an ordinary domain)."""
    conf = smarthost_cfg(cfg, sink)
    spool, deliverer = await deliver(conf)
    msg_id = await spool.enqueue(
        sender=LOGIN, recipients=[OUTSIDE, ALLOWED], body=message().encode(), user=LOGIN,
        sandbox=DOMAIN, allowed=frozenset({ALLOWED}),
    )  # fmt: skip
    await idle(deliverer)
    (got,) = await sink.wait_received(1)
    assert got.rcpt_tos == (ALLOWED,)
    box = await Inbox.open(conf)
    try:
        [kept] = await box.list_all()
        assert (kept.queue_id, kept.domain, kept.recipients) == (msg_id, DOMAIN, (OUTSIDE,))
    finally:
        await box.close()


async def test_the_dsn_of_a_sandbox_message_is_captured_too(
    cfg: Config, sink: Sink, deliver: Deliver
) -> None:
    sink.script_rcpt(ALLOWED, "550 5.1.1 no such user")
    conf = smarthost_cfg(cfg, sink)
    spool, deliverer = await deliver(conf)
    msg_id = await spool.enqueue(
        sender=LOGIN, recipients=[ALLOWED], body=message(ALLOWED).encode(), user=LOGIN,
        sandbox=DOMAIN, allowed=frozenset({ALLOWED}),
    )  # fmt: skip
    await idle(deliverer)
    assert [r.state for r in (await spool.show(msg_id)).recipients] == ["bounced"]
    box = await Inbox.open(conf)
    try:
        [dsn] = await box.list_all()
        assert (dsn.sender, dsn.recipients, dsn.domain) == ("", (LOGIN,), DOMAIN)
    finally:
        await box.close()
    assert [c for c in sink.commands if c[0] == "MAIL"] == [("MAIL", LOGIN)]  # no DSN went out


async def test_the_inbox_keeps_the_newest_inbox_max_messages(
    cfg: Config, sink: Sink, deliver: Deliver
) -> None:
    conf = smarthost_cfg(cfg, sink, inbox_max_messages=2)
    spool, deliverer = await deliver(conf)
    ids = []
    for n in range(3):
        ids.append(
            await spool.enqueue(
                sender=LOGIN,
                recipients=[OUTSIDE],
                body=message(subject=f"m{n}").encode(),
                user=LOGIN,
                sandbox=DOMAIN,
            )  # fmt: skip
        )
        await idle(deliverer)
    box = await Inbox.open(conf)
    try:
        assert [(m.queue_id, m.subject) for m in await box.list_all()] == [
            (ids[2], "m2"), (ids[1], "m1"),
        ]  # fmt: skip
        assert await box.count() == 2
    finally:
        await box.close()
    assert sink.connections == 0


async def test_a_capture_repeated_after_a_crash_keeps_one_copy(cfg: Config) -> None:
    box = await Inbox.open(cfg)
    try:
        args: dict[str, Any] = {
            "queue_id": "q1", "domain": DOMAIN, "sender": LOGIN, "recipients": [OUTSIDE],
            "body": message().encode(), "now": 1.0,
        }  # fmt: skip
        first = await box.capture(**args)
        assert await box.capture(**args) == first
        assert await box.count() == 1
        assert (await box.get(first)).body == message().encode()
        with pytest.raises(NotFound):
            await box.get(first + 1)
    finally:
        await box.close()


@pytest.mark.parametrize("key_type", ["rsa", "ed25519"])
async def test_the_dkim_result_uses_the_domain_key_in_the_store(
    db: Store, cfg: Config, clock: ManualClock, key_type: str
) -> None:
    conf = dataclasses.replace(cfg, dns=dataclasses.replace(cfg.dns, dkim_key_type=key_type))
    await sandbox.add(db, DOMAIN, cfg=conf, now=clock(), actor="t")
    key = await domains.signing_key(db, DOMAIN)
    assert key is not None
    leaks.add(key.private_pem)
    signed = Signer().sign(message().encode(), key)
    passed = await inbox.dkim_result(db, signed)
    assert (passed.result, passed.domain, passed.selector) == ("pass", DOMAIN, "relaybox")
    changed = await inbox.dkim_result(db, signed.replace(b"Hello", b"Hullo"))
    assert changed.result == "fail" and "body hash mismatch" in changed.reason
    assert (await inbox.dkim_result(db, message().encode())).result == "none"
    await domains.remove(db, DOMAIN, with_users=False, now=clock(), actor="t")
    await sandbox.add(db, DOMAIN, cfg=conf, now=clock(), actor="t")  # a new key
    assert (await inbox.dkim_result(db, signed)).result == "fail"
    await domains.remove(db, DOMAIN, with_users=False, now=clock(), actor="t")
    gone = await inbox.dkim_result(db, signed)
    assert (gone.result, gone.reason) == ("fail", f"no key at relaybox._domainkey.{DOMAIN}")


# --- the store: verified without DNS, never checked; the allow list ------------------------------


async def test_no_check_ever_changes_a_sandbox_domain(
    db: Store,
    dns_cfg: Config,
    store_cfg: Config,
    clock: ManualClock,
    dns_server: TestDNSServer,
) -> None:
    dns_cfg = dataclasses.replace(dns_cfg, store=store_cfg.store)  # the doctor reads ``db``'s store
    await sandbox.add(db, DOMAIN, cfg=dns_cfg, now=clock(), actor="test")
    await make_domain(db, dns_cfg, "example.com", now=clock())  # verified, records unpublished
    resolver = dnscheck.make_resolver(dns_cfg)
    clock.advance(float(dns_cfg.dns.failure_grace) + 1)
    after = {
        d.name: d for d in await domains.recheck(db, resolver=resolver, cfg=dns_cfg, now=clock())
    }
    assert after["example.com"].state == "failing"  # the recheck did run
    assert (after[DOMAIN].state, after[DOMAIN].last_checked_at) == ("verified", None)
    with pytest.raises(Conflict, match="sandbox domain"):
        await domains.verify(db, DOMAIN, resolver=resolver, cfg=dns_cfg, now=clock(), actor="t")
    with pytest.raises(Conflict, match="sandbox domain"):
        await domains.record_results(db, DOMAIN, [], cfg=dns_cfg, now=clock())
    d = await domains.get(db, DOMAIN)
    assert d is not None and (d.state, d.sandbox, d.verified_at) == ("verified", True, 1.8e9)

    @asynccontextmanager
    async def open_db(_cfg: Config) -> AsyncIterator[Store]:
        yield db

    checks = {c.check: c for c in await doctor.check_store(dns_cfg, open_db)}
    assert checks["domain example.com"].status == "fail"  # the doctor did look
    sandboxed = checks[f"domain {DOMAIN}"]
    assert sandboxed.status == "pass" and "verified without DNS" in sandboxed.detail
    assert [q for q in dns_server.queries if DOMAIN in q[0]] == []  # never asked about


async def test_the_allow_list(db: Store, cfg: Config, clock: ManualClock) -> None:
    now = clock()
    d, allowed = await sandbox.add(
        db, DOMAIN, allow_rcpt=["Bob@Dest.TEST", "bob@dest.test"], cfg=cfg, now=now, actor="t"
    )
    assert allowed == ("Bob@dest.test", "bob@dest.test")  # local parts may be case-sensitive
    assert await sandbox.set_allowed(db, DOMAIN, remove=["Bob@DEST.test"], now=now, actor="t") == (
        "bob@dest.test",
    )
    after = await sandbox.set_allowed(db, DOMAIN, clear=True, add=["x@y.test"], now=now, actor="t")
    assert after == ("x@y.test",) == await sandbox.allowed(db, DOMAIN)
    assert await sandbox.allow_lists(db) == {DOMAIN: ("x@y.test",)}
    with pytest.raises(Invalid):
        await sandbox.set_allowed(db, DOMAIN, add=["not an address"], now=now, actor="t")
    await make_domain(db, cfg, "example.com", now=now)
    with pytest.raises(Conflict, match="not a sandbox domain"):
        await sandbox.set_allowed(db, "example.com", add=["x@y.test"], now=now, actor="t")
    with pytest.raises(NotFound):
        await sandbox.set_allowed(db, "nowhere.test", add=["x@y.test"], now=now, actor="t")
    await domains.remove(db, DOMAIN, with_users=False, now=now, actor="t")
    assert await sandbox.allow_lists(db) == {}  # gone with the domain
    again, _ = await sandbox.add(db, DOMAIN, cfg=cfg, now=now, actor="t")
    assert await sandbox.allowed(db, again.name) == ()


async def test_a_database_of_schema_version_1_has_no_sandbox_domain(cfg: Config) -> None:
    old = await Database.open(cfg.db_path, (Migration(1, MAIN_MIGRATIONS[0].sql),))
    try:
        async with old.transaction() as conn:
            await conn.execute(
                "INSERT INTO domains (name, token, dkim_selector, dkim_algorithm, "
                "dkim_private_key, dkim_public_key, state, created_at) "
                "VALUES ('old.test', 't', 's', 'rsa', 'k', 'p', 'verified', 1.0)"
            )
    finally:
        await old.close()
    db = SqliteStore(await Database.open(cfg.db_path, MAIN_MIGRATIONS))
    try:
        d = await domains.get(db, "old.test")
        assert d is not None and (d.state, d.sandbox) == ("verified", False)
    finally:
        await db.close()


def test_the_bound_is_a_config_key() -> None:
    assert SandboxConfig().inbox_max_messages == 1000
    with pytest.raises(ValueError, match="inbox_max_messages"):
        SandboxConfig(inbox_max_messages=0)


# --- the CLI: markers, set, errors ---------------------------------------------------------------


def invoke(cli_config: Path, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, ["--config", str(cli_config), *args], input=input)


def ok(cli_config: Path, *args: str) -> str:
    result = invoke(cli_config, *args)
    assert result.exit_code == 0, result.output
    return result.stdout


def one_line_error(result: Result, text: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and text in result.stderr, result.stderr


def test_domain_commands_mark_a_sandbox_domain(cli_config: Path) -> None:
    added = json.loads(ok(cli_config, "domain", "add", "--sandbox", DOMAIN, "--allow-rcpt",
                          ALLOWED, "--json"))  # fmt: skip
    assert list(added) == ["name", "state", "records", "checks", "sandbox", "allow_rcpt"]
    assert (added["state"], added["sandbox"], added["allow_rcpt"]) == ("verified", True, [ALLOWED])
    text = ok(cli_config, "domain", "add", "example.com")
    assert "(pending)" in text
    assert json.loads(ok(cli_config, "domain", "show", "example.com", "--json"))["sandbox"] is False
    assert (
        json.loads(ok(cli_config, "domain", "show", "example.com", "--json"))["allow_rcpt"] is None
    )

    listed = json.loads(ok(cli_config, "domain", "list", "--json"))
    assert [(d["name"], d["sandbox"]) for d in listed] == [("example.com", False), (DOMAIN, True)]
    table = ok(cli_config, "domain", "list").splitlines()
    assert table[2].split()[:2] == ["example.com", "pending"]
    assert table[3].split()[:3] == [DOMAIN, "verified", "(sandbox)"]

    shown = ok(cli_config, "domain", "show", DOMAIN)
    assert shown.splitlines()[0] == f"{DOMAIN}: verified (sandbox)"
    assert (
        f"mail to {ALLOWED} is delivered; to anyone else it is kept in the sandbox inbox" in shown
    )
    assert "Records to publish" not in shown

    changed = json.loads(ok(cli_config, "domain", "set", DOMAIN, "--allow-rcpt", "x@y.test",
                            "--remove-rcpt", ALLOWED, "--json"))  # fmt: skip
    assert changed["allow_rcpt"] == ["x@y.test"]
    cleared = ok(cli_config, "domain", "set", DOMAIN, "--no-allow-rcpt")
    assert (
        cleared == f"{DOMAIN}: all its mail is kept in the sandbox inbox (`relaybox inbox list`)\n"
    )

    one_line_error(invoke(cli_config, "domain", "verify", DOMAIN), "is a sandbox domain")
    one_line_error(invoke(cli_config, "domain", "set", DOMAIN), "nothing to change")
    one_line_error(
        invoke(cli_config, "domain", "set", "example.com", "--allow-rcpt", "a@b.test"),
        "example.com is not a sandbox domain",
    )
    one_line_error(
        invoke(cli_config, "domain", "add", "other.test", "--allow-rcpt", "a@b.test"),
        "--allow-rcpt: only for a sandbox domain",
    )
    one_line_error(
        invoke(cli_config, "domain", "add", "--sandbox", "bad.test", "--allow-rcpt", "nope"),
        "not an email address",
    )
    assert invoke(cli_config, "domain", "show", "bad.test").exit_code == 1  # nothing was added


def test_user_show_marks_a_sandbox_user(cli_config: Path) -> None:
    ok(cli_config, "domain", "add", "--sandbox", DOMAIN)
    created = json.loads(ok(cli_config, "user", "add", LOGIN, "--json"))
    leaks.add(created["password"])
    data = json.loads(ok(cli_config, "user", "show", LOGIN, "--json"))
    assert data["sandbox"] is True
    assert list(data)[-1] == "sandbox"
    text = ok(cli_config, "user", "show", LOGIN)
    assert f"Sandbox:    yes: {DOMAIN} is a sandbox domain" in text


def test_inbox_commands_on_an_empty_and_a_filled_inbox(cli_config: Path) -> None:
    assert (
        ok(cli_config, "inbox", "list")
        == "the inbox is empty: mail of sandbox domains lands here\n"
    )
    assert json.loads(ok(cli_config, "inbox", "list", "--json")) == []
    one_line_error(invoke(cli_config, "inbox", "show", "1"), "no message 1 in the inbox")
    one_line_error(invoke(cli_config, "inbox", "show", "x"), "not an inbox message id")
    one_line_error(invoke(cli_config, "inbox", "delete"), "give a message ID or --all")
    ok(cli_config, "domain", "add", "--sandbox", DOMAIN)
    conf = _load(cli_config)

    async def fill() -> None:
        box = await Inbox.open(conf)
        try:
            for n in range(3):
                body = message(subject=f"s{n}\x1b[31m").encode()  # an escape: shown as '?'
                await box.capture(queue_id=f"q{n}", domain=DOMAIN, sender=LOGIN,
                                  recipients=[OUTSIDE], body=body, now=1.8e9 + n)  # fmt: skip
        finally:
            await box.close()

    asyncio.run(fill())
    table = ok(cli_config, "inbox", "list")
    assert "\x1b" not in table and "s2?[31m" in table
    shown = ok(cli_config, "inbox", "show", "2")
    assert "DKIM: none (no DKIM-Signature)" in shown  # captured here unsigned
    assert "\x1b" not in shown
    assert invoke(cli_config, "inbox", "show", "2", "--raw").stdout_bytes.startswith(b"From: App")
    assert json.loads(ok(cli_config, "inbox", "delete", "2", "--json")) == {
        "target": "2", "deleted": 1,
    }  # fmt: skip
    one_line_error(invoke(cli_config, "inbox", "delete", "2"), "no message 2 in the inbox")
    assert ok(cli_config, "inbox", "delete", "--all") == "all: 2 message(s) deleted\n"
    audit = json.loads(ok(cli_config, "audit", "--json"))  # newest first
    assert [e["target"] for e in audit if e["action"] == "inbox.delete"] == ["all", "2"]


def _load(cli_config: Path) -> Config:
    return config_mod.load(cli_config)
