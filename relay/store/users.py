"""SMTP users: the credential store (logins, Argon2id hashes, the reset grace window).

A login is an address-shaped name ``local@domain`` whose domain must be verified when the user is
created. Only hashes are stored; a reset keeps the previous hash working until ``now + grace`` so
the apps using the old password can be moved over without an outage (only the immediately previous
password survives a second reset). Every admin action writes an audit event in the same
transaction; no password or hash ever goes into an event or a log line.

This module is the admin side (what `relaybox user` and `relaybox domain remove` do) and the model
both sides share: :class:`User` and :func:`normalize_login`. The SMTP server's side (verify a
password, read the stored hashes for its cache, batch its last-login updates) is
relay/store/logins.py, split from here to keep modules small; it is the same store module's SQL.
Only these two modules write the ``users`` table (a domain removed with its users calls
:func:`delete_in_domain` inside that transaction).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from relay import grammar, saslprep, userrules
from relay.config import Config
from relay.errors import Conflict, Invalid, NotFound
from relay.store import events
from relay.store.db import StoreError
from relay.store.engine import IntegrityError, Row, Store, Tx
from relay.store.passwords import Hasher
from relay.units import format_duration
from relay.userrules import LimitOverrides

COLUMNS = (  # what a User is read from
    "login, domain, created_at, last_login_at, password_changed_at, previous_hash, "
    "previous_valid_until, disabled, messages_per_hour, messages_per_day, recipients_per_day, "
    "allow_ip, allow_from, expires_at"
)


@dataclass(frozen=True)
class User:
    """An SMTP user as the rest of relaybox sees it: no hashes in it."""

    login: str
    domain: str
    created_at: float
    last_login_at: float | None
    password_changed_at: float
    old_password_valid_until: float | None  # end of the grace window as stored (may be past)
    disabled: bool
    limits: LimitOverrides = LimitOverrides()  # its own sending limits (None: the default)
    allow_ip: tuple[str, ...] = ()  # networks it may log in from (empty: anywhere)
    allow_from: tuple[str, ...] = ()  # senders it may use (empty: any of its domain)
    expires_at: float | None = None  # from then on its passwords are refused

    def old_password_works(self, now: float) -> bool:
        """True while a reset's previous password is still accepted."""
        return self.old_password_valid_until is not None and now < self.old_password_valid_until

    def grace_until(self, now: float) -> float | None:
        """End of the grace window if it is still running at ``now``, else None."""
        return self.old_password_valid_until if self.old_password_works(now) else None


@functools.lru_cache(maxsize=1024)  # pure; ~30 us (IDNA's UTS 46 in Python), at every AUTH
def normalize_login(login: str) -> str:
    """``local@domain`` with the domain IDNA-normalized and the local part checked.

    The one normalizing function: what creates a user, finds one, and what the server counts
    AUTH failures under (relay/smtp/auth.py), so no alias of a login escapes the count.

    First SASLprep's mapping and NFKC (RFC 4013 2.1-2.2, as RFC 4616 2 recommends for the PLAIN
    authentication identity): full-width letters and "@", non-ASCII spaces and soft hyphens come
    out as what they look like. Then surrounding spaces go. The local part must be an RFC 5321
    dot-atom of at most 64 octets (no quoted strings, ASCII only). It is lower-cased: a login is a
    name people type into app settings, and two users that differ only in case would be a trap.
    The domain loses its final dot and is IDNA-normalized. Raises Invalid naming the problem.
    """
    local, sep, domain = saslprep.map_and_normalize(login).strip().rpartition("@")
    shown = login if len(login) <= 100 else login[:100] + "..."  # client input: keep errors short
    if not sep or not local or not domain:
        raise Invalid(f"login {shown!r} must look like name@domain")
    if len(local.encode("utf-8", "surrogatepass")) > grammar.MAX_LOCAL_PART:
        raise Invalid(
            f"login {shown!r}: the part before @ is longer than {grammar.MAX_LOCAL_PART} bytes"
        )
    if not local.isascii() or not grammar.is_dot_atom(local):
        raise Invalid(
            f"login {shown!r}: the part before @ may use letters, digits and !#$%&'*+/=?^_`{{|}}~- "
            "separated by single dots"
        )
    return f"{local.lower()}@{grammar.normalize_domain(domain)}"


def from_row(row: Row) -> User:
    """A :class:`User` from a row holding :data:`COLUMNS`."""
    has_previous = row["previous_hash"] is not None
    return User(
        login=row["login"],
        domain=row["domain"],
        created_at=row["created_at"],
        last_login_at=row["last_login_at"],
        password_changed_at=row["password_changed_at"],
        old_password_valid_until=row["previous_valid_until"] if has_previous else None,
        disabled=bool(row["disabled"]),
        limits=LimitOverrides(
            row["messages_per_hour"], row["messages_per_day"], row["recipients_per_day"]
        ),
        allow_ip=split_list(row["allow_ip"]),
        allow_from=split_list(row["allow_from"]),
        expires_at=row["expires_at"],
    )


def split_list(text: str) -> tuple[str, ...]:
    """An allow-list column: entries separated by spaces (none holds one)."""
    return tuple(text.split())


async def _fetch(conn: Tx, login: str) -> Row | None:
    """Read a user inside a write transaction (the writer connection sees its own changes)."""
    return await conn.fetchone("SELECT * FROM users WHERE login = ?", (login,))


async def _existing(conn: Tx, login: str) -> Row:
    row = await _fetch(conn, login)
    if row is None:
        raise NotFound(f"no such user: {login}")
    return row


@asynccontextmanager
async def writing(db: Store) -> AsyncIterator[Tx]:
    """A write transaction whose store errors name this store ("users: ...")."""
    try:
        async with db.transaction() as conn:
            yield conn
    except IntegrityError:
        raise
    except StoreError as exc:
        raise StoreError(f"users: {exc}") from exc


async def _domain_state(db: Store, domain: str) -> str | None:
    """The state of ``domain`` (an A-label), None if it is not known (the FK's other end)."""
    row = await db.fetchone("SELECT state FROM domains WHERE name = ?", (domain,))
    return None if row is None else str(row["state"])


_Change = Callable[[Row], tuple[str, tuple[object, ...], str]]  # row -> SQL, params, detail


async def _update(
    db: Store, login: str, change: _Change, *, now: float, actor: str, action: str
) -> User:
    """Apply ``change`` to ``login`` and audit it as ``action``, in one transaction."""
    async with writing(db) as conn:
        sql, params, detail = change(await _existing(conn, login))
        await conn.execute(sql, params)
        await events.add(conn, now=now, actor=actor, action=action, target=login, detail=detail)
        row = await _existing(conn, login)
    return from_row(row)


# --- admin actions ------------------------------------------------------------------------------


async def create(
    db: Store,
    login: str,
    password: str,
    *,
    hasher: Hasher,
    cfg: Config,
    now: float,
    actor: str,
    expires_at: float | None = None,
) -> User:
    """Create a user. The domain must exist and be ``verified`` (not merely failing/pending).
    ``expires_at``: when its password stops working (None: never)."""
    if expires_at is not None and expires_at <= now:
        raise Invalid("expires: that is in the past")
    login = normalize_login(login)
    domain = login.rpartition("@")[2]
    hasher.check_policy(password)
    state = await _domain_state(db, domain)
    if state is None:
        raise Conflict(
            f"domain {domain} is not known: run `relaybox domain add {domain}`, publish its "
            f"records, then `relaybox domain verify {domain}`"
        )
    if state != "verified":
        raise Conflict(
            f"domain {domain} is not verified (state {state}): "
            f"run `relaybox domain verify {domain}`"
        )
    if await get(db, login) is not None:  # cheap early answer before spending an argon2 hash
        raise Conflict(f"user {login} already exists")
    password_hash = await hasher.hash(password)
    async with writing(db) as conn:
        if await _fetch(conn, login) is not None:
            raise Conflict(f"user {login} already exists")
        try:
            await conn.execute(
                "INSERT INTO users (login, domain, password_hash, created_at, password_changed_at,"
                " expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                (login, domain, password_hash, now, now, expires_at),
            )
        except IntegrityError:
            # The domain was removed between the check and the insert (foreign key).
            raise Conflict(
                f"domain {domain} is not known: run `relaybox domain add {domain}`"
            ) from None
        shown = "" if expires_at is None else f"expires_at={userrules.format_time(expires_at)}"
        await events.add(conn, now=now, actor=actor, action="user.add", target=login, detail=shown)
        row = await _existing(conn, login)
    return from_row(row)


async def reset_password(
    db: Store,
    login: str,
    new_password: str,
    *,
    grace: float,
    hasher: Hasher,
    now: float,
    actor: str,
) -> User:
    """Set a new password; the current one keeps working until ``now + grace``.

    ``grace == 0`` revokes the old password at once. A reset inside a running window replaces that
    window's password: only the immediately previous password survives.
    """
    login = normalize_login(login)
    if grace < 0:
        raise Invalid("grace cannot be negative")
    hasher.check_policy(new_password)
    if await get(db, login) is None:
        raise NotFound(f"no such user: {login}")
    new_hash = await hasher.hash(new_password)

    def change(row: Row) -> tuple[str, tuple[object, ...], str]:
        previous, until = (row["password_hash"], now + grace) if grace > 0 else (None, None)
        sql = (
            "UPDATE users SET password_hash = ?, previous_hash = ?, previous_valid_until = ?,"
            " password_changed_at = ? WHERE login = ?"
        )
        return sql, (new_hash, previous, until, now, login), f"grace={format_duration(grace)}"

    return await _update(db, login, change, now=now, actor=actor, action="user.reset-password")


async def revoke_old(db: Store, login: str, *, now: float, actor: str) -> User:
    """End a running grace window: only the current password works from now on."""
    login = normalize_login(login)

    def change(row: Row) -> tuple[str, tuple[object, ...], str]:
        active = from_row(row).old_password_works(now)
        sql = "UPDATE users SET previous_hash = NULL, previous_valid_until = NULL WHERE login = ?"
        return sql, (login,), "window was running" if active else "no window was running"

    return await _update(db, login, change, now=now, actor=actor, action="user.revoke-old")


async def delete(db: Store, login: str, *, now: float, actor: str) -> None:
    """Remove the user: current and previous passwords stop working at once."""
    login = normalize_login(login)
    async with writing(db) as conn:
        await _existing(conn, login)
        await conn.execute("DELETE FROM users WHERE login = ?", (login,))
        await events.add(conn, now=now, actor=actor, action="user.delete", target=login)


async def set_disabled(db: Store, login: str, disabled: bool, *, now: float, actor: str) -> User:
    """Disable (no password works, nothing is forgotten) or enable a user."""
    login = normalize_login(login)

    def change(_row: Row) -> tuple[str, tuple[object, ...], str]:
        return "UPDATE users SET disabled = ? WHERE login = ?", (int(disabled), login), ""

    action = "user.disable" if disabled else "user.enable"
    return await _update(db, login, change, now=now, actor=actor, action=action)


@dataclass(frozen=True)
class SettingsChange:
    """What `relaybox user set` changes; every field left at its default is kept as it is.

    ``limits``: limit name -> the user's own value (0 = unlimited), or None to put the config's
    default back. ``allow_ip`` / ``allow_from``: the whole new list as typed (empty: no list).
    ``expires``: True to set ``expires_at`` (None: never)."""

    limits: Mapping[str, int | None] = field(default_factory=dict)
    allow_ip: Sequence[str] | None = None
    allow_from: Sequence[str] | None = None
    expires: bool = False
    expires_at: float | None = None

    def empty(self) -> bool:
        return (
            not self.limits
            and self.allow_ip is None
            and self.allow_from is None
            and not (self.expires)
        )


async def update_settings(
    db: Store, login: str, change: SettingsChange, *, now: float, actor: str
) -> User:
    """Apply ``change`` (limits, allow-lists, expiry) and audit it as ``user.set``, one
    transaction. Entries are checked and stored canonical (relay/userrules.py); Invalid names
    the first bad one."""
    login = normalize_login(login)
    domain = login.rpartition("@")[2]
    sets: list[str] = []
    params: list[object] = []
    detail: list[str] = []
    for name, value in change.limits.items():
        if name not in userrules.LIMIT_NAMES:
            raise Invalid(f"no such limit: {name}")
        if value is not None and not 0 <= value <= userrules.MAX_LIMIT:
            raise Invalid(f"{name}: expected 0 (unlimited) to {userrules.MAX_LIMIT}")
        sets.append(f"{name} = ?")
        params.append(value)
        detail.append(f"{name}={'default' if value is None else value}")
    if change.allow_ip is not None:
        nets = userrules.check_list(
            [userrules.parse_network(t) for t in change.allow_ip], "allow_ip"
        )
        sets.append("allow_ip = ?")
        params.append(" ".join(nets))
        detail.append(f"allow_ip={','.join(nets) or 'any'}")
    if change.allow_from is not None:
        senders = [userrules.parse_sender(t, domain) for t in change.allow_from]
        allowed = userrules.check_list(senders, "allow_from")
        sets.append("allow_from = ?")
        params.append(" ".join(allowed))
        detail.append(f"allow_from={','.join(allowed) or 'any'}")
    if change.expires:
        if change.expires_at is not None and change.expires_at <= now:
            raise Invalid("expires: that is in the past")
        sets.append("expires_at = ?")
        params.append(change.expires_at)
        shown = "never" if change.expires_at is None else userrules.format_time(change.expires_at)
        detail.append(f"expires_at={shown}")
    if not sets:
        raise Invalid("nothing to change: give at least one option")

    def apply(_row: Row) -> tuple[str, tuple[object, ...], str]:
        sql = f"UPDATE users SET {', '.join(sets)} WHERE login = ?"
        return sql, (*params, login), " ".join(detail)

    return await _update(db, login, apply, now=now, actor=actor, action="user.set")


async def count_in_domain(conn: Tx, domain: str) -> int:
    """How many users ``domain`` has, read inside the caller's write transaction."""
    row = await conn.fetchone("SELECT COUNT(*) FROM users WHERE domain = ?", (domain,))
    return int(row[0]) if row else 0


async def delete_in_domain(conn: Tx, domain: str) -> None:
    """Delete every user of ``domain`` inside the caller's write transaction (domains.remove's)."""
    await conn.execute("DELETE FROM users WHERE domain = ?", (domain,))


# --- reads ----------------------------------------------------------------------------------------


async def get(db: Store, login: str) -> User | None:
    login = normalize_login(login)
    row = await db.fetchone(f"SELECT {COLUMNS} FROM users WHERE login = ?", (login,))
    return None if row is None else from_row(row)


async def list_all(db: Store, domain: str | None = None) -> list[User]:
    if domain is None:
        rows = await db.fetchall(f"SELECT {COLUMNS} FROM users ORDER BY domain, login")
    else:
        rows = await db.fetchall(
            f"SELECT {COLUMNS} FROM users WHERE domain = ? ORDER BY login",
            (grammar.normalize_domain(domain),),
        )
    return [from_row(r) for r in rows]
