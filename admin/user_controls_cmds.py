"""`relaybox user set` and `relaybox user usage`, and how `user show` / `user list` present a
user's own controls: sending limits, IP and sender allow-lists, expiry, today's counts (issue 14).

Presentation only: the rules are relay/userrules.py, the settings relay/store/users.py
(:func:`~relay.store.users.update_settings` checks, stores and audits them as ``user.set``), the
counts relay/store/usage.py (``usage.db``, which the server's workers share).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import click

from admin import common
from relay import clock, userrules
from relay.config import Config
from relay.errors import Invalid, NotFound
from relay.store import domains, events, shared, usage, users
from relay.store.engine import Store
from relay.store.usage import Counts
from relay.store.users import SettingsChange, User
from relay.units import parse_duration
from relay.userrules import LIMIT_NAMES, Limits

OPTION_OF = {name: name.replace("_", "-") for name in LIMIT_NAMES}  # messages-per-hour...
MAX_DAYS = usage.KEEP_DAYS
ShowJson = Callable[[Config, User], dict[str, Any]]


# --- reading ------------------------------------------------------------------------------------


async def today(cfg: Config, logins: Sequence[str], now: float) -> Mapping[str, Counts]:
    """Today's counts of ``logins``. Await it inside :func:`common.main_db` (which has become the
    state dir's owner). Before the server counted anything there is no usage.db: zeros, and no
    file is made for that."""
    if not logins or not shared.counts_exist(cfg):
        return {login: Counts() for login in logins}
    db = await shared.open_counts(cfg)
    try:
        return await usage.today_for(db, logins, now)
    finally:
        await db.close()


def at_limit(limits: Limits, counts: Counts, now: float) -> list[str]:
    """The limits the user is at (or over) now: its next message would get the 451. Decided by
    the server's own rule (usage.first_hit), one limit at a time."""

    def only(name: str) -> Limits:
        return Limits(*(limits.get(n) if n == name else 0 for n in LIMIT_NAMES))

    return [n for n in LIMIT_NAMES if usage.first_hit(only(n), counts, now) is not None]


def fields(user: User, cfg: Config, counts: Counts, now: float) -> dict[str, Any]:
    """The keys `user show --json` and `user list --json` gained with issue 14."""
    limits = userrules.effective(user.limits, cfg.limits.user)
    return {
        "limits": limits.as_json(user.limits),
        "allow_ip": list(user.allow_ip),
        "allow_from": list(user.allow_from),
        "expires_at": _time(user.expires_at),
        "usage_today": {
            "messages": counts.messages_today,
            "recipients": counts.recipients_today,
            "messages_this_hour": counts.messages_this_hour,
            "limited": at_limit(limits, counts, now),
        },
    }


def _time(at: float | None) -> str | None:
    return None if at is None else userrules.format_time(at)


async def details(cfg: Config, db: Store, login: str, now: float) -> tuple[User, bool, Counts]:
    """What `user show` shows: the user, whether its domain is a sandbox, today's counts."""
    user = await users.get(db, login)
    if user is None:
        raise NotFound(f"no such user: {users.normalize_login(login)}")
    domain = await domains.get(db, user.domain)
    counts = (await today(cfg, [user.login], now))[user.login]
    return user, domain is not None and domain.sandbox, counts


def parse_since(text: str) -> float:
    """``--unused-since``'s duration, in seconds."""
    try:
        return float(parse_duration(text))
    except ValueError as exc:
        raise Invalid(f"--unused-since: {exc}") from None


# --- people's view ------------------------------------------------------------------------------


def expiry(user: User, now: float) -> str:
    if user.expires_at is None:
        return "never"
    at = userrules.format_time(user.expires_at)
    if userrules.expired(user.expires_at, now):
        return f"{at} (expired: its passwords are refused)"
    left = user.expires_at - now
    if left >= 2 * userrules.DAY:
        return f"{at} (in {round(left / userrules.DAY)} days)"
    if left >= 2 * userrules.HOUR:
        return f"{at} (in {round(left / userrules.HOUR)} hours)"
    return f"{at} (in {max(1, round(left / 60))} minutes)"


def expires_cell(user: User) -> str:
    return _time(user.expires_at) or "never"


def state(user: User, now: float) -> str:
    if user.disabled:
        return "disabled"
    return "expired" if userrules.expired(user.expires_at, now) else "active"


def limited_text(user: User, cfg: Config, counts: Counts, now: float) -> str:
    """``messages per hour`` for a user at that limit (the `user list` column), else ``-``."""
    names = at_limit(userrules.effective(user.limits, cfg.limits.user), counts, now)
    return ", ".join(userrules.describe(n) for n in names) or "-"


def lines(user: User, cfg: Config, counts: Counts, now: float) -> list[str]:
    """What `user show` and `user set` print about the controls."""
    limits = userrules.effective(user.limits, cfg.limits.user)
    width = max(len(userrules.describe(n)) for n in LIMIT_NAMES) + 2
    out = [f"Expires:    {expiry(user, now)}"]
    for i, name in enumerate(LIMIT_NAMES):
        value = limits.get(name) or "unlimited"
        whose = "default" if user.limits.get(name) is None else "own"
        head = "Limits:     " if i == 0 else " " * 12
        out.append(f"{head}{userrules.describe(name).ljust(width)}{value} ({whose})")
    out.append(f"Allowed IPs:     {', '.join(user.allow_ip) or 'any'}")
    senders = ", ".join(user.allow_from) or f"any address of {user.domain}"
    out.append(f"Allowed senders: {common.shown(senders)}")
    today_text = (
        f"Today:      {counts.messages_today} messages ({counts.messages_this_hour} this hour), "
        f"{counts.recipients_today} recipients"
    )
    names = at_limit(limits, counts, now)
    if names:
        ends = {n: userrules.format_reset(userrules.window_end(n, now)) for n in names}
        until = ", ".join(f"{userrules.describe(n)} (until {at})" for n, at in ends.items())
        today_text += f"; at its limit: {until}"
    return [*out, today_text]


# --- user set -----------------------------------------------------------------------------------


def _limit_changes(
    values: Mapping[str, str | None], defaults: Sequence[str]
) -> dict[str, int | None]:
    """``--messages-per-hour N`` and the like, and ``--default LIMIT``: name -> value (None: the
    config's default)."""
    out: dict[str, int | None] = {}
    for name, text in values.items():
        if text is None:
            continue
        try:
            out[name] = userrules.parse_limit(text)
        except Invalid as exc:
            raise Invalid(f"--{OPTION_OF[name]}: {exc}") from None
    choices = {**{v: k for k, v in OPTION_OF.items()}, **{k: k for k in LIMIT_NAMES}}
    for text in defaults:
        key = text.strip().lower()
        if key != "all" and key not in choices:
            shown = ", ".join(OPTION_OF.values())
            raise Invalid(f"--default {text!r}: expected {shown} or all")
        for name in LIMIT_NAMES if key == "all" else (choices[key],):
            if out.get(name, None) is not None:
                raise Invalid(f"--default {text} and --{OPTION_OF[name]}: give one of them")
            out[name] = None
    return out


def _allow_list(
    option: str, entries: Sequence[str], check: Callable[[str], str]
) -> list[str] | None:
    """A repeatable allow-list option: None if not given, [] for ``any``, else the entries
    (each checked here too, so the error names the option)."""
    if not entries:
        return None
    if any(e.strip().lower() == "any" for e in entries):
        if len(entries) > 1:
            raise Invalid(f"{option} any clears the list: give it alone")
        return []
    for entry in entries:
        try:
            check(entry)
        except Invalid as exc:
            raise Invalid(f"{option}: {exc}") from None
    return list(entries)


def settings_change(
    login: str,
    limits: Mapping[str, str | None],
    defaults: Sequence[str],
    allow_ip: Sequence[str],
    allow_from: Sequence[str],
    expires: str | None,
    now: float,
) -> SettingsChange:
    domain = users.normalize_login(login).rpartition("@")[2]
    change = SettingsChange(
        limits=_limit_changes(limits, defaults),
        allow_ip=_allow_list("--allow-ip", allow_ip, userrules.parse_network),
        allow_from=_allow_list(
            "--allow-from", allow_from, lambda e: userrules.parse_sender(e, domain)
        ),
        expires=expires is not None,
        expires_at=parse_expires(expires, now) if expires is not None else None,
    )
    if change.empty():
        options = ", ".join(f"--{o}" for o in (*OPTION_OF.values(), "default", "allow-ip"))
        raise Invalid(f"nothing to change: give at least one of {options}, --allow-from, --expires")
    return change


def parse_expires(text: str, now: float) -> float | None:
    try:
        return userrules.parse_expires(text, now)
    except Invalid as exc:
        raise Invalid(f"--expires: {exc}") from None


LIMIT_HELP = "A count (0 = unlimited), or default: [limits.user]'s again."
EXPIRES_HELP = "When its passwords stop working: 90d (from now), 2027-03-01 (00:00Z), or never."


def register(group: click.Group, show_json: ShowJson) -> None:
    """Attach `set` and `usage` to the `user` group; ``show_json`` is `user show --json`'s."""

    @group.command("set")
    @click.argument("login")
    @click.option("--messages-per-hour", metavar="N", help=LIMIT_HELP)
    @click.option("--messages-per-day", metavar="N", help=LIMIT_HELP)
    @click.option("--recipients-per-day", metavar="N", help=LIMIT_HELP)
    @click.option(
        "--default",
        "defaults",
        multiple=True,
        metavar="LIMIT",
        help="Put a limit back to [limits.user]'s: messages-per-hour, messages-per-day, "
        "recipients-per-day or all (repeatable).",
    )
    @click.option(
        "--allow-ip",
        multiple=True,
        metavar="CIDR",
        help="Networks LOGIN may log in from (repeatable; the whole new list; any: anywhere).",
    )
    @click.option(
        "--allow-from",
        multiple=True,
        metavar="ADDRESS|*@DOMAIN",
        help="Senders LOGIN may use (repeatable; the whole new list; any: any of its domain).",
    )
    @click.option("--expires", default=None, metavar="WHEN", help=EXPIRES_HELP)
    @common.json_option
    @click.pass_context
    @common.user_errors
    def user_set(
        ctx: click.Context,
        login: str,
        messages_per_hour: str | None,
        messages_per_day: str | None,
        recipients_per_day: str | None,
        defaults: tuple[str, ...],
        allow_ip: tuple[str, ...],
        allow_from: tuple[str, ...],
        expires: str | None,
        json_: bool,
    ) -> None:
        """Set LOGIN's sending limits, allow-lists and expiry; print what it now has.

        The limits count in fixed UTC windows (the clock hour, the UTC day) for the whole
        service, every worker together. Every change is in `relaybox audit` (user.set).
        """
        cfg = common.get_config(ctx)
        now = clock.system()
        values = {
            "messages_per_hour": messages_per_hour,
            "messages_per_day": messages_per_day,
            "recipients_per_day": recipients_per_day,
        }
        change = settings_change(login, values, defaults, allow_ip, allow_from, expires, now)

        async def _apply() -> tuple[User, Counts]:
            async with common.main_db(cfg) as db:
                actor = events.current_actor()
                user = await users.update_settings(db, login, change, now=now, actor=actor)
                return user, (await today(cfg, [user.login], now))[user.login]

        user, counts = common.run(_apply())
        if json_:
            common.emit_json(show_json(cfg, user))
            return
        click.echo(f"{user.login}: updated (`relaybox audit --target {user.login}`)")
        for line in lines(user, cfg, counts, now):
            click.echo(line)

    @group.command("usage")
    @click.argument("login")
    @click.option("--days", default="30", metavar="N", help="How many UTC days, 1 to 400 (30).")
    @common.json_option
    @click.pass_context
    @common.user_errors
    def user_usage(ctx: click.Context, login: str, days: str, json_: bool) -> None:
        """What LOGIN sent per UTC day, oldest first: messages accepted, their recipients,
        recipients delivered, deferred and bounced, and messages refused at a limit."""
        cfg = common.get_config(ctx)
        count = _days(days)
        now = clock.system()
        found = common.run(_history(cfg, login, count, now))
        if json_:
            days_json = [d.as_json() for d in found]
            common.emit_json({"login": users.normalize_login(login), "days": days_json})
            return
        rows = [
            (d.day, d.accepted, d.recipients, d.delivered, d.deferred, d.bounced, d.limited)
            for d in found
        ]
        headers = ("Day", "Accepted", "Recipients", "Delivered", "Deferred", "Bounced")
        click.echo(common.table((*headers, "Refused (limit)"), rows))
        sent, rcpt = sum(d.accepted for d in found), sum(d.recipients for d in found)
        click.echo(f"\n{count} days: {sent} messages, {rcpt} recipients")


def _days(text: str) -> int:
    value = text.strip()
    if not value.isdigit() or not 1 <= int(value) <= MAX_DAYS:
        raise Invalid(f"--days {text!r}: expected a number of days from 1 to {MAX_DAYS}")
    return int(value)


async def _history(cfg: Config, login: str, days: int, now: float) -> list[usage.DayUsage]:
    async with common.main_db(cfg) as db:
        user = await users.get(db, login)
        if user is None:
            raise NotFound(f"no such user: {users.normalize_login(login)}")
        if not shared.counts_exist(cfg):
            return [usage.DayUsage(d) for d in _day_keys(days, now)]
        counts = await shared.open_counts(cfg)
        try:
            return await usage.history(counts, user.login, days, now)
        finally:
            await counts.close()


def _day_keys(days: int, now: float) -> list[str]:
    return [userrules.day_key(now - i * userrules.DAY) for i in range(days - 1, -1, -1)]
