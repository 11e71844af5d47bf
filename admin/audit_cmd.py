"""`relaybox audit`: the audit log of admin actions (who ran what, when; never a secret)."""

from __future__ import annotations

import click

from admin import common
from relay import clock
from relay.store import events


def register(cli: click.Group) -> None:
    @cli.command("audit")
    @click.option(
        "--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Most recent N."
    )
    @click.option("--target", default=None, help="Only events about this user or domain.")
    @common.json_option
    @click.pass_context
    @common.user_errors
    def audit(ctx: click.Context, limit: int, target: str | None, json_: bool) -> None:
        """List recent admin actions, newest first."""
        cfg = common.get_config(ctx)

        async def _load() -> list[events.Event]:
            async with common.main_db(cfg) as db:
                return await events.recent(db, limit=limit, target=target)

        found = common.run(_load())
        if json_:
            common.emit_json(
                [
                    {
                        "id": e.id,
                        "at": clock.iso(e.at),
                        "actor": e.actor,
                        "action": e.action,
                        "target": e.target,
                        "detail": e.detail,
                    }
                    for e in found
                ]
            )
            return
        if not found:
            click.echo("no events")
            return
        rows = [(clock.iso(e.at), e.actor, e.action, e.target, e.detail) for e in found]
        click.echo(common.table(("When", "Actor", "Action", "Target", "Detail"), rows))
