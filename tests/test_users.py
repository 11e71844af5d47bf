"""The credential store: creation rules, the reset grace window, revocation, verify's cost."""

from __future__ import annotations

import dataclasses
import sqlite3
import unicodedata
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from argon2 import PasswordHasher, Type
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.clock import ManualClock
from relay.config import Config
from relay.errors import Conflict, Invalid, NotFound
from relay.store import domains, logins, users
from relay.store.db import StoreError
from relay.store.engine import Store
from relay.store.passwords import Hasher
from tests import leaks
from tests.pgserver import sqlite_of
from tests.userhelpers import make_domain

P1 = "first-password-0001"
P2 = "second-password-002"
P3 = "third-password-0003"
HOUR = 3600.0


@pytest.fixture(autouse=True)
def _register_secrets() -> None:
    for pw in (P1, P2, P3):
        leaks.add(pw)


@pytest.fixture
async def domain(db: Store, cfg: Config, clock: ManualClock) -> str:
    return await make_domain(db, cfg, now=clock())


@pytest.fixture
async def user(db: Store, cfg: Config, hasher: Hasher, clock: ManualClock, domain: str) -> str:
    u = await users.create(
        db, f"app@{domain}", P1, hasher=hasher, cfg=cfg, now=clock(), actor="test"
    )
    return u.login


async def _current_hash(db: Store, login: str) -> str | None:
    """The current hash of an enabled user, else None (unknown, malformed or disabled)."""
    creds = await logins.credentials(db, login)
    return None if creds is None or creds.disabled else creds.current_hash


async def _which(db: Store, hasher: Hasher, login: str, pw: str, now: float) -> str | None:
    return (await logins.verify(db, login, pw, hasher=hasher, now=now)).matched


async def _reset(
    db: Store, hasher: Hasher, login: str, pw: str, grace: float, now: float
) -> users.User:
    return await users.reset_password(
        db, login, pw, grace=grace, hasher=hasher, now=now, actor="test"
    )


@asynccontextmanager
async def _stale_reader(db: Store) -> AsyncIterator[None]:
    """Hold a read transaction on the reader: its reads keep seeing the database as it is now,
    while the writer commits. Reads made through it stand for reads that happened before those
    commits (the interleaving a race would produce, without timing)."""
    reader = sqlite_of(db).reader
    await reader.execute_fetchall("BEGIN")
    try:
        await reader.execute_fetchall("SELECT COUNT(*) FROM users")  # the snapshot starts here
        yield
    finally:
        await reader.execute_fetchall("ROLLBACK")


@asynccontextmanager
async def _refused(db: Store, action: int, table: str) -> AsyncIterator[None]:
    """A store fault in the middle of a write: the writer connection (the one db.transaction()
    hands out) refuses to prepare statements doing ``action`` on ``table`` (sqlite3.Error)."""
    async with sqlite_of(db).transaction() as writer:
        pass

    def authorize(code: int, arg1: str | None, *_: str | None) -> int:
        return sqlite3.SQLITE_DENY if (code, arg1) == (action, table) else sqlite3.SQLITE_OK

    await writer.set_authorizer(authorize)
    try:
        yield
    finally:
        await writer.set_authorizer(None)


# --- logins ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("app@example.com", "app@example.com"),
        ("  App.Mailer@EXAMPLE.com ", "app.mailer@example.com"),
        ("billing+eu@Bücher.example", "billing+eu@xn--bcher-kva.example"),
        ("a!#$%&'*/=?^_`{|}~-z@example.com", "a!#$%&'*/=?^_`{|}~-z@example.com"),
        ("x" * 64 + "@example.com", "x" * 64 + "@example.com"),
    ],
)
def test_normalize_login(raw: str, normal: str) -> None:
    assert users.normalize_login(raw) == normal


@pytest.mark.parametrize(
    "raw",
    [
        "no-at-sign",
        "@example.com",
        "app@",
        ".app@example.com",
        "app.@example.com",
        "a..b@example.com",
        '"quoted"@example.com',
        "sp ace@example.com",
        "jörg@example.com",
        "x" * 65 + "@example.com",
        "app@exa mple.com",
    ],
)
def test_normalize_login_rejects(raw: str) -> None:
    with pytest.raises(Invalid):
        users.normalize_login(raw)


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        pytest.param("x" * 99, "x" * 99, id="99"),
        pytest.param("x" * 100, "x" * 100, id="100"),
        pytest.param("x" * 101, "x" * 100 + "...", id="101"),
        pytest.param("x" * 150, "x" * 100 + "...", id="150"),
    ],
)
def test_an_error_shows_at_most_100_characters_of_the_login(raw: str, shown: str) -> None:
    with pytest.raises(Invalid) as exc:
        users.normalize_login(raw)
    assert str(exc.value) == f"login {shown!r} must look like name@domain"


@pytest.mark.parametrize(
    "raw",
    ["", "@", "no-at-sign", "@example.com", "app@"],
    ids=["empty", "at", "no-at", "no-name", "no-domain"],
)
def test_a_login_needs_a_name_and_a_domain(raw: str) -> None:
    with pytest.raises(Invalid) as exc:
        users.normalize_login(raw)
    assert str(exc.value) == f"login {raw!r} must look like name@domain"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=120) | st.from_regex(r"[a-zA-Z0-9.+-]{0,70}@[a-zA-Z0-9.-]{0,70}"))
def test_normalize_login_only_ever_raises_invalid(raw: str) -> None:
    """Client input (AUTH): any string either normalizes (idempotently) or raises Invalid."""
    try:
        normal = users.normalize_login(raw)
    except Invalid as exc:
        assert len(str(exc)) < 400
        return
    assert users.normalize_login(normal) == normal
    assert normal == normal.strip() and normal.count("@") == 1


# --- creation -------------------------------------------------------------------------------------


async def test_create_and_read(
    db: Store, cfg: Config, hasher: Hasher, clock: ManualClock, domain: str
) -> None:
    u = await users.create(
        db, "App@Example.COM", P1, hasher=hasher, cfg=cfg, now=clock(), actor="test"
    )
    assert u == users.User(
        login="app@example.com",
        domain="example.com",
        created_at=clock(),
        last_login_at=None,
        password_changed_at=clock(),
        old_password_valid_until=None,
        disabled=False,
    )
    assert await users.get(db, "APP@example.com") == u
    assert await _which(db, hasher, "app@example.com", P1, clock()) == "current"
    with pytest.raises(Conflict, match="already exists"):
        await users.create(db, "app@example.com", P2, hasher=hasher, cfg=cfg, now=1, actor="t")


async def test_create_needs_a_verified_domain(
    db: Store, cfg: Config, hasher: Hasher, clock: ManualClock
) -> None:
    with pytest.raises(Conflict, match=r"relaybox domain add nowhere\.example"):
        await users.create(
            db, "a@nowhere.example", P1, hasher=hasher, cfg=cfg, now=clock(), actor="t"
        )
    await make_domain(db, cfg, "pending.example", now=clock(), verified=False)
    with pytest.raises(Conflict) as exc:
        await users.create(
            db, "a@pending.example", P1, hasher=hasher, cfg=cfg, now=clock(), actor="t"
        )
    assert str(exc.value) == (
        "domain pending.example is not verified (state pending): "
        "run `relaybox domain verify pending.example`"
    )
    assert await users.list_all(db) == []


async def test_a_domain_removed_after_the_check_is_reported_as_unknown(
    db: Store, cfg: Config, hasher: Hasher, clock: ManualClock, domain: str
) -> None:
    """create() checks the domain, hashes, then inserts: a domain removed in between fails the
    insert's foreign key, which is the unknown domain it is (a Conflict), not a store fault."""
    async with _stale_reader(db):  # create's checks read the domain as it was before the removal
        await domains.remove(db, domain, with_users=False, now=clock(), actor="test")
        with pytest.raises(Conflict) as exc:
            await users.create(
                db, f"app@{domain}", P1, hasher=hasher, cfg=cfg, now=clock(), actor="t"
            )
    assert str(exc.value) == f"domain {domain} is not known: run `relaybox domain add {domain}`"
    assert await users.list_all(db) == []


async def test_a_store_fault_during_create_is_a_store_error(
    db: Store, cfg: Config, hasher: Hasher, clock: ManualClock, domain: str
) -> None:
    with pytest.raises(StoreError, match="^users: not authorized$"):
        async with _refused(db, sqlite3.SQLITE_INSERT, "users"):
            await users.create(
                db, f"app@{domain}", P1, hasher=hasher, cfg=cfg, now=clock(), actor="t"
            )
    assert await users.list_all(db) == []
    assert await db.fetchall("SELECT * FROM events WHERE action = 'user.add'") == []


async def test_create_enforces_the_password_policy(
    db: Store, cfg: Config, hasher: Hasher, domain: str
) -> None:
    for weak in ("short", "a" * 30, "nul-inside\0-password"):
        with pytest.raises(Invalid):
            await users.create(db, f"a@{domain}", weak, hasher=hasher, cfg=cfg, now=1, actor="t")
    assert await users.get(db, f"a@{domain}") is None


async def test_list_all_by_domain(
    db: Store, cfg: Config, hasher: Hasher, clock: ManualClock, domain: str
) -> None:
    other = await make_domain(db, cfg, "other.example", now=clock())
    for login in (f"b@{domain}", f"a@{domain}", f"c@{other}"):
        await users.create(db, login, P1, hasher=hasher, cfg=cfg, now=clock(), actor="t")
    assert [u.login for u in await users.list_all(db)] == [
        "a@example.com",
        "b@example.com",
        "c@other.example",
    ]
    assert [u.login for u in await users.list_all(db, "OTHER.example")] == ["c@other.example"]


# --- the grace window -----------------------------------------------------------------------------


async def test_old_password_works_until_the_grace_ends(
    db: Store, hasher: Hasher, clock: ManualClock, user: str
) -> None:
    t0 = clock()
    u = await _reset(db, hasher, user, P2, HOUR, t0)
    assert u.old_password_valid_until == t0 + HOUR
    assert u.password_changed_at == t0
    assert await _which(db, hasher, user, P2, t0) == "current"
    assert await _which(db, hasher, user, P1, t0) == "previous"
    assert await _which(db, hasher, user, P1, t0 + HOUR - 1) == "previous"
    assert await _which(db, hasher, user, P1, t0 + HOUR) is None
    assert await _which(db, hasher, user, P2, t0 + HOUR) == "current"
    after = await users.get(db, user)
    assert after is not None
    assert after.grace_until(t0 + HOUR - 1) == t0 + HOUR
    assert after.grace_until(t0 + HOUR) is None


async def test_old_password_fails_once_the_window_has_passed(
    db: Store, hasher: Hasher, clock: ManualClock, user: str
) -> None:
    t0 = clock()
    await _reset(db, hasher, user, P2, HOUR, t0)
    for later in (t0 + HOUR + 1, t0 + 30 * 86400):
        assert await _which(db, hasher, user, P1, later) is None
        assert await _which(db, hasher, user, P2, later) == "current"
    u = await users.get(db, user)
    assert u is not None and u.old_password_valid_until == t0 + HOUR  # as stored
    assert not u.old_password_works(t0 + HOUR + 1)
    assert u.grace_until(t0 + HOUR + 1) is None
    await users.revoke_old(db, user, now=t0 + HOUR + 1, actor="test")
    rows = await db.fetchall("SELECT detail FROM events WHERE action = 'user.revoke-old'")
    assert [r["detail"] for r in rows] == ["no window was running"]


@pytest.mark.parametrize("grace", [0.5, 1.0])
async def test_a_grace_of_a_second_or_less_still_keeps_the_old_password(
    db: Store, hasher: Hasher, clock: ManualClock, user: str, grace: float
) -> None:
    t0 = clock()
    u = await _reset(db, hasher, user, P2, grace, t0)
    assert u.old_password_valid_until == t0 + grace
    assert await _which(db, hasher, user, P1, t0) == "previous"
    assert await _which(db, hasher, user, P1, t0 + grace) is None


@pytest.mark.parametrize("grace", [-1.0, -0.5])
async def test_a_negative_grace_is_refused(
    db: Store, hasher: Hasher, clock: ManualClock, user: str, grace: float
) -> None:
    with pytest.raises(Invalid, match="grace cannot be negative"):
        await _reset(db, hasher, user, P2, grace, clock())
    assert await _which(db, hasher, user, P1, clock()) == "current"
    assert await _which(db, hasher, user, P2, clock()) is None


async def test_a_store_fault_during_a_reset_is_a_store_error(
    db: Store, hasher: Hasher, clock: ManualClock, user: str
) -> None:
    with pytest.raises(StoreError, match="^users: not authorized$"):
        async with _refused(db, sqlite3.SQLITE_UPDATE, "users"):
            await _reset(db, hasher, user, P2, HOUR, clock())
    assert await _which(db, hasher, user, P1, clock()) == "current"  # rolled back
    assert await _which(db, hasher, user, P2, clock()) is None


async def test_grace_zero_revokes_at_once(
    db: Store, hasher: Hasher, clock: ManualClock, user: str
) -> None:
    u = await _reset(db, hasher, user, P2, 0, clock())
    assert u.old_password_valid_until is None
    assert await _which(db, hasher, user, P1, clock()) is None
    assert await _which(db, hasher, user, P2, clock()) == "current"


async def test_revoke_old_ends_the_window(
    db: Store, hasher: Hasher, clock: ManualClock, user: str
) -> None:
    await _reset(db, hasher, user, P2, HOUR, clock())
    clock.advance(60)
    assert await _which(db, hasher, user, P1, clock()) == "previous"
    u = await users.revoke_old(db, user, now=clock(), actor="test")
    assert u.old_password_valid_until is None
    assert await _which(db, hasher, user, P1, clock()) is None
    assert await _which(db, hasher, user, P2, clock()) == "current"
    # Idempotent: nothing running is not an error.
    await users.revoke_old(db, user, now=clock(), actor="test")


async def test_second_reset_replaces_the_previous_password(
    db: Store, hasher: Hasher, clock: ManualClock, user: str
) -> None:
    t0 = clock()
    await _reset(db, hasher, user, P2, HOUR, t0)
    u = await _reset(db, hasher, user, P3, HOUR, t0 + 600)
    assert u.old_password_valid_until == t0 + 600 + HOUR
    now = t0 + 601
    assert await _which(db, hasher, user, P3, now) == "current"
    assert await _which(db, hasher, user, P2, now) == "previous"
    assert await _which(db, hasher, user, P1, now) is None  # only the immediately previous one


async def test_delete_revokes_everything_at_once(
    db: Store, hasher: Hasher, clock: ManualClock, user: str
) -> None:
    await _reset(db, hasher, user, P2, HOUR, clock())
    await users.delete(db, user, now=clock(), actor="test")
    for pw in (P1, P2):
        assert await _which(db, hasher, user, pw, clock()) is None
    assert await users.get(db, user) is None
    assert await _current_hash(db, user) is None
    assert await logins.credentials(db, user) is None
    with pytest.raises(NotFound, match="no such user: app@example.com"):
        await users.delete(db, user, now=clock(), actor="test")


async def test_disabled_users_fail_until_enabled(
    db: Store, hasher: Hasher, clock: ManualClock, user: str
) -> None:
    await _reset(db, hasher, user, P2, HOUR, clock())
    u = await users.set_disabled(db, user, True, now=clock(), actor="test")
    assert u.disabled
    before = hasher.verifications
    assert await _which(db, hasher, user, P2, clock()) is None
    assert await _which(db, hasher, user, P1, clock()) is None
    assert hasher.verifications == before + 2  # each paid one (dummy) verify
    assert await _current_hash(db, user) is None
    creds = await logins.credentials(db, user)
    assert creds is not None and creds.disabled
    await users.set_disabled(db, user, False, now=clock(), actor="test")
    assert await _which(db, hasher, user, P2, clock()) == "current"
    assert await _which(db, hasher, user, P1, clock()) == "previous"


async def test_unknown_logins_raise_not_found(db: Store, hasher: Hasher, domain: str) -> None:
    login = f"ghost@{domain}"
    with pytest.raises(NotFound):
        await _reset(db, hasher, login, P2, HOUR, 1)
    with pytest.raises(NotFound):
        await users.revoke_old(db, login, now=1, actor="t")
    with pytest.raises(NotFound):
        await users.set_disabled(db, login, True, now=1, actor="t")


# --- verify: cost, rehash, what the server sees -------------------------------------------------


async def test_unknown_and_malformed_logins_cost_one_verify(
    db: Store, hasher: Hasher, clock: ManualClock, user: str
) -> None:
    """A wrong password, an unknown user and a malformed login each cost one argon2 verify."""
    cases = [(user, "wrong-password-xyz"), ("nobody@example.com", P1), ("not a login", P1)]
    for login, pw in cases:
        before = hasher.verifications
        result = await logins.verify(db, login, pw, hasher=hasher, now=clock())
        assert result == logins.VerifyResult(None)
        assert hasher.verifications == before + 1, login


async def test_verify_result_matched_says_whether_a_password_matched(
    db: Store, hasher: Hasher, clock: ManualClock, user: str
) -> None:
    assert (await logins.verify(db, user, P1, hasher=hasher, now=clock())).matched is not None
    await _reset(db, hasher, user, P2, HOUR, clock())
    # the previous one
    assert (await logins.verify(db, user, P1, hasher=hasher, now=clock())).matched is not None
    for login, pw in ((user, P3), ("nobody@example.com", P1), ("not a login", P1)):
        assert (await logins.verify(db, login, pw, hasher=hasher, now=clock())).matched is None


async def test_what_the_store_returns_is_frozen_and_hashable(
    db: Store, hasher: Hasher, clock: ManualClock, user: str
) -> None:
    u = await users.get(db, user)
    creds = await logins.credentials(db, user)
    result = await logins.verify(db, user, P1, hasher=hasher, now=clock())
    assert u is not None and creds is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        u.disabled = True  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        creds.current_hash = "replaced"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.matched = "previous"  # type: ignore[misc]
    assert {u: 1}[await users.get(db, user)] == 1  # type: ignore[index]
    assert {creds: 1}[await logins.credentials(db, user)] == 1  # type: ignore[index]
    assert {result: 1}[await logins.verify(db, user, P1, hasher=hasher, now=clock())] == 1


async def test_malformed_logins_have_no_hash_and_no_credentials(db: Store, user: str) -> None:
    for raw in ("not a login", "@example.com", "x" * 200):
        assert await _current_hash(db, raw) is None
        assert await logins.credentials(db, raw) is None


async def test_verify_result_carries_the_matched_hash(
    db: Store, hasher: Hasher, clock: ManualClock, user: str
) -> None:
    first = await logins.verify(db, user, P1, hasher=hasher, now=clock())
    assert first.matched == "current" and first.user is not None
    assert first.user.login == user
    assert first.password_hash == await _current_hash(db, user)
    await _reset(db, hasher, user, P2, HOUR, clock())
    second = await logins.verify(db, user, P1, hasher=hasher, now=clock())
    assert second.matched == "previous"
    creds = await logins.credentials(db, user)
    assert creds is not None
    assert second.password_hash == creds.previous_hash == first.password_hash
    assert creds.previous_valid_until == clock() + HOUR
    # Hashes never show up in reprs (logs of these objects stay clean).
    for obj in (first, second, creds, first.user):
        assert "$argon2" not in repr(obj)


async def test_successful_login_rehashes_with_new_parameters(
    db: Store, cfg: Config, hasher: Hasher, clock: ManualClock, user: str
) -> None:
    old_hash = await _current_hash(db, user)
    assert old_hash is not None and ",t=1," in old_hash
    params = dataclasses.replace(cfg.auth.argon2, time_cost=2)
    dearer = Hasher(dataclasses.replace(cfg.auth, argon2=params))
    try:
        assert await _which(db, dearer, user, "wrong-password-xyz", clock()) is None
        assert await _current_hash(db, user) == old_hash  # no rehash on failure
        result = await logins.verify(db, user, P1, hasher=dearer, now=clock())
        assert result.matched == "current"
        new_hash = await _current_hash(db, user)
        assert new_hash is not None and new_hash != old_hash and ",t=2," in new_hash
        assert result.password_hash == new_hash
        assert not dearer.needs_rehash(new_hash)
        assert await _which(db, dearer, user, P1, clock()) == "current"
        # A password in its grace window is not upgraded: it is on its way out.
        await _reset(db, hasher, user, P2, HOUR, clock())
        prev = (await logins.credentials(db, user)).previous_hash  # type: ignore[union-attr]
        assert await _which(db, dearer, user, P1, clock()) == "previous"
        assert (await logins.credentials(db, user)).previous_hash == prev  # type: ignore[union-attr]
    finally:
        dearer.close()


async def test_a_rehash_that_cannot_write_keeps_the_old_hash(
    db: Store,
    cfg: Config,
    hasher: Hasher,
    clock: ManualClock,
    user: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A CLI holds the write lock during a login that would rehash: the login still succeeds,
    with the old hash, and the next login upgrades it."""
    old_hash = await _current_hash(db, user)
    async with sqlite_of(db).transaction() as conn:
        await conn.execute("PRAGMA busy_timeout = 0")  # the writer gives up on a held lock at once
    params = dataclasses.replace(cfg.auth.argon2, time_cost=2)
    dearer = Hasher(dataclasses.replace(cfg.auth, argon2=params))
    cli = sqlite3.connect(cfg.db_path, isolation_level=None, timeout=0)
    try:
        cli.execute("BEGIN IMMEDIATE")
        result = await logins.verify(db, user, P1, hasher=dearer, now=clock())
        cli.execute("ROLLBACK")
        assert result.matched == "current" and result.password_hash == old_hash
        assert await _current_hash(db, user) == old_hash
        assert "rehash skipped user=app@example.com reason=StoreError" in caplog.messages
        again = await logins.verify(db, user, P1, hasher=dearer, now=clock())
        assert again.password_hash != old_hash
        assert again.password_hash == await _current_hash(db, user)
    finally:
        cli.close()
        dearer.close()


async def test_a_reset_that_ran_meanwhile_wins_over_the_rehash(
    db: Store,
    cfg: Config,
    hasher: Hasher,
    clock: ManualClock,
    user: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """verify read the old hash, a reset committed, then the rehash's compare-and-set finds
    another hash: the reset stands, and the login's result carries the hash it matched."""
    old_hash = await _current_hash(db, user)
    params = dataclasses.replace(cfg.auth.argon2, time_cost=2)
    dearer = Hasher(dataclasses.replace(cfg.auth, argon2=params))
    try:
        async with _stale_reader(db):  # verify reads the user as it was before the reset
            await _reset(db, hasher, user, P2, 0, clock())
            result = await logins.verify(db, user, P1, hasher=dearer, now=clock())
    finally:
        dearer.close()
    assert result.matched == "current" and result.password_hash == old_hash
    creds = await logins.credentials(db, user)
    assert creds is not None and creds.previous_hash is None
    assert creds.current_hash not in (old_hash, None)
    assert await _which(db, hasher, user, P2, clock()) == "current"
    assert await _which(db, hasher, user, P1, clock()) is None
    assert not [m for m in caplog.messages if m.startswith("rehash")]


async def test_record_logins_in_a_batch(
    db: Store, cfg: Config, hasher: Hasher, clock: ManualClock, user: str
) -> None:
    other = (
        await users.create(db, "b@example.com", P2, hasher=hasher, cfg=cfg, now=1, actor="t")
    ).login
    t = clock()
    await logins.record_logins(db, {user: t + 10, other: t + 20, "gone@example.com": t})
    assert (await users.get(db, user)).last_login_at == t + 10  # type: ignore[union-attr]
    assert (await users.get(db, other)).last_login_at == t + 20  # type: ignore[union-attr]
    await logins.record_logins(db, {user: t + 5})  # a late, older flush never moves it back
    assert (await users.get(db, user)).last_login_at == t + 10  # type: ignore[union-attr]
    await logins.record_logins(db, {})


async def test_a_store_fault_while_recording_logins_is_a_store_error(
    db: Store, clock: ManualClock, user: str
) -> None:
    with pytest.raises(StoreError, match="^users: not authorized$"):
        async with _refused(db, sqlite3.SQLITE_UPDATE, "users"):
            await logins.record_logins(db, {user: clock()})
    assert (await users.get(db, user)).last_login_at is None  # type: ignore[union-attr]


# --- the audit trail ------------------------------------------------------------------------------


async def test_every_admin_action_is_audited_without_secrets(
    db: Store, cfg: Config, hasher: Hasher, clock: ManualClock, domain: str
) -> None:
    login = f"app@{domain}"
    await users.create(db, login, P1, hasher=hasher, cfg=cfg, now=clock(), actor="alice")
    await _reset(db, hasher, login, P2, HOUR, clock())
    await users.revoke_old(db, login, now=clock(), actor="test")
    await users.set_disabled(db, login, True, now=clock(), actor="test")
    await users.set_disabled(db, login, False, now=clock(), actor="test")
    hashes = [await _current_hash(db, login)]
    await users.delete(db, login, now=clock(), actor="test")
    rows = await db.fetchall("SELECT * FROM events WHERE target = ? ORDER BY id", (login,))
    assert [(r["action"], r["detail"]) for r in rows] == [
        ("user.add", ""),
        ("user.reset-password", "grace=1h"),
        ("user.revoke-old", "window was running"),
        ("user.disable", ""),
        ("user.enable", ""),
        ("user.delete", ""),
    ]
    assert rows[0]["actor"] == "alice"
    everything = "\n".join(" ".join(str(v) for v in tuple(r)) for r in rows)
    for secret in (P1, P2, *hashes):
        assert secret is not None and secret not in everything
    assert "$argon2" not in everything


# --- SASLprep and hashes made before it (issue 12, item 10) --------------------------------------

COMPOSED = "Pa\u00dfw\u00f6rd-tr\u00e8s-s\u00fbr"
DECOMPOSED = unicodedata.normalize("NFD", COMPOSED)


async def _store_unprepared_hash(db: Store, cfg: Config, login: str, password: str) -> str:
    """Make ``login``'s current hash one relaybox made before SASLprep (argon2 over the password
    as sent). SQL in a test, because no code path of relaybox makes such a hash any more."""
    p = cfg.auth.argon2
    old = PasswordHasher(
        time_cost=p.time_cost, memory_cost=p.memory_kib, parallelism=p.parallelism, type=Type.ID
    ).hash(password)
    async with db.transaction() as conn:
        await conn.execute("UPDATE users SET password_hash = ? WHERE login = ?", (old, login))
    return old


async def test_set_composed_log_in_decomposed(
    db: Store, cfg: Config, hasher: Hasher, clock: ManualClock, domain: str
) -> None:
    leaks.add(COMPOSED)
    leaks.add(DECOMPOSED)
    login = (
        await users.create(db, f"u@{domain}", COMPOSED, hasher=hasher, cfg=cfg, now=1, actor="t")
    ).login
    assert await _which(db, hasher, login, DECOMPOSED, clock()) == "current"
    await _reset(db, hasher, login, DECOMPOSED, HOUR, clock())  # set decomposed this time
    assert await _which(db, hasher, login, COMPOSED, clock()) == "current"


async def test_a_hash_made_before_saslprep_logs_in_and_is_upgraded(
    db: Store, cfg: Config, hasher: Hasher, clock: ManualClock, user: str
) -> None:
    """An app whose password SASLprep changes keeps working after the upgrade of relaybox: its
    first login matches the old hash with the password as sent and stores the prepared form's
    hash; from then on one verify suffices, and the other form of the password works too."""
    leaks.add(DECOMPOSED)
    old = await _store_unprepared_hash(db, cfg, user, DECOMPOSED)
    assert await _which(db, hasher, user, COMPOSED, clock()) is None  # the old hash is raw
    result = await logins.verify(db, user, DECOMPOSED, hasher=hasher, now=clock())
    assert result.matched == "current"
    upgraded = await _current_hash(db, user)
    assert upgraded not in (None, old) and result.password_hash == upgraded
    for sent in (DECOMPOSED, COMPOSED):
        before = hasher.verifications
        assert await _which(db, hasher, user, sent, clock()) == "current"
        assert hasher.verifications == before + 1, sent
    assert await _current_hash(db, user) == upgraded  # upgraded once, not at every login


async def test_a_hash_made_before_saslprep_keeps_working_in_its_grace_window(
    db: Store, cfg: Config, hasher: Hasher, clock: ManualClock, user: str
) -> None:
    leaks.add(DECOMPOSED)
    await _store_unprepared_hash(db, cfg, user, DECOMPOSED)
    await _reset(db, hasher, user, P2, HOUR, clock())  # the old raw hash becomes the previous one
    assert await _which(db, hasher, user, DECOMPOSED, clock()) == "previous"
    assert await _which(db, hasher, user, P2, clock()) == "current"
    assert await _which(db, hasher, user, DECOMPOSED, clock() + HOUR) is None


async def test_unknown_users_cost_what_wrong_passwords_cost_whatever_saslprep_does(
    db: Store, hasher: Hasher, clock: ManualClock, user: str
) -> None:
    """A password that SASLprep changes is tried in two forms (two argon2 verifies): so it is for
    the dummy of an unknown, disabled or malformed login too; one it leaves alone costs one."""
    for password, forms in (("wrong-password-xyz", 1), (DECOMPOSED, 2)):
        leaks.add(password)
        for login in (user, "nobody@example.com", "not a login"):
            before = hasher.verifications
            assert await _which(db, hasher, login, password, clock()) is None
            assert hasher.verifications == before + forms, (login, password)


async def test_a_password_saslprep_refuses_cannot_be_set(
    db: Store, cfg: Config, hasher: Hasher, clock: ManualClock, user: str, domain: str
) -> None:
    for bad in ("emoji-\U0001f600-password", "private-\ue000-password"):
        leaks.add(bad)
        with pytest.raises(Invalid):
            await users.create(db, f"new@{domain}", bad, hasher=hasher, cfg=cfg, now=1, actor="t")
        with pytest.raises(Invalid):
            await _reset(db, hasher, user, bad, HOUR, clock())
    assert await users.get(db, f"new@{domain}") is None
    assert await _which(db, hasher, user, P1, clock()) == "current"


@pytest.mark.parametrize(
    ("alias", "normal"),
    [
        ("app@example.com.", "app@example.com"),
        (" app@example.com\t", "app@example.com"),
        ("\u3000app@example.com\u00a0", "app@example.com"),  # non-ASCII spaces
        ("app@\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com", "app@example.com"),
        ("\uff41\uff50\uff50@example.com", "app@example.com"),  # full-width local part
        ("app\uff20example.com", "app@example.com"),  # FULLWIDTH COMMERCIAL AT
        ("ap\u00adp@example.com", "app@example.com"),  # SOFT HYPHEN: mapped to nothing
    ],
)
def test_login_aliases_normalize_to_one_login(alias: str, normal: str) -> None:
    assert users.normalize_login(alias) == normal
