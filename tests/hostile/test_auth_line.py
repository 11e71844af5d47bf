"""AUTH response length and mechanism names against the real server (issue 12, item 12).

One limit for an AUTH response, inline (``AUTH PLAIN <response>``) or after a 334: 12288 octets,
the size RFC 4954 4 asks servers to handle whatever their line limits elsewhere. Python's
smtplib sends the initial response inline whatever its length, so a long password must work that
way too. Mechanism names are matched whatever their case (RFC 5321 2.4: verbs, argument values
and extension keywords are not case sensitive; SASL names are registered in upper case, RFC 4422
3.1).
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl

import pytest

from relay import replies
from relay.store import users
from relay.store.passwords import MAX_PASSWORD_BYTES
from tests import leaks
from tests.dialogue import Dialogue, b64, plain
from tests.hostile.kit import LOGIN, no_errors_logged
from tests.relayserver import RelayHandle

LIMIT = 12288  # octets of one AUTH response, however it is sent
LINE_TOO_LONG = "500 Command line too long"  # aiosmtpd's reply for a command line over its limit


async def tls_session(relay: RelayHandle) -> Dialogue:
    d = await Dialogue.open(relay.tls_port, tls=relay.client_context())
    await d.expect_after("EHLO c", "250")
    return d


async def long_password_user(relay: RelayHandle) -> str:
    """A user whose password is the longest allowed: its PLAIN response is about 1.4 kB."""
    password = leaks.add(("Long-passw0rd-" * 80)[:MAX_PASSWORD_BYTES])
    leaks.add_auth_payload(LOGIN, password)
    await relay.add_user("other@example.com")  # makes the verified domain
    db = relay.server.db
    assert db is not None
    await users.create(
        db, LOGIN, password, hasher=relay.hasher, cfg=relay.server.cfg, now=relay.clock(), actor="t"
    )
    return password


async def test_a_long_inline_response_logs_in(
    relay: RelayHandle, caplog: pytest.LogCaptureFixture
) -> None:
    password = await long_password_user(relay)
    assert len(plain(LOGIN, password)) > 1000  # over the 512-octet command line, and the 1000
    d = await tls_session(relay)
    assert await d.reply_after(f"AUTH PLAIN {plain(LOGIN, password)}") == str(replies.AUTH_OK)
    await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250 2.1.0")
    await d.close()
    d = await tls_session(relay)
    assert await d.reply_after(f"AUTH LOGIN {b64(LOGIN)}") == "334 " + b64("Password:")
    assert await d.reply_after(b64(password)) == str(replies.AUTH_OK)
    await d.close()
    no_errors_logged(caplog.records)


async def test_smtplib_logs_in_with_the_longest_password(relay: RelayHandle) -> None:
    """A real client: smtplib sends ``AUTH PLAIN <response>`` inline, whatever its length."""
    password = await long_password_user(relay)
    ctx = ssl.create_default_context(cafile=str(relay.ca_path))

    def login() -> tuple[int, bytes]:
        with smtplib.SMTP_SSL("127.0.0.1", relay.tls_port, context=ctx, timeout=10) as client:
            client.ehlo("client.test")
            client.user, client.password = LOGIN, password
            # PLAIN only: login() would fall back to LOGIN (a 334 continuation) after a 500.
            code, text = client.auth("PLAIN", client.auth_plain)
            client.quit()
            return code, text

    code, _text = await asyncio.to_thread(login)
    assert code == 235


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "after-334"])
async def test_one_limit_for_both_ways(relay: RelayHandle, inline: bool) -> None:
    """A response of exactly 12288 octets is read and checked (a wrong login: 535) both ways;
    one octet more is refused both ways, without reading it as a command."""
    await relay.add_user(LOGIN)
    fits = b64(b"\0" + b"x" * (LIMIT // 4 * 3 - 3) + b"\0" + b"y")
    assert len(fits) == LIMIT
    too_long = fits + "A"
    d = await tls_session(relay)
    for response, expected in ((fits, str(replies.AUTH_FAILED)), (too_long, None)):
        if inline:
            reply = await d.reply_after(f"AUTH PLAIN {response}")
            assert reply == (expected or LINE_TOO_LONG)
        else:
            await d.expect_after("AUTH PLAIN", "334")
            reply = await d.reply_after(response)
            assert reply == (expected or str(replies.AUTH_MALFORMED))
    assert await d.reply_after("NOOP") == "250 OK"  # nothing of it was taken for a command
    await d.close()


async def test_other_command_lines_stay_at_512_octets(relay: RelayHandle) -> None:
    """The AUTH allowance is AUTH's alone (RFC 5321 4.5.3.1.4: 512 octets for a command line)."""
    d = await tls_session(relay)
    assert await d.reply_after("NOOP " + "x" * 507) == "250 OK"  # 512 octets
    assert await d.reply_after("NOOP " + "x" * 508) == LINE_TOO_LONG
    assert await d.reply_after("EHLO " + "x" * 2000) == LINE_TOO_LONG
    assert await d.reply_after("X" * 100_000) == LINE_TOO_LONG
    await d.expect_after("NOOP", "250 OK")
    await d.close()


@pytest.mark.parametrize("mech", ["plain", "Plain", "pLaIn"])
async def test_mechanism_names_are_case_insensitive(relay: RelayHandle, mech: str) -> None:
    password = await relay.add_user(LOGIN)
    d = await tls_session(relay)
    assert await d.reply_after(f"AUTH {mech} {plain(LOGIN, password)}") == str(replies.AUTH_OK)
    await d.close()
    d = await tls_session(relay)
    assert await d.reply_after("auth login") == "334 " + b64("Username:")
    assert await d.reply_after(b64(LOGIN)) == "334 " + b64("Password:")
    assert await d.reply_after(b64(password)) == str(replies.AUTH_OK)
    await d.close()
    d = await tls_session(relay)
    assert await d.reply_after("AUTH cram-md5") == str(replies.AUTH_UNKNOWN_MECH)
    await d.close()
