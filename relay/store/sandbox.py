"""Sandbox domains: verified without DNS, and never a way out to the Internet.

A sandbox domain is a ``domains`` row with ``sandbox = 1`` (relay/store/domains.py adds it
``verified``, and no check ever changes it). Its mail is captured into the local inbox
(relay/store/inbox.py) except for the recipients the operator allows: the ``sandbox_recipients``
table, which only this module writes. Which recipients of a message are captured is decided when it
is accepted (relay/smtp/accept.py asks :func:`allowed`) and written on the queued message
(relay/store/spool.py), so a change made later, or the domain's removal, never lets queued mail out.

An allowed address matches exactly in its local part (RFC 5321 2.4: it may be case-sensitive) and
whatever the case or IDNA form of its domain: a near miss is captured, never delivered.
"""

from __future__ import annotations

from collections.abc import Sequence

from relay import grammar
from relay.config import Config
from relay.errors import Conflict, Invalid, NotFound
from relay.store import domains, events
from relay.store.domains import Domain
from relay.store.engine import Store, Tx

__all__ = ["add", "address_key", "allow_lists", "allowed", "set_allowed"]


def address_key(address: str) -> str:
    """``local@domain`` with the domain in lowercase A-label form: how addresses are compared.
    Raises Invalid for what is not a mailbox."""
    parts = grammar.split_address(address.strip())
    if parts is None:
        raise Invalid(f"not an email address: {address!r}")
    local, domain = parts
    return f"{local}@{grammar.normalize_domain(domain)}"


async def add(
    db: Store,
    name: str,
    *,
    allow_rcpt: Sequence[str] = (),
    cfg: Config,
    now: float,
    actor: str,
) -> tuple[Domain, tuple[str, ...]]:
    """Add ``name`` as a sandbox domain that delivers only to ``allow_rcpt``; the domain and its
    allowed recipients. The addresses are checked before anything is written; were the second
    write to fail, the domain would be left capturing everything (the safe side)."""
    keys = [address_key(a) for a in allow_rcpt]
    domain = await domains.add(db, name, cfg=cfg, now=now, actor=actor, sandbox=True)
    if keys:
        return domain, await set_allowed(db, domain.name, add=keys, now=now, actor=actor)
    return domain, ()


async def allowed(db: Store, name: str) -> tuple[str, ...]:
    """The recipients ``name``'s mail may be delivered to (sorted; empty: every one captured)."""
    try:
        name = grammar.normalize_domain(name)
    except Invalid:
        return ()
    rows = await db.fetchall(
        "SELECT address FROM sandbox_recipients WHERE domain = ? ORDER BY address", (name,)
    )
    return tuple(r["address"] for r in rows)


async def allow_lists(db: Store) -> dict[str, tuple[str, ...]]:
    """Every sandbox domain's allowed recipients, by domain (domains without any are absent)."""
    rows = await db.fetchall(
        "SELECT domain, address FROM sandbox_recipients ORDER BY domain, address"
    )
    lists: dict[str, list[str]] = {}
    for r in rows:
        lists.setdefault(r["domain"], []).append(r["address"])
    return {d: tuple(a) for d, a in lists.items()}


async def set_allowed(
    db: Store,
    name: str,
    *,
    add: Sequence[str] = (),
    remove: Sequence[str] = (),
    clear: bool = False,
    now: float,
    actor: str,
) -> tuple[str, ...]:
    """Change a sandbox domain's allowed recipients: ``clear`` them all first, then ``remove``,
    then ``add``; returns the list after the change. Audited as ``domain.allow_rcpt``. Conflict
    for a domain that is not a sandbox (its mail is not captured: there is nothing to allow)."""
    name = grammar.normalize_domain(name)
    added, removed = [address_key(a) for a in add], [address_key(a) for a in remove]
    async with db.transaction() as conn:
        await _require_sandbox(conn, name)
        if clear:
            await conn.execute("DELETE FROM sandbox_recipients WHERE domain = ?", (name,))
        await conn.executemany(
            "DELETE FROM sandbox_recipients WHERE domain = ? AND address = ?",
            [(name, a) for a in removed],
        )
        await conn.executemany(
            "INSERT INTO sandbox_recipients (domain, address) VALUES (?, ?)"
            " ON CONFLICT (domain, address) DO NOTHING",
            [(name, a) for a in added],
        )
        rows = await conn.fetchall(
            "SELECT address FROM sandbox_recipients WHERE domain = ? ORDER BY address", (name,)
        )
        after = tuple(str(r[0]) for r in rows)
        detail = " ".join(
            [*(["cleared"] if clear else []), *(f"-{a}" for a in removed)]
            + [f"+{a}" for a in added]
            + [f"now={len(after)}"]
        )
        await events.add(
            conn, now=now, actor=actor, action="domain.allow_rcpt", target=name, detail=detail
        )
    return after


async def _require_sandbox(conn: Tx, name: str) -> None:
    row = await conn.fetchone("SELECT sandbox FROM domains WHERE name = ?", (name,))
    if row is None:
        raise NotFound(f"no such domain: {name}")
    if not row[0]:
        raise Conflict(
            f"{name} is not a sandbox domain: its mail is delivered, there is no recipient to allow"
        )
