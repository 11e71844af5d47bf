"""What every admin command shares: config loading, the store, errors, output."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click

from relay import config as config_mod
from relay.config import Config, ConfigError
from relay.errors import RelayboxError
from relay.maillog import printable
from relay.store import shared
from relay.store.db import StoreError
from relay.store.engine import Store

P = ParamSpec("P")
T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    """Run one store coroutine to completion from a synchronous Click command."""

    async def _main() -> T:
        return await coro

    return asyncio.run(_main())


def get_config(ctx: click.Context) -> Config:
    """The config named by the group's --config (or the default lookup), loaded once."""
    root = ctx.find_root()
    obj = root.ensure_object(dict)
    if "config" not in obj:
        try:
            obj["config"] = config_mod.load(obj.get("config_path"))
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
    cfg: Config = obj["config"]
    return cfg


def read_secret(prompt: str, *, confirm: bool = False) -> str:
    """One secret from standard input: a hidden prompt on a terminal, else one line of a pipe.

    The line ending (LF or CRLF) is removed; nothing else is. Reads ``sys.stdin`` directly (Click
    8.5 deprecates ``click.get_text_stream``; ``CliRunner`` swaps ``sys.stdin`` the same way).
    """
    stdin = sys.stdin
    if stdin is None:
        raise click.ClickException("no standard input to read the password from")
    if stdin.isatty():
        value: str = click.prompt(prompt, hide_input=True, confirmation_prompt=confirm, err=True)
        return value
    return stdin.readline().removesuffix("\n").removesuffix("\r")


def user_errors(fn: Callable[P, T]) -> Callable[P, T]:
    """Turn the errors a person can act on into one line on stderr and exit 1 (no traceback)."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except (RelayboxError, ConfigError) as exc:
            raise click.ClickException(str(exc)) from None
        except StoreError as exc:
            raise click.ClickException(f"store error: {exc}") from None

    return wrapper


def drop_privileges_for(state_dir: Path) -> None:
    """As root on a state dir owned by the service user, become that user first.

    Otherwise SQLite would create root-owned WAL/SHM files (or a root-owned database) that the
    service then cannot open. Only switches when the dir exists and belongs to someone else.
    As another unprivileged user who cannot write there, refuse with the way out instead of
    SQLite's "unable to open database file".
    """
    try:
        st = state_dir.stat()
    except FileNotFoundError:
        return
    except PermissionError:
        raise click.ClickException(
            f"cannot reach {state_dir}: run as the service user or as root"
        ) from None
    if os.geteuid() != 0:
        if st.st_uid != os.geteuid() and not os.access(state_dir, os.W_OK | os.X_OK):
            owner = _user_name(st.st_uid)
            raise click.ClickException(
                f"{state_dir} belongs to {owner}: run as that user "
                f"(runuser -u {owner} -- relaybox ...) or as root"
            )
        return
    if st.st_uid == 0:
        return
    try:
        name = pwd.getpwuid(st.st_uid).pw_name
        groups = os.getgrouplist(name, st.st_gid)
        os.setgroups(groups)
    except KeyError:
        os.setgroups([])
    os.setgid(st.st_gid)
    os.setuid(st.st_uid)
    # What we create from here on is the service's alone (as the unit's UMask=0077).
    os.umask(0o077)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


@asynccontextmanager
async def main_db(cfg: Config) -> AsyncIterator[Store]:
    """The shared store's main tables (users, domains, events...), opened as the state dir's
    owner."""
    drop_privileges_for(cfg.state_dir)
    db = await shared.open_main(cfg)
    try:
        yield db
    finally:
        await db.close()


def emit_json(data: Any) -> None:
    """``--json``: values whole, and printable ASCII whatever they hold (``ensure_ascii``
    writes ESC as \\u001b, C1 controls and bidi overrides as \\u009b, \\u202e...)."""
    click.echo(json.dumps(data, indent=2, sort_keys=False, ensure_ascii=True))


def shown(value: object) -> str:
    """A value from the store or from outside, as a person's terminal shows it: one line, no
    control, escape or bidi character (each becomes '?'), whatever was stored before relaybox
    sanitised it on the way in. Every table cell goes through here; use it for other lines
    that show stored values too."""
    return "" if value is None else printable(value, limit=None)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table for people (scripts use --json); every cell :func:`shown`."""
    cells = [[shown(h) for h in headers]] + [[shown(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def confirm_or_abort(prompt: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise click.ClickException(f"{prompt} Refusing without --yes (no terminal to ask on).")
    if not click.confirm(prompt, default=False):
        raise click.ClickException("aborted")


json_option = click.option("--json", "json_", is_flag=True, help="Machine-readable output.")
