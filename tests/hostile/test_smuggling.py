"""SMTP smuggling and command injection against the real server (issue 6, item 1).

A smuggling attack hides a second SMTP transaction inside a message behind an end-of-data marker
that the receiving server reads differently from the sender (SEC Consult, 2023). relaybox accepts
only ``CRLF . CRLF`` as the end of DATA (RFC 5321 4.1.1.4), in both modes of
``limits.bare_newline``: ``"reject"`` refuses any message with a bare CR or LF (554 5.6.0);
``"normalize"`` (the default, Postfix 3.9's) takes a bare LF as a line end and stores it as CRLF,
and still refuses a bare CR. Whatever follows a lax marker stays inside the one message, refused
or accepted as text. After each attempt the spool is read: never a second message, never a queued
message that was refused, never a stored line ending other than CRLF.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from relay import config as config_mod
from relay import replies
from relay.clock import ManualClock
from relay.config import Config
from tests.dialogue import Dialogue, plain
from tests.hostile.kit import (
    LOGIN,
    authed,
    eventually,
    message,
    queued,
    started,
    stopped,
    with_auth,
    with_limits,
)
from tests.relayserver import RelayHandle

SMUGGLED = (
    b"MAIL FROM:<app@example.com>\r\n"
    b"RCPT TO:<victim@dest.test>\r\n"
    b"DATA\r\n" + message(subject="smuggled") + b"\r\n.\r\n"
)

# Markers that some servers take as the end of DATA (all but the real CRLF.CRLF).
END_VARIANTS = [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r"]


async def start_data(d: Dialogue, rcpt: str = "r@dest.test") -> None:
    await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250 2.1.0")
    await d.expect_after(f"RCPT TO:<{rcpt}>", "250 2.1.5")
    await d.expect_after("DATA", "354")


def server_reader(relay: RelayHandle, d: Dialogue) -> asyncio.StreamReader:
    """The server side of this client's connection: its session's stream reader (the relay runs
    in this process, so the test can look at what the server has read)."""
    me = d.writer.get_extra_info("sockname")
    (smtp,) = [
        s
        for s in relay.server.gate.sessions
        if s.transport is not None and s.transport.get_extra_info("peername") == me
    ]
    reader: asyncio.StreamReader = smtp._reader
    return reader


async def server_waits_holding(relay: RelayHandle, d: Dialogue, unread: bytes) -> None:
    """Until the server has read everything the client sent except ``unread`` and is waiting for
    more data: proof that the stream is split exactly there, whatever the timing. Looks at the
    stdlib StreamReader's buffer and waiter (CPython internals, stable since 3.4), not at any
    hook in relaybox."""
    reader = server_reader(relay, d)

    def waiting() -> bool:
        held = bytes(reader._buffer)  # type: ignore[attr-defined]
        return reader._waiter is not None and held == unread  # type: ignore[attr-defined]

    await eventually(waiting, what=f"the server read all but {unread!r} and waits for more")


async def assert_one_reply_then_quiet(d: Dialogue, expected: str) -> None:
    """Exactly one reply to the whole DATA blob: the next reply read answers our NOOP."""
    assert await d.reply() == expected
    assert await d.reply_after("NOOP") == "250 OK"


MODES = ["reject", "normalize"]


async def in_mode(relay: RelayHandle, mode: str) -> None:
    if relay.server.cfg.limits.bare_newline != mode:
        await relay.server.reload(with_limits(relay.server.cfg, bare_newline=mode), notify=False)


async def stored_body(relay: RelayHandle, message_id: str) -> bytes:
    spool = relay.server.spool
    assert spool is not None
    stored = await spool.load(message_id)
    assert stored is not None and stored.body is not None
    return stored.body


def only_crlf(body: bytes) -> bool:
    return body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n") and b"\0" not in body


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", END_VARIANTS, ids=[repr(v)[2:-1] for v in END_VARIANTS])
async def test_end_of_data_variants_never_make_a_second_message(
    relay: RelayHandle, variant: bytes, mode: str
) -> None:
    await in_mode(relay, mode)
    password = await relay.add_user(LOGIN)
    d = await authed(relay, password)
    await start_data(d)
    # The first message's last line has no CRLF of its own: the variant ends it.
    first = message(subject="first").removesuffix(b"\r\n")
    d.send_raw(first + variant + SMUGGLED)
    await d.writer.drain()
    if mode == "reject" or b"\r" in variant.replace(b"\r\n", b""):
        await assert_one_reply_then_quiet(d, str(replies.BARE_LINE_ENDING))
        assert await queued(relay) == []
        before: list[str] = []
    else:
        # Normalized: one message up to the real CRLF.CRLF, the smuggled transaction its text.
        reply = await d.reply()
        assert reply.startswith("250 2.0.0 queued as "), reply
        assert await d.reply_after("NOOP") == "250 OK"
        (msg,) = await queued(relay)
        assert msg.id == reply.rsplit(" ", 1)[1]
        assert [r.address for r in msg.recipients] == ["r@dest.test"]
        body = await stored_body(relay, msg.id)
        assert only_crlf(body)
        assert b"\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<victim@dest.test>\r\nDATA\r\n" in body
        assert b"Subject: smuggled" in body
        before = [msg.id]
    # The session is still usable, and a clean message is exactly one message.
    await start_data(d)
    d.send_raw(message(subject="clean") + b".\r\n")
    await d.writer.drain()
    reply = await d.reply()
    assert reply.startswith("250 2.0.0 queued as "), reply
    msgs = await queued(relay)
    assert sorted(m.id for m in msgs) == sorted([*before, reply.rsplit(" ", 1)[1]])
    assert all([r.address for r in m.recipients] == ["r@dest.test"] for m in msgs)
    await d.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("body", "expected", "normalized"),
    [
        (b"bare\nLF inside a line\r\n", replies.BARE_LINE_ENDING, b"bare\r\nLF inside a line\r\n"),
        (b"bare\rCR inside a line\r\n", replies.BARE_LINE_ENDING, None),
        (b"ends with a bare CR\r\r\n", replies.BARE_LINE_ENDING, None),
        (b"lone LF at the end\n", replies.BARE_LINE_ENDING, b"lone LF at the end\r\n"),
        (b"a NUL \0 byte\r\n", replies.NUL_IN_MESSAGE, None),
        (b"\n.\n", replies.BARE_LINE_ENDING, b"\r\n\r\n"),
        (b"x\n..\n.y\r\n", replies.BARE_LINE_ENDING, b"x\r\n.\r\ny\r\n"),
        (b"CR then LF\r\r\n\n", replies.BARE_LINE_ENDING, None),
    ],
    ids=["lf", "cr", "cr-before-crlf", "trailing-lf", "nul", "lf-dot-lf-alone", "lf-dots", "cr-lf"],
)
async def test_bare_cr_lf_and_nul_are_refused(
    relay: RelayHandle, body: bytes, expected: replies.Reply, normalized: bytes | None, mode: str
) -> None:
    """In "normalize" mode only a bare LF is taken (a line end, dot-unstuffed like any line
    start, stored as CRLF); a bare CR and a NUL are refused in both modes."""
    await in_mode(relay, mode)
    password = await relay.add_user(LOGIN)
    d = await authed(relay, password)
    await start_data(d)
    d.send_raw(message(body=body) + b"\r\n.\r\n")
    await d.writer.drain()
    if mode == "reject" or normalized is None:
        await assert_one_reply_then_quiet(d, str(expected))
        assert await queued(relay) == []
    else:
        reply = await d.reply()
        assert reply.startswith("250 2.0.0 queued as "), reply
        (msg,) = await queued(relay)
        stored = await stored_body(relay, msg.id)
        assert only_crlf(stored)
        assert stored.endswith(b"\r\n\r\n" + normalized + b"\r\n"), stored
    await d.close()


@pytest.mark.parametrize("mode", MODES)
async def test_bare_lf_in_a_header(relay: RelayHandle, mode: str) -> None:
    """Refused in "reject" mode; in "normalize" mode the LF ends the field, as at Postfix: the
    Bcc is a field of the message, never a recipient of the envelope."""
    await in_mode(relay, mode)
    password = await relay.add_user(LOGIN)
    d = await authed(relay, password)
    await start_data(d)
    d.send_raw(b"From: app@example.com\nBcc: victim@dest.test\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    await d.writer.drain()
    if mode == "reject":
        await assert_one_reply_then_quiet(d, str(replies.BARE_LINE_ENDING))
        assert await queued(relay) == []
    else:
        reply = await d.reply()
        assert reply.startswith("250 2.0.0 queued as "), reply
        (msg,) = await queued(relay)
        assert [r.address for r in msg.recipients] == ["r@dest.test"]
        assert only_crlf(await stored_body(relay, msg.id))
    await d.close()


def test_bare_newline_is_normalize_or_reject() -> None:
    assert config_mod.from_dict({}).limits.bare_newline == "normalize"
    cfg = config_mod.from_dict({"limits": {"bare_newline": "reject"}})
    assert cfg.limits.bare_newline == "reject"
    with pytest.raises(config_mod.ConfigError, match=r"limits\.bare_newline: 'lax' is not one of"):
        config_mod.from_dict({"limits": {"bare_newline": "lax"}})


async def test_a_bare_lf_after_an_overlong_line_is_no_crlf_before_an_end(
    relay: RelayHandle,
) -> None:
    """In "normalize" mode a bare LF ends a line too long to keep, but a dot after it is still
    no end of DATA: only CRLF . CRLF is."""
    await in_mode(relay, "normalize")
    password = await relay.add_user(LOGIN)
    d = await authed(relay, password)
    await start_data(d)
    d.send_raw(message(body=b"x" * 3000 + b"\n.\r\n" + SMUGGLED))
    await d.writer.drain()
    await assert_one_reply_then_quiet(d, str(replies.LINE_TOO_LONG))
    assert await queued(relay) == []
    await d.close()


async def test_tail_of_an_overlong_line_is_not_an_end_of_data(relay: RelayHandle) -> None:
    """A line over 1000 octets is read in pieces; its tail must never count as a line start.

    Had the server taken the "." left over from a cut-off long line, followed by CRLF, as the end
    of DATA, the commands after it would run in the client's authenticated session: a smuggled
    second message with recipients of the attacker's choice.
    """
    password = await relay.add_user(LOGIN)
    d = await authed(relay, password)
    await start_data(d)
    d.send_raw(message(body=b"x" * 3000 + b"."))
    await d.writer.drain()
    # The split must happen at the dot: the server has consumed the long line up to it and waits
    # for more. Sent together, the dot and its CRLF arrive as one line and the bug stays hidden.
    await server_waits_holding(relay, d, b".")
    d.send_raw(b"\r\n" + SMUGGLED)
    await d.writer.drain()
    await assert_one_reply_then_quiet(d, str(replies.LINE_TOO_LONG))
    assert await queued(relay) == []
    await d.close()


async def test_dot_stuffing_is_undone_and_only_crlf_dot_crlf_ends(relay: RelayHandle) -> None:
    """RFC 5321 4.5.2: "..\\r\\n" is a line holding one dot, not the end of the message."""
    password = await relay.add_user(LOGIN)
    d = await authed(relay, password)
    await start_data(d)
    d.send_raw(message(body=b"..\r\n..MAIL FROM:<x@example.com>\r\n") + b".\r\n")
    await d.writer.drain()
    reply = await d.reply()
    assert reply.startswith("250 2.0.0 queued as "), reply
    (msg,) = await queued(relay)
    spool = relay.server.spool
    assert spool is not None
    stored = await spool.load(msg.id)
    assert stored is not None and stored.body is not None
    assert stored.body.endswith(b"\r\n\r\n.\r\n.MAIL FROM:<x@example.com>\r\n")
    await d.close()


async def test_starttls_discards_pipelined_plaintext(relay: RelayHandle) -> None:
    """RFC 3207 4.2 / CVE-2011-0411: bytes sent with STARTTLS before the handshake are dropped."""
    d = await Dialogue.open(relay.starttls_port)
    await d.expect_after("EHLO c", "250")
    d.send_raw(b"STARTTLS\r\nRSET\r\n")
    await d.writer.drain()
    await d.expect("220")
    await d.writer.start_tls(relay.client_context(), server_hostname="relay.test")
    # Had the injected RSET run inside TLS, its "250 OK" would come before this EHLO's reply.
    ehlo = await d.reply_after("EHLO c")
    assert ehlo.startswith("250-relay.test"), ehlo
    assert "AUTH" in ehlo
    assert await d.reply_after("NOOP") == "250 OK"
    await d.close()


async def test_starttls_discards_pipelined_auth(relay: RelayHandle) -> None:
    """An AUTH injected in plaintext behind STARTTLS never authenticates the TLS session."""
    password = await relay.add_user(LOGIN)
    d = await Dialogue.open(relay.starttls_port)
    await d.expect_after("EHLO c", "250")
    d.send_raw(f"STARTTLS\r\nAUTH PLAIN {plain(LOGIN, password)}\r\n".encode())
    await d.writer.drain()
    await d.expect("220")
    await d.writer.start_tls(relay.client_context(), server_hostname="relay.test")
    await d.expect_after("EHLO c", "250")
    assert await d.reply_after(f"MAIL FROM:<{LOGIN}>") == str(replies.AUTH_REQUIRED)
    await d.close()


async def test_commands_before_the_greeting(relay: RelayHandle) -> None:
    """A client that talks before the 220 gets the greeting first, then one reply per command
    in order; nothing it sent early gets around STARTTLS or AUTH."""
    password = await relay.add_user(LOGIN)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.starttls_port)
    writer.write(
        b"EHLO early\r\n"
        + f"AUTH PLAIN {plain(LOGIN, password)}\r\n".encode()
        + f"MAIL FROM:<{LOGIN}>\r\n".encode()
        + b"STARTTLS\r\nRSET\r\n"
    )
    await writer.drain()
    d = Dialogue(reader, writer)
    greeting = await d.reply()
    assert greeting.startswith("220 relay.test"), greeting
    await d.expect("250")  # EHLO
    assert await d.reply() == str(replies.AUTH_NEEDS_TLS)
    assert await d.reply() == str(replies.AUTH_REQUIRED)
    await d.expect("220")  # STARTTLS; the RSET behind it is discarded
    await writer.start_tls(relay.client_context(), server_hostname="relay.test")
    ehlo = await d.reply_after("EHLO c")
    assert ehlo.startswith("250-relay.test"), ehlo
    await d.close()


async def test_early_talker_on_the_implicit_tls_listener(relay: RelayHandle) -> None:
    """On port 465 the early bytes go inside TLS; the greeting still comes first."""
    password = await relay.add_user(LOGIN)
    ctx: ssl.SSLContext = relay.client_context()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", relay.tls_port, ssl=ctx, server_hostname="relay.test"
    )
    writer.write(f"EHLO early\r\nAUTH PLAIN {plain(LOGIN, password)}\r\nNOOP\r\n".encode())
    await writer.drain()
    d = Dialogue(reader, writer)
    await d.expect("220 relay.test")
    await d.expect("250")
    assert await d.reply() == str(replies.AUTH_OK)
    assert await d.reply() == "250 OK"
    await d.close()


async def test_starttls_forgets_a_plaintext_login(
    relay_cfg: Config, tls_files: tuple[Path, Path, Path], clock: ManualClock
) -> None:
    """RFC 3207 4.2: after STARTTLS the server discards what it knew, the AUTH included (only
    possible at all with auth.allow_plaintext, a lab setting)."""
    relay = await started(with_auth(relay_cfg, allow_plaintext=True), tls_files, clock)
    try:
        password = await relay.add_user(LOGIN)
        d = await Dialogue.open(relay.starttls_port)
        await d.expect_after("EHLO c", "250")
        assert await d.reply_after(f"AUTH PLAIN {plain(LOGIN, password)}") == str(replies.AUTH_OK)
        await d.starttls(relay.client_context())
        await d.expect_after("EHLO c", "250")
        assert await d.reply_after(f"MAIL FROM:<{LOGIN}>") == str(replies.AUTH_REQUIRED)
        await d.close()
    finally:
        await stopped(relay)
