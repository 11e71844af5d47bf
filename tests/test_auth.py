"""The authenticator: cache, single flight, revocation, throttle (real store, real argon2)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest

from relay import events, users
from relay.auth import Authenticator, Outcome, Throttle
from relay.clock import ManualClock
from relay.config import Config, Listener
from relay.db import Database
from relay.passwords import Hasher
from tests import leaks
from tests.userhelpers import make_domain

LOGIN = "app@example.com"
PASSWORD = "Correct-horse-battery-1"


@pytest.fixture
async def authn(
    db: Database, cfg: Config, hasher: Hasher, clock: ManualClock
) -> AsyncIterator[Authenticator]:
    leaks.add(PASSWORD)
    await make_domain(db, cfg, now=clock())
    await users.create(db, LOGIN, PASSWORD, hasher=hasher, cfg=cfg, now=clock(), actor="t")
    yield Authenticator(db, hasher, cfg, clock=clock)


async def test_cache_spares_argon2_on_reconnect(authn: Authenticator, hasher: Hasher) -> None:
    first = await authn.authenticate(LOGIN, PASSWORD, "127.0.0.1")
    assert first.outcome is Outcome.OK
    before = hasher.verifications
    for _ in range(5):
        again = await authn.authenticate(LOGIN, PASSWORD, "127.0.0.1")
        assert again.outcome is Outcome.OK
    assert hasher.verifications == before
    wrong = await authn.authenticate(LOGIN, PASSWORD + "x", "127.0.0.1")
    assert wrong.outcome is Outcome.FAILED
    assert hasher.verifications == before + 1


async def test_single_flight(authn: Authenticator, hasher: Hasher) -> None:
    before = hasher.verifications
    answers = await asyncio.gather(
        *(authn.authenticate(LOGIN, PASSWORD, "127.0.0.1") for _ in range(32))
    )
    assert all(a.outcome is Outcome.OK for a in answers)
    assert hasher.verifications == before + 1


async def test_cache_expires(authn: Authenticator, hasher: Hasher, clock: ManualClock) -> None:
    await authn.authenticate(LOGIN, PASSWORD, "127.0.0.1")
    before = hasher.verifications
    clock.advance(authn.cfg.auth.cache_ttl + 1)
    assert (await authn.authenticate(LOGIN, PASSWORD, "127.0.0.1")).outcome is Outcome.OK
    assert hasher.verifications == before + 1


async def test_cached_credentials_are_revoked_at_once(
    authn: Authenticator, db: Database, hasher: Hasher, clock: ManualClock
) -> None:
    ok = await authn.authenticate(LOGIN, PASSWORD, "127.0.0.1")
    assert ok.identity is not None
    new = leaks.add("Another-password-22")
    # Reset with a grace window: the old password (cached) keeps working, as "previous".
    await users.reset_password(db, LOGIN, new, grace=600, hasher=hasher, now=clock(), actor="t")
    again = await authn.authenticate(LOGIN, PASSWORD, "127.0.0.1")
    assert again.outcome is Outcome.OK and again.identity is not None
    assert again.identity.which == "previous"
    assert await authn.still_valid(ok.identity)
    clock.advance(601)
    assert not await authn.still_valid(ok.identity)
    assert (await authn.authenticate(LOGIN, PASSWORD, "127.0.0.1")).outcome is Outcome.FAILED
    assert (await authn.authenticate(LOGIN, new, "127.0.0.1")).outcome is Outcome.OK
    await users.delete(db, LOGIN, now=clock(), actor="t")
    assert (await authn.authenticate(LOGIN, new, "127.0.0.1")).outcome is Outcome.FAILED


async def test_cache_off(
    db: Database, cfg: Config, hasher: Hasher, clock: ManualClock, authn: Authenticator
) -> None:
    nocache = Authenticator(
        db, hasher, dataclasses.replace(cfg, auth=dataclasses.replace(cfg.auth, cache_ttl=0)),
        clock=clock,
    )  # fmt: skip
    before = hasher.verifications
    for _ in range(3):
        assert (await nocache.authenticate(LOGIN, PASSWORD, "127.0.0.1")).outcome is Outcome.OK
    assert hasher.verifications == before + 3


async def test_lockout_per_ip_spends_no_argon2(
    authn: Authenticator, hasher: Hasher, clock: ManualClock
) -> None:
    for _ in range(authn.cfg.auth.max_failures):
        await authn.authenticate(LOGIN, "bad-password-xx", "192.0.2.1")
    before = hasher.verifications
    locked = await authn.authenticate(LOGIN, PASSWORD, "192.0.2.1")
    assert locked.outcome is Outcome.THROTTLED
    assert hasher.verifications == before
    recent = await events.recent(authn.db)
    assert [e.action for e in recent][:2] == ["auth.lockout", "auth.login-failures"]
    assert recent[0].target == "192.0.2.1"
    # Another address is not affected.
    assert (await authn.authenticate(LOGIN, PASSWORD, "192.0.2.2")).outcome is Outcome.OK
    clock.advance(authn.cfg.auth.lockout + 1)
    assert (await authn.authenticate(LOGIN, PASSWORD, "192.0.2.1")).outcome is Outcome.OK


async def test_failures_pay_a_minimum_time(
    db: Database, cfg: Config, hasher: Hasher, clock: ManualClock, authn: Authenticator
) -> None:
    slow = Authenticator(
        db, hasher, dataclasses.replace(cfg, auth=dataclasses.replace(cfg.auth, failure_delay=0.2)),
        clock=clock,
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    for login in ("nobody@example.com", LOGIN, "not a login"):
        t0 = loop.time()
        answer = await slow.authenticate(login, "bad-password-xx", "192.0.2.9")
        assert answer.outcome is Outcome.FAILED
        assert loop.time() - t0 >= 0.2


async def test_workers_share_the_failure_limit(
    db: Database, cfg: Config, hasher: Hasher, clock: ManualClock, authn: Authenticator
) -> None:
    """With workers = 2 each process locks out after its half (rounded up) of max_failures."""
    two = dataclasses.replace(cfg, workers=2, listen=(Listener("127.0.0.1", 2587, "starttls"),))
    worker = Authenticator(db, hasher, two, clock=clock)
    for _ in range(3):  # ceil(5 / 2)
        assert (await worker.authenticate(LOGIN, "bad-password-xx", "192.0.2.7")).outcome is (
            Outcome.FAILED
        )
    assert (await worker.authenticate(LOGIN, PASSWORD, "192.0.2.7")).outcome is Outcome.THROTTLED


async def test_failures_age_out_of_the_failure_window(
    authn: Authenticator, clock: ManualClock
) -> None:
    """auth.failure_window slides: failures older than it no longer count toward a lockout,
    neither for the address nor for the login; failures inside it still add up."""
    limit = authn.cfg.auth.max_failures
    ip = "192.0.2.3"
    for _ in range(limit - 1):
        assert (await authn.authenticate(LOGIN, "bad-password-xx", ip)).outcome is Outcome.FAILED
    clock.advance(float(authn.cfg.auth.failure_window) + 1)
    # Those have aged out: as many again is still one short of the limit.
    for _ in range(limit - 1):
        answer = await authn.authenticate(LOGIN, "bad-password-xx", ip)
        assert (answer.outcome, answer.reason) == (Outcome.FAILED, "bad_credentials")
    assert (await authn.authenticate(LOGIN, PASSWORD, ip)).outcome is Outcome.OK
    assert [e.action for e in await events.recent(authn.db) if e.action.startswith("auth.")] == []
    # One more inside the window reaches the limit: the address is locked, operators are told.
    answer = await authn.authenticate(LOGIN, "bad-password-xx", ip)
    assert (answer.outcome, answer.reason) == (Outcome.FAILED, "bad_credentials,ip_now_locked_out")
    assert (await authn.authenticate(LOGIN, PASSWORD, ip)).outcome is Outcome.THROTTLED
    assert [e.action for e in await events.recent(authn.db) if e.action.startswith("auth.")] == [
        "auth.lockout",
        "auth.login-failures",
    ]


def test_throttle_counts_only_failures_inside_the_window() -> None:
    throttle = Throttle(max_failures=3, window=60, lockout=300)
    t0 = 1_800_000_000.0
    assert not throttle.fail("k", t0)
    assert not throttle.fail("k", t0 + 30)
    assert throttle.failures("k", t0 + 30) == 2
    assert throttle.failures("k", t0 + 60) == 1  # the first is exactly one window old: gone
    assert not throttle.fail("k", t0 + 61)  # 2 inside the window, not 3
    throttle.prune(t0 + 200)  # every failure of "k" is stale: the key is forgotten
    assert throttle.failures("k", t0 + 200) == 0
    assert not throttle.fail("k", t0 + 200)
    assert not throttle.fail("k", t0 + 201)
    assert throttle.fail("k", t0 + 202)  # three inside the window: locked
    assert throttle.locked("k", t0 + 202 + 299) and not throttle.locked("k", t0 + 202 + 300)
