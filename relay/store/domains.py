"""Sender domains: the records to publish, and the verification state machine.

A domain is added ``pending`` with an ownership token and a DKIM key pair. Its checks (ownership,
SPF, DKIM, DMARC; DNS in relay/dnscheck.py) run on ``relaybox domain verify`` and on the server's
schedule (:func:`recheck`). Only the checks in ``dns.required`` decide the state:

- all required pass: ``verified`` (from any state; ``failing_since`` cleared);
- a required check definitely fails: ``pending`` stays pending; ``verified`` becomes ``failing``
  (``failing_since`` set once); ``failing`` becomes ``suspended`` once
  ``now - failing_since >= dns.failure_grace``; ``suspended`` stays suspended;
- any required temperror (timeout, SERVFAIL): the state does not change at all. Domain state
  changes only on definite answers.

The results themselves are always stored as the last results (with ``last_checked_at``), temperrors
included, so ``domain show`` says what the last check saw. A ``failing`` domain still sends (it is
in its grace window); ``suspended`` and ``pending`` do not: see :attr:`Domain.can_send`.

A *sandbox* domain (``add(sandbox=True)``, relay/store/sandbox.py) is added ``verified`` and no
check ever changes it: :func:`recheck` skips it, :func:`verify` and :func:`record_results` refuse.

The DKIM private key lives in the ``domains`` row but never in :class:`Domain`: only
:func:`signing_key` reads it, for the signer.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import dns.asyncresolver

from relay import dkimkeys, dnscheck
from relay.config import Config
from relay.dnscheck import CheckResult
from relay.errors import Conflict, Invalid, NotFound
from relay.grammar import normalize_domain
from relay.store import events, users
from relay.store.engine import Row, Store, Tx

__all__ = [
    "Domain",
    "Record",
    "SigningKey",
    "add",
    "check_records",
    "get",
    "list_all",
    "next_state",
    "record_results",
    "recheck",
    "records",
    "remove",
    "signing_key",
    "verify",
]

STATES = ("pending", "verified", "failing", "suspended")
# The states in which a domain's users may send: verified, or failing inside dns.failure_grace.
SENDING_STATES = frozenset({"verified", "failing"})
RECHECK_CONCURRENCY = 8
_SANDBOX = "{name} is a sandbox domain: verified without DNS, it is never checked"


@dataclass(frozen=True)
class Record:
    purpose: str  # "ownership" | "spf" | "dkim" | "dmarc"
    type: str  # "TXT"
    name: str  # fully qualified, no final dot
    value: str  # the whole TXT value, unsplit


@dataclass(frozen=True)
class Domain:
    name: str  # A-label form, lowercase
    state: str  # "pending" | "verified" | "failing" | "suspended"
    token: str
    dkim_selector: str
    dkim_algorithm: str
    dkim_public_key: str
    created_at: float
    last_checked_at: float | None
    verified_at: float | None  # when it last became verified
    failing_since: float | None
    checks: tuple[CheckResult, ...]  # the last results, in check order
    sandbox: bool = False  # verified without DNS; its mail is captured (relay/store/sandbox.py)

    @property
    def can_send(self) -> bool:
        """Verified, or failing but still inside ``dns.failure_grace``."""
        return self.state in SENDING_STATES


@dataclass(frozen=True)
class SigningKey:
    domain: str
    selector: str
    algorithm: str
    private_pem: str = field(repr=False)


def _domain(row: Row) -> Domain:
    checks = tuple(CheckResult.from_json(c) for c in json.loads(row["checks"]))
    return Domain(
        name=row["name"],
        state=row["state"],
        token=row["token"],
        dkim_selector=row["dkim_selector"],
        dkim_algorithm=row["dkim_algorithm"],
        dkim_public_key=row["dkim_public_key"],
        created_at=row["created_at"],
        last_checked_at=row["last_checked_at"],
        verified_at=row["verified_at"],
        failing_since=row["failing_since"],
        checks=checks,
        sandbox=bool(row["sandbox"]),
    )


_COLUMNS = (
    "name, state, token, dkim_selector, dkim_algorithm, dkim_public_key, created_at, "
    "last_checked_at, verified_at, failing_since, checks, sandbox"
)


async def _fetch(conn: Tx, name: str) -> Row | None:
    """Read inside a write transaction (the writer sees its own, current state)."""
    return await conn.fetchone(f"SELECT {_COLUMNS} FROM domains WHERE name = ?", (name,))


# --- admin actions ------------------------------------------------------------------------------


async def add(
    db: Store, name: str, *, cfg: Config, now: float, actor: str, sandbox: bool = False
) -> Domain:
    """Add a domain ``pending`` with a new ownership token and DKIM key. Conflict if it exists.
    A ``sandbox`` domain is ``verified`` from now on, without DNS (see the module docstring)."""
    name = normalize_domain(name)
    if await get(db, name) is not None:  # early answer before paying for an RSA key
        raise Conflict(f"domain {name} already exists")
    key = await asyncio.to_thread(dkimkeys.generate, cfg.dns.dkim_key_type)
    token = secrets.token_hex(16)
    async with db.transaction() as conn:
        if await _fetch(conn, name) is not None:
            raise Conflict(f"domain {name} already exists")
        await conn.execute(
            "INSERT INTO domains (name, token, dkim_selector, dkim_algorithm, dkim_private_key, "
            "dkim_public_key, state, checks, created_at, verified_at, sandbox) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, '[]', ?, ?, ?)",
            (name, token, cfg.dns.dkim_selector, key.algorithm, key.private_pem, key.public_b64)
            + (("verified", now, now, 1) if sandbox else ("pending", now, None, 0)),
        )
        detail = f"dkim={key.algorithm} selector={cfg.dns.dkim_selector}"
        await events.add(
            conn,
            now=now,
            actor=actor,
            action="domain.add",
            target=name,
            detail=detail + (" sandbox" if sandbox else ""),
        )
        row = await _fetch(conn, name)
    assert row is not None
    return _domain(row)


async def get(db: Store, name: str) -> Domain | None:
    try:
        name = normalize_domain(name)
    except Invalid:
        return None
    row = await db.fetchone(f"SELECT {_COLUMNS} FROM domains WHERE name = ?", (name,))
    return None if row is None else _domain(row)


async def list_all(db: Store) -> list[Domain]:
    rows = await db.fetchall(f"SELECT {_COLUMNS} FROM domains ORDER BY name")
    return [_domain(r) for r in rows]


async def remove(db: Store, name: str, *, with_users: bool, now: float, actor: str) -> None:
    """Remove a domain and its DKIM key. Refused while it has users, unless ``with_users``: then
    its users are deleted in the same transaction, by relay/store/users.py (users.domain references
    domains.name; the cascade is asked for here rather than declared as ON DELETE CASCADE, so
    deleting users stays explicit). One audit event, ``domain.remove``, counts them."""
    name = normalize_domain(name)
    async with db.transaction() as conn:
        if await _fetch(conn, name) is None:
            raise NotFound(f"no such domain: {name}")
        n_users = await users.count_in_domain(conn, name)
        if n_users and not with_users:
            raise Conflict(
                f"domain {name} has {n_users} user(s): delete them first, or remove the domain "
                "with its users (--with-users)"
            )
        await users.delete_in_domain(conn, name)
        await conn.execute("DELETE FROM domains WHERE name = ?", (name,))
        await events.add(
            conn,
            now=now,
            actor=actor,
            action="domain.remove",
            target=name,
            detail=f"users_deleted={n_users}",
        )


def records(domain: Domain, cfg: Config) -> list[Record]:
    """The TXT records the domain's owner publishes, in check order."""
    return [
        Record(
            "ownership",
            "TXT",
            dnscheck.ownership_name(domain.name),
            dnscheck.ownership_value(domain.token),
        ),
        Record("spf", "TXT", domain.name, dnscheck.spf_suggestion(cfg)),
        Record(
            "dkim",
            "TXT",
            dnscheck.dkim_name(domain.dkim_selector, domain.name),
            dkimkeys.txt_value(domain.dkim_algorithm, domain.dkim_public_key),
        ),
        Record("dmarc", "TXT", dnscheck.dmarc_name(domain.name), dnscheck.DMARC_SUGGESTION),
    ]


async def check_records(
    resolver: dns.asyncresolver.Resolver, domain: Domain, cfg: Config
) -> list[CheckResult]:
    """Look up the domain's records now and check them against its token and DKIM key (every
    check, required or not). Nothing is recorded: see :func:`verify` and :func:`recheck`."""
    return await dnscheck.run_checks(
        resolver,
        domain.name,
        token=domain.token,
        dkim_selector=domain.dkim_selector,
        dkim_algorithm=domain.dkim_algorithm,
        dkim_public_key=domain.dkim_public_key,
        cfg=cfg,
    )


# --- the state machine --------------------------------------------------------------------------


def next_state(
    domain: Domain, results: Sequence[CheckResult], *, cfg: Config, now: float
) -> tuple[str, float | None, float | None]:
    """(state, verified_at, failing_since) after ``results``; see the module docstring.

    A required check missing from ``results`` counts as a temperror (no definite answer).
    """
    by_check = {r.check: r.result for r in results}
    required = [by_check.get(c, "temperror") for c in cfg.dns.required]
    state, verified_at, failing_since = domain.state, domain.verified_at, domain.failing_since
    if any(r not in ("pass", "fail") for r in required):
        return state, verified_at, failing_since
    if all(r == "pass" for r in required):
        return "verified", (verified_at if state == "verified" else now), None
    if state == "verified":
        state, failing_since = "failing", now
    if state == "failing":
        since = now if failing_since is None else failing_since
        if now - since >= cfg.dns.failure_grace:
            state = "suspended"
        return state, verified_at, since
    return state, verified_at, failing_since  # pending stays pending, suspended stays suspended


async def _record(
    db: Store,
    name: str,
    results: Sequence[CheckResult],
    *,
    cfg: Config,
    now: float,
    actor: str,
    action: str | None,
) -> Domain:
    name = normalize_domain(name)
    async with db.transaction() as conn:
        row = await _fetch(conn, name)  # re-read under the write lock: no lost updates
        if row is None:
            raise NotFound(f"no such domain: {name}")
        before = _domain(row)
        if before.sandbox:
            raise Conflict(_SANDBOX.format(name=name))
        state, verified_at, failing_since = next_state(before, results, cfg=cfg, now=now)
        checks = json.dumps([r.as_json() for r in results])
        await conn.execute(
            "UPDATE domains SET state = ?, checks = ?, last_checked_at = ?, verified_at = ?, "
            "failing_since = ? WHERE name = ?",
            (state, checks, now, verified_at, failing_since, name),
        )
        summary = " ".join(f"{r.check}={r.result}" for r in results)
        if action is not None:
            await events.add(conn, now=now, actor=actor, action=action, target=name, detail=summary)
        if state != before.state:
            await events.add(
                conn,
                now=now,
                actor=actor,
                action="domain.state",
                target=name,
                detail=f"{before.state} -> {state} ({summary})",
            )
        row = await _fetch(conn, name)
    assert row is not None
    return _domain(row)


async def record_results(
    db: Store,
    name: str,
    results: Sequence[CheckResult],
    *,
    cfg: Config,
    now: float,
    actor: str = "system",
) -> Domain:
    """Store ``results`` as the last check results and apply the state machine. A state change
    is written to the audit log (action ``domain.state``)."""
    return await _record(db, name, results, cfg=cfg, now=now, actor=actor, action=None)


async def verify(
    db: Store,
    name: str,
    *,
    resolver: dns.asyncresolver.Resolver,
    cfg: Config,
    now: float,
    actor: str,
) -> Domain:
    """Run every check now (an operator asked: audited as ``domain.verify``)."""
    domain = await get(db, name)
    if domain is None:
        raise NotFound(f"no such domain: {normalize_domain(name)}")
    if domain.sandbox:
        raise Conflict(_SANDBOX.format(name=domain.name))
    results = await check_records(resolver, domain, cfg)
    return await _record(
        db, domain.name, results, cfg=cfg, now=now, actor=actor, action="domain.verify"
    )


async def recheck(
    db: Store, *, resolver: dns.asyncresolver.Resolver, cfg: Config, now: float
) -> list[Domain]:
    """Re-check every domain (the server calls this every ``dns.recheck_interval``).

    Checks run concurrently, a few domains at a time; a domain removed meanwhile is skipped, a
    sandbox domain is never checked. Returns the domains as they are after the check.
    """
    limit = asyncio.Semaphore(RECHECK_CONCURRENCY)

    async def one(domain: Domain) -> Domain | None:
        if domain.sandbox:
            return domain
        async with limit:
            results = await check_records(resolver, domain, cfg)
        try:
            return await record_results(db, domain.name, results, cfg=cfg, now=now)
        except NotFound:
            return None

    done = await asyncio.gather(*(one(d) for d in await list_all(db)))
    return [d for d in done if d is not None]


async def signing_key(db: Store, name: str) -> SigningKey | None:
    """The DKIM private key of ``name`` (whatever its state: whether it may send is policy's
    decision, see :attr:`Domain.can_send`). A secret: never log it."""
    try:
        name = normalize_domain(name)
    except Invalid:
        return None
    row = await db.fetchone(
        "SELECT name, dkim_selector, dkim_algorithm, dkim_private_key FROM domains WHERE name = ?",
        (name,),
    )
    if row is None:
        return None
    return SigningKey(
        row["name"], row["dkim_selector"], row["dkim_algorithm"], row["dkim_private_key"]
    )
