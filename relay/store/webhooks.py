"""Webhook endpoints: where delivery events go (issue 16), shared by every worker and node.

The ``webhook_endpoints`` table (relay/store/db.py, migration 5), which only this module reads
and writes: an id (``wh_...``), the URL (relay/webhook.py's :func:`check_url`: https, or http to
loopback), the sender domain whose events it gets (NULL: every domain's), the event types
(comma-separated) and the signing secret, which must be stored to sign and is shown once, by
:func:`add` (the state dir is 0700 and the file 0600, as for the DKIM keys). Changes are audited
in the same transaction, never with the secret.

:class:`Subscriptions` is a process's copy of the table, read again every
``[webhooks] refresh_interval`` and at SIGHUP (relay/service/webhooks.py): the hot path asks it,
in memory, whether any endpoint wants an event, and writes nothing when none does. An endpoint
added is used within that interval; a post to one removed meanwhile is failed by the poster.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from relay import clock, grammar, webhook
from relay.errors import NotFound
from relay.store import domains, events
from relay.store.engine import Store
from relay.store.outbox import EventRow

__all__ = ["Endpoint", "Subscriptions", "add", "get", "list_all", "remove"]

_COLUMNS = "id, url, domain, events, secret, created_at"


@dataclass(frozen=True)
class Endpoint:
    id: str
    url: str
    domain: str | None  # None: every sender domain's events
    events: tuple[str, ...]
    secret: str = field(repr=False)
    created_at: float = 0.0

    def wants(self, event_type: str, domain: str) -> bool:
        return event_type in self.events and (self.domain is None or self.domain == domain)

    def as_json(self) -> dict[str, Any]:
        """What ``webhook list --json`` shows: never the secret."""
        return {
            "id": self.id,
            "url": self.url,
            "domain": self.domain,
            "events": list(self.events),
            "created_at": clock.iso(self.created_at),
        }


def _row(r: Any) -> Endpoint:
    kinds = tuple(t for t in str(r["events"]).split(",") if t)
    return Endpoint(r["id"], r["url"], r["domain"], kinds, r["secret"], r["created_at"])


async def add(
    db: Store,
    url: str,
    *,
    domain: str | None = None,
    event_types: Sequence[str] = (),
    now: float,
    actor: str,
) -> Endpoint:
    """A new endpoint with a generated secret (in the result: show it once). ``domain``: one
    of ours, whose events alone it gets; ``event_types``: none named, all. Audited as
    ``webhook.add``. Invalid for a URL or event type that is not one; NotFound for a domain."""
    checked = webhook.check_url(url)
    kinds = webhook.check_events(event_types)
    name = None
    if domain is not None:
        name = grammar.normalize_domain(domain)
        if await domains.get(db, name) is None:
            raise NotFound(f"no such domain: {name}")
    entry = Endpoint(webhook.new_endpoint_id(), checked, name, kinds, webhook.new_secret(), now)
    async with db.transaction() as conn:
        await conn.execute(
            f"INSERT INTO webhook_endpoints ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
            (entry.id, entry.url, name, ",".join(kinds), entry.secret, now),
        )
        detail = f"{checked} domain={name or '*'} events={','.join(kinds)}"
        await events.add(
            conn, now=now, actor=actor, action="webhook.add", target=entry.id, detail=detail
        )
    return entry


async def list_all(db: Store) -> list[Endpoint]:
    rows = await db.fetchall(f"SELECT {_COLUMNS} FROM webhook_endpoints ORDER BY created_at, id")
    return [_row(r) for r in rows]


async def get(db: Store, endpoint_id: str) -> Endpoint:
    row = await db.fetchone(
        f"SELECT {_COLUMNS} FROM webhook_endpoints WHERE id = ?", (endpoint_id.strip(),)
    )
    if row is None:
        raise NotFound(f"no such webhook endpoint: {endpoint_id.strip()[:40]}")
    return _row(row)


async def remove(db: Store, endpoint_id: str, *, now: float, actor: str) -> Endpoint:
    """Remove an endpoint (its pending events are failed by the poster). Audited as
    ``webhook.remove``. NotFound if there is none of that id."""
    entry = await get(db, endpoint_id)
    async with db.transaction() as conn:
        await conn.execute("DELETE FROM webhook_endpoints WHERE id = ?", (entry.id,))
        await events.add(
            conn, now=now, actor=actor, action="webhook.remove", target=entry.id, detail=entry.url
        )
    return entry


@dataclass
class Subscriptions:
    """The endpoints as last read: what the hot path asks before it writes an event."""

    endpoints: tuple[Endpoint, ...] = ()
    loaded: bool = False  # read once at least (before that, no pending row is judged)
    _by_id: dict[str, Endpoint] = field(default_factory=dict)

    async def refresh(self, db: Store) -> None:
        """Read the table again (a StoreError keeps the copy as it was)."""
        self.set(await list_all(db))

    def set(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = tuple(endpoints)
        self._by_id = {e.id: e for e in endpoints}
        self.loaded = True

    def get(self, endpoint_id: str) -> Endpoint | None:
        return self._by_id.get(endpoint_id)

    def wanted(self, event_type: str, domain: str) -> list[Endpoint]:
        return [e for e in self.endpoints if e.wants(event_type, domain)]

    def rows(
        self, event_type: str, domain: str, data: dict[str, Any], now: float
    ) -> list[EventRow]:
        """One event (one id, one body) for every endpoint that wants it; none: no rows, and
        nothing built (the hot path without endpoints pays for this call only)."""
        wanted = self.wanted(event_type, domain) if self.endpoints else []
        if not wanted:
            return []
        event_id = webhook.new_event_id(now)
        text = webhook.body(event_type, now, data)
        return [EventRow(event_id, e.id, event_type, text, now) for e in wanted]
