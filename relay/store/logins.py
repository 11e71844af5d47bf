"""SMTP logins: the server's side of the ``users`` table (verify, cached credentials, last logins).

Split from relay/store/users.py (the admin side and the :class:`~relay.store.users.User` model) to
keep modules small; it is the same store module's SQL. The SMTP server uses :func:`verify` (argon2
in the hasher's thread pool), :func:`credentials` to check a cached credential cheaply, and
:func:`record_logins` to batch its last-login updates (writes to the shared database stay rare).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from relay import maillog
from relay.errors import Invalid
from relay.store.db import StoreError
from relay.store.engine import Store
from relay.store.passwords import Hasher
from relay.store.users import COLUMNS, User, from_row, normalize_login, writing
from relay.userrules import LimitOverrides


@dataclass(frozen=True)
class VerifyResult:
    """What :func:`verify` found. ``user`` and ``password_hash`` are set only when one matched."""

    matched: str | None  # "current", "previous" (in its grace window) or None
    user: User | None = None
    password_hash: str | None = field(default=None, repr=False)  # the hash that matched


_NO_MATCH = VerifyResult(None)


@dataclass(frozen=True)
class Credentials:
    """The stored hashes of one user, for the server's auth cache only (never shown or logged)."""

    login: str
    current_hash: str = field(repr=False)
    previous_hash: str | None = field(repr=False)
    previous_valid_until: float | None
    disabled: bool
    limits: LimitOverrides = LimitOverrides()
    allow_ip: tuple[str, ...] = ()
    allow_from: tuple[str, ...] = ()
    expires_at: float | None = None


async def verify(
    db: Store, login: str, password: str, *, hasher: Hasher, now: float
) -> VerifyResult:
    """Which password of ``login`` matches: the current one, the previous one in its window, none.

    Unknown, disabled and malformed logins still pay the argon2 work of a mismatch (against the
    dummy hash, one verify per form of the password: relay/store/passwords.py), so the answer's
    timing does not tell whether a login exists. A success with the current password is re-hashed
    and stored when its hash was made with other parameters (argon2's ``check_needs_rehash``) or
    before SASLprep (it matched the password as sent, not its prepared form): the returned
    ``password_hash`` is then the new hash, and the next login needs one verify. A password in
    its grace window is never upgraded: it is on its way out.
    """
    try:
        key = normalize_login(login)
    except Invalid:
        await hasher.verify_dummy(password)
        return _NO_MATCH
    row = await db.fetchone(f"SELECT {COLUMNS}, password_hash FROM users WHERE login = ?", (key,))
    if row is None or row["disabled"]:
        await hasher.verify_dummy(password)
        return _NO_MATCH
    user = from_row(row)
    current: str = row["password_hash"]
    form = await hasher.match(current, password)
    if form is not None:
        if form == "raw" or hasher.needs_rehash(current):
            current = await _rehash(db, key, current, password, hasher)
        return VerifyResult("current", user, current)
    previous: str | None = row["previous_hash"]
    if previous is not None and user.old_password_works(now):
        if await hasher.match(previous, password) is not None:
            return VerifyResult("previous", user, previous)
    return _NO_MATCH


async def _rehash(db: Store, login: str, old_hash: str, password: str, hasher: Hasher) -> str:
    """Store a hash with the configured parameters of the password's prepared form; keep the old
    one if anything interferes (or if SASLprep refuses the password for a stored string: a
    password set before relaybox prepared passwords may hold what it now refuses)."""
    try:
        new_hash = await hasher.hash(password)
    except Invalid:
        return old_hash
    try:
        async with db.transaction() as conn:
            # Compare-and-set: a reset that ran meanwhile wins over this upgrade.
            changed = await conn.execute(
                "UPDATE users SET password_hash = ? WHERE login = ? AND password_hash = ?",
                (new_hash, login, old_hash),
            )
    except StoreError as exc:
        # The login still succeeds with the old hash; the next login tries again.
        maillog.event("rehash skipped", user=login, reason=type(exc).__name__)
        return old_hash
    if changed != 1:
        return old_hash
    maillog.event("rehashed", user=login)
    return new_hash


async def credentials(db: Store, login: str) -> Credentials | None:
    """The stored hashes of ``login`` (None if unknown or malformed), for the server's auth cache.

    One indexed read, no argon2: the cache compares the hash a cached login matched against these
    to see at once that a reset, revoke-old, disable or delete took its credential away.
    """
    try:
        key = normalize_login(login)
    except Invalid:
        return None
    row = await db.fetchone(f"SELECT {COLUMNS}, password_hash FROM users WHERE login = ?", (key,))
    if row is None:
        return None
    user = from_row(row)
    return Credentials(
        login=user.login,
        current_hash=row["password_hash"],
        previous_hash=row["previous_hash"],
        previous_valid_until=user.old_password_valid_until,
        disabled=user.disabled,
        limits=user.limits,
        allow_ip=user.allow_ip,
        allow_from=user.allow_from,
        expires_at=user.expires_at,
    )


async def record_logins(db: Store, logins: Mapping[str, float]) -> None:
    """Set last_login_at for many users in one transaction (the server flushes periodically).

    Never moves a timestamp backwards, and silently skips users deleted meanwhile.
    """
    if not logins:
        return
    params = [(at, login, at) for login, at in logins.items()]
    async with writing(db) as conn:
        await conn.executemany(
            "UPDATE users SET last_login_at = ? WHERE login = ?"
            " AND (last_login_at IS NULL OR last_login_at < ?)",
            params,
        )
