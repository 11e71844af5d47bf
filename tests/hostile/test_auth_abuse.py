"""Malformed and abusive AUTH against the real server: exact replies (issue 6, item 2).

Where relaybox decides the reply it comes from relay/replies.py; where aiosmtpd decides it (before
our hooks run) the test pins aiosmtpd 1.4.6's exact text, so a change there is noticed.
Property tests (hypothesis) drive the address and login parsers directly, and random AUTH blobs
through a live server: no exception ever escapes as a reply, and nothing but the right password
ever gets 235.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay import grammar, replies
from relay.clock import ManualClock
from relay.config import Config
from relay.errors import Invalid
from relay.store import users
from tests import leaks
from tests.dialogue import Dialogue, b64, plain
from tests.hostile.kit import LOGIN, authed, no_errors_logged, started, stopped, with_auth
from tests.relayserver import RelayHandle

MALFORMED = str(replies.AUTH_MALFORMED)
FAILED = str(replies.AUTH_FAILED)
# aiosmtpd's own replies (sent before any relaybox hook runs).
LINE_TOO_LONG = "500 Command line too long"
SEND_EHLO_FIRST = "503 Error: send EHLO first"
NOT_UTF8_LOGIN = base64.b64encode(b"\0\xff\xfeapp@example.com\0password-123").decode()
NOT_UTF8_PASSWORD = base64.b64encode(b"\0app@example.com\0\xc3\x28password").decode()


async def tls_session(relay: RelayHandle) -> Dialogue:
    d = await Dialogue.open(relay.tls_port, tls=relay.client_context())
    await d.expect_after("EHLO c", "250")
    return d


def b64raw(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("AUTH PLAIN !!!not-base64!!!", MALFORMED),
        ("AUTH PLAIN AGFwcA", MALFORMED),  # base64 with its padding missing
        (f"AUTH PLAIN {b64('app@example.compassword')}", MALFORMED),  # no NULs
        (f"AUTH PLAIN {b64(chr(0) + 'app@example.com')}", MALFORMED),  # one NUL
        (f"AUTH PLAIN {b64raw(b'a' + bytes(3) + b'b')}", MALFORMED),  # three NULs
        (f"AUTH PLAIN {NOT_UTF8_LOGIN}", MALFORMED),
        (f"AUTH PLAIN {NOT_UTF8_PASSWORD}", MALFORMED),
        (f"AUTH PLAIN {b64(chr(0) + chr(0) + 'some-password')}", FAILED),  # empty login
        (f"AUTH PLAIN {b64(chr(0) + 'app@example.com' + chr(0))}", FAILED),  # empty password
        ("AUTH PLAIN =", MALFORMED),  # RFC 4954 4: "=" is an empty response: no NULs
        ("AUTH PLAIN Zm9v\u00e9", "500 Error: strict ASCII mode"),  # aiosmtpd: no SMTPUTF8
        (f"AUTH PLAIN {'A' * 2000}", MALFORMED),  # read whole (up to 12288): 1500 NULs
        (f"AUTH PLAIN {'A' * 12289}", LINE_TOO_LONG),  # over the one AUTH response limit
        ("AUTH CRAM-MD5", str(replies.AUTH_UNKNOWN_MECH)),
        ("AUTH XOAUTH2 dG9rZW4=", str(replies.AUTH_UNKNOWN_MECH)),
        ("AUTH response", str(replies.AUTH_UNKNOWN_MECH)),  # no helper method is a mechanism
        ("AUTH", "501 Not enough value"),
        ("AUTH PLAIN a b", "501 Too many values"),
    ],
)
async def test_malformed_auth_exact_replies(
    relay: RelayHandle, caplog: pytest.LogCaptureFixture, command: str, expected: str
) -> None:
    await relay.add_user(LOGIN)
    d = await tls_session(relay)
    assert await d.reply_after(command) == expected
    # The session is not broken: the server still answers, and nobody got authenticated.
    assert await d.reply_after(f"MAIL FROM:<{LOGIN}>") == str(replies.AUTH_REQUIRED)
    await d.close()
    no_errors_logged(caplog.records)


async def test_ehlo_advertises_exactly_login_and_plain(relay: RelayHandle) -> None:
    d = await Dialogue.open(relay.tls_port, tls=relay.client_context())
    ehlo = await d.expect_after("EHLO c", "250")
    assert [line for line in ehlo.split("\n") if "AUTH" in line] == ["250-AUTH LOGIN PLAIN"]
    await d.close()


@pytest.mark.parametrize(
    ("mech", "at"), [("LOGIN", "username"), ("LOGIN", "password"), ("PLAIN", "response")]
)
async def test_star_cancels(relay: RelayHandle, mech: str, at: str) -> None:
    """RFC 4954 4: "*" as a response cancels the exchange with a 501."""
    await relay.add_user(LOGIN)
    d = await tls_session(relay)
    await d.expect_after(f"AUTH {mech}", "334 ")
    if at == "password":
        assert await d.reply_after(b64(LOGIN)) == "334 " + b64("Password:")
    assert await d.reply_after("*") == str(replies.AUTH_CANCELLED)
    assert await d.reply_after("NOOP") == "250 OK"
    await d.close()


async def test_login_prompts_and_continuation_errors(relay: RelayHandle) -> None:
    await relay.add_user(LOGIN)
    d = await tls_session(relay)
    assert await d.reply_after("AUTH LOGIN") == "334 " + b64("Username:")
    assert await d.reply_after("%%%") == MALFORMED
    assert await d.reply_after("AUTH PLAIN") == "334 "
    assert await d.reply_after("bm90IHBsYWlu") == MALFORMED  # "not plain": no NULs
    assert await d.reply_after("AUTH LOGIN") == "334 " + b64("Username:")
    assert await d.reply_after("=") == "334 " + b64("Password:")  # empty login
    assert await d.reply_after(b64("some-password")) == FAILED
    await d.close()


async def test_ten_kilobyte_login(relay: RelayHandle) -> None:
    """A 10 kB login: refused without a crash, whichever way it is sent."""
    await relay.add_user(LOGIN)
    login = "a" * 10240 + "@example.com"
    d = await tls_session(relay)
    assert await d.reply_after(f"AUTH PLAIN {plain(login, 'x-password-1')}") == LINE_TOO_LONG
    # As a continuation line it is longer than RFC 4954's 12288 octets once encoded: refused.
    await d.expect_after("AUTH PLAIN", "334")
    assert await d.reply_after(plain(login, "x-password-1")) == MALFORMED
    await d.expect_after("AUTH LOGIN", "334")
    assert await d.reply_after(b64(login)) == MALFORMED
    # Within the continuation limit it is read whole and checked like any unknown login.
    login = "a" * 5000 + "@example.com"
    await d.expect_after("AUTH LOGIN", "334")
    assert await d.reply_after(b64(login)) == "334 " + b64("Password:")
    assert await d.reply_after(b64("x-password-1")) == FAILED
    assert await d.reply_after("NOOP") == "250 OK"
    await d.close()


async def test_longest_allowed_password_logs_in(relay: RelayHandle) -> None:
    """RFC 4954 4: a server must accept responses as long as its mechanisms produce. A password
    of MAX_PASSWORD_BYTES makes a PLAIN response of about 1.4 kB, over the 1000-octet SMTP line."""
    from relay.store.passwords import MAX_PASSWORD_BYTES

    password = leaks.add(("Long-passw0rd-" * 80)[:MAX_PASSWORD_BYTES])
    leaks.add_auth_payload(LOGIN, password)
    await relay.add_user("other@example.com")  # makes the verified domain
    db = relay.server.db
    assert db is not None
    await users.create(
        db, LOGIN, password, hasher=relay.hasher, cfg=relay.server.cfg, now=relay.clock(), actor="t"
    )
    d = await tls_session(relay)
    await d.expect_after("AUTH PLAIN", "334")
    assert await d.reply_after(plain(LOGIN, password)) == str(replies.AUTH_OK)
    await d.close()
    d = await tls_session(relay)
    await d.expect_after(f"AUTH LOGIN {b64(LOGIN)}", "334")
    assert await d.reply_after(b64(password)) == str(replies.AUTH_OK)
    await d.close()


async def test_auth_twice_is_503(relay: RelayHandle) -> None:
    password = await relay.add_user(LOGIN)
    d = await authed(relay, password)
    assert await d.reply_after(f"AUTH PLAIN {plain(LOGIN, password)}") == str(replies.AUTH_ALREADY)
    assert await d.reply_after("AUTH LOGIN") == str(replies.AUTH_ALREADY)
    await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250 2.1.0")
    await d.close()


async def test_auth_before_ehlo(relay: RelayHandle) -> None:
    password = await relay.add_user(LOGIN)
    d = await Dialogue.open(relay.tls_port, tls=relay.client_context())
    assert await d.reply_after(f"AUTH PLAIN {plain(LOGIN, password)}") == SEND_EHLO_FIRST
    # HELO is not extended SMTP: AUTH does not exist there (RFC 4954 3).
    await d.expect_after("HELO c", "250")
    assert await d.reply_after(f"AUTH PLAIN {plain(LOGIN, password)}") == (
        "500 Error: command 'AUTH' not recognized"
    )
    await d.close()


async def test_auth_on_plaintext_is_538(relay: RelayHandle) -> None:
    password = await relay.add_user(LOGIN)
    d = await Dialogue.open(relay.starttls_port)
    ehlo = await d.expect_after("EHLO c", "250")
    assert "AUTH" not in ehlo
    for command in (f"AUTH PLAIN {plain(LOGIN, password)}", "AUTH LOGIN", "AUTH PLAIN"):
        assert await d.reply_after(command) == str(replies.AUTH_NEEDS_TLS)
    # The credentials were never looked at: no argon2 work, no failure counted.
    assert relay.server.auth.throttle.failures("127.0.0.1", relay.clock()) == 0
    await d.close()


async def test_three_failures_close_the_session(relay: RelayHandle) -> None:
    await relay.add_user(LOGIN)
    d = await tls_session(relay)
    assert await d.reply_after(f"AUTH PLAIN {plain(LOGIN, 'wrong-1-password')}") == FAILED
    assert await d.reply_after(f"AUTH PLAIN {plain(LOGIN, 'wrong-2-password')}") == FAILED
    assert await d.reply_after(f"AUTH PLAIN {plain(LOGIN, 'wrong-3-password')}") == str(
        replies.AUTH_TOO_MANY
    )
    assert await d.closed()
    await d.close()


async def test_authzid_must_be_the_login(relay: RelayHandle) -> None:
    """RFC 4616 2: no proxy authorization; an authzid naming someone else is a failure."""
    password = await relay.add_user(LOGIN)
    await relay.add_user("boss@example.com")
    d = await tls_session(relay)
    blob = b64(f"boss@example.com\0{LOGIN}\0{password}")
    leaks.add(blob.rstrip("="))
    assert await d.reply_after(f"AUTH PLAIN {blob}") == FAILED
    blob = b64(f"{LOGIN}\0{LOGIN}\0{password}")
    leaks.add(blob.rstrip("="))
    assert await d.reply_after(f"AUTH PLAIN {blob}") == str(replies.AUTH_OK)
    await d.close()


# --- property tests: the parsers ----------------------------------------------------------------

PROPS = settings(max_examples=300, deadline=None, database=None)
addressish = st.one_of(
    st.text(max_size=300),
    st.text(alphabet='abcAZ09.-_+@"\\ <>()[]:;,\r\n\0\u00e9\u4e2d', max_size=80),
    st.builds(
        lambda a, b: f"{a}@{b}",
        st.text(alphabet='abc.+-"\\ \u00e9', max_size=70),
        st.text(alphabet="abcxn-.0\u00e9\u00df", max_size=70),
    ),
)


@PROPS
@given(addressish)
def test_split_address_never_raises_and_accepts_only_printable_ascii(address: str) -> None:
    parts = grammar.split_address(address)
    if parts is None:
        return
    local, domain = parts
    assert all(0x20 <= ord(c) < 0x7F for c in address), address
    assert f"{local}@{domain}".lower() == address.lower()
    assert len(local) <= 64 and len(address) <= 254
    assert grammar.split_address(f"{local}@{domain}") == parts


@PROPS
@given(addressish)
def test_normalize_login_raises_only_invalid_and_is_idempotent(login: str) -> None:
    try:
        key = users.normalize_login(login)
    except Invalid as exc:
        assert len(str(exc)) < 400  # client input is cut before it reaches a message
        return
    assert key.isascii() and key.count("@") == 1
    assert key == key.lower().strip()
    assert users.normalize_login(key) == key


# --- property test: random AUTH exchanges against a live server ---------------------------------


def _exchange(port: int, ctx: ssl.SSLContext, lines: list[bytes]) -> list[str]:
    """One TLS connection: EHLO, then each line, returning the reply to each (blocking I/O)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="relay.test") as s:
            f = s.makefile("rb")

            def reply() -> str:
                out = []
                while True:
                    line = f.readline(70000)
                    if not line:
                        out.append("<closed>")
                        return "\n".join(out)
                    text = line.decode("utf-8", "replace").rstrip("\r\n")
                    out.append(text)
                    if len(text) < 4 or text[3] != "-":
                        return "\n".join(out)

            reply()
            s.sendall(b"EHLO fuzz\r\n")
            reply()
            answers = []
            for line in lines:
                s.sendall(line + b"\r\n")
                answers.append(reply())
                if not answers[-1].startswith("334 "):
                    break
            return answers


def _right(login: bytes, password: bytes, authzid: bytes, good: bytes) -> bool:
    if password != good or (authzid and authzid != login):
        return False
    try:
        return users.normalize_login(login.decode("utf-8")) == LOGIN
    except (Invalid, UnicodeDecodeError):
        return False


ALLOWED = {
    str(replies.AUTH_OK),
    FAILED,
    MALFORMED,
    str(replies.AUTH_CANCELLED),
    LINE_TOO_LONG,
    "501 Too many values",
    "500 Error: strict ASCII mode",
}


async def test_random_auth_exchanges_live(
    relay_cfg: Config,
    tls_files: tuple[Path, Path, Path],
    clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = with_auth(relay_cfg, max_failures=10000)
    relay = await started(cfg, tls_files, clock)
    try:
        password = await relay.add_user(LOGIN)
        good = password.encode()
        port, ctx = relay.tls_port, relay.client_context()
        logins = st.sampled_from(
            [LOGIN, LOGIN.upper(), " " + LOGIN, "other@example.com", "app@example.co", ""]
        ).map(str.encode) | st.binary(max_size=40)
        passwords = st.sampled_from(
            [password, password + "x", password[:-1], password.upper(), "", " " + password]
        ).map(str.encode) | st.binary(max_size=40)
        authzids = st.sampled_from([b"", b"other@example.com"]) | st.binary(max_size=10)
        mechs = st.sampled_from(["plain-inline", "plain-continued", "login", "login-inline"])
        seen: dict[str, int] = {}

        @settings(
            max_examples=120,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(
            mechs,
            logins,
            passwords,
            authzids,
            st.one_of(st.none(), st.binary(max_size=200), st.text(max_size=200)),
        )
        def prop(
            mech: str, login: bytes, pw: bytes, authzid: bytes, junk: bytes | str | None
        ) -> None:
            if isinstance(junk, str):
                junk = junk.encode("utf-8", "surrogatepass")
            blob = authzid + b"\0" + login + b"\0" + pw
            if junk is not None:  # raw bytes in place of a well-formed response
                junk = junk.replace(b"\n", b"")  # one line each: replies stay in step
                lines = {
                    "plain-inline": [b"AUTH PLAIN " + junk],
                    "plain-continued": [b"AUTH PLAIN", junk],
                    "login": [b"AUTH LOGIN", junk, junk],
                    "login-inline": [b"AUTH LOGIN " + junk, junk],
                }[mech]
                expect_ok = False
            elif mech == "plain-inline":
                lines = [b"AUTH PLAIN " + base64.b64encode(blob)]
                expect_ok = _right(login, pw, authzid, good)
            elif mech == "plain-continued":
                lines = [b"AUTH PLAIN", base64.b64encode(blob)]
                expect_ok = _right(login, pw, authzid, good)
            elif mech == "login":
                lines = [b"AUTH LOGIN", base64.b64encode(login), base64.b64encode(pw)]
                expect_ok = _right(login, pw, b"", good)
            else:
                lines = [b"AUTH LOGIN " + base64.b64encode(login), base64.b64encode(pw)]
                expect_ok = _right(login, pw, b"", good)
            answers = _exchange(port, ctx, lines)
            last = answers[-1]
            if last.startswith("334 "):
                return  # a junk response that the mechanism took as a username
            assert last in ALLOWED, (lines, answers)
            assert (last == str(replies.AUTH_OK)) == expect_ok, (lines, answers)
            seen[last] = seen.get(last, 0) + 1

        await asyncio.to_thread(prop)
        # The generator really reached both sides of the oracle.
        assert seen.get(str(replies.AUTH_OK), 0) > 0 and seen.get(FAILED, 0) > 0, seen
        no_errors_logged(caplog.records)
    finally:
        await stopped(relay)
