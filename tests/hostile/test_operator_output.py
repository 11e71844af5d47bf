"""What operators read cannot be forged from outside (issue 12, items 8 and 9).

A client chooses its login, a remote server its reply text: either may carry newlines, terminal
escape sequences (CSI, OSC, C1 controls) or bidi overrides. They are made printable where they
enter (the audit log's ``events.add``; outbound's ``Result``, so the spool and the DSN never hold
them), and again where anything is shown (every CLI table, through one function), so rows stored
before that are shown safely too. ``--json`` escapes them (``ensure_ascii``): its output is
printable ASCII whatever the data.

The helpers check output character by character: nothing that is not printable reaches a terminal
but the newlines ending a table's rows, and a table has exactly one line per row.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.message
import email.policy
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from admin import common
from admin.cli import cli
from relay import config as config_mod
from relay.clock import ManualClock
from relay.config import Config
from relay.config_sections import SmarthostConfig
from relay.delivery.outbound import Outbound
from relay.delivery.scheduler import Deliverer
from relay.store import events, shared
from relay.store.db import Database
from relay.store.spool import Outcome, Spool
from relay.units import Duration
from tests.dialogue import Dialogue, plain
from tests.faults.upstream import Upstream
from tests.relayserver import RelayHandle
from tests.serverconf import serve_config
from tests.sink import Sink

# A forged audit row after a newline, a screen clear, a window title (OSC ... BEL), a C1 CSI
# (U+009B), DEL, backspace, and the bidi overrides and isolates that reorder what follows.
FORGED_ROW = "2026-12-01T00:00:00Z  root (via sudo as root)  user.delete  boss@example.com"
HOSTILE = (
    f"app@example.com\n{FORGED_ROW}\r\x1b[2J\x1b]0;owned\x07\x9b31m\x7f\x08"
    "\u202egnp.exe\u202c\u2066x\u2069\u200b"
)
BIDI = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}


def unprintable(text: str, *, newlines: bool = True) -> list[str]:
    """The characters of ``text`` a terminal could act on (every newline allowed if
    ``newlines``): controls, DEL, C1, bidi and other format characters, lone surrogates."""
    return [
        repr(ch)
        for ch in text
        if not (ch == "\n" and newlines) and (not ch.isprintable() or ch in BIDI)
    ]


def json_is_printable_ascii(text: str) -> None:
    bad = [repr(ch) for ch in text if ch != "\n" and not " " <= ch <= "~"]
    assert not bad, f"--json output carries raw {bad}"


def invoke(config: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--config", str(config), *args])


# --- the audit log (item 8) ---------------------------------------------------------------------


@pytest.fixture
def cli_file(relay_cfg: Config, tls_files: tuple[Path, Path, Path], tmp_path: Path) -> Path:
    """A config file naming the state dir of ``relay_cfg``: the CLI sees what the server wrote."""
    cert, key, _ca = tls_files
    path = tmp_path / "cli.toml"
    path.write_text(serve_config(state=relay_cfg.state_dir, cert=cert, key=key))
    return path


async def test_a_hostile_login_forges_no_audit_row(relay: RelayHandle, cli_file: Path) -> None:
    """The issue's case: five failed AUTHs with one hostile login make an
    ``auth.login-failures`` event; `relaybox audit` shows it on one row, printable."""
    for _ in range(relay.server.cfg.auth.max_failures):
        d = await Dialogue.open(relay.tls_port, tls=relay.client_context())
        await d.expect_after("EHLO client.test", "250")
        await d.expect_after(f"AUTH PLAIN {plain(HOSTILE, 'wrong-password')}", "535")
        await d.close()
    table = await asyncio.to_thread(invoke, cli_file, "audit")
    assert table.exit_code == 0, table.output
    assert "auth.login-failures" in table.stdout
    lines = table.stdout.splitlines()
    listed = await asyncio.to_thread(invoke, cli_file, "audit", "--json")
    found = json.loads(listed.stdout)
    assert len(lines) == 2 + len(found), lines  # header, rule, one line per event
    assert not unprintable(table.stdout)
    json_is_printable_ascii(listed.stdout)
    for event in found:
        for value in event.values():
            assert not unprintable(str(value), newlines=False), event


async def test_the_audit_log_stores_only_printable_text(db: Database) -> None:
    """events.add is where outside text enters the audit log: actor, action, target and
    detail are stored printable (a newline or an escape becomes '?')."""
    await events.record(db, now=1.0, actor=HOSTILE, action=HOSTILE, target=HOSTILE, detail=HOSTILE)
    [event] = await events.recent(db)
    for value in (event.actor, event.action, event.target, event.detail):
        assert not unprintable(value, newlines=False), value
        assert value.startswith("app@example.com?2026-12-01T00:00:00Z  root")


def _store_raw_event(cfg: Config) -> None:
    """A row as a relaybox before the fix could have stored it (written with sqlite3 directly:
    events.add no longer writes such a row)."""
    with sqlite3.connect(cfg.db_path) as conn:
        conn.execute(
            "INSERT INTO events (at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
            (time.time(), "relaybox", "auth.login-failures", HOSTILE, f"last user={HOSTILE}"),
        )


def test_an_old_audit_row_is_shown_safely(cli_config: Path) -> None:
    cfg = config_mod.load(cli_config)
    asyncio.run(_open_and_close(cfg))  # the schema, as the service creates it
    _store_raw_event(cfg)
    table = invoke(cli_config, "audit")
    assert table.exit_code == 0, table.output
    assert not unprintable(table.stdout), table.stdout
    assert len(table.stdout.splitlines()) == 3  # header, rule, the one event: no forged row
    listed = invoke(cli_config, "audit", "--json")
    json_is_printable_ascii(listed.stdout)
    [event] = json.loads(listed.stdout)
    assert event["target"] == HOSTILE  # --json carries the stored value, escaped


async def _open_and_close(cfg: Config) -> None:
    db = await shared.open_main(cfg)
    await db.close()


@pytest.mark.parametrize("cell", [HOSTILE, HOSTILE.encode("utf-8", "surrogateescape"), None, 7])
def test_every_table_cell_is_shown_printable_on_one_line(cell: object) -> None:
    """admin/common.py's table() is what every command prints its rows through."""
    text = common.table(("A", "B"), [("x", cell), (cell, "y")])
    assert not unprintable(text), text
    assert len(text.splitlines()) == 4


def test_json_output_escapes_every_control_and_bidi_character(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """json.dumps(ensure_ascii=True) writes ESC as \\u001b, C1 and bidi as \\u009b / \\u202e,
    lone surrogates as \\udcff: what reaches the terminal is printable ASCII."""
    value = HOSTILE + "\udcff"
    common.emit_json({"target": value})
    out = capsys.readouterr().out
    json_is_printable_ascii(out)
    assert "\\u001b[2J" in out and "\\u009b" in out and "\\u202e" in out
    assert json.loads(out) == {"target": value}


# --- remote replies (item 9) --------------------------------------------------------------------

REMOTE = "\x1b[2J\x1b]0;owned\x07\x9b1m\u202egnp.exe\x7f\x08 text"
SENDER = "alice@example.com"
BODY = b"From: <alice@example.com>\r\nTo: <bob@example.net>\r\nSubject: hi\r\n\r\nHello.\r\n"


CliFor = Callable[[Config], Path]


@pytest.fixture
def cli_for(tmp_path: Path) -> CliFor:
    """A config file for the CLI naming a test config's state dir."""

    def make(cfg: Config) -> Path:
        path = tmp_path / "cli.toml"
        path.write_text(f'state_dir = "{cfg.state_dir}"\npublic_hostname = "relay.test"\n')
        return path

    return make


def _delivering(cfg: Config, port: int, security: str = "none") -> Config:
    d = dataclasses.replace(
        cfg.delivery,
        mode="smarthost",
        smarthost=SmarthostConfig(host="127.0.0.1", port=port, security=security),
        connect_timeout=Duration(2),
        command_timeout=Duration(5),
    )
    return dataclasses.replace(cfg, delivery=d)


def _show_and_list(config: Path, msg_id: str) -> list[Result]:
    runs = [
        invoke(config, "queue", "list", "--state", "all"),
        invoke(config, "queue", "show", msg_id),
    ]
    for result in runs:
        assert result.exit_code == 0, result.output
        assert not unprintable(result.stdout), result.stdout
    for args in (("list", "--state", "all"), ("show", msg_id)):
        listed = invoke(config, "queue", *args, "--json")
        assert listed.exit_code == 0, listed.output
        json_is_printable_ascii(listed.stdout)
    return runs


async def test_remote_replies_reach_neither_spool_nor_dsn_nor_terminal_raw(
    cfg: Config, sink: Sink, clock: ManualClock, cli_for: CliFor
) -> None:
    """A smarthost refuses one recipient (550, multi-line) and defers another (451) with escape
    sequences in its text: the spool, the DSN's Diagnostic-Code and `queue list/show` hold the
    replies printable."""
    sink.script_rcpt("bob@example.net", f"550-5.1.1 first {REMOTE}\r\n550 5.1.1 {REMOTE}")
    sink.script_rcpt("carol@example.net", f"451 4.3.0 {REMOTE}")
    conf = _delivering(cfg, sink.port)
    spool = await Spool.open(conf, clock=clock)
    deliverer = Deliverer(spool, conf, clock=clock)
    try:
        msg_id = await spool.enqueue(
            sender=SENDER, recipients=["bob@example.net", "carol@example.net"], body=BODY, user=None
        )
        deliverer.start()
        deliverer.wake()
        await deliverer.wait_idle()
        info = await spool.show(msg_id)
    finally:
        await deliverer.stop()
        await spool.close()
    states = {r.address: (r.state, r.last_reply or "") for r in info.recipients}
    assert states["bob@example.net"][0] == "bounced"
    assert states["carol@example.net"][0] == "deferred"
    for _state, reply in states.values():
        assert not unprintable(reply, newlines=False), reply
        assert reply.endswith("gnp.exe?? text"), reply
    [dsn] = sink.received
    diagnostic = [
        line
        for line in dsn.data.decode("utf-8", "surrogateescape").split("\r\n")
        if line.startswith("Diagnostic-Code:")
    ]
    assert diagnostic and all(not unprintable(line) for line in diagnostic), diagnostic
    parsed = email.message_from_bytes(dsn.data, policy=email.policy.SMTP)
    assert isinstance(parsed, email.message.EmailMessage)
    text = parsed.get_body(("plain",))
    assert text is not None and "gnp.exe" in text.get_content()
    assert not unprintable(text.get_content().replace("\r\n", "\n")), "the DSN's text part"
    config = cli_for(conf)
    listed, shown = await asyncio.to_thread(_show_and_list, config, msg_id)
    assert "4.3.0" in shown.stdout and "5.1.1" in shown.stdout


@pytest.mark.parametrize(
    "where",
    ["STARTTLS", "EHLO", "MAIL", "RCPT", "DATA", "multi-line"],
)
async def test_every_remote_reply_becomes_a_printable_result(cfg: Config, where: str) -> None:
    """Each place outbound.py turns what a peer said into a Result (the STARTTLS failure text,
    a refused EHLO and HELO, MAIL, RCPT, DATA, a multi-line reply) stores it printable."""
    hostile = f"554 5.7.1 {REMOTE}\r\n".encode()
    security = "none"
    up = Upstream()
    if where == "STARTTLS":
        up = Upstream(starttls_reply=b"454 4.7.0 " + REMOTE.encode() + b"\r\n")
        security = "starttls"
    elif where == "EHLO":
        up.replies["EHLO"] = up.replies["HELO"] = hostile
    elif where == "multi-line":
        up.replies["RCPT"] = b"550-5.1.1 one\x1b[2J\r\n550-\x1b]0;t\x07\r\n" + hostile
    else:
        up.replies[where] = hostile
    await up.start()
    out = Outbound(_delivering(cfg, up.port, security))
    await out.start()
    try:
        [result] = await out.deliver("smarthost", SENDER, BODY, ["bob@example.net"])
    finally:
        await out.close_idle(everything=True)
        await up.stop()
    assert result.kind != "ok"
    assert not unprintable(result.reply, newlines=False), result.reply
    assert not unprintable(result.relay, newlines=False), result.relay
    # The peer's words, made printable (not a Python repr of an exception: no "\\x1b").
    assert "?[2J?]0;" in result.reply and "gnp.exe" in result.reply, result.reply


async def test_an_old_spool_row_is_shown_safely(
    cfg: Config, clock: ManualClock, cli_for: CliFor
) -> None:
    """A reply stored raw before the fix (written here through Spool.record, which stores
    what it is given) is shown printable by `queue list` and `queue show`."""
    spool = await Spool.open(cfg, clock=clock)
    try:
        msg_id = await spool.enqueue(
            sender=SENDER, recipients=["bob@example.net"], body=BODY, user=None
        )
        await spool.claim_due(10)
        raw = f"451 4.3.0 {REMOTE}\n{FORGED_ROW}"
        await spool.record(
            [Outcome(msg_id, 0, "deferred", 451, raw, f"mx{REMOTE}", clock() + 3600)]
        )
    finally:
        await spool.close()
    config = cli_for(cfg)
    listed, shown = await asyncio.to_thread(_show_and_list, config, msg_id)
    assert len(listed.stdout.splitlines()) == 3  # header, rule, the message
    assert "4.3.0" in shown.stdout and FORGED_ROW not in shown.stdout.splitlines()
