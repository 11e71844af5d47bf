"""The authenticator: cache, single flight, revocation, throttle (real store, real argon2)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import random
import sqlite3
import tomllib
from collections.abc import AsyncIterator, Iterator, Sized
from pathlib import Path

import pytest

from relay import config as config_mod
from relay.clock import ManualClock
from relay.config import Config, ConfigError, Listener
from relay.smtp.auth import Authenticator, Outcome, Throttle, address_key, address_limit
from relay.store import db as db_mod
from relay.store import events, users
from relay.store import shared as shared_mod
from relay.store.db import MAIN_MIGRATIONS, Database
from relay.store.engine import SqliteStore, Store
from relay.store.passwords import Hasher
from relay.units import Duration
from tests import leaks
from tests.hostile.kit import with_auth
from tests.pgserver import sqlite_of
from tests.userhelpers import make_domain

LOGIN = "app@example.com"
PASSWORD = "Correct-horse-battery-1"


@pytest.fixture
async def authn(
    db: Store, cfg: Config, hasher: Hasher, clock: ManualClock
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
    authn: Authenticator, db: Store, hasher: Hasher, clock: ManualClock
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
    db: Store, cfg: Config, hasher: Hasher, clock: ManualClock, authn: Authenticator
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
    db: Store, cfg: Config, hasher: Hasher, clock: ManualClock, authn: Authenticator
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
    db: Store, cfg: Config, hasher: Hasher, clock: ManualClock, authn: Authenticator
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
    neither for the login on that address nor for the login; failures inside it still add up."""
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
    # One more inside the window reaches the limit: the login is locked out on that address,
    # operators are told.
    answer = await authn.authenticate(LOGIN, "bad-password-xx", ip)
    assert (answer.outcome, answer.reason) == (
        Outcome.FAILED,
        "bad_credentials,ip_login_now_locked_out",
    )
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
    assert throttle.failures("k", t0 + 100) == 1  # t0+30 is stale, though not dropped yet
    throttle.prune(t0 + 200)  # every failure of "k" is stale: the key is forgotten
    assert throttle.failures("k", t0 + 200) == 0
    assert not throttle.fail("k", t0 + 200)
    assert not throttle.fail("k", t0 + 201)
    assert throttle.fail("k", t0 + 202)  # three inside the window: locked
    assert throttle.locked("k", t0 + 202 + 299) and not throttle.locked("k", t0 + 202 + 300)


# --- behaviours the mutation run of relay/auth.py found unguarded --------------------------------

BAD = "bad-password-xx"


async def test_an_identity_never_shows_its_password_hash(authn: Authenticator) -> None:
    """A session's identity may end up in a log line or a traceback: its repr has no hash."""
    answer = await authn.authenticate(LOGIN, PASSWORD, "127.0.0.1")
    assert answer.identity is not None
    assert answer.identity.password_hash not in repr(answer.identity)
    assert answer.identity.password_hash not in repr(answer)


async def test_an_answer_and_its_identity_are_frozen(authn: Authenticator) -> None:
    """A session keeps the identity it authenticated as (and re-checks its hash at MAIL): neither
    it nor the answer it came in can be changed afterwards."""
    answer = await authn.authenticate(LOGIN, PASSWORD, "127.0.0.1")
    assert answer.identity is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        answer.outcome = Outcome.FAILED  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        answer.identity.login = "boss@example.com"  # type: ignore[misc]


async def test_a_login_longer_than_an_address_counts_under_its_first_320_characters(
    authn: Authenticator, db: Store
) -> None:
    """An address has at most 320 characters: logins that differ only after that are one login
    for the per-login failure count, and that is the name the audit row gets."""
    stem = "X" * 308 + "@example.com"
    assert len(stem) == 320
    for i in range(authn.cfg.auth.max_failures):  # one address each: only the login adds up
        answer = await authn.authenticate(f"{stem}-{i}", BAD, f"192.0.2.{20 + i}")
        assert (answer.outcome, answer.reason) == (Outcome.FAILED, "bad_credentials")
    audited = [e.target for e in await events.recent(db) if e.action == "auth.login-failures"]
    assert audited == [stem.lower()]


async def test_a_failure_exactly_one_window_old_no_longer_counts(
    authn: Authenticator, clock: ManualClock
) -> None:
    limit = authn.cfg.auth.max_failures
    ip = "192.0.2.3"
    for _ in range(limit - 1):
        assert (await authn.authenticate(LOGIN, BAD, ip)).outcome is Outcome.FAILED
    clock.advance(float(authn.cfg.auth.failure_window))  # exactly one window later
    for _ in range(limit - 1):
        answer = await authn.authenticate(LOGIN, BAD, ip)
        assert (answer.outcome, answer.reason) == (Outcome.FAILED, "bad_credentials")
    assert (await authn.authenticate(LOGIN, PASSWORD, ip)).outcome is Outcome.OK


async def test_a_reload_that_lowers_max_failures_counts_the_failures_already_made(
    authn: Authenticator,
) -> None:
    """configure() keeps the counts: with 3 failures counted and a new limit of 2, the next
    failure locks the login out on that address; a new per-address limit of 4 locks the address
    out at the same failure (its fourth)."""
    ip = "192.0.2.8"
    for _ in range(3):
        assert (await authn.authenticate(LOGIN, BAD, ip)).outcome is Outcome.FAILED
    authn.configure(with_auth(authn.cfg, max_failures=2, max_failures_per_address=4))
    answer = await authn.authenticate(LOGIN, BAD, ip)
    assert (answer.outcome, answer.reason) == (
        Outcome.FAILED,
        "bad_credentials,ip_login_now_locked_out,ip_now_locked_out",
    )
    assert (await authn.authenticate(LOGIN, PASSWORD, ip)).outcome is Outcome.THROTTLED


async def test_a_reload_that_turns_the_cache_off_stops_cache_hits(
    authn: Authenticator, hasher: Hasher
) -> None:
    assert (await authn.authenticate(LOGIN, PASSWORD, "127.0.0.1")).outcome is Outcome.OK
    before = hasher.verifications
    authn.configure(with_auth(authn.cfg, cache_ttl=Duration(0)))
    assert (await authn.authenticate(LOGIN, PASSWORD, "127.0.0.1")).outcome is Outcome.OK
    assert hasher.verifications == before + 1


async def test_a_reload_that_keeps_the_cache_on_keeps_cached_logins(
    authn: Authenticator, hasher: Hasher
) -> None:
    """A reload (SIGHUP for a renewed certificate, say) costs no argon2 storm; a short but
    non-zero cache_ttl still caches."""
    assert (await authn.authenticate(LOGIN, PASSWORD, "127.0.0.1")).outcome is Outcome.OK
    before = hasher.verifications
    authn.configure(with_auth(authn.cfg, cache_ttl=Duration(1)))
    assert (await authn.authenticate(LOGIN, PASSWORD, "127.0.0.1")).outcome is Outcome.OK
    assert hasher.verifications == before


async def test_a_cached_login_expires_at_exactly_cache_ttl(
    authn: Authenticator, hasher: Hasher, clock: ManualClock
) -> None:
    assert (await authn.authenticate(LOGIN, PASSWORD, "127.0.0.1")).outcome is Outcome.OK
    before = hasher.verifications
    clock.advance(float(authn.cfg.auth.cache_ttl) - 1)
    assert (await authn.authenticate(LOGIN, PASSWORD, "127.0.0.1")).outcome is Outcome.OK
    assert hasher.verifications == before  # still cached one second before
    clock.advance(1)
    assert (await authn.authenticate(LOGIN, PASSWORD, "127.0.0.1")).outcome is Outcome.OK
    assert hasher.verifications == before + 1  # at cache_ttl it is gone


async def test_a_one_second_cache_ttl_still_caches(
    db: Store, cfg: Config, hasher: Hasher, clock: ManualClock, authn: Authenticator
) -> None:
    short = Authenticator(db, hasher, with_auth(cfg, cache_ttl=Duration(1)), clock=clock)
    assert (await short.authenticate(LOGIN, PASSWORD, "127.0.0.1")).outcome is Outcome.OK
    before = hasher.verifications
    assert (await short.authenticate(LOGIN, PASSWORD, "127.0.0.1")).outcome is Outcome.OK
    assert hasher.verifications == before


async def test_cache_ttl_0_caches_nothing_even_when_the_clock_steps_back(
    db: Store, cfg: Config, hasher: Hasher, clock: ManualClock, authn: Authenticator
) -> None:
    nocache = Authenticator(db, hasher, with_auth(cfg, cache_ttl=Duration(0)), clock=clock)
    assert (await nocache.authenticate(LOGIN, PASSWORD, "127.0.0.1")).outcome is Outcome.OK
    clock.advance(-30)  # the system clock stepped back (an NTP correction)
    before = hasher.verifications
    assert (await nocache.authenticate(LOGIN, PASSWORD, "127.0.0.1")).outcome is Outcome.OK
    assert hasher.verifications == before + 1


async def test_the_old_password_stops_at_the_exact_end_of_its_grace_even_when_cached(
    authn: Authenticator, db: Store, hasher: Hasher, clock: ManualClock
) -> None:
    """users.verify and the cache agree: the grace window ends at now + grace, exclusive."""
    ok = await authn.authenticate(LOGIN, PASSWORD, "127.0.0.1")
    assert ok.identity is not None
    grace = 100.0
    assert grace < authn.cfg.auth.cache_ttl  # the cached entry outlives the grace window
    new = leaks.add("Another-password-22")
    await users.reset_password(db, LOGIN, new, grace=grace, hasher=hasher, now=clock(), actor="t")
    clock.advance(grace - 1)
    assert await authn.still_valid(ok.identity)
    clock.advance(1)
    assert not await authn.still_valid(ok.identity)
    assert (await authn.authenticate(LOGIN, PASSWORD, "127.0.0.1")).outcome is Outcome.FAILED


async def test_flush_logins_records_the_last_login(
    authn: Authenticator, db: Store, clock: ManualClock
) -> None:
    assert (await authn.authenticate(LOGIN, PASSWORD, "127.0.0.1")).outcome is Outcome.OK
    clock.advance(5)
    assert (await authn.authenticate(LOGIN, PASSWORD, "127.0.0.1")).outcome is Outcome.OK
    user = await users.get(db, LOGIN)
    assert user is not None and user.last_login_at is None  # batched, not yet written
    await authn.flush_logins()
    user = await users.get(db, LOGIN)
    assert user is not None and user.last_login_at == clock()
    assert authn.logins == {}


async def test_a_failure_waits_failure_delay_less_its_own_time_plus_a_jitter_of_a_fifth(
    db: Store,
    cfg: Config,
    hasher: Hasher,
    clock: ManualClock,
    authn: Authenticator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each failure sleeps failure_delay - (the time it took) + uniform(0, failure_delay / 5).

    asyncio.sleep is replaced by a recorder (it does not wait) and the random module is seeded,
    so the jitter of each failure is known. The time a failure took is bounded from both sides by
    loop.time() read around it, so the bounds below hold whatever the load."""
    delay = 1.0
    padded = Authenticator(db, hasher, with_auth(cfg, failure_delay=Duration(delay)), clock=clock)
    loop = asyncio.get_running_loop()
    asked: list[tuple[float, float]] = []  # (seconds, loop.time() when asked)
    real_sleep = asyncio.sleep

    async def recorded_sleep(seconds: float) -> None:
        asked.append((seconds, loop.time()))
        await real_sleep(0)

    seed = 20240518
    rng = random.Random(seed)
    jitters = [rng.uniform(0, delay / 5) for _ in range(20)]
    state = random.getstate()
    random.seed(seed)
    monkeypatch.setattr(asyncio, "sleep", recorded_sleep)
    try:
        for i, jitter in enumerate(jitters):  # one address each: no lockout
            before = loop.time()
            answer = await padded.authenticate(LOGIN, BAD, f"192.0.2.{100 + i}")
            assert answer.outcome is Outcome.FAILED
            assert len(asked) == i + 1
            seconds, at = asked[-1]
            took_at_most = at - before
            assert delay - took_at_most + jitter - 1e-9 <= seconds <= delay + jitter + 1e-9
    finally:
        monkeypatch.undo()
        random.setstate(state)


@pytest.fixture
def quick_busy_db(monkeypatch: pytest.MonkeyPatch) -> None:
    """Databases opened from here on give up on a held write lock after 50 ms, not 5 s."""
    monkeypatch.setattr(db_mod, "BUSY_TIMEOUT_MS", 50)


@contextlib.contextmanager
def write_locked(path: Path) -> Iterator[None]:
    """What a long CLI transaction does: BEGIN IMMEDIATE on a separate connection, held."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


async def test_an_audit_row_the_store_cannot_write_does_not_fail_the_auth(
    cfg: Config,
    hasher: Hasher,
    clock: ManualClock,
    authn: Authenticator,
    quick_busy_db: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The lockout and login-failures audit rows cannot be written (the database is write-locked):
    the AUTH is still answered, the lockout still holds, and the mail log has both events."""
    db = SqliteStore(await Database.open(cfg.db_path, MAIN_MIGRATIONS))
    try:
        locking = Authenticator(db, hasher, cfg, clock=clock)
        ip = "192.0.2.5"
        with write_locked(cfg.db_path):
            for _ in range(cfg.auth.max_failures - 1):
                assert (await locking.authenticate(LOGIN, BAD, ip)).outcome is Outcome.FAILED
            answer = await locking.authenticate(LOGIN, BAD, ip)
            assert (answer.outcome, answer.reason) == (
                Outcome.FAILED,
                "bad_credentials,ip_login_now_locked_out",
            )
            assert (await locking.authenticate(LOGIN, PASSWORD, ip)).outcome is Outcome.THROTTLED
        assert [e for e in await events.recent(db) if e.action.startswith("auth.")] == []
    finally:
        await db.close()
    logged = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("auth lockout ") for m in logged), logged
    assert any(m.startswith("auth login-failures ") for m in logged), logged


async def test_last_logins_the_store_cannot_write_are_kept_for_the_next_flush(
    cfg: Config,
    hasher: Hasher,
    clock: ManualClock,
    authn: Authenticator,
    quick_busy_db: None,
    db: Store,
) -> None:
    sqlite_of(db)  # a CLI's write lock on the SQLite file is the fault
    db = SqliteStore(await Database.open(cfg.db_path, MAIN_MIGRATIONS))
    try:
        flushing = Authenticator(db, hasher, cfg, clock=clock)
        assert (await flushing.authenticate(LOGIN, PASSWORD, "127.0.0.1")).outcome is Outcome.OK
        at = clock()
        with write_locked(cfg.db_path):
            await flushing.flush_logins()  # the write fails: nothing raised, the batch kept
        assert flushing.logins == {LOGIN: at}
        await flushing.flush_logins()
        user = await users.get(db, LOGIN)
        assert user is not None and user.last_login_at == at
        assert flushing.logins == {}
    finally:
        await db.close()


async def test_a_store_fault_in_a_shared_verify_answers_every_caller(
    authn: Authenticator, db: Store, hasher: Hasher
) -> None:
    """Eight simultaneous logins share one verify; its read of the user fails (every statement
    on the reader is interrupted): each of the eight gets TEMPFAIL, none is left waiting."""
    await sqlite_of(db).reader.set_progress_handler(lambda: 1, 1)
    before = hasher.verifications
    try:
        # A hang guard only: a passing run never waits for it.
        async with asyncio.timeout(5):
            answers = await asyncio.gather(
                *(authn.authenticate(LOGIN, PASSWORD, f"192.0.2.{i}") for i in range(8))
            )
    finally:
        await sqlite_of(db).reader.set_progress_handler(lambda: 0, 1)
    assert [(a.outcome, a.reason) for a in answers] == [(Outcome.TEMPFAIL, "store_error")] * 8
    assert hasher.verifications == before  # the read failed before any argon2 work
    assert (await authn.authenticate(LOGIN, PASSWORD, "192.0.2.1")).outcome is Outcome.OK


async def test_prune_keeps_failures_and_lockouts_that_still_count(
    authn: Authenticator, clock: ManualClock
) -> None:
    limit = authn.cfg.auth.max_failures
    half = float(authn.cfg.auth.failure_window) / 2
    ip = "192.0.2.6"
    assert (await authn.authenticate(LOGIN, BAD, ip)).outcome is Outcome.FAILED
    clock.advance(half)
    for _ in range(limit - 2):
        assert (await authn.authenticate(LOGIN, BAD, ip)).outcome is Outcome.FAILED
    clock.advance(half)  # the first failure has aged out, the others have not
    authn.prune()
    answer = await authn.authenticate(LOGIN, BAD, ip)
    assert (answer.outcome, answer.reason) == (Outcome.FAILED, "bad_credentials")
    answer = await authn.authenticate(LOGIN, BAD, ip)
    assert (answer.outcome, answer.reason) == (
        Outcome.FAILED,
        "bad_credentials,ip_login_now_locked_out",
    )
    authn.prune()  # inside the lockout
    assert (await authn.authenticate(LOGIN, PASSWORD, ip)).outcome is Outcome.THROTTLED


async def test_prune_keeps_live_cache_entries_and_forgets_expired_ones(
    authn: Authenticator, hasher: Hasher, clock: ManualClock
) -> None:
    assert (await authn.authenticate(LOGIN, PASSWORD, "127.0.0.1")).outcome is Outcome.OK
    clock.advance(float(authn.cfg.auth.cache_ttl) - 1)
    authn.prune()
    before = hasher.verifications
    assert (await authn.authenticate(LOGIN, PASSWORD, "127.0.0.1")).outcome is Outcome.OK
    assert hasher.verifications == before
    clock.advance(1)  # expires exactly now
    authn.prune()
    assert authn._cache == {}  # memory only: no public view of the cache


async def test_prune_forgets_every_stale_key_after_a_spray_of_addresses(
    db: Store, cfg: Config, hasher: Hasher, clock: ManualClock, authn: Authenticator
) -> None:
    """Memory under a spray of addresses and logins is bounded by prune(). There is no public
    view of what is tracked, so this counts the keys of the private dicts.

    Window, lockout and cache TTL are equal; a second wave comes one second after the first,
    and prune() runs when the first wave is one second stale and the second exactly at its end:
    each is forgotten from the instant it stops counting (as fail(), locked() and the cache
    lookup already treat it)."""
    span = Duration(900)
    sprayed = Authenticator(
        db,
        hasher,
        with_auth(cfg, failure_window=span, lockout=span, cache_ttl=span),
        clock=clock,
    )

    def tracked() -> list[int]:
        t, p, lf = sprayed.throttle, sprayed.pairs, sprayed.login_failures
        sizes: list[Sized] = [
            t._failures,
            t._locked_until,
            p._failures,
            p._locked_until,
            lf._failures,
            lf._locked_until,
            sprayed._cache,
        ]
        return [len(d) for d in sizes]

    assert (await sprayed.authenticate(LOGIN, PASSWORD, "127.0.0.1")).outcome is Outcome.OK
    for wave, locked_login in enumerate((LOGIN, "other@example.com")):
        for i in range(10):
            answer = await sprayed.authenticate(
                f"u{wave}{i}@example.com", BAD, f"198.51.{wave}.{i}"
            )
            assert answer.outcome is Outcome.FAILED
        for _ in range(cfg.auth.max_failures):  # one login locked out, on one address and as such
            answer = await sprayed.authenticate(locked_login, BAD, f"192.0.{wave}.4")
            assert answer.outcome is Outcome.FAILED
        clock.advance(1)
    assert tracked() == [22, 0, 22, 2, 22, 2, 1]
    clock.advance(span - 3)  # one second before the first wave is stale
    sprayed.prune()
    assert tracked() == [22, 0, 22, 2, 22, 2, 1]
    clock.advance(2)  # the first wave one second stale, the second exactly
    sprayed.prune()
    assert tracked() == [0, 0, 0, 0, 0, 0, 0]


async def test_max_failures_1_locks_a_login_out_at_its_first_failure(
    db: Store, cfg: Config, hasher: Hasher, clock: ManualClock, authn: Authenticator
) -> None:
    strict = Authenticator(db, hasher, with_auth(cfg, max_failures=1), clock=clock)
    answer = await strict.authenticate(LOGIN, BAD, "192.0.2.10")
    assert (answer.outcome, answer.reason) == (
        Outcome.FAILED,
        "bad_credentials,ip_login_now_locked_out",
    )
    assert (await strict.authenticate(LOGIN, PASSWORD, "192.0.2.10")).outcome is Outcome.THROTTLED
    assert not strict.is_throttled("192.0.2.10")  # the address has 9 failures to go
    stricter = Authenticator(
        db, hasher, with_auth(cfg, max_failures=1, max_failures_per_address=1), clock=clock
    )
    answer = await stricter.authenticate(LOGIN, BAD, "192.0.2.11")
    assert (answer.outcome, answer.reason) == (
        Outcome.FAILED,
        "bad_credentials,ip_login_now_locked_out,ip_now_locked_out",
    )
    assert stricter.is_throttled("192.0.2.11")


async def test_a_caller_that_goes_away_does_not_cancel_the_shared_verify(
    authn: Authenticator, hasher: Hasher
) -> None:
    """aiosmtpd cancels a session's handler when its client disconnects: the other sessions
    waiting on the same verify (one app's parallel logins) still get their answer."""
    before = hasher.verifications
    first = asyncio.create_task(authn.authenticate(LOGIN, PASSWORD, "192.0.2.1"))
    second = asyncio.create_task(authn.authenticate(LOGIN, PASSWORD, "192.0.2.2"))
    # One turn of the loop: each task runs to its first suspension, which is the shared verify
    # (nothing in authenticate() awaits before it). The verify itself needs a thread: not done.
    await asyncio.sleep(0)  # sleep-ok: a turn of the loop, not a wait for time
    assert len(authn._inflight) == 1 and waiting(first) and waiting(second)
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    answer = await asyncio.wait_for(second, 30)
    assert answer.outcome is Outcome.OK
    assert hasher.verifications == before + 1
    assert authn._inflight == {}


def waiting(task: asyncio.Task[object]) -> bool:
    """The task has started and is suspended (not done)."""
    return not task.done() and task.get_stack() != []


def test_a_lockout_that_ends_takes_its_failures_with_it_pruned_or_not() -> None:
    """With lockout shorter than the failure window, the first failure after a lockout counts
    from one, whether or not the periodic prune ran in between."""
    for prune_in_between in (False, True):
        t = Throttle(max_failures=3, window=900, lockout=60)
        assert [t.fail("192.0.2.9", 0) for _ in range(3)] == [False, False, True]
        if prune_in_between:
            t.prune(61)
        assert not t.locked("192.0.2.9", 61)
        assert t.fail("192.0.2.9", 61) is False, prune_in_between
        assert t.failures("192.0.2.9", 61) == 1


async def test_the_login_failures_audit_row_names_the_login_sanitised(
    authn: Authenticator, db: Store
) -> None:
    """A login is client input: control characters never reach the audit trail (or the terminal
    that `relaybox audit` prints it on)."""
    login = "ev\x1b[31mil\n@example.com"
    for i in range(authn.cfg.auth.max_failures):
        await authn.authenticate(login, BAD, f"192.0.2.{40 + i}")
    audited = [e.target for e in await events.recent(db) if e.action == "auth.login-failures"]
    assert len(audited) == 1 and not any(ord(c) < 32 or ord(c) == 127 for c in audited[0])
    assert audited[0].startswith("ev?") and audited[0].endswith("@example.com")


async def test_a_failed_verify_whose_callers_all_left_logs_nothing(
    authn: Authenticator, db: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """Every caller of a shared verify went away (cancelled), then the verify failed: its error is
    retrieved, so asyncio never logs "Task exception was never retrieved" for it."""
    await sqlite_of(db).reader.set_progress_handler(lambda: 1, 1)  # every read on the reader fails
    try:
        caller = asyncio.create_task(authn.authenticate(LOGIN, PASSWORD, "192.0.2.77"))
        await asyncio.sleep(0)  # sleep-ok: one turn: the caller starts the shared verify
        (verify,) = authn._inflight.values()
        caller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await caller
        # Wait for it without retrieving its error (asyncio.wait does not): that is the point.
        done, _ = await asyncio.wait({verify}, timeout=5)  # the timeout is a hang guard only
        assert done == {verify}
    finally:
        await sqlite_of(db).reader.set_progress_handler(lambda: 0, 1)
    assert authn._inflight == {}
    del verify
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


# --- lockout per (address, login) and per address; IPv6 by prefix (issue 12, item 4) -------------


async def test_failures_with_one_login_do_not_lock_out_another_login_on_that_address(
    authn: Authenticator, db: Store, hasher: Hasher, clock: ManualClock
) -> None:
    """Everyone behind one NAT shares an address: one client failing with its login locks that
    login out there, not the address."""
    other = leaks.add("Other-user-password-9")
    await users.create(
        db, "other@example.com", other, hasher=hasher, cfg=authn.cfg, now=1, actor="t"
    )
    ip = "192.0.2.50"
    for _ in range(authn.cfg.auth.max_failures - 1):
        answer = await authn.authenticate(LOGIN, BAD, ip)
        assert (answer.outcome, answer.reason) == (Outcome.FAILED, "bad_credentials")
    answer = await authn.authenticate(LOGIN, BAD, ip)
    assert (answer.outcome, answer.reason) == (
        Outcome.FAILED,
        "bad_credentials,ip_login_now_locked_out",
    )
    before = hasher.verifications
    locked = await authn.authenticate(LOGIN, PASSWORD, ip)
    assert (locked.outcome, locked.reason) == (Outcome.THROTTLED, "ip_login_locked_out")
    assert hasher.verifications == before  # no argon2 work while locked out
    assert not authn.is_throttled(ip)  # the address itself is not locked
    assert (await authn.authenticate("other@example.com", other, ip)).outcome is Outcome.OK
    assert (await authn.authenticate(LOGIN, PASSWORD, "192.0.2.51")).outcome is Outcome.OK
    lockouts = [e for e in await events.recent(db) if e.action == "auth.lockout"]
    assert [(e.target, e.detail) for e in lockouts] == [(ip, f"user={LOGIN}")]


async def test_an_address_failing_with_many_logins_is_locked_out_at_its_own_threshold(
    db: Store, cfg: Config, hasher: Hasher, clock: ManualClock, authn: Authenticator
) -> None:
    """A spray of logins from one address: each login stays under max_failures, the address is
    locked out (every login, no argon2 work) once it reaches max_failures_per_address."""
    spray = Authenticator(
        db, hasher, with_auth(cfg, max_failures=3, max_failures_per_address=7), clock=clock
    )
    ip = "192.0.2.60"
    for i in range(6):
        answer = await spray.authenticate(f"u{i}@example.com", BAD, ip)
        assert (answer.outcome, answer.reason) == (Outcome.FAILED, "bad_credentials")
    answer = await spray.authenticate("u6@example.com", BAD, ip)
    assert (answer.outcome, answer.reason) == (Outcome.FAILED, "bad_credentials,ip_now_locked_out")
    assert spray.is_throttled(ip)
    before = hasher.verifications
    locked = await spray.authenticate(LOGIN, PASSWORD, ip)
    assert (locked.outcome, locked.reason) == (Outcome.THROTTLED, "ip_locked_out")
    assert hasher.verifications == before
    assert (await spray.authenticate(LOGIN, PASSWORD, "192.0.2.61")).outcome is Outcome.OK
    lockouts = [e for e in await events.recent(db) if e.action == "auth.lockout"]
    assert [(e.target, e.detail) for e in lockouts] == [(ip, "all users; last user=u6@example.com")]
    clock.advance(float(cfg.auth.lockout))
    assert (await spray.authenticate(LOGIN, PASSWORD, ip)).outcome is Outcome.OK


def test_the_per_address_threshold_defaults_to_ten_times_max_failures(cfg: Config) -> None:
    assert cfg.auth.max_failures_per_address == 0
    assert address_limit(cfg.auth) == 10 * cfg.auth.max_failures == 50
    assert address_limit(with_auth(cfg, max_failures=7).auth) == 70
    assert address_limit(with_auth(cfg, max_failures_per_address=12).auth) == 12
    assert address_limit(with_auth(cfg, max_failures_per_address=5).auth) == 5  # = max_failures


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("max_failures_per_address = 4", r"auth\.max_failures_per_address: 4 is outside 5\.\."),
        ("max_failures_per_address = -1", r"auth\.max_failures_per_address: -1 is outside"),
        ("ipv6_prefix = 31", r"auth\.ipv6_prefix: 31 is outside 32\.\.128"),
        ("ipv6_prefix = 129", r"auth\.ipv6_prefix: 129 is outside 32\.\.128"),
        ('ipv6_prefix = "64"', r"auth\.ipv6_prefix: expected an integer"),
    ],
)
def test_lockout_keys_are_validated(table: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_mod.from_dict(tomllib.loads(f"[auth]\n{table}\n"))


@pytest.mark.parametrize(
    ("ip", "prefix", "key"),
    [
        ("192.0.2.1", 64, "192.0.2.1"),  # IPv4: the address itself (/32)
        ("192.0.2.2", 64, "192.0.2.2"),
        ("::ffff:192.0.2.1", 64, "192.0.2.1"),  # IPv4-mapped (a dual-stack listener): IPv4
        ("2001:db8:1:2::1", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", 64, "2001:db8:1:2::/64"),
        ("2001:DB8:1:2:0:0:0:7", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", 64, "2001:db8:1:3::/64"),
        ("2001:db8:1:3::1", 48, "2001:db8:1::/48"),
        ("2001:db8:1:3::1", 128, "2001:db8:1:3::1/128"),
        ("fe80::1%eth0", 64, "fe80::/64"),  # a zone is not part of the address
        ("::1", 64, "::/64"),
        ("not-an-address", 64, "not-an-address"),  # as it is (nothing to group)
    ],
)
def test_address_key(ip: str, prefix: int, key: str) -> None:
    assert address_key(ip, prefix) == key


async def test_ipv6_addresses_inside_one_prefix_share_a_lockout(
    db: Store, cfg: Config, hasher: Hasher, clock: ManualClock, authn: Authenticator
) -> None:
    """A client with a /64 rotates its address at will: every address in it counts as one."""
    limit = cfg.auth.max_failures
    for i in range(limit):
        answer = await authn.authenticate(LOGIN, BAD, f"2001:db8:5:6::{i + 1:x}")
        assert answer.outcome is Outcome.FAILED
    assert answer.reason == "bad_credentials,ip_login_now_locked_out"
    locked = await authn.authenticate(LOGIN, PASSWORD, "2001:db8:5:6:abcd::99")
    assert locked.outcome is Outcome.THROTTLED
    assert (await authn.authenticate(LOGIN, PASSWORD, "2001:db8:5:7::1")).outcome is Outcome.OK
    (lockout,) = [e for e in await events.recent(db) if e.action == "auth.lockout"]
    assert lockout.target == "2001:db8:5:6::/64"
    # Keyed by the full address (ipv6_prefix = 128), the same rotation is never locked out.
    full = Authenticator(db, hasher, with_auth(cfg, ipv6_prefix=128), clock=clock)
    for i in range(limit):
        answer = await full.authenticate(LOGIN, BAD, f"2001:db8:9::{i + 1:x}")
        assert (answer.outcome, answer.reason) == (Outcome.FAILED, "bad_credentials")
    assert (await full.authenticate(LOGIN, PASSWORD, "2001:db8:9::99")).outcome is Outcome.OK


async def test_workers_share_the_per_address_threshold(
    db: Store, cfg: Config, hasher: Hasher, clock: ManualClock, authn: Authenticator
) -> None:
    """With workers = 2 each process locks an address out after half (rounded up) of it."""
    two = dataclasses.replace(
        with_auth(cfg, max_failures=5, max_failures_per_address=7),
        workers=2,
        listen=(Listener("127.0.0.1", 2587, "starttls"),),
    )
    worker = Authenticator(db, hasher, two, clock=clock)
    for i in range(4):  # ceil(7 / 2), one login each
        assert (await worker.authenticate(f"w{i}@example.com", BAD, "192.0.2.70")).outcome is (
            Outcome.FAILED
        )
    assert worker.is_throttled("192.0.2.70")


# --- login aliases count as the login (issue 12, item 10) ----------------------------------------

ALIASES = (
    "app@example.com.",
    " APP@example.com ",
    "app@\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com",
    "\u3000App@Example.Com",
    "app@EXAMPLE.COM.",
)


async def test_aliases_of_a_login_add_up_to_one_count(
    authn: Authenticator, db: Store, hasher: Hasher
) -> None:
    """Each alias names the same user (users.normalize_login): their failures are one login's,
    for the lockout on one address and for the audit of one login failing from many addresses."""
    assert len(ALIASES) == authn.cfg.auth.max_failures
    for i, alias in enumerate(ALIASES):  # one address each: only the login adds up
        assert (await authn.authenticate(alias, BAD, f"192.0.2.{80 + i}")).outcome is Outcome.FAILED
    audited = [e.target for e in await events.recent(db) if e.action == "auth.login-failures"]
    assert audited == [LOGIN]
    ip = "192.0.2.90"  # now all from one address
    for alias in ALIASES:
        assert (await authn.authenticate(alias, BAD, ip)).outcome is Outcome.FAILED
    before = hasher.verifications
    assert (await authn.authenticate(LOGIN, PASSWORD, ip)).outcome is Outcome.THROTTLED
    assert hasher.verifications == before


async def test_an_alias_with_the_right_password_logs_in_as_the_user(authn: Authenticator) -> None:
    for alias in ALIASES:
        answer = await authn.authenticate(alias, PASSWORD, "192.0.2.95")
        assert answer.outcome is Outcome.OK and answer.identity is not None
        assert answer.identity.login == LOGIN


async def test_lockouts_read_are_kept_until_a_worker_writes_one(
    db: Store, cfg: Config, hasher: Hasher, clock: ManualClock, authn: Authenticator
) -> None:
    """Two workers (two Authenticators on one usage.db): each keeps what it read of the shared
    lockouts (one read, then none while nothing is locked out), and a lockout one of them writes
    moves the 8 bytes beside usage.db, so the other's next AUTH reads it and is refused."""
    usage = await shared_mod.open_counts(cfg)
    try:
        a = Authenticator(db, hasher, cfg, clock=clock, shared=usage)
        b = Authenticator(db, hasher, cfg, clock=clock, shared=usage)
        ip = "192.0.2.44"
        for _ in range(3):
            assert (await b.authenticate(LOGIN, PASSWORD, ip)).outcome is Outcome.OK
        assert (b.lockouts.lookups, b.lockouts.reads) == (3, 1)
        for _ in range(cfg.auth.max_failures):
            assert (await a.authenticate(LOGIN, BAD, ip)).outcome is Outcome.FAILED
        answer = await b.authenticate(LOGIN, PASSWORD, ip)
        assert (answer.outcome, answer.reason) == (Outcome.THROTTLED, "ip_login_locked_out")
        assert b.lockouts.reads == 2
    finally:
        await usage.close()
