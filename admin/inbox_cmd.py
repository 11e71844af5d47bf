"""`relaybox inbox ...`: the mail sandbox domains sent, kept on this box (list, show, delete).

Presentation only: the inbox is relay/store/inbox.py (``inbox.db`` in the state dir, shared by
every worker), its DKIM check relay/dkim.py's :func:`relay.dkim.verify` with the domain's key from
the store. A captured message is outside text: what a terminal shows of it goes through
:func:`admin.common.shown` line by line; ``show --raw`` writes its bytes exactly as kept.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from admin import common
from relay import clock, grammar
from relay.config import Config
from relay.dkim import Verification
from relay.store import events, inbox
from relay.store.engine import Store
from relay.store.inbox import Captured, Inbox

T = TypeVar("T")
_TO_CELL = 40  # characters of the recipients shown in the list (--json has them all)
_FOLD = re.compile(rb"[ \t]*\r\n[ \t]+|\t")  # RFC 5322 2.2.3 (a tab would be shown as '?')


def _with_inbox(cfg: Config, fn: Callable[[Inbox, Store], Awaitable[T]]) -> T:
    """Open the inbox and the shared database (domains' keys, the audit log), run ``fn``."""

    async def _main() -> T:
        async with common.main_db(cfg) as db:
            box = await Inbox.open(cfg)
            try:
                return await fn(box, db)
            finally:
                await box.close()

    return common.run(_main())


def _summary(m: Captured) -> dict[str, Any]:
    return {
        "id": m.id,
        "captured_at": clock.iso(m.captured_at),
        "queue_id": m.queue_id,
        "domain": m.domain,
        "from": m.sender,
        "to": list(m.recipients),
        "subject": m.subject,
        "size": m.size,
    }


def _dkim_json(v: Verification) -> dict[str, str]:
    return {"result": v.result, "domain": v.domain, "selector": v.selector, "reason": v.reason}


def _dkim_text(v: Verification) -> str:
    if v.result == "pass":
        return f"pass (d={v.domain} s={v.selector}, against the domain's key in the store)"
    if v.result == "none":
        return f"none ({v.reason})"
    return f"{v.result} (d={v.domain} s={v.selector}: {v.reason})"


def _split(message: bytes) -> tuple[list[tuple[str, str]], str]:
    """The header fields (name, value unfolded: each fold one space) and the body, as text."""
    fields = grammar.header_fields(message) or []
    headers = [
        (f.name, _FOLD.sub(b" ", f.value).strip().decode("utf-8", "replace")) for f in fields
    ]
    end = message.find(b"\r\n\r\n")
    body = message[end + 4 :] if end >= 0 else b""
    return headers, body.decode("utf-8", "replace")


def _parse_id(value: str) -> int:
    if not value.isdigit():
        raise click.ClickException(f"not an inbox message id: {common.shown(value)!r}")
    return int(value)


def register(cli: click.Group) -> None:
    @cli.group("inbox")
    def inbox_group() -> None:
        """Mail of sandbox domains, kept on this box instead of being sent."""

    @inbox_group.command("list")
    @common.json_option
    @click.pass_context
    @common.user_errors
    def inbox_list(ctx: click.Context, json_: bool) -> None:
        """The captured messages, newest first."""
        cfg = common.get_config(ctx)
        found = _with_inbox(cfg, lambda box, _db: box.list_all())
        if json_:
            common.emit_json([_summary(m) for m in found])
            return
        if not found:
            click.echo("the inbox is empty: mail of sandbox domains lands here")
            return
        rows = [
            (
                m.id,
                clock.iso(m.captured_at),
                m.sender or "<>",
                _short(", ".join(m.recipients)),
                m.subject,
                m.size,
            )
            for m in found
        ]
        click.echo(common.table(("ID", "Captured", "From", "To", "Subject", "Size"), rows))

    @inbox_group.command("show")
    @click.argument("inbox_id", metavar="ID")
    @click.option("--raw", is_flag=True, help="Write the message exactly as kept, nothing else.")
    @common.json_option
    @click.pass_context
    @common.user_errors
    def inbox_show(ctx: click.Context, inbox_id: str, raw: bool, json_: bool) -> None:
        """Message ID: its envelope, its DKIM check (against its domain's key), headers, body."""
        cfg = common.get_config(ctx)
        wanted = _parse_id(inbox_id)

        async def load(box: Inbox, db: Store) -> tuple[Captured, Verification]:
            m = await box.get(wanted)
            assert m.body is not None
            return m, await inbox.dkim_result(db, m.body)

        m, verdict = _with_inbox(cfg, load)
        assert m.body is not None
        if raw:
            sys.stdout.buffer.write(m.body)
            sys.stdout.buffer.flush()
            return
        headers, body = _split(m.body)
        if json_:
            data = _summary(m)
            data["dkim"] = _dkim_json(verdict)
            data["headers"] = [{"name": n, "value": v} for n, v in headers]
            data["body"] = body
            common.emit_json(data)
            return
        click.echo(f"Message {m.id}, captured {clock.iso(m.captured_at)} (queue id {m.queue_id})")
        click.echo(common.shown(f"From: <{m.sender}> (envelope), sandbox domain {m.domain}"))
        click.echo(common.shown(f"To:   {', '.join(m.recipients)}"))
        click.echo(common.shown(f"DKIM: {_dkim_text(verdict)}"))
        click.echo("")
        for name, value in headers:
            click.echo(common.shown(f"{name}: {value}"))
        click.echo("")
        for line in body.splitlines():
            click.echo(common.shown(line))

    @inbox_group.command("delete")
    @click.argument("inbox_id", metavar="ID", required=False)
    @click.option("--all", "all_", is_flag=True, help="Every captured message.")
    @common.json_option
    @click.pass_context
    @common.user_errors
    def inbox_delete(ctx: click.Context, inbox_id: str | None, all_: bool, json_: bool) -> None:
        """Delete message ID, or every message (--all), from the inbox."""
        if bool(inbox_id) == all_:
            raise click.ClickException("give a message ID or --all")
        cfg = common.get_config(ctx)
        wanted = None if inbox_id is None else _parse_id(inbox_id)
        now = clock.system()
        n = _with_inbox(
            cfg,
            lambda box, db: inbox.delete(
                box, wanted, audit=db, now=now, actor=events.current_actor()
            ),
        )
        target = "all" if wanted is None else str(wanted)
        if json_:
            common.emit_json({"target": target, "deleted": n})
        else:
            click.echo(f"{target}: {n} message(s) deleted")


def _short(text: str) -> str:
    return text if len(text) <= _TO_CELL else text[: _TO_CELL - 3] + "..."
