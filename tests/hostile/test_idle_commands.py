"""Sessions that never send mail against the real server (issue 12, item 4: its last part).

NOOP, RSET, HELP, VRFY (every command that resets the idle timer) kept a session open for ever.
``limits.max_idle_commands`` bounds the commands that bring no message closer between two
accepted messages: past it the session gets ``421 4.7.0`` and is closed. A session that sends mail
is never cut by it: each accepted message starts the count again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from relay import replies
from relay.clock import ManualClock
from relay.config import Config
from tests.dialogue import Dialogue
from tests.hostile.kit import LOGIN, authed, message, started, stopped, with_limits
from tests.relayserver import RelayHandle

LIMIT = 6


@pytest.fixture
async def strict(
    relay_cfg: Config, tls_files: tuple[Path, Path, Path], clock: ManualClock
) -> RelayHandle:
    relay = await started(with_limits(relay_cfg, max_idle_commands=LIMIT), tls_files, clock)
    yield relay  # type: ignore[misc]
    await stopped(relay)


async def cut(d: Dialogue, command: str) -> None:
    assert await d.reply_after(command) == str(replies.TOO_MANY_COMMANDS)
    assert await d.closed(), "the session stayed open after its 421"
    await d.close()


@pytest.mark.parametrize("command", ["NOOP", "RSET", "HELP", "VRFY someone", "EHLO again"])
async def test_commands_without_mail_end_the_session(strict: RelayHandle, command: str) -> None:
    d = await Dialogue.open(strict.starttls_port)
    await d.expect_after("EHLO c", "250")  # the first of LIMIT
    for _ in range(LIMIT - 1):
        reply = await d.reply_after(command)
        assert not reply.startswith("421"), reply
    await cut(d, command)


async def test_quit_is_always_answered(strict: RelayHandle) -> None:
    d = await Dialogue.open(strict.starttls_port)
    for _ in range(LIMIT):
        await d.expect_after("NOOP", "250")
    await d.expect_after("QUIT", "221")
    await d.close()


async def test_a_mail_rset_loop_is_bounded_too(strict: RelayHandle) -> None:
    """MAIL accepted and then abandoned brings no message: MAIL then RSET, for ever, is cut."""
    password = await strict.add_user(LOGIN)
    d = await authed(strict, password)  # EHLO and AUTH: 2 of LIMIT
    for _ in range(LIMIT):
        reply = await d.reply_after(f"MAIL FROM:<{LOGIN}>")
        if reply.startswith("421"):
            assert reply == str(replies.TOO_MANY_COMMANDS)
            assert await d.closed()
            await d.close()
            return
        await d.expect_after("RSET", "250")
    raise AssertionError("MAIL/RSET went on past max_idle_commands")


async def test_sending_mail_starts_the_count_again(strict: RelayHandle) -> None:
    """A session that delivers messages may live long: the limit is on commands between them.
    A whole transaction (MAIL, every RCPT, DATA) counts nothing."""
    password = await strict.add_user(LOGIN)
    d = await authed(strict, password)  # EHLO and AUTH: 2 of LIMIT
    for _round in range(3):
        for _ in range(LIMIT - 3):  # 2 + 3 in the first round: one short of the limit
            await d.expect_after("NOOP", "250")
        await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250 2.1.0")
        for i in range(LIMIT + 2):  # more recipients than the limit: none of them counts
            await d.expect_after(f"RCPT TO:<r{i}@dest.test>", "250 2.1.5")
        await d.expect_after("DATA", "354")
        await d.expect_after(message() + b".\r\n", "250 2.0.0 queued as")
    for _ in range(LIMIT):
        await d.expect_after("NOOP", "250")
    await cut(d, "NOOP")


async def test_the_default_is_a_hundred(relay: RelayHandle) -> None:
    assert relay.server.cfg.limits.max_idle_commands == 100
    d = await Dialogue.open(relay.tls_port, tls=relay.client_context())
    for _ in range(100):
        await d.expect_after("NOOP", "250")
    await cut(d, "NOOP")
