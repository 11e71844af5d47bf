"""`relaybox webhook ...`: delivery webhooks (add, list, remove, test, deliveries, replay).

Presentation only: the endpoints and their rules live in relay/store/webhooks.py (URL and event
checks: relay/webhook.py), the outbox in relay/store/outbox.py, the posting in
relay/delivery/poster.py. ``add`` prints the generated secret once; nothing prints it again.
Every change is audited (``webhook.add``, ``webhook.remove``, ``webhook.replay``). The outbox
is read from every worker's spool file in the state dir, also while the server runs (WAL).

``--json`` shapes: an endpoint ``{"id", "url", "domain", "events", "created_at"}`` (``add``
adds ``"secret"``); a delivery ``{"event_id", "endpoint_id", "type", "state", "attempts",
"created_at", "last_attempt_at", "next_attempt_at", "last_status", "last_error"}``.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

import click

from admin import common
from relay import clock, webhook
from relay.config import Config
from relay.delivery import poster
from relay.errors import Conflict, NotFound
from relay.store import events, outbox, webhooks
from relay.store.db import Database
from relay.store.engine import Store
from relay.store.outbox import Delivery
from relay.store.spool_schema import SPOOL_MIGRATIONS
from relay.store.webhooks import Endpoint

T = TypeVar("T")
_SPOOL_FILE = re.compile(r"^spool-(\d+)\.db$")


def _with_db(cfg: Config, fn: Callable[[Store], Awaitable[T]]) -> T:
    async def _main() -> T:
        async with common.main_db(cfg) as db:
            return await fn(db)

    return common.run(_main())


@asynccontextmanager
async def _outboxes(cfg: Config) -> AsyncIterator[list[Database]]:
    """Every worker's spool file (the outbox is in each), opened as the state dir's owner."""
    common.drop_privileges_for(cfg.state_dir)
    paths = []
    if cfg.state_dir.is_dir():
        paths = sorted(p for p in cfg.state_dir.iterdir() if _SPOOL_FILE.match(p.name))
    opened: list[Database] = []
    try:
        for path in paths:
            opened.append(await Database.open(path, SPOOL_MIGRATIONS))
        yield opened
    finally:
        for db in opened:
            await db.close()


def _endpoint_table(found: Sequence[Endpoint]) -> str:
    rows = [
        (e.id, e.url, e.domain or "(all)", ",".join(e.events), clock.iso(e.created_at))
        for e in found
    ]
    return common.table(("ID", "URL", "Domain", "Events", "Created"), rows)


def _delivery_table(found: Sequence[Delivery]) -> str:
    rows = [
        (
            d.event_id, d.endpoint_id, d.type, d.state, d.attempts,
            d.last_status if d.last_status is not None else "-",
            d.last_error or "-", clock.iso(d.created_at),
            clock.iso(d.next_attempt_at) or "-",
        )
        for d in found
    ]  # fmt: skip
    headers = ("Event", "Endpoint", "Type", "State", "Tries", "Status", "Error", "At", "Next")
    return common.table(headers, rows)


async def _test(cfg: Config, endpoint: Endpoint) -> tuple[int | None, str]:
    now = clock.system()
    event_id = webhook.new_event_id(now)
    body = webhook.body(webhook.TEST_TYPE, now, {"endpoint_id": endpoint.id})
    async with poster.client(cfg) as client:
        timeout = float(cfg.webhooks.timeout)
        return await poster.post(client, endpoint, event_id, body, int(now), timeout)


async def _replay(cfg: Config, event_id: str, actor: str) -> list[Delivery]:
    now = clock.system()
    async with _outboxes(cfg) as dbs:
        found: list[Delivery] = []
        for db in dbs:
            found += await outbox.replay(db, event_id, now)
    if not found:
        raise NotFound(f"no such event: {event_id[:40]}")
    async with common.main_db(cfg) as main:
        endpoints = ",".join(d.endpoint_id for d in found)
        await events.record(
            main, now=now, actor=actor, action="webhook.replay", target=event_id, detail=endpoints
        )
    return found


def register(cli: click.Group) -> None:
    @cli.group("webhook")
    def webhook_group() -> None:
        """Signed delivery events posted to your app (Standard Webhooks)."""

    @webhook_group.command("add")
    @click.argument("url")
    @click.option("--domain", default=None, help="Only this sender domain's events.")
    @click.option(
        "--events",
        "event_types",
        default="",
        help=f"Comma-separated event types (default: all: {','.join(webhook.EVENT_TYPES)}).",
    )
    @common.json_option
    @click.pass_context
    @common.user_errors
    def webhook_add(
        ctx: click.Context, url: str, domain: str | None, event_types: str, json_: bool
    ) -> None:
        """Post events to URL (https://, or http:// on loopback). Prints the signing secret
        once: give it to the app now (relaybox shows it nowhere else)."""
        cfg = common.get_config(ctx)
        now, actor = clock.system(), events.current_actor()
        kinds = [t for t in event_types.split(",") if t.strip()]
        entry = _with_db(
            cfg,
            lambda db: webhooks.add(
                db, url, domain=domain, event_types=kinds, now=now, actor=actor
            ),
        )
        if json_:
            common.emit_json({**entry.as_json(), "secret": entry.secret})
            return
        click.echo(common.shown(f"added {entry.id}: {entry.url}"))
        click.echo(f"secret: {entry.secret}")
        click.echo("(shown once: store it with the app; a lost secret means remove and add)")

    @webhook_group.command("list")
    @common.json_option
    @click.pass_context
    @common.user_errors
    def webhook_list(ctx: click.Context, json_: bool) -> None:
        """List the endpoints (never their secrets)."""
        cfg = common.get_config(ctx)
        found = _with_db(cfg, webhooks.list_all)
        if json_:
            common.emit_json([e.as_json() for e in found])
        elif not found:
            click.echo("no webhook endpoints")
        else:
            click.echo(_endpoint_table(found))

    @webhook_group.command("remove")
    @click.argument("endpoint_id")
    @click.pass_context
    @common.user_errors
    def webhook_remove(ctx: click.Context, endpoint_id: str) -> None:
        """Stop posting to ENDPOINT_ID (its pending events are failed)."""
        cfg = common.get_config(ctx)
        now, actor = clock.system(), events.current_actor()
        entry = _with_db(cfg, lambda db: webhooks.remove(db, endpoint_id, now=now, actor=actor))
        click.echo(common.shown(f"removed {entry.id}: {entry.url}"))

    @webhook_group.command("test")
    @click.argument("endpoint_id")
    @click.pass_context
    @common.user_errors
    def webhook_test(ctx: click.Context, endpoint_id: str) -> None:
        """Post a signed webhook.test event to ENDPOINT_ID now and print its answer (exit 1
        unless it is a 2xx)."""
        cfg = common.get_config(ctx)
        entry = _with_db(cfg, lambda db: webhooks.get(db, endpoint_id))
        status, error = common.run(_test(cfg, entry))
        if status is None:
            raise Conflict(f"{entry.id}: no answer ({error})")
        if error:
            raise Conflict(f"{entry.id} answered HTTP {status}")
        click.echo(f"{entry.id} answered HTTP {status}")

    @webhook_group.command("deliveries")
    @click.option("--failed", is_flag=True, help="Only the events given up on (for replay).")
    @click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100000))
    @common.json_option
    @click.pass_context
    @common.user_errors
    def webhook_deliveries(ctx: click.Context, failed: bool, limit: int, json_: bool) -> None:
        """The latest events posted or to post, newest first, from every worker's outbox."""
        cfg = common.get_config(ctx)

        async def _main() -> list[Delivery]:
            async with _outboxes(cfg) as dbs:
                found: list[Delivery] = []
                for db in dbs:
                    found += await outbox.deliveries(db, failed=failed, limit=limit)
            found.sort(key=lambda d: (-d.created_at, d.event_id, d.endpoint_id))
            return found[:limit]

        found = common.run(_main())
        if json_:
            common.emit_json([d.as_json() for d in found])
        elif not found:
            click.echo("no failed deliveries" if failed else "no deliveries")
        else:
            click.echo(_delivery_table(found))

    @webhook_group.command("replay")
    @click.argument("event_id")
    @click.pass_context
    @common.user_errors
    def webhook_replay(ctx: click.Context, event_id: str) -> None:
        """Post EVENT_ID again (same webhook-id) to each endpoint it was for, with a new day of
        retries. The service picks it up within seconds (at once after a SIGHUP)."""
        cfg = common.get_config(ctx)
        found = common.run(_replay(cfg, event_id.strip(), events.current_actor()))
        click.echo(common.shown(f"queued {event_id.strip()} again for {len(found)} endpoint(s)"))
