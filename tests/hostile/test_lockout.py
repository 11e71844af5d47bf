"""AUTH lockouts against the real server: per (address, login), per address, IPv6 by prefix.

Issue 12, item 4. Clients on loopback come from different addresses by binding their socket to
127.0.0.2, 127.0.0.3... (all of 127.0.0.0/8 is the loopback interface on Linux), so "another
address" is a real other peer address as the server sees it, not a parameter of a function.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from pathlib import Path

import pytest

from relay import replies
from relay.clock import ManualClock
from relay.config import Config, Listener
from relay.store import events
from tests import leaks
from tests.dialogue import Dialogue, plain
from tests.hostile.kit import LOGIN, started, stopped, with_auth
from tests.relayserver import RelayHandle

OTHER = "other@example.com"
FAILED = str(replies.AUTH_FAILED)
THROTTLED = str(replies.AUTH_THROTTLED)
OK = str(replies.AUTH_OK)


async def session_from(relay: RelayHandle, source: str, host: str = "127.0.0.1") -> Dialogue:
    """A session on the implicit-TLS listener whose client socket is bound to ``source``."""
    reader, writer = await asyncio.open_connection(
        host,
        relay.tls_port,
        ssl=relay.client_context(),
        server_hostname="relay.test",
        local_addr=(source, 0),
    )
    d = Dialogue(reader, writer)
    await d.expect("220")
    await d.expect_after("EHLO c", "250")
    return d


async def fail(relay: RelayHandle, source: str, logins: list[str]) -> None:
    """One failed AUTH per login, from ``source``, two per session (the third closes it)."""
    for start in range(0, len(logins), 2):
        d = await session_from(relay, source)
        for login in logins[start : start + 2]:
            leaks.add_auth_payload(login, "wrong-password-1")
            assert await d.reply_after(f"AUTH PLAIN {plain(login, 'wrong-password-1')}") == FAILED
        await d.close()


async def auth_reply(relay: RelayHandle, source: str, login: str, password: str) -> str:
    d = await session_from(relay, source)
    reply = await d.reply_after(f"AUTH PLAIN {plain(login, password)}")
    await d.close()
    return reply


async def test_one_client_failing_locks_out_its_login_not_its_address(
    relay_cfg: Config, tls_files: tuple[Path, Path, Path], clock: ManualClock
) -> None:
    """Behind one NAT: a client failing with login A (under any alias of it) locks A out there,
    without argon2 work; another login on that address still logs in."""
    relay = await started(with_auth(relay_cfg, max_failures=3), tls_files, clock)
    try:
        password = await relay.add_user(LOGIN)
        other = await relay.add_user(OTHER)
        await fail(relay, "127.0.0.2", [" APP@example.com", "app@example.com.", "app@EXAMPLE.com"])
        verifies = relay.server.auth.hasher.verifications
        assert await auth_reply(relay, "127.0.0.2", LOGIN, password) == THROTTLED
        assert relay.server.auth.hasher.verifications == verifies
        assert await auth_reply(relay, "127.0.0.2", OTHER, other) == OK
    finally:
        await stopped(relay)


async def test_an_attacker_address_does_not_lock_out_another_address(
    relay_cfg: Config, tls_files: tuple[Path, Path, Path], clock: ManualClock
) -> None:
    relay = await started(
        with_auth(relay_cfg, max_failures=2, max_failures_per_address=2), tls_files, clock
    )
    try:
        password = await relay.add_user(LOGIN)
        await fail(relay, "127.0.0.2", [LOGIN, OTHER])  # the address itself is now locked out
        assert await auth_reply(relay, "127.0.0.2", LOGIN, password) == THROTTLED
        assert await auth_reply(relay, "127.0.0.3", LOGIN, password) == OK
        assert await auth_reply(relay, "127.0.0.1", LOGIN, password) == OK
    finally:
        await stopped(relay)


async def test_an_address_is_locked_out_at_the_per_address_threshold(
    relay_cfg: Config, tls_files: tuple[Path, Path, Path], clock: ManualClock
) -> None:
    """A spray of logins from one address, each under max_failures: the address is locked out
    once it reaches max_failures_per_address, before the SASL exchange starts."""
    cfg = with_auth(relay_cfg, max_failures=3, max_failures_per_address=5)
    relay = await started(cfg, tls_files, clock)
    try:
        password = await relay.add_user(LOGIN)
        other = await relay.add_user(OTHER)
        await fail(relay, "127.0.0.2", [f"spray{i}@example.com" for i in range(4)])
        assert await auth_reply(relay, "127.0.0.2", OTHER, other) == OK  # 4 of 5: not yet
        await fail(relay, "127.0.0.2", ["spray4@example.com"])
        verifies = relay.server.auth.hasher.verifications
        assert await auth_reply(relay, "127.0.0.2", OTHER, other) == THROTTLED
        d = await session_from(relay, "127.0.0.2")
        assert await d.reply_after("AUTH LOGIN") == THROTTLED  # no 334: nothing is read
        await d.close()
        assert relay.server.auth.hasher.verifications == verifies
        assert await auth_reply(relay, "127.0.0.3", LOGIN, password) == OK
        clock.advance(float(cfg.auth.lockout))
        assert await auth_reply(relay, "127.0.0.2", OTHER, other) == OK
    finally:
        await stopped(relay)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) here")
async def test_an_ipv6_client_is_keyed_by_its_64(
    relay_cfg: Config, tls_files: tuple[Path, Path, Path], clock: ManualClock
) -> None:
    """A real IPv6 client (::1) is counted under ::/64: the lockout it causes is recorded for
    that prefix and holds for every address in it (::1 is the only one loopback gives us, so
    the rest of the /64 is asked of the running server's authenticator)."""
    cfg = dataclasses.replace(
        with_auth(relay_cfg, max_failures=2, max_failures_per_address=2),
        listen=(Listener("::1", 0, "tls"), Listener("127.0.0.1", 0, "starttls")),
    )
    relay = await started(cfg, tls_files, clock)
    try:
        password = await relay.add_user(LOGIN)
        d = await session_from(relay, "::1", host="::1")
        for _ in range(2):
            assert await d.reply_after(f"AUTH PLAIN {plain(OTHER, 'wrong-password-1')}") == FAILED
        assert await d.reply_after(f"AUTH PLAIN {plain(LOGIN, password)}") == THROTTLED
        await d.close()
        assert relay.server.db is not None
        lockouts = [e for e in await events.recent(relay.server.db) if e.action == "auth.lockout"]
        assert {e.target for e in lockouts} == {"::/64"}
        auth = relay.server.auth
        assert auth.is_throttled("::1:2:3:4") and not auth.is_throttled("0:0:0:1::1")
    finally:
        await stopped(relay)
