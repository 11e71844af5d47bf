"""The suppression list (issue 16, item 1), against the real server and the real CLI.

A 550 5.1.1 from the smarthost (the sink) puts the recipient on the sender domain's list; the next
RCPT TO it from a user of that domain gets the 550 5.1.1 naming the date and the command that
removes it. 5.7.x and 4xx never suppress; another sender domain is not affected; the CLI (Click's
runner, in a thread: it runs its own event loop) lists, adds, shows and removes entries on the
server's own state dir. The server runs with a controllable clock (expiry).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from admin.cli import cli
from relay import clock as clock_mod
from relay.clock import ManualClock
from relay.config import Config
from relay.config_sections import SmarthostConfig
from relay.store import events, suppressions, users
from relay.store.engine import SqliteStore
from relay.units import Duration
from tests.dialogue import Dialogue
from tests.hostile.kit import message
from tests.relayserver import RelayHandle, start_relay
from tests.sink import Sink
from tests.userhelpers import json_of, one_line_error

LOGIN = "app@example.com"
OTHER = "ops@other.test"
GONE = "gone@dest.test"
HARD = "550 5.1.1 no such user"

Cli = Callable[..., Awaitable[Result]]


def delivering(cfg: Config, sink: Sink, **suppression: Any) -> Config:
    delivery = dataclasses.replace(
        cfg.delivery,
        mode="smarthost",
        smarthost=SmarthostConfig(host="127.0.0.1", port=sink.port, security="none"),
        connect_timeout=Duration(2),
        paused=False,
    )
    supp = dataclasses.replace(cfg.suppression, **suppression)
    return dataclasses.replace(cfg, delivery=delivery, suppression=supp)


@pytest.fixture
async def box(
    relay_cfg: Config, tls_files: tuple[Path, Path, Path], clock: ManualClock, sink: Sink
) -> AsyncIterator[RelayHandle]:
    handle = await start_relay(delivering(relay_cfg, sink), tls_files[2], clock)
    yield handle
    await handle.server.shutdown()
    handle.close()


@pytest.fixture
def relaybox(relay_cfg: Config, tmp_path: Path) -> Cli:
    """The real CLI on the server's state dir (in a thread: it runs its own loop)."""
    conf = tmp_path / "cli.toml"
    conf.write_text(f'state_dir = "{relay_cfg.state_dir}"\n')

    async def invoke(*args: str) -> Result:
        return await asyncio.to_thread(CliRunner().invoke, cli, ["--config", str(conf), *args])

    return invoke


async def _session(relay: RelayHandle, login: str, password: str) -> Dialogue:
    d = await Dialogue.open(relay.tls_port, tls=relay.client_context())
    await d.login(login, password)
    return d


async def rcpt_reply(relay: RelayHandle, password: str, rcpt: str, login: str = LOGIN) -> str:
    """MAIL FROM the user, then RCPT TO ``rcpt``: the reply to RCPT."""
    d = await _session(relay, login, password)
    try:
        await d.expect_after(f"MAIL FROM:<{login}>", "250")
        return await d.reply_after(f"RCPT TO:<{rcpt}>")
    finally:
        await d.close()


async def send(relay: RelayHandle, password: str, *rcpts: str, login: str = LOGIN) -> None:
    """One message to ``rcpts``, queued; then delivery until nothing is due."""
    d = await _session(relay, login, password)
    try:
        await d.expect_after(f"MAIL FROM:<{login}>", "250")
        for rcpt in rcpts:
            await d.expect_after(f"RCPT TO:<{rcpt}>", "250")
        await d.expect_after("DATA", "354")
        d.send_raw(message(sender=login, to=rcpts[0]) + b".\r\n")
        await d.writer.drain()
        await d.expect("250 2.0.0 queued as ")
    finally:
        await d.close()
    deliverer = relay.server.deliverer
    assert deliverer is not None
    await deliverer.wait_idle()


def suppressed_reply(address: str, at: float, domain: str = "example.com") -> str:
    day = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d")
    return (
        f"550 5.1.1 <{address}>: suppressed after a hard bounce on {day}"
        f" (relaybox suppression remove {address} --domain {domain})"
    )


def mail_log(caplog: pytest.LogCaptureFixture, prefix: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "relaybox.mail" and r.getMessage().startswith(prefix)
    ]


# --- the rule ------------------------------------------------------------------------------------


def test_which_replies_suppress() -> None:
    codes = ("5.1.*", "5.2.1")
    assert suppressions.suppresses("550 5.1.1 no such user", codes) == "5.1.1"
    assert suppressions.suppresses("550-5.1.10 null MX", codes) == "5.1.10"
    assert suppressions.suppresses("552 5.2.1 mailbox disabled", codes) == "5.2.1"
    for reply in (
        "550 5.7.1 refused by policy",
        "552 5.2.2 mailbox full",
        "451 4.1.1 try later",
        "450 5.1.1 inconsistent: a 4xx never suppresses",
        "550 no enhanced code",
        "550 4.1.1 mixed classes",
        "",
    ):
        assert suppressions.suppresses(reply, codes) is None, reply
    assert suppressions.suppresses("550 5.7.1 x", ("5.7.1",)) == "5.7.1"  # configurable
    assert suppressions.suppresses("550 5.1.1 x", ()) is None


# --- against the server ----------------------------------------------------------------------


async def test_a_hard_bounce_suppresses_the_address_for_the_sender_domain_only(
    box: RelayHandle, sink: Sink, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    password = await box.add_user(LOGIN)
    other = await box.add_user(OTHER)
    sink.script_rcpt(GONE, HARD)
    bounced_at = clock()
    await send(box, password, GONE, "fine@dest.test")
    clock.advance(3600)

    assert await rcpt_reply(box, password, GONE) == suppressed_reply(GONE, bounced_at)
    assert len(suppressed_reply(GONE, bounced_at).encode()) < 512
    assert (await rcpt_reply(box, password, "fine@dest.test")).startswith("250 ")
    assert (await rcpt_reply(box, other, GONE, login=OTHER)).startswith("250 ")  # other domain

    assert box.server.db is not None
    entry = await suppressions.is_suppressed(box.server.db, "example.com", GONE, clock())
    assert entry is not None
    assert entry.as_json() == {
        "domain": "example.com",
        "address": GONE,
        "reason": "",
        "code": "5.1.1",
        "reply": HARD,
        "source": "bounce",
        "created_at": clock_mod.iso(bounced_at),
        "expires_at": None,
    }
    assert mail_log(caplog, "rejected stage=rcpt") == [
        f"rejected stage=rcpt reason=suppressed user={LOGIN} ip=127.0.0.1 to={GONE}"
    ]
    [line] = mail_log(caplog, "suppressed ")
    assert f"domain=example.com to={GONE} code=5.1.1 source=bounce" in line
    metrics = box.server.metrics.render().decode()
    assert 'relaybox_messages_rejected_total{reason="suppressed"} 1.0' in metrics
    assert 'relaybox_suppressions_added_total{source="bounce"} 1.0' in metrics
    # The bounce itself is recorded once, with its DSN, whatever the suppression did.
    assert [x for x in mail_log(caplog, "bounced ") if f"to={GONE}" in x] != []
    assert len(mail_log(caplog, "bounced ")) == 1
    assert len(mail_log(caplog, "bounce queued ")) == 1


async def test_policy_refusals_and_temporary_failures_never_suppress(
    box: RelayHandle, sink: Sink, relaybox: Cli
) -> None:
    password = await box.add_user(LOGIN)
    sink.script_rcpt("policy@dest.test", "550 5.7.1 refused by policy")
    sink.script_rcpt("later@dest.test", "451 4.2.0 try later")
    sink.script_rcpt("full@dest.test", "552 5.2.2 mailbox full")
    await send(box, password, "policy@dest.test", "later@dest.test", "full@dest.test")
    for rcpt in ("policy@dest.test", "later@dest.test", "full@dest.test"):
        assert (await rcpt_reply(box, password, rcpt)).startswith("250 "), rcpt
    assert json_of(await relaybox("suppression", "list", "--json")) == []
    metrics = box.server.metrics.render().decode()
    assert 'relaybox_suppressions_added_total{source="bounce"} 0.0' in metrics


async def test_remove_lets_the_address_through_again(
    box: RelayHandle, sink: Sink, clock: ManualClock, relaybox: Cli
) -> None:
    password = await box.add_user(LOGIN)
    sink.script_rcpt(GONE, HARD)
    await send(box, password, GONE)
    assert (await rcpt_reply(box, password, GONE)).startswith("550 5.1.1 ")

    [listed] = json_of(await relaybox("suppression", "list", "--json"))
    assert (listed["domain"], listed["address"], listed["source"]) == (
        "example.com",
        GONE,
        "bounce",
    )
    done = await relaybox("suppression", "remove", GONE, "--domain", "example.com")
    assert done.exit_code == 0, done.output
    assert done.stdout == f"removed {GONE} from 1 domain(s): example.com\n"
    assert (await rcpt_reply(box, password, GONE)).startswith("250 ")
    one_line_error(await relaybox("suppression", "remove", GONE), f"no suppression for {GONE}")

    assert box.server.db is not None
    actions = [e.action for e in await events.recent(box.server.db, target="example.com")]
    assert "suppression.remove" in actions

    # Suppressed again by the next hard bounce: the entry comes back with the new time.
    sink.script_rcpt(GONE, HARD)
    clock.advance(86400)
    again = clock()
    await send(box, password, GONE)
    assert await rcpt_reply(box, password, GONE) == suppressed_reply(GONE, again)


async def test_a_dsn_never_suppresses(box: RelayHandle, sink: Sink, relaybox: Cli) -> None:
    """The DSN of a bounce has the null sender: its own hard bounce suppresses nothing."""
    password = await box.add_user(LOGIN)
    sink.script_rcpt(GONE, HARD)
    sink.script_rcpt(LOGIN, HARD)  # the DSN to the sender bounces too (and is dropped)
    await send(box, password, GONE)
    listed = json_of(await relaybox("suppression", "list", "--json"))
    assert [e["address"] for e in listed] == [GONE]


async def test_expiry_with_a_ttl(
    relay_cfg: Config, tls_files: tuple[Path, Path, Path], clock: ManualClock, sink: Sink
) -> None:
    relay = await start_relay(
        delivering(relay_cfg, sink, ttl=Duration(30 * 86400)), tls_files[2], clock
    )
    try:
        password = await relay.add_user(LOGIN)
        sink.script_rcpt(GONE, HARD)
        at = clock()
        await send(relay, password, GONE)
        assert relay.server.db is not None
        entry = await suppressions.is_suppressed(relay.server.db, "example.com", GONE, clock())
        assert entry is not None and entry.expires_at == at + 30 * 86400
        clock.advance(30 * 86400 - 1)
        assert await rcpt_reply(relay, password, GONE) == suppressed_reply(GONE, at)
        clock.advance(1)
        assert (await rcpt_reply(relay, password, GONE)).startswith("250 ")
        assert (
            await suppressions.is_suppressed(relay.server.db, "example.com", GONE, clock()) is None
        )
    finally:
        await relay.server.shutdown()
        relay.close()


# --- the CLI -----------------------------------------------------------------------------------


KEYS = ["domain", "address", "reason", "code", "reply", "source", "created_at", "expires_at"]


async def test_add_show_list_json_and_normalised_addresses(box: RelayHandle, relaybox: Cli) -> None:
    password = await box.add_user(LOGIN)
    await box.add_domain("other.test")
    added = json_of(
        await relaybox(
            "suppression", "add", "Bob@BÜCHER.Example", "--domain", "EXAMPLE.com",
            "--reason", "asked to stop", "--json",
        )
    )  # fmt: skip
    assert list(added) == KEYS
    assert added["domain"] == "example.com"
    assert added["address"] == "Bob@xn--bcher-kva.example"  # local part exactly as given
    assert (added["reason"], added["source"], added["code"], added["reply"]) == (
        "asked to stop", "admin", "", "",
    )  # fmt: skip
    assert added["created_at"].endswith("Z") and added["expires_at"] is None
    json_of(
        await relaybox("suppression", "add", "bob@dest.test", "--domain", "other.test", "--json")
    )
    json_of(
        await relaybox("suppression", "add", "bob@dest.test", "--domain", "example.com", "--json")
    )

    # The same entry, however its domain is written; a local part in another case is not.
    [shown] = json_of(await relaybox("suppression", "show", "Bob@xn--BCHER-kva.example", "--json"))
    assert shown == added
    one_line_error(
        await relaybox("suppression", "show", "bob@xn--bcher-kva.example"), "no suppression for"
    )
    reply = await rcpt_reply(box, password, "Bob@XN--BCHER-KVA.EXAMPLE")
    assert reply.startswith("550 5.1.1 <Bob@XN--BCHER-KVA.EXAMPLE>: suppressed after a hard ")
    assert "(relaybox suppression remove Bob@xn--bcher-kva.example --domain example.com)" in reply
    assert (await rcpt_reply(box, password, "bob@xn--bcher-kva.example")).startswith("250 ")

    both = json_of(await relaybox("suppression", "show", "bob@dest.test", "--json"))
    assert [(e["domain"], e["address"]) for e in both] == [
        ("example.com", "bob@dest.test"),
        ("other.test", "bob@dest.test"),
    ]
    everything = json_of(await relaybox("suppression", "list", "--json"))
    assert [list(e) for e in everything] == [KEYS] * 3
    only = json_of(await relaybox("suppression", "list", "--domain", "other.test", "--json"))
    assert [e["address"] for e in only] == ["bob@dest.test"]
    table = await relaybox("suppression", "list")
    assert table.exit_code == 0 and "Bob@xn--bcher-kva.example" in table.stdout

    removed = await relaybox("suppression", "remove", "bob@dest.test")  # every domain
    assert removed.stdout == "removed bob@dest.test from 2 domain(s): example.com, other.test\n"
    assert box.server.db is not None
    actions = [e.action for e in await events.recent(box.server.db)]
    assert actions.count("suppression.add") == 3 and actions.count("suppression.remove") == 2


async def test_cli_errors_are_one_line_and_exit_1(box: RelayHandle, relaybox: Cli) -> None:
    await box.add_user(LOGIN)
    one_line_error(
        await relaybox("suppression", "add", "not-an-address", "--domain", "example.com"),
        "not an email address",
    )
    one_line_error(
        await relaybox("suppression", "add", "x@dest.test", "--domain", "nosuch.test"),
        "no such domain: nosuch.test",
    )
    assert (
        await relaybox("suppression", "add", "x@dest.test", "--domain", "example.com")
    ).exit_code == 0
    one_line_error(
        await relaybox("suppression", "add", "x@dest.test", "--domain", "example.com"),
        "already suppressed",
    )
    one_line_error(
        await relaybox("suppression", "remove", "y@dest.test", "--domain", "example.com"),
        "no suppression for y@dest.test",
    )
    one_line_error(await relaybox("suppression", "show", "y@dest.test"), "no suppression for")
    missing = await relaybox("suppression", "add", "x@dest.test")
    assert missing.exit_code == 2  # Click's usage error: --domain is required


async def test_a_hostile_address_never_reaches_the_reply_or_the_log_raw(
    box: RelayHandle, relaybox: Cli, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    password = await box.add_user(LOGIN)
    line = one_line_error(
        await relaybox("suppression", "add", "a\x1b[31m\r\nb@dest.test", "--domain", "example.com"),
        "not an email address",
    )
    assert "\x1b" not in line and "\r" not in line
    # A quoted local part may hold spaces, quotes and "=": the reply and the log show '?'.
    odd = "\"a b='c'\"@dest.test"
    json_of(await relaybox("suppression", "add", odd, "--domain", "example.com", "--json"))
    reply = await rcpt_reply(box, password, odd)
    assert reply.startswith("550 5.1.1 <?a?b??c??@dest.test>: suppressed after a hard bounce")
    assert "\n" not in reply and len(reply.encode()) < 512
    [logged] = mail_log(caplog, "rejected stage=rcpt")
    assert logged.endswith(" to=?a?b??c??@dest.test")
    # Control characters never get as far as the check: the syntax refusal comes first.
    d = await _session(box, LOGIN, password)
    await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250")
    await d.expect_after(b"RCPT TO:<a\x01b@dest.test>\r\n", "553 5.1.3")
    await d.close()
    for record in caplog.records:  # relaybox's own loggers (aiosmtpd's mail.log is its own)
        if record.name.startswith("relaybox"):
            assert "\x01" not in record.getMessage() and "\x1b" not in record.getMessage()


async def test_a_store_error_at_rcpt_is_a_temporary_failure(box: RelayHandle) -> None:
    password = await box.add_user(LOGIN)
    d = await _session(box, LOGIN, password)
    await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250")
    assert isinstance(box.server.db, SqliteStore)
    await box.server.db.db.reader.close()  # every read on it fails from now on: a store fault
    await d.expect_after(f"RCPT TO:<{GONE}>", "451 4.3.0")
    await d.close()


async def test_a_failure_to_suppress_neither_loses_nor_repeats_the_outcome(
    box: RelayHandle, sink: Sink, relay_cfg: Config, caplog: pytest.LogCaptureFixture
) -> None:
    """The main database refuses the suppression (a trigger, from outside): the bounce is
    recorded once with its one DSN, the failure is logged, nothing is suppressed."""
    caplog.set_level(logging.INFO)
    password = await box.add_user(LOGIN)
    with sqlite3.connect(relay_cfg.db_path) as conn:
        conn.execute(
            "CREATE TRIGGER no_suppression BEFORE INSERT ON suppressions"
            " BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )
    conn.close()
    sink.script_rcpt(GONE, HARD)
    await send(box, password, GONE)
    assert len(mail_log(caplog, "bounced ")) == 1
    assert len(mail_log(caplog, "bounce queued ")) == 1
    assert mail_log(caplog, "suppressed ") == []
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert [e for e in errors if e.startswith(f"could not suppress {GONE} for example.com: ")]
    assert box.server.spool is not None
    [info] = [m for m in await box.server.spool.list_messages(("bounced",)) if m.sender]
    assert [(r.address, r.state, r.attempts) for r in info.recipients] == [(GONE, "bounced", 1)]
    assert (await rcpt_reply(box, password, GONE)).startswith("250 ")


async def test_a_bounce_of_a_subdomain_sender_suppresses_for_its_users_domain(
    box: RelayHandle, sink: Sink, clock: ManualClock
) -> None:
    """A user allowed to send as ``*@news.example.com`` (its domain's subdomain): the bounce of
    such a message is recorded for the user's domain, example.com, which is what its later RCPT
    TO is checked against, whatever sender that message has."""
    password = await box.add_user(LOGIN)
    db = box.server.db
    assert db is not None
    change = users.SettingsChange(allow_from=["*@news.example.com", LOGIN])
    await users.update_settings(db, LOGIN, change, now=clock(), actor="test")
    sink.script_rcpt(GONE, HARD)
    bounced_at = clock()
    d = await _session(box, LOGIN, password)
    try:
        await d.expect_after("MAIL FROM:<list@news.example.com>", "250")
        await d.expect_after(f"RCPT TO:<{GONE}>", "250")
        await d.expect_after("DATA", "354")
        d.send_raw(message(sender="list@news.example.com", to=GONE) + b".\r\n")
        await d.writer.drain()
        await d.expect("250 2.0.0 queued as ")
    finally:
        await d.close()
    deliverer = box.server.deliverer
    assert deliverer is not None
    await deliverer.wait_idle()
    assert await rcpt_reply(box, password, GONE) == suppressed_reply(GONE, bounced_at)
