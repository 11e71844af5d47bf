"""The suppression list: recipients a sender domain no longer sends to (issue 16).

A permanent failure that says the address is bad (:func:`suppresses`: by its enhanced code, the
``[suppression] codes``) puts the recipient on the list of the sending domain
(:func:`record_bounce`, called by delivery once the outcome itself is recorded); an operator adds
and removes entries (:func:`add`, :func:`remove`: audited in the same transaction). A later RCPT
TO a listed address from a user of that domain is refused (:func:`is_suppressed`: one
primary-key read; the server asks through :class:`Lookup`, which keeps answers until the next
write to the store, relay/store/readcache.py).

The ``suppressions`` table (relay/store/db.py, migration 4), which only this module writes, is
keyed (domain, address): the sender domain as stored (lowercase A-label), the recipient with its
domain lowercase A-label and its local part exactly as given (RFC 5321 2.4: it may be
case-sensitive). An entry whose ``expires_at`` has passed counts as absent everywhere (a later
bounce replaces it).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from relay import clock, grammar, maillog, replies
from relay.config import Config
from relay.errors import Conflict, Invalid, NotFound
from relay.maillog import printable
from relay.metrics import Metrics
from relay.replies import Reply
from relay.store import domains, events
from relay.store.engine import Store, Tx
from relay.store.readcache import ReadCache

__all__ = [
    "Lookup",
    "Suppress",
    "Suppression",
    "add",
    "address_key",
    "for_address",
    "is_suppressed",
    "list_for",
    "record_bounce",
    "recorder",
    "refusal",
    "remove",
    "suppresses",
]

REPLY_LIMIT = 300  # characters of the remote reply kept (printable)
REASON_LIMIT = 200
SHOWN_LIMIT = 120  # characters of an address a refusal shows (the reply stays under 512 bytes)
SOURCES = ("bounce", "admin")

# "550 5.1.1 text" or "550-5.1.1 text": the basic code and the enhanced code (RFC 3463).
_REPLY = re.compile(r"^([245])\d\d[ -]([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")
_COLUMNS = "domain, address, reason, code, reply, source, created_at, expires_at"
_LIVE = "(expires_at IS NULL OR expires_at > ?)"

# What delivery calls for a bounce that suppresses: (sender domain, recipient, enhanced code,
# reply, now).
Suppress = Callable[[str, str, str, str, float], Awaitable[None]]


@dataclass(frozen=True)
class Suppression:
    domain: str
    address: str
    reason: str
    code: str
    reply: str
    source: str  # "bounce" | "admin"
    created_at: float
    expires_at: float | None

    def as_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "address": self.address,
            "reason": self.reason,
            "code": self.code,
            "reply": self.reply,
            "source": self.source,
            "created_at": clock.iso(self.created_at),
            "expires_at": clock.iso(self.expires_at),
        }


def suppresses(reply: str, codes: Sequence[str]) -> str | None:
    """The enhanced code of ``reply`` if it is a permanent failure (5xx with a 5.x.x code) that
    one of ``codes`` ("5.1.*", "5.2.1") names; else None. A reply without an enhanced code, a
    4xx, or a code of another class never suppresses."""
    m = _REPLY.match(reply)
    if m is None or m.group(1) != "5" or m.group(2) != "5":
        return None
    parts = ("5", str(int(m.group(3))), str(int(m.group(4))))
    for pattern in codes:
        wanted = pattern.split(".")
        if len(wanted) == 3 and all(w in ("*", p) for w, p in zip(wanted, parts, strict=True)):
            return ".".join(parts)
    return None


def refusal(entry: Suppression, address: str) -> Reply:
    """The 550 5.1.1 for a RCPT TO ``address`` (the client's, shown as one safe token) that
    ``entry`` suppresses: the UTC day of the bounce, and the command that removes it."""
    return replies.SUPPRESSED.fill(
        address=maillog.safe(address, SHOWN_LIMIT),
        date=(clock.iso(entry.created_at) or "")[:10],
        key=maillog.safe(entry.address, SHOWN_LIMIT),
        domain=maillog.safe(entry.domain, SHOWN_LIMIT),
    )


def address_key(address: str) -> str:
    """``local@domain`` as stored: the domain lowercase A-label (IDNA U-labels accepted), the
    local part exactly as given. Invalid for what is not a mailbox."""
    text = address.strip()
    local, at, domain = text.rpartition("@")
    if not at or not local:
        raise Invalid(f"not an email address: {address!r}")
    try:
        ascii_domain = grammar.normalize_domain(domain)
    except Invalid:
        raise Invalid(f"not an email address: {address!r}") from None
    parts = grammar.split_address(f"{local}@{ascii_domain}")
    if parts is None:
        raise Invalid(f"not an email address: {address!r}")
    return f"{parts[0]}@{parts[1]}"


def _row(r: Any) -> Suppression:
    return Suppression(
        r["domain"],
        r["address"],
        r["reason"],
        r["code"],
        r["reply"],
        r["source"],
        r["created_at"],
        r["expires_at"],
    )


async def is_suppressed(db: Store, domain: str, address: str, now: float) -> Suppression | None:
    """The live entry for ``address`` on ``domain``'s list, or None. ``domain`` as stored (a
    user's domain); ``address`` a mailbox that passed RCPT's syntax check (an ASCII domain: its
    lowercase form is its key) or any form :func:`address_key` reads. One primary-key read."""
    parts = grammar.split_address(address)
    if parts is not None:
        key = f"{parts[0]}@{parts[1]}"
    else:
        try:
            key = address_key(address)
        except Invalid:
            return None
    row = await db.fetchone(
        f"SELECT {_COLUMNS} FROM suppressions WHERE domain = ? AND address = ? AND {_LIVE}",
        (domain, key, now),
    )
    return None if row is None else _row(row)


async def any_live(db: Store, domain: str, now: float) -> bool:
    """Whether ``domain``'s list has a live entry. Live entries only ever lapse with time: a
    False stays true until something is written."""
    row = await db.fetchone(
        f"SELECT 1 FROM suppressions WHERE domain = ? AND {_LIVE} LIMIT 1", (domain, now)
    )
    return row is not None


class Lookup:
    """:func:`is_suppressed` for RCPT TO, with answers kept while nothing is written to the store
    (relay/store/readcache.py): first whether the domain has any live entry (most have none, and
    then no address needs a read), then the address. A kept entry still lapses at its
    ``expires_at``."""

    def __init__(self, db: Store) -> None:
        self.db = db
        self.domains: ReadCache[str, bool] = ReadCache(db.generation)
        self.entries: ReadCache[tuple[str, str], Suppression | None] = ReadCache(db.generation)

    async def check(self, domain: str, address: str, now: float) -> Suppression | None:
        if not await self.domains.get(domain, lambda: any_live(self.db, domain, now)):
            return None
        entry = await self.entries.get(
            (domain, address), lambda: is_suppressed(self.db, domain, address, now)
        )
        if entry is None or (entry.expires_at is not None and entry.expires_at <= now):
            return None
        return entry


async def list_for(db: Store, now: float, domain: str | None = None) -> list[Suppression]:
    """The live entries, of one domain or of all, by domain then address."""
    if domain is None:
        rows = await db.fetchall(
            f"SELECT {_COLUMNS} FROM suppressions WHERE {_LIVE} ORDER BY domain, address", (now,)
        )
    else:
        rows = await db.fetchall(
            f"SELECT {_COLUMNS} FROM suppressions WHERE domain = ? AND {_LIVE} ORDER BY address",
            (grammar.normalize_domain(domain), now),
        )
    return [_row(r) for r in rows]


async def for_address(db: Store, address: str, now: float) -> list[Suppression]:
    """Every domain's live entry for ``address``, by domain. NotFound if there is none."""
    key = address_key(address)
    rows = await db.fetchall(
        f"SELECT {_COLUMNS} FROM suppressions WHERE address = ? AND {_LIVE} ORDER BY domain",
        (key, now),
    )
    if not rows:
        raise NotFound(f"no suppression for {printable(key)}")
    return [_row(r) for r in rows]


async def add(
    db: Store, address: str, *, domain: str, reason: str = "", now: float, actor: str
) -> Suppression:
    """Suppress ``address`` for ``domain`` (one of ours) by hand, until removed. Audited as
    ``suppression.add``. Conflict if it is suppressed there already."""
    key = address_key(address)
    name = grammar.normalize_domain(domain)
    if await domains.get(db, name) is None:
        raise NotFound(f"no such domain: {name}")
    entry = Suppression(name, key, printable(reason, REASON_LIMIT), "", "", "admin", now, None)
    async with db.transaction() as conn:
        if await _live(conn, name, key, now):
            raise Conflict(f"{printable(key)} is already suppressed for {name}")
        await _put(conn, entry)
        detail = f"{key} {entry.reason}".strip()
        await events.add(
            conn, now=now, actor=actor, action="suppression.add", target=name, detail=detail
        )
    return entry


async def remove(
    db: Store, address: str, *, domain: str | None = None, now: float, actor: str
) -> list[str]:
    """Remove ``address`` from ``domain``'s list, or from every list; the domains it was
    removed from (sorted). Each is audited as ``suppression.remove``. NotFound if none."""
    key = address_key(address)
    name = None if domain is None else grammar.normalize_domain(domain)
    async with db.transaction() as conn:
        sql = "WHERE address = ?" if name is None else "WHERE domain = ? AND address = ?"
        params: tuple[object, ...] = (key, now) if name is None else (name, key, now)
        rows = await conn.fetchall(
            f"SELECT domain FROM suppressions {sql} AND {_LIVE} ORDER BY domain", params
        )
        found = [str(r[0]) for r in rows]
        if not found:
            where = f" for {name}" if name is not None else ""
            raise NotFound(f"no suppression for {printable(key)}{where}")
        await conn.execute(f"DELETE FROM suppressions {sql}", params[:-1])
        for d in found:
            await events.add(
                conn, now=now, actor=actor, action="suppression.remove", target=d, detail=key
            )
    return found


async def record_bounce(
    db: Store,
    *,
    domain: str,
    address: str,
    code: str,
    reply: str,
    now: float,
    ttl: float = 0,
) -> Suppression | None:
    """Suppress ``address`` for the sender ``domain`` after a hard bounce (``reply``, whose
    enhanced code is ``code``); ``ttl`` seconds, 0: until removed. Replaces an entry already
    there (the latest bounce is what the refusal names). None, writing nothing, for a domain
    or address that is not one (a DSN's null sender)."""
    try:
        name = grammar.normalize_domain(domain)
        key = address_key(address)
    except Invalid:
        return None
    expires = now + ttl if ttl > 0 else None
    entry = Suppression(name, key, "", code, printable(reply, REPLY_LIMIT), "bounce", now, expires)
    async with db.transaction() as conn:
        await _put(conn, entry)
    return entry


async def _live(conn: Tx, domain: str, key: str, now: float) -> bool:
    rows = await conn.fetchall(
        f"SELECT 1 FROM suppressions WHERE domain = ? AND address = ? AND {_LIVE}",
        (domain, key, now),
    )
    return bool(rows)


async def _put(conn: Tx, e: Suppression) -> None:
    await conn.execute(
        f"INSERT INTO suppressions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (domain, address) DO UPDATE SET reason = excluded.reason,"
        " code = excluded.code, reply = excluded.reply, source = excluded.source,"
        " created_at = excluded.created_at, expires_at = excluded.expires_at",
        (e.domain, e.address, e.reason, e.code, e.reply, e.source, e.created_at, e.expires_at),
    )


def recorder(db: Store, cfg: Callable[[], Config], metrics: Metrics | None) -> Suppress:
    """The :data:`Suppress` delivery is handed: :func:`record_bounce` with the ttl of the config
    in effect (``cfg()``), counted in ``metrics`` and logged in the mail log."""

    async def suppress(domain: str, address: str, code: str, reply: str, now: float) -> None:
        ttl = float(cfg().suppression.ttl)
        entry = await record_bounce(
            db, domain=domain, address=address, code=code, reply=reply, now=now, ttl=ttl
        )
        if entry is None:
            return
        if metrics is not None:
            metrics.suppression_added("bounce")
        maillog.event(
            "suppressed", domain=entry.domain, to=entry.address, code=code, source="bounce"
        )

    return suppress
