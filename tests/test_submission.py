"""Submission: real clients against the real server on ephemeral ports (issue 3)."""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import email.utils
import smtplib
import ssl
import time
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest

from relay import replies
from relay.clock import ManualClock
from relay.config import Config
from relay.store import users
from tests.dialogue import Dialogue, b64, plain
from tests.relayserver import RelayHandle, start_relay

LOGIN = "app@example.com"


def message(sender: str = LOGIN, to: str = "someone@dest.test", size: int = 0) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = "hello"
    msg.set_content("Hello there.\n" + ("x" * 70 + "\n") * (size // 71))
    return msg.as_bytes().replace(b"\n", b"\r\n")


def smtplib_send(
    port: int, ctx: ssl.SSLContext, login: str, password: str, *, implicit: bool, mech: str
) -> str:
    """Send one message with smtplib; returns the final reply text (raises on failure)."""
    cls = smtplib.SMTP_SSL if implicit else smtplib.SMTP
    kwargs = {"context": ctx} if implicit else {}
    with cls("127.0.0.1", port, timeout=10, **kwargs) as s:  # type: ignore[arg-type]
        if not implicit:
            s.ehlo("client.test")
            s.starttls(context=ctx)
        s.ehlo("client.test")
        s.login(login, password) if mech == "any" else _login(s, mech, login, password)
        s.mail(login)
        s.rcpt("someone@dest.test")
        code, text = s.data(message(login))
        assert code == 250, (code, text)
        return text.decode()


def _login(s: smtplib.SMTP, mech: str, login: str, password: str) -> None:
    s.user, s.password = login, password
    s.auth(mech, getattr(s, "auth_" + mech.lower()), initial_response_ok=True)


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "tls"])
async def test_smtplib_auth_and_send(relay: RelayHandle, mech: str, implicit: bool) -> None:
    password = await relay.add_user(LOGIN)
    port = relay.tls_port if implicit else relay.starttls_port
    text = await asyncio.to_thread(
        smtplib_send, port, relay.client_context(), LOGIN, password, implicit=implicit, mech=mech
    )
    assert text.startswith("2.0.0 queued as ")


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "tls"])
async def test_aiosmtplib_send(relay: RelayHandle, implicit: bool) -> None:
    password = await relay.add_user(LOGIN)
    port = relay.tls_port if implicit else relay.starttls_port
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = LOGIN, "a@dest.test", "hi"
    msg.set_content("hi")
    errors, response = await aiosmtplib.send(
        msg,
        hostname="127.0.0.1",
        port=port,
        username=LOGIN,
        password=password,
        use_tls=implicit,
        start_tls=not implicit,
        tls_context=relay.client_context(),
        timeout=10,
    )
    assert errors == {}
    assert response.startswith("2.0.0 queued as")


@pytest.mark.parametrize("mode", ["starttls", "tls"])
async def test_wrong_password_is_535_on_both_listeners(relay: RelayHandle, mode: str) -> None:
    """No async-authenticator bypass: a wrong password never gets 235."""
    await relay.add_user(LOGIN)
    ctx = relay.client_context()
    d = await Dialogue.open(relay.port(mode), tls=ctx if mode == "tls" else None)
    if mode == "starttls":
        await d.expect_after("EHLO c", "250")
        await d.starttls(ctx)
    await d.expect_after("EHLO c", "250")
    await d.expect_after(f"AUTH PLAIN {plain(LOGIN, 'wrong-password-123')}", "535 5.7.8")
    await d.expect_after(f"AUTH LOGIN {b64(LOGIN)}", "334")
    await d.expect_after(b64("another-wrong-one"), "535 5.7.8")
    await d.expect_after(f"AUTH PLAIN {plain('nobody@example.com', 'x' * 20)}", "421 4.7.0")
    await d.close()


async def test_auth_not_offered_before_starttls(relay: RelayHandle) -> None:
    password = await relay.add_user(LOGIN)
    d = await Dialogue.open(relay.starttls_port)
    ehlo = await d.expect_after("EHLO c", "250")
    assert "STARTTLS" in ehlo and "AUTH" not in ehlo
    await d.expect_after(f"AUTH PLAIN {plain(LOGIN, password)}", "538 5.7.11")
    await d.expect_after("MAIL FROM:<app@example.com>", "530 5.7.0")
    await d.starttls(relay.client_context())
    ehlo = await d.expect_after("EHLO c", "250")
    assert "AUTH LOGIN PLAIN" in ehlo
    await d.expect_after("MAIL FROM:<app@example.com>", "530 5.7.0")
    await d.expect_after(f"AUTH PLAIN {plain(LOGIN, password)}", "235 2.7.0")
    await d.expect_after("AUTH PLAIN xyz", "503")
    await d.expect_after("MAIL FROM:<app@example.com>", "250 2.1.0")
    await d.close()


async def test_grace_window_over_smtp(relay: RelayHandle, clock: ManualClock) -> None:
    old = await relay.add_user(LOGIN)
    db = relay.server.db
    assert db is not None
    new = "N3w-password-for-the-app"
    relay_secret(new)
    await users.reset_password(
        db, LOGIN, new, grace=3600, hasher=relay.hasher, now=clock(), actor="test"
    )
    ctx = relay.client_context()
    for pw in (old, new):
        d = await Dialogue.open(relay.tls_port, tls=ctx)
        await d.login(LOGIN, pw)
        await d.close()
    clock.advance(3601)
    d = await Dialogue.open(relay.tls_port, tls=ctx)
    await d.expect_after("EHLO c", "250")
    await d.expect_after(f"AUTH PLAIN {plain(LOGIN, old)}", "535 5.7.8")
    await d.expect_after(f"AUTH PLAIN {plain(LOGIN, new)}", "235 2.7.0")
    await d.close()


def relay_secret(secret: str) -> None:
    from tests import leaks

    leaks.add(secret)


async def test_revocation_is_immediate_even_mid_session(
    relay: RelayHandle, clock: ManualClock
) -> None:
    password = await relay.add_user(LOGIN)
    db = relay.server.db
    assert db is not None
    ctx = relay.client_context()
    d = await Dialogue.open(relay.tls_port, tls=ctx)
    await d.login(LOGIN, password)
    await d.expect_after("MAIL FROM:<app@example.com>", "250")
    await d.expect_after("RSET", "250")
    await users.set_disabled(db, LOGIN, True, now=clock(), actor="test")
    await d.expect_after("MAIL FROM:<app@example.com>", "535 5.7.8")
    await d.expect_after("MAIL FROM:<app@example.com>", "530 5.7.0")
    await d.close()
    # A cached credential does not survive a reset with no grace, nor a delete.
    await users.set_disabled(db, LOGIN, False, now=clock(), actor="test")
    d = await Dialogue.open(relay.tls_port, tls=ctx)
    await d.login(LOGIN, password)
    await d.close()
    relay_secret("Fresh-password-0001")
    await users.reset_password(
        db, LOGIN, "Fresh-password-0001", grace=0, hasher=relay.hasher, now=clock(), actor="t"
    )
    d = await Dialogue.open(relay.tls_port, tls=ctx)
    await d.expect_after("EHLO c", "250")
    await d.expect_after(f"AUTH PLAIN {plain(LOGIN, password)}", "535 5.7.8")
    await d.login(LOGIN, "Fresh-password-0001", ehlo="again")
    await users.delete(db, LOGIN, now=clock(), actor="test")
    await d.expect_after("MAIL FROM:<app@example.com>", "535 5.7.8")
    await d.close()


@pytest.mark.parametrize(
    ("sender", "header_from", "setup", "expect"),
    [
        ("app@example.com", "app@example.com", None, "250 2.0.0 queued as"),
        ("other@example.com", "Someone <x@example.com>", None, "250 2.0.0 queued as"),
        ("app@other.test", None, None, "550 5.7.1"),
        ("app@example.com", "boss@other.test", None, "550 5.7.1"),
        ("app@example.com", None, "failing", "250 2.0.0 queued as"),
        ("app@example.com", None, "suspended", "550 5.7.1"),
        ("", None, None, "550 5.7.1"),
        # Raw From fields (EmailMessage would refuse a second From):
        pytest.param(LOGIN, (), None, "550 5.6.0", id="no-from"),
        pytest.param(LOGIN, (f"From: {LOGIN}",) * 2, None, "550 5.6.0", id="two-from-fields"),
        pytest.param(
            LOGIN,
            (f"From: {LOGIN}", "From: boss@other.test"),
            None,
            "550 5.6.0",
            id="two-from-fields-one-foreign",
        ),
        pytest.param(
            LOGIN,
            (f"From: {LOGIN}, boss@other.test",),
            None,
            "550 5.7.1",
            id="from-list-one-foreign",
        ),
        pytest.param(
            LOGIN,
            (f"From: {LOGIN}, b@example.com",),
            None,
            "250 2.0.0 queued as",
            id="from-list-all-owned",
        ),
        pytest.param(
            LOGIN,
            ("From : boss@other.test", f"From: {LOGIN}"),
            None,
            "550 5.6.0",
            id="obs-syntax-second-from",
        ),
    ],
)
async def test_policy_matrix(
    relay: RelayHandle,
    clock: ManualClock,
    sender: str,
    header_from: str | tuple[str, ...] | None,
    setup: str | None,
    expect: str,
) -> None:
    password = await relay.add_user(LOGIN)
    if setup is not None:
        await set_domain_state(relay, "example.com", setup, clock)
    d = await Dialogue.open(relay.tls_port, tls=relay.client_context())
    await d.login(LOGIN, password)
    mail_reply = await d.reply_after(f"MAIL FROM:<{sender}>")
    if not mail_reply.startswith("250"):
        assert mail_reply.startswith(expect), mail_reply
        await d.close()
        return
    await d.expect_after("RCPT TO:<rcpt@dest.test>", "250 2.1.5")
    await d.expect_after("DATA", "354")
    if isinstance(header_from, tuple):
        data = raw_message(*header_from)
    else:
        data = message(header_from or sender)
    await d.expect_after(data + b".\r\n", expect)
    await d.close()


def raw_message(*fields: str) -> bytes:
    """A message with exactly these origin fields, then To, Subject and a body."""
    head = [*fields, "To: someone@dest.test", "Subject: hello"]
    return ("".join(f"{f}\r\n" for f in head) + "\r\nHello there.\r\n").encode()


async def set_domain_state(relay: RelayHandle, name: str, state: str, clock: ManualClock) -> None:
    """Drive the real state machine to ``state`` with recorded check results."""
    from relay.dnscheck import CheckResult
    from relay.store import domains

    db = relay.server.db
    assert db is not None
    cfg = relay.server.cfg
    fail = [CheckResult(c, "fail", "no TXT record", "", "") for c in cfg.dns.required]
    await domains.record_results(db, name, fail, cfg=cfg, now=clock())
    if state == "suspended":
        clock.advance(cfg.dns.failure_grace + 1)
        await domains.record_results(db, name, fail, cfg=cfg, now=clock())
    relay.server.acceptor.forget()
    d = await domains.get(db, name)
    assert d is not None and d.state == state


async def test_limits_size_recipients_bare_lf(relay: RelayHandle) -> None:
    cfg = dataclasses.replace(
        relay.server.cfg,
        limits=dataclasses.replace(
            relay.server.cfg.limits,
            max_message_size=20000,
            max_recipients=3,
            bare_newline="reject",  # "normalize" is tests/hostile/test_smuggling.py's
        ),
    )
    await relay.server.reload(cfg, notify=False)
    password = await relay.add_user(LOGIN)
    d = await Dialogue.open(relay.tls_port, tls=relay.client_context())
    await d.login(LOGIN, password)
    await d.expect_after("MAIL FROM:<app@example.com>", "250")
    for i in range(3):
        await d.expect_after(f"RCPT TO:<r{i}@dest.test>", "250")
    await d.expect_after("RCPT TO:<r3@dest.test>", "452 4.5.3")
    await d.expect_after("DATA", "354")
    await d.expect_after(message(size=30000) + b".\r\n", "552 5.3.4")
    # Bare LF inside a line, and a smuggling attempt with \n.\n: one reply, no second message.
    await d.expect_after("MAIL FROM:<app@example.com>", "250")
    await d.expect_after("RCPT TO:<r@dest.test>", "250")
    await d.expect_after("DATA", "354")
    smuggle = message() + b"\n.\nMAIL FROM:<app@example.com>\r\n"
    await d.expect_after(smuggle + b".\r\n", "554 5.6.0")
    await d.expect_after("NOOP", "250")
    await d.close()


async def test_received_is_added_and_date_and_message_id_only_when_missing(
    relay: RelayHandle,
) -> None:
    """RFC 5321 4.4: a Received field on top, naming the client's EHLO and address, this host,
    ESMTPSA (authenticated, over TLS) and the time. RFC 6409 8.2, 8.3: a Date and a Message-ID
    for a message that has none; one that has them keeps its own, and gets no second."""
    password = await relay.add_user(LOGIN)
    head = f"From: <{LOGIN}>\r\nTo: <someone@dest.test>\r\nSubject: fields\r\n"
    bare = (head + "\r\nhi\r\n").encode()
    own = "Date: Thu, 26 Nov 2026 10:00:00 +0000\r\nMessage-ID: <own-1@example.com>\r\n"
    dressed = (head + own + "\r\nhi\r\n").encode()
    spool = relay.server.spool
    assert spool is not None
    stored: list[bytes] = []
    for content in (bare, dressed):
        d = await Dialogue.open(relay.tls_port, tls=relay.client_context())
        await d.login(LOGIN, password, ehlo="client.test")
        await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250")
        await d.expect_after("RCPT TO:<someone@dest.test>", "250")
        await d.expect_after("DATA", "354")
        before = time.time()
        reply = await d.expect_after(content + b".\r\n", "250 2.0.0 queued as")
        after = time.time()
        await d.close()
        msg = await spool.load(reply.split()[-1])
        assert msg is not None and msg.body is not None
        stored.append(msg.body)
        parsed = email.message_from_bytes(msg.body, policy=email.policy.default)
        received = parsed.get_all("Received")
        assert received is not None and len(received) == 1
        # Above the client's fields (a DKIM-Signature, when the domain signs, comes first).
        assert msg.body.index(b"Received: ") < msg.body.index(b"From: ")
        trace = " ".join(str(received[0]).split())
        assert trace.startswith("from client.test ([127.0.0.1]) by relay.test (relaybox) with ")
        assert " with ESMTPSA; " in trace, trace
        stamp = email.utils.parsedate_to_datetime(trace.rsplit("; ", 1)[1]).timestamp()
        assert int(before) <= stamp <= after, (before, trace, after)
        assert len(parsed.get_all("Date") or []) == 1
        assert len(parsed.get_all("Message-ID") or []) == 1
    added = email.message_from_bytes(stored[0], policy=email.policy.default)
    assert str(added["Date"]) == " ".join(str(added["Received"]).split()).rsplit("; ", 1)[1]
    assert str(added["Message-ID"]).endswith("@relay.test>")
    kept = email.message_from_bytes(stored[1], policy=email.policy.default)
    assert str(kept["Date"]) == "Thu, 26 Nov 2026 10:00:00 +0000"
    assert str(kept["Message-ID"]) == "<own-1@example.com>"


async def test_sigterm_drain_lets_a_session_finish(relay: RelayHandle) -> None:
    password = await relay.add_user(LOGIN)
    ctx = relay.client_context()
    busy = await Dialogue.open(relay.tls_port, tls=ctx)
    await busy.login(LOGIN, password)
    await busy.expect_after("MAIL FROM:<app@example.com>", "250")
    idle = await Dialogue.open(relay.tls_port, tls=ctx)
    await idle.expect_after("EHLO idle", "250")
    stopping = asyncio.create_task(relay.server.shutdown())
    await idle.expect("421 4.3.2")  # idle session told at once
    with pytest.raises(OSError):
        await Dialogue.open(relay.tls_port, tls=ctx)  # no longer accepting
    await busy.expect_after("RCPT TO:<r@dest.test>", "250")
    await busy.expect_after("DATA", "354")
    await busy.expect_after(message() + b".\r\n", "250 2.0.0 queued as")
    await busy.expect_after("MAIL FROM:<app@example.com>", "421 4.3.2")
    await asyncio.wait_for(stopping, 10)
    await busy.close()
    await idle.close()


async def test_throttle_locks_out_an_ip(
    relay_cfg: Config, tls_files: tuple[Path, Path, Path], clock: ManualClock
) -> None:
    cfg = dataclasses.replace(
        relay_cfg, auth=dataclasses.replace(relay_cfg.auth, max_failures=4, lockout=600)
    )
    relay = await start_relay(cfg, tls_files[2], clock)
    try:
        password = await relay.add_user(LOGIN)
        ctx = relay.client_context()
        for _ in range(2):
            d = await Dialogue.open(relay.tls_port, tls=ctx)
            await d.expect_after("EHLO c", "250")
            await d.expect_after(f"AUTH PLAIN {plain(LOGIN, 'bad-password-1')}", "535")
            await d.expect_after(f"AUTH PLAIN {plain(LOGIN, 'bad-password-2')}", "535")
            await d.close()
        verifies = relay.server.auth.hasher.verifications
        d = await Dialogue.open(relay.tls_port, tls=ctx)
        await d.expect_after("EHLO c", "250")
        # Locked: even the right password gets 454, and no argon2 work is spent.
        await d.expect_after(f"AUTH PLAIN {plain(LOGIN, password)}", "454 4.7.0")
        assert relay.server.auth.hasher.verifications == verifies
        clock.advance(601)
        await d.expect_after(f"AUTH PLAIN {plain(LOGIN, password)}", "235")
        await d.close()
    finally:
        await relay.server.shutdown()
        relay.close()


@pytest.mark.parametrize("state", ["pending", "suspended", None])
def test_unverified_domains_cannot_send(state: str | None) -> None:
    from relay.smtp import policy

    assert (
        policy.check_sender("example.com", "a@example.com", state)
        == replies.SENDER_DOMAIN_UNVERIFIED
    )
    assert policy.check_sender("example.com", "a@example.com", "verified") is None
    assert policy.check_sender("example.com", "a@EXAMPLE.com", "failing") is None


def test_replies_catalogue_is_consistent() -> None:
    for name in dir(replies):
        r = getattr(replies, name)
        if isinstance(r, replies.Reply) and r.code // 100 == 3:
            assert r.enhanced == "", name  # RFC 3463 codes are for 2xx, 4xx and 5xx replies only
        elif isinstance(r, replies.Reply):
            assert str(r.code)[0] == r.enhanced[0], name
