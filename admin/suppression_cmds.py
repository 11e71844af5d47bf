"""`relaybox suppression ...`: the sender domains' suppression lists (list, add, remove, show).

Presentation only: the rules live in relay/store/suppressions.py (what suppresses, how addresses
are compared, the audit events). ``--json`` prints each entry as
``{"domain", "address", "reason", "code", "reply", "source", "created_at", "expires_at"}`` (times
ISO UTC, ``expires_at`` null for an entry kept until removed).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import click

from admin import common
from relay import clock
from relay.config import Config
from relay.store import events, suppressions
from relay.store.engine import Store
from relay.store.suppressions import Suppression

T = TypeVar("T")
_CELL = 60  # longest reply or reason shown in a table (--json carries them whole)


def _with_db(cfg: Config, fn: Callable[[Store], Awaitable[T]]) -> T:
    async def _main() -> T:
        async with common.main_db(cfg) as db:
            return await fn(db)

    return common.run(_main())


def _short(text: str) -> str:
    return text if len(text) <= _CELL else text[: _CELL - 3] + "..."


def _table(entries: Sequence[Suppression]) -> str:
    rows = [
        (
            e.domain,
            e.address,
            e.source,
            e.code or "-",
            clock.iso(e.created_at),
            clock.iso(e.expires_at) or "never",
            _short(e.reply if e.source == "bounce" else e.reason) or "-",
        )
        for e in entries
    ]
    return common.table(("Domain", "Address", "Source", "Code", "Since", "Expires", "Why"), rows)


def _emit(entries: Sequence[Suppression], json_: bool, empty: str) -> None:
    if json_:
        common.emit_json([e.as_json() for e in entries])
    elif not entries:
        click.echo(empty)
    else:
        click.echo(_table(entries))


def register(cli: click.Group) -> None:
    @cli.group("suppression")
    def suppression_group() -> None:
        """Addresses a sender domain no longer sends to (hard bounces, or added by hand)."""

    @suppression_group.command("list")
    @click.option("--domain", default=None, help="Only this sender domain's list.")
    @common.json_option
    @click.pass_context
    @common.user_errors
    def suppression_list(ctx: click.Context, domain: str | None, json_: bool) -> None:
        """List the suppressed addresses (expired entries are left out)."""
        cfg = common.get_config(ctx)
        now = clock.system()
        found = _with_db(cfg, lambda db: suppressions.list_for(db, now, domain))
        _emit(found, json_, "no suppressions")

    @suppression_group.command("add")
    @click.argument("address")
    @click.option("--domain", required=True, help="The sender domain whose list it goes on.")
    @click.option("--reason", default="", help="Why (kept with the entry and in the audit log).")
    @common.json_option
    @click.pass_context
    @common.user_errors
    def suppression_add(
        ctx: click.Context, address: str, domain: str, reason: str, json_: bool
    ) -> None:
        """Suppress ADDRESS for DOMAIN's users until it is removed: their RCPT TO it gets 550."""
        cfg = common.get_config(ctx)
        now, actor = clock.system(), events.current_actor()
        entry = _with_db(
            cfg,
            lambda db: suppressions.add(
                db, address, domain=domain, reason=reason, now=now, actor=actor
            ),
        )
        if json_:
            common.emit_json(entry.as_json())
            return
        click.echo(common.shown(f"suppressed {entry.address} for {entry.domain}"))

    @suppression_group.command("remove")
    @click.argument("address")
    @click.option("--domain", default=None, help="Only from this domain's list (default: all).")
    @click.pass_context
    @common.user_errors
    def suppression_remove(ctx: click.Context, address: str, domain: str | None) -> None:
        """Let mail to ADDRESS through again, from DOMAIN's list or from every list."""
        cfg = common.get_config(ctx)
        now, actor = clock.system(), events.current_actor()
        key = suppressions.address_key(address)
        removed = _with_db(
            cfg,
            lambda db: suppressions.remove(db, address, domain=domain, now=now, actor=actor),
        )
        line = f"removed {key} from {len(removed)} domain(s): {', '.join(removed)}"
        click.echo(common.shown(line))

    @suppression_group.command("show")
    @click.argument("address")
    @common.json_option
    @click.pass_context
    @common.user_errors
    def suppression_show(ctx: click.Context, address: str, json_: bool) -> None:
        """Every domain's entry for ADDRESS (exit 1 if it is suppressed nowhere)."""
        cfg = common.get_config(ctx)
        now = clock.system()
        found = _with_db(cfg, lambda db: suppressions.for_address(db, address, now))
        _emit(found, json_, "")
