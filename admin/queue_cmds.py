"""`relaybox queue ...`: look at and manage the delivery queue (list, show, retry, delete, stats).

Presentation only: the rules live in relay/store/spool.py and relay/store/spool_admin.py (which
also audits the changes). The commands open the spool files directly,
also while the server runs (SQLite WAL + busy_timeout make that safe); they never run the spool's
crash recovery, which would hand the server's in-flight deliveries out a second time. Every worker's
spool file (``spool-<N>.db``) in the state dir is read; a missing one is simply empty.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import click

from admin import common
from relay import clock
from relay.config import Config
from relay.store import events, spool_admin
from relay.store.engine import Store
from relay.store.spool import PENDING, STATES, MessageInfo, Spool, Stats

T = TypeVar("T")
_SPOOL_FILE = re.compile(r"^spool-(\d+)\.db$")


def _workers(cfg: Config) -> list[int]:
    if not cfg.state_dir.is_dir():
        return []
    found = (_SPOOL_FILE.match(p.name) for p in cfg.state_dir.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


@asynccontextmanager
async def _spools(cfg: Config) -> AsyncIterator[list[Spool]]:
    common.drop_privileges_for(cfg.state_dir)
    opened: list[Spool] = []
    try:
        for worker in _workers(cfg):
            opened.append(await Spool.open(cfg, worker=worker, recover=False))
        yield opened
    finally:
        for sp in opened:
            await sp.close()


def _run(cfg: Config, fn: Callable[[list[Spool]], Awaitable[T]]) -> T:
    async def _main() -> T:
        async with _spools(cfg) as spools:
            return await fn(spools)

    return common.run(_main())


def _change(cfg: Config, fn: Callable[[list[Spool], Store], Awaitable[T]]) -> T:
    """Run a change of the queue: the spools, and the shared database its audit event goes to."""

    async def _main() -> T:
        async with _spools(cfg) as spools, common.main_db(cfg) as db:
            return await fn(spools, db)

    return common.run(_main())


def _next(info: MessageInfo) -> float | None:
    times = [r.next_attempt_at for r in info.recipients if r.next_attempt_at is not None]
    return min(times) if times else None


def _last_reply(info: MessageInfo) -> str | None:
    done = [r for r in info.recipients if r.last_attempt_at is not None]
    return max(done, key=lambda r: r.last_attempt_at or 0).last_reply if done else None


def _summary(info: MessageInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "created_at": clock.iso(info.created_at),
        "sender": info.sender,
        "user": info.user,
        "size": info.size,
        "recipients": len(info.recipients),
        "states": {s: info.count(s) for s in STATES},
        "next_attempt_at": clock.iso(_next(info)),
        "last_reply": _last_reply(info),
    }


def _detail(info: MessageInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "created_at": clock.iso(info.created_at),
        "sender": info.sender,
        "user": info.user,
        "size": info.size,
        "done_at": clock.iso(info.done_at),
        "recipients": [
            {
                "address": r.address,
                "state": r.state,
                "in_flight": r.in_flight,
                "attempts": r.attempts,
                "next_attempt_at": clock.iso(r.next_attempt_at),
                "last_attempt_at": clock.iso(r.last_attempt_at),
                "last_code": r.last_code,
                "last_reply": r.last_reply,
                "relay": r.relay,
            }
            for r in info.recipients
        ],
    }


def _stats(all_stats: list[Stats]) -> dict[str, Any]:
    def least(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return min(present) if present else None

    return {
        "messages": sum(s.messages for s in all_stats),
        "pending_messages": sum(s.pending_messages for s in all_stats),
        "recipients": {st: sum(s.recipients.get(st, 0) for s in all_stats) for st in STATES},
        "in_flight": sum(s.in_flight for s in all_stats),
        "oldest_pending_at": clock.iso(least([s.oldest_pending_at for s in all_stats])),
        "next_attempt_at": clock.iso(least([s.next_attempt_at for s in all_stats])),
    }


def register(cli: click.Group) -> None:
    @cli.group("queue")
    def queue_group() -> None:
        """Inspect and manage the delivery queue."""

    @queue_group.command("list")
    @click.option(
        "--state",
        "states",
        multiple=True,
        type=click.Choice([*STATES, "all"]),
        help="Messages with a recipient in this state (repeatable). Default: queued, deferred.",
    )
    @click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True)
    @common.json_option
    @click.pass_context
    @common.user_errors
    def queue_list(ctx: click.Context, states: tuple[str, ...], limit: int, json_: bool) -> None:
        """List queued messages, oldest first."""
        cfg = common.get_config(ctx)
        wanted = STATES if "all" in states else (states or PENDING)

        async def _load(spools: list[Spool]) -> list[MessageInfo]:
            found = [m for sp in spools for m in await sp.list_messages(wanted, limit)]
            return sorted(found, key=lambda m: (m.created_at, m.id))[:limit]

        found = _run(cfg, _load)
        if json_:
            common.emit_json([_summary(m) for m in found])
            return
        if not found:
            click.echo("queue is empty" if wanted == PENDING else "no such messages")
            return
        rows = []
        for m in found:
            s = _summary(m)
            states_text = ",".join(f"{k}={v}" for k, v in s["states"].items() if v)
            rows.append(
                (m.id, s["created_at"], m.sender or "<>", m.size, states_text, s["last_reply"])
            )
        click.echo(common.table(("ID", "QUEUED", "FROM", "SIZE", "RECIPIENTS", "LAST REPLY"), rows))

    @queue_group.command("show")
    @click.argument("message_id")
    @common.json_option
    @click.pass_context
    @common.user_errors
    def queue_show(ctx: click.Context, message_id: str, json_: bool) -> None:
        """Envelope, per-recipient state, attempts and last reply of one message."""
        cfg = common.get_config(ctx)

        async def _load(spools: list[Spool]) -> MessageInfo:
            return (await spool_admin.find(spools, message_id))[1]

        info = _run(cfg, _load)
        data = _detail(info)
        if json_:
            common.emit_json(data)
            return
        click.echo(f"id:       {common.shown(info.id)}")
        click.echo(f"queued:   {data['created_at']}")
        click.echo(f"from:     <{common.shown(info.sender)}>")
        click.echo(f"user:     {common.shown(info.user or '-')}")
        click.echo(f"size:     {info.size}")
        if info.done_at is not None:
            click.echo(f"done:     {data['done_at']}")
        rows = [
            (
                r["address"],
                r["state"] + (" (in flight)" if r["in_flight"] else ""),
                r["attempts"],
                r["next_attempt_at"] or "-",
                r["relay"] or "-",
                r["last_reply"] or "-",
            )
            for r in data["recipients"]
        ]
        headers = ("RECIPIENT", "STATE", "ATTEMPTS", "NEXT ATTEMPT", "RELAY", "LAST REPLY")
        click.echo(common.table(headers, rows))

    @queue_group.command("retry")
    @click.argument("message_id", required=False)
    @click.option("--all", "all_", is_flag=True, help="Every pending message.")
    @common.json_option
    @click.pass_context
    @common.user_errors
    def queue_retry(ctx: click.Context, message_id: str | None, all_: bool, json_: bool) -> None:
        """Make pending recipients due now (the server picks them up within seconds)."""
        if bool(message_id) == all_:
            raise click.UsageError("give a message ID or --all")
        cfg = common.get_config(ctx)

        async def _retry(spools: list[Spool], db: Store) -> int:
            return await spool_admin.retry(
                spools, message_id, now=time.time(), audit=db, actor=events.current_actor()
            )

        n = _change(cfg, _retry)
        target = message_id or "all"
        if json_:
            common.emit_json({"target": target, "retried": n})
        else:
            click.echo(f"{target}: {n} recipient(s) due now")

    @queue_group.command("delete")
    @click.argument("message_id")
    @click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
    @click.pass_context
    @common.user_errors
    def queue_delete(ctx: click.Context, message_id: str, yes: bool) -> None:
        """Remove a message from the queue for good, without a bounce to its sender."""
        cfg = common.get_config(ctx)
        info = _run(cfg, lambda spools: spool_admin.find(spools, message_id))[1]
        pending = sum(1 for r in info.recipients if r.state in PENDING)
        common.confirm_or_abort(
            f"Delete {message_id} from <{common.shown(info.sender)}> "
            f"({pending} recipient(s) not delivered)?",
            yes,
        )

        async def _delete(spools: list[Spool], db: Store) -> MessageInfo:
            return await spool_admin.delete(
                spools, message_id, now=time.time(), audit=db, actor=events.current_actor()
            )

        _change(cfg, _delete)
        click.echo(f"deleted {message_id} ({pending} undelivered recipient(s), no bounce sent)")

    @queue_group.command("stats")
    @common.json_option
    @click.pass_context
    @common.user_errors
    def queue_stats(ctx: click.Context, json_: bool) -> None:
        """Counts by state, in flight, oldest pending message, next attempt."""
        cfg = common.get_config(ctx)

        async def _load(spools: list[Spool]) -> list[Stats]:
            return [await sp.stats() for sp in spools]

        data = _stats(_run(cfg, _load))
        if json_:
            common.emit_json(data)
            return
        click.echo(f"messages:        {data['messages']} ({data['pending_messages']} pending)")
        for state, n in data["recipients"].items():
            click.echo(f"  {state + ':':<15}{n}")
        click.echo(f"in flight:       {data['in_flight']}")
        click.echo(f"oldest pending:  {data['oldest_pending_at'] or '-'}")
        click.echo(f"next attempt:    {data['next_attempt_at'] or '-'}")
