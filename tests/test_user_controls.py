"""Per-user controls against the real server (issue 14): sending limits, the IP and sender
allow-lists, expiry.

The server runs in-process on ephemeral ports with a controllable clock (the fixtures of
tests/relayserver.py); clients are real SMTP sessions (tests/dialogue.py). A user's settings are
written with the store's own function (what `relaybox user set` calls). The limits with
``workers = 2`` are in tests/test_user_limits_workers.py (real processes).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay import userrules
from relay.clock import ManualClock
from relay.config import Config
from relay.config_sections import SmarthostConfig, UserLimitsConfig
from relay.store import usage, users
from relay.store.users import SettingsChange
from relay.units import Duration
from tests.dialogue import Dialogue
from tests.hostile.kit import LOGIN, message, queued, with_limits
from tests.relayserver import RelayHandle, start_relay
from tests.sink import Sink
from tests.test_sandbox import CONSOLE

NOREPLY = "noreply@example.com"


@pytest.fixture
async def lax(
    relay_cfg: Config, tls_files: tuple[Path, Path, Path], clock: ManualClock
) -> AsyncIterator[RelayHandle]:
    """The relay with no failure delay and a lockout far away (so that refused AUTHs can be
    counted without locking the address out of the rest of the test)."""
    auth = dataclasses.replace(relay_cfg.auth, max_failures=50)
    handle = await start_relay(dataclasses.replace(relay_cfg, auth=auth), tls_files[2], clock)
    yield handle
    await handle.server.shutdown()
    handle.close()


async def configure(relay: RelayHandle, login: str = LOGIN, **change: object) -> None:
    db = relay.server.db
    assert db is not None
    await users.update_settings(
        db,
        login,
        SettingsChange(**change),
        now=relay.clock(),
        actor="test",  # type: ignore[arg-type]
    )


async def session(relay: RelayHandle, password: str, source: str | None = None) -> Dialogue:
    d = await Dialogue.open(relay.tls_port, tls=relay.client_context(), source=source)
    await d.login(LOGIN, password)
    return d


async def transaction(
    d: Dialogue,
    *,
    sender: str = LOGIN,
    header_from: str | None = None,
    rcpts: tuple[str, ...] = ("bob@dest.test",),
) -> str:
    """One transaction; the first reply that is not a 250 (or the 250 for DATA)."""
    reply = await d.reply_after(f"MAIL FROM:<{sender}>")
    if not reply.startswith("250"):
        return reply
    for rcpt in rcpts:
        reply = await d.reply_after(f"RCPT TO:<{rcpt}>")
        if not reply.startswith("250"):
            await d.expect_after("RSET", "250")
            return reply
    await d.expect_after("DATA", "354")
    d.send_raw(message(sender=header_from or sender, to=rcpts[0]) + b".\r\n")
    await d.writer.drain()
    return await d.reply(within=30)


def limit_reply(limit: int, what: str, at: str) -> str:
    return f"451 4.7.1 {LOGIN}: limit of {limit} {what} reached; retry after {at}"


async def counts(relay: RelayHandle) -> usage.Counts:
    assert relay.server.usage_db is not None
    return await usage.snapshot(relay.server.usage_db, LOGIN, relay.clock())


# --- sending limits -----------------------------------------------------------------------------


async def test_messages_per_hour_admits_five_then_451_until_the_hour_ends(
    relay: RelayHandle, caplog: pytest.LogCaptureFixture, clock: ManualClock
) -> None:
    """--messages-per-hour 5: five 250s, then 451 4.7.1 at MAIL FROM naming the limit and the
    time the hour ends; a message refused for another reason (its header From is not the
    user's) does not count; one mail-log line for the window, however many refusals; the
    metric counts each; at the next hour the count starts again."""
    caplog.set_level(logging.INFO, logger="mail.relaybox")
    caplog.set_level(logging.INFO)
    password = await relay.add_user(LOGIN)
    await configure(relay, limits={"messages_per_hour": 5})
    clock.set(userrules.day_start(clock()) + 13 * 3600 + 1800)  # 13:30Z
    d = await session(relay, password)
    refused = await transaction(d, header_from="someone@elsewhere.test")
    assert refused.startswith("550 5.7.1"), refused
    for _ in range(5):
        assert (await transaction(d)).startswith("250 2.0.0 queued as ")
    over = await transaction(d)
    assert over == limit_reply(5, "messages per hour", "14:00Z")
    assert await transaction(d) == over  # refused again: still one log line
    assert len(await queued(relay)) == 5
    assert (await counts(relay)).messages_this_hour == 5
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("limited ")]
    assert lines == [
        f"limited user={LOGIN} limit=messages_per_hour value=5 until="
        + userrules.format_time(userrules.window_end("messages_per_hour", clock()))
    ]
    rendered = relay.server.metrics.render().decode()
    assert 'relaybox_limited_total{limit="messages_per_hour"} 2.0' in rendered
    clock.advance(1800)  # 14:00Z: a new hour
    assert (await transaction(d)).startswith("250 2.0.0 queued as ")
    await d.close()


async def test_messages_per_day_uses_the_utc_day(relay: RelayHandle, clock: ManualClock) -> None:
    password = await relay.add_user(LOGIN)
    await configure(relay, limits={"messages_per_day": 2, "messages_per_hour": 0})
    clock.set(userrules.day_start(clock()) + 23 * 3600)  # 23:00Z
    d = await session(relay, password)
    for _ in range(2):
        assert (await transaction(d)).startswith("250 ")
    assert await transaction(d) == limit_reply(2, "messages per day", "00:00Z")
    clock.advance(3600)  # the next UTC day
    assert (await transaction(d)).startswith("250 ")
    await d.close()


async def test_recipients_per_day_counts_recipients_of_accepted_messages(
    relay: RelayHandle,
) -> None:
    """recipients_per_day 5: a message to 3 is accepted (3 counted); a message to 2 whose DATA
    is refused counts none; the next message's third RCPT is refused at RCPT TO with the 451."""
    password = await relay.add_user(LOGIN)
    await configure(relay, limits={"recipients_per_day": 5})
    d = await session(relay, password)
    three = ("a@dest.test", "b@dest.test", "c@dest.test")
    assert (await transaction(d, rcpts=three)).startswith("250 ")
    refused = await transaction(d, rcpts=three[:2], header_from="x@elsewhere.test")
    assert refused.startswith("550 5.7.1"), refused
    assert (await counts(relay)).recipients_today == 3
    await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250")
    await d.expect_after("RCPT TO:<d@dest.test>", "250")
    await d.expect_after("RCPT TO:<e@dest.test>", "250")
    over = await d.reply_after("RCPT TO:<f@dest.test>")
    assert over == limit_reply(5, "recipients per day", "00:00Z")
    await d.expect_after("DATA", "354")
    d.send_raw(message() + b".\r\n")
    assert (await d.reply()).startswith("250 ")
    assert (await counts(relay)).recipients_today == 5
    assert (await transaction(d)) == limit_reply(5, "recipients per day", "00:00Z")
    await d.close()


async def test_admission_at_data_is_exact_when_mail_from_was_passed_concurrently(
    relay: RelayHandle,
) -> None:
    """Four sessions pass MAIL FROM while one place is left (the early answer lets them all
    in); at the end of DATA only one is admitted, the others get the 451 there and nothing of
    theirs is queued or counted."""
    password = await relay.add_user(LOGIN)
    await configure(relay, limits={"messages_per_hour": 3})
    first = await session(relay, password)
    for _ in range(2):
        assert (await transaction(first)).startswith("250 ")
    others = [await session(relay, password) for _ in range(4)]
    for d in others:
        await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250")
        await d.expect_after("RCPT TO:<bob@dest.test>", "250")
        await d.expect_after("DATA", "354")
    finals = []
    for d in others:
        d.send_raw(message() + b".\r\n")
        await d.writer.drain()
        finals.append(await d.reply())
    assert sum(f.startswith("250 ") for f in finals) == 1, finals
    assert all(f.startswith("451 4.7.1 ") for f in finals if not f.startswith("250 "))
    assert len(await queued(relay)) == 3
    assert (await counts(relay)).messages_this_hour == 3
    for d in [first, *others]:
        await d.close()


async def test_the_config_default_applies_and_an_override_wins(
    relay_cfg: Config, tls_files: tuple[Path, Path, Path], clock: ManualClock
) -> None:
    cfg = with_limits(relay_cfg, user=UserLimitsConfig(messages_per_hour=1))
    relay = await start_relay(cfg, tls_files[2], clock)
    try:
        password = await relay.add_user(LOGIN)
        d = await session(relay, password)
        assert (await transaction(d)).startswith("250 ")
        assert (await transaction(d)).startswith("451 4.7.1 ")
        await configure(relay, limits={"messages_per_hour": 0})  # unlimited for this user
        assert (await transaction(d)).startswith("250 ")
        await configure(relay, limits={"messages_per_hour": None})  # the default again
        assert (await transaction(d)).startswith("451 4.7.1 ")
        await d.close()
    finally:
        await relay.server.shutdown()
        relay.close()


# --- IP allow-list ------------------------------------------------------------------------------


async def test_auth_from_outside_the_ip_allow_list_is_535_like_a_wrong_password(
    lax: RelayHandle, caplog: pytest.LogCaptureFixture
) -> None:
    """allow_ip 127.0.0.1/32: from 127.0.0.2 the right password gets exactly the 535 of a wrong
    one, logged reason=ip_not_allowed and counted as a failure; from 127.0.0.1 it works. An
    authenticated session whose address is taken off the list meanwhile is refused at MAIL."""
    caplog.set_level(logging.INFO)
    relay = lax
    password = await relay.add_user(LOGIN)
    await configure(relay, allow_ip=["127.0.0.1/32", "::1"])
    wrong = await Dialogue.open(relay.tls_port, tls=relay.client_context(), source="127.0.0.2")
    await wrong.expect_after("EHLO client.test", "250")
    blob = _plain(LOGIN, password + "x")
    bad_password = await wrong.reply_after(f"AUTH PLAIN {blob}")
    outside = await Dialogue.open(relay.tls_port, tls=relay.client_context(), source="127.0.0.2")
    await outside.expect_after("EHLO client.test", "250")
    refused = await outside.reply_after(f"AUTH PLAIN {_plain(LOGIN, password)}")
    assert refused == bad_password == "535 5.7.8 Authentication credentials invalid"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("auth failed")]
    assert any("ip=127.0.0.2" in x and "reason=ip_not_allowed" in x for x in lines), lines
    assert relay.server.auth.pairs.failures(f"127.0.0.2 {LOGIN}", relay.clock()) == 2
    inside = await session(relay, password)
    assert (await transaction(inside)).startswith("250 ")
    await configure(relay, allow_ip=["192.0.2.0/24"])
    assert await transaction(inside) == "535 5.7.8 Authentication credentials no longer valid"
    for d in (wrong, outside, inside):
        await d.close()


def _plain(login: str, password: str) -> str:
    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


# --- sender allow-list --------------------------------------------------------------------------


async def test_allow_from_refuses_other_senders_in_mail_and_in_the_header(
    relay: RelayHandle,
) -> None:
    password = await relay.add_user(LOGIN)
    await configure(relay, allow_from=[NOREPLY, "*@news.example.com"])
    d = await session(relay, password)
    named = "app@example.com may send only as noreply@example.com, *@news.example.com"
    assert await transaction(d, sender="billing@example.com") == f"550 5.7.1 {named}"
    assert (
        await transaction(d, sender=NOREPLY, header_from="billing@example.com")
        == f"550 5.7.1 From address not allowed: {named}"
    )
    assert (await transaction(d, sender=NOREPLY)).startswith("250 ")
    # *@news.example.com: a subdomain of the user's domain, named on its list, may send
    assert (await transaction(d, sender="list@news.example.com")).startswith("250 ")
    assert (await transaction(d, sender="x@other.example.com")).startswith("550 5.7.1 ")
    await configure(relay, allow_from=[])  # no list: any address of the domain again
    assert (await transaction(d, sender="billing@example.com")).startswith("250 ")
    assert (await transaction(d, sender="list@news.example.com")).startswith("550 5.7.1 Sender")
    await d.close()


# --- expiry -------------------------------------------------------------------------------------


async def test_an_expired_user_gets_535_at_auth_and_at_mail(
    lax: RelayHandle, caplog: pytest.LogCaptureFixture, clock: ManualClock
) -> None:
    caplog.set_level(logging.INFO)
    relay = lax
    password = await relay.add_user(LOGIN)
    await configure(relay, expires=True, expires_at=clock() + 3600)
    d = await session(relay, password)
    assert (await transaction(d)).startswith("250 ")
    clock.advance(3600)
    assert await transaction(d) == "535 5.7.8 Authentication credentials no longer valid"
    again = await Dialogue.open(relay.tls_port, tls=relay.client_context())
    await again.expect_after("EHLO client.test", "250")
    reply = await again.reply_after(f"AUTH PLAIN {_plain(LOGIN, password)}")
    assert reply == "535 5.7.8 Authentication credentials invalid"
    lines = [r.getMessage() for r in caplog.records]
    assert any(x.startswith("auth failed") and "reason=expired" in x for x in lines), lines
    assert any(x.startswith("rejected stage=mail reason=expired") for x in lines), lines
    await configure(relay, expires=True, expires_at=None)  # never again
    await again.expect_after(f"AUTH PLAIN {_plain(LOGIN, password)}", "235")
    for s in (d, again):
        await s.close()


# --- usage --------------------------------------------------------------------------------------


async def test_usage_counts_what_was_accepted_refused_and_what_became_of_it(
    relay_cfg: Config, tls_files: tuple[Path, Path, Path], clock: ManualClock, sink: Sink
) -> None:
    """Three messages accepted (four recipients), one refused at its limit; delivery through a
    real smarthost (the sink) delivers two recipients, defers one (451) and bounces one (550):
    the user's usage for the day says exactly that once the tally is flushed; the DSN of the
    bounce is nobody's usage."""
    delivery = dataclasses.replace(
        relay_cfg.delivery,
        mode="smarthost",
        smarthost=SmarthostConfig(host="127.0.0.1", port=sink.port, security="none"),
        connect_timeout=Duration(2),
        paused=False,
    )
    clock.set(time.time())  # `relaybox user usage` (the CLI) counts days from the real clock
    relay = await start_relay(
        dataclasses.replace(relay_cfg, delivery=delivery), tls_files[2], clock
    )
    try:
        sink.script_rcpt("later@dest.test", "451 4.3.0 try later")
        sink.script_rcpt("gone@dest.test", "550 5.1.1 no such user")
        password = await relay.add_user(LOGIN)
        await configure(relay, limits={"messages_per_day": 3, "messages_per_hour": 0})
        d = await session(relay, password)
        for rcpts in (("a@dest.test",), ("b@dest.test", "later@dest.test"), ("gone@dest.test",)):
            assert (await transaction(d, rcpts=rcpts)).startswith("250 ")
        assert (await transaction(d)).startswith("451 4.7.1 ")
        await d.close()
        deliverer = relay.server.deliverer
        assert deliverer is not None
        await sink.wait_received(3)  # a, b, and the DSN of gone@ to the sender
        await deliverer.wait_idle()
        assert relay.server.usage_db is not None
        await relay.server.tally.flush(relay.server.usage_db, clock())
        (today,) = await usage.history(relay.server.usage_db, LOGIN, 1, clock())
        expected = {
            "day": userrules.day_key(clock()),
            "accepted": 3,
            "recipients": 4,
            "delivered": 2,
            "deferred": 1,
            "bounced": 1,
            "refused_for_limit": 1,
        }
        assert today.as_json() == expected
        # What an operator sees: the console script, on a config naming the same state dir.
        conf = relay_cfg.state_dir.parent / "usage-cli.toml"
        conf.write_text(f'state_dir = "{relay_cfg.state_dir}"\n')
        proc = await asyncio.create_subprocess_exec(
            str(CONSOLE), "--config", str(conf), "user", "usage", LOGIN, "--days", "1", "--json",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode == 0, err
        if userrules.day_key(time.time()) == expected["day"]:  # not across UTC midnight
            assert json.loads(out) == {"login": LOGIN, "days": [expected]}
    finally:
        await relay.server.shutdown()
        relay.close()
