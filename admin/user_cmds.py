"""`relaybox user ...`: SMTP users (add, list, show, reset-password, revoke-old, delete, disable;
`set` and `usage` are admin/user_controls_cmds.py).

Presentation only: the rules live in relay/store/users.py and relay/store/passwords.py. A password
is printed exactly once, right after it was generated; `--password-stdin` passwords are never
echoed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import click

from admin import common
from admin import user_controls_cmds as controls
from relay import clock
from relay.config import Config
from relay.store import events, passwords, users
from relay.store.engine import Store
from relay.store.passwords import Hasher
from relay.store.usage import Counts
from relay.store.users import User
from relay.units import format_duration, parse_duration

T = TypeVar("T")
BATCHED = (  # relay/service/server.py's LOGIN_FLUSH_INTERVAL
    "The server writes last logins in batches, every 30 seconds and when it stops."
)
MAX_GRACE = 30 * 86400  # the longest --grace: how long an old password may keep working


def _with_store(cfg: Config, fn: Callable[[Store, Hasher], Awaitable[T]]) -> T:
    """Open the shared database and a hasher, run ``fn``, close both."""

    async def _main() -> T:
        hasher = Hasher(cfg.auth)
        try:
            async with common.main_db(cfg) as db:
                return await fn(db, hasher)
        finally:
            hasher.close()

    return common.run(_main())


def _read_password(cfg: Config) -> str:
    """One line from stdin (a pipe), or a hidden prompt typed twice on a terminal."""
    value = common.read_secret("New password", confirm=True)
    if not value:
        raise click.ClickException("--password-stdin: no password on standard input")
    passwords.check_policy(value, cfg)
    return value


def _new_password(cfg: Config, from_stdin: bool) -> tuple[str, bool]:
    """The password to set and whether relaybox generated it (only then is it printed)."""
    if from_stdin:
        return _read_password(cfg), False
    length = max(passwords.GENERATED_LENGTH, cfg.auth.min_password_length)
    return passwords.generate_password(length), True


def _listeners(cfg: Config) -> list[dict[str, Any]]:
    return [{"port": lst.port, "security": lst.security} for lst in cfg.listen]


def _encryption(cfg: Config, mode: str) -> str:
    tls = f"TLS {cfg.tls.min_version}+"
    if mode == "tls":
        return f"{tls} from the first byte (RFC 8314)"
    if cfg.auth.allow_plaintext:
        return f"{tls} after STARTTLS (RFC 3207); plaintext AUTH allowed"
    return f"{tls} after STARTTLS (RFC 3207); AUTH only after it"


def _connection_info(cfg: Config) -> str:
    rows = [(lst.port, lst.security, _encryption(cfg, lst.mode)) for lst in cfg.listen]
    return "\n".join(
        [
            f"SMTP host:  {cfg.public_hostname}",
            common.table(("Port", "Security", "Encryption"), rows),
            "Auth:       PLAIN or LOGIN; the user name is the login",
        ]
    )


def _row(user: User, now: float) -> dict[str, Any]:
    """The `user list` JSON object before issue 14's keys (also the base of `user show`)."""
    return {
        "login": user.login,
        "domain": user.domain,
        "created_at": clock.iso(user.created_at),
        "last_login_at": clock.iso(user.last_login_at),
        "password_changed_at": clock.iso(user.password_changed_at),
        "old_password_valid_until": clock.iso(user.grace_until(now)),
        "disabled": user.disabled,
    }


def _print_password(
    cfg: Config, user: User, password: str, generated: bool, json_: bool, now: float
) -> None:
    """The add/reset output: the password once (if generated), the connection info."""
    if json_:
        common.emit_json(
            {
                "login": user.login,
                "password": password if generated else None,
                "host": cfg.public_hostname,
                "listeners": _listeners(cfg),
                "old_password_valid_until": clock.iso(user.grace_until(now)),
            }
        )
        return
    click.echo(f"SMTP user:  {user.login}")
    if generated:
        click.echo(f"Password:   {password}")
        click.echo(
            "            (shown only now: relaybox keeps just a hash of it; if it is lost, run "
            f"`relaybox user reset-password {user.login}`)"
        )
    else:
        click.echo("Password:   the one read from standard input (not shown)")
    click.echo(_connection_info(cfg))


def _grace_text(user: User, now: float) -> str:
    until = user.grace_until(now)
    if until is None:
        return "no (only the current password works)"
    return f"yes, until {clock.iso(until)} (end it now: `relaybox user revoke-old {user.login}`)"


def register(cli: click.Group) -> None:
    @cli.group("user")
    def user_group() -> None:
        """SMTP users: the logins apps use to send through relaybox."""

    @user_group.command("add")
    @click.argument("login")
    @click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
    @click.option("--expires", default="never", metavar="WHEN", help=controls.EXPIRES_HELP)
    @common.json_option
    @click.pass_context
    @common.user_errors
    def user_add(
        ctx: click.Context, login: str, password_stdin: bool, expires: str, json_: bool
    ) -> None:
        """Create LOGIN (name@domain, domain verified); print its password once."""
        cfg = common.get_config(ctx)
        login = users.normalize_login(login)
        now = clock.system()
        expires_at = controls.parse_expires(expires, now)
        password, generated = _new_password(cfg, password_stdin)
        user = _with_store(
            cfg,
            lambda db, h: users.create(
                db,
                login,
                password,
                hasher=h,
                cfg=cfg,
                now=now,
                actor=events.current_actor(),
                expires_at=expires_at,
            ),
        )
        _print_password(cfg, user, password, generated, json_, now)
        if not json_ and user.expires_at is not None:
            click.echo(f"Expires:    {controls.expiry(user, now)}")

    @user_group.command("list", help=f"List SMTP users.\n\n{BATCHED}")
    @click.option("--domain", default=None, help="Only users of this domain.")
    @click.option(
        "--unused-since",
        default=None,
        metavar="DURATION",
        help="Only users whose last login is older than that (e.g. 30d), or who never logged "
        f"in and were created before. {BATCHED}",
    )
    @common.json_option
    @click.pass_context
    @common.user_errors
    def user_list(
        ctx: click.Context, domain: str | None, unused_since: str | None, json_: bool
    ) -> None:
        now = clock.system()
        cutoff = None if unused_since is None else now - controls.parse_since(unused_since)
        cfg = common.get_config(ctx)

        async def _load(db: Store, _h: Hasher) -> tuple[list[User], Mapping[str, Counts]]:
            found = await users.list_all(db, domain)
            if cutoff is not None:
                found = [u for u in found if (u.last_login_at or u.created_at) < cutoff]
            return found, await controls.today(cfg, [u.login for u in found], now)

        found, counts = _with_store(cfg, _load)
        if json_:
            common.emit_json(
                [_row(u, now) | controls.fields(u, cfg, counts[u.login], now) for u in found]
            )
            return
        if not found:
            if unused_since is not None:
                click.echo(f"no user unused since {unused_since}")
            else:
                click.echo("no SMTP users yet: `relaybox user add NAME@DOMAIN`")
            return
        rows = [
            (
                u.login,
                clock.iso(u.created_at),
                clock.iso(u.last_login_at) or "never",
                clock.iso(u.password_changed_at),
                clock.iso(u.grace_until(now)) or "-",
                controls.expires_cell(u),
                controls.state(u, now),
                controls.limited_text(u, cfg, counts[u.login], now),
            )
            for u in found
        ]
        headers = ("Login", "Created", "Last login", "Password changed", "Old pw until")
        click.echo(common.table((*headers, "Expires", "State", "Limited"), rows))

    @user_group.command("show")
    @click.argument("login")
    @common.json_option
    @click.pass_context
    @common.user_errors
    def user_show(ctx: click.Context, login: str, json_: bool) -> None:
        """Connection info and state of LOGIN (the password itself cannot be shown)."""
        cfg = common.get_config(ctx)
        now = clock.system()
        user, is_sandbox, counts = _with_store(
            cfg, lambda db, _h: controls.details(cfg, db, login, now)
        )
        if json_:
            common.emit_json(_show_data(cfg, user, is_sandbox, counts, now))
            return
        click.echo(f"SMTP user:  {user.login}")
        click.echo(
            "Password:   cannot be shown: relaybox stores only a hash of it. For a new one run "
            f"`relaybox user reset-password {user.login}`"
        )
        click.echo(_connection_info(cfg))
        click.echo(f"State:      {'disabled' if user.disabled else 'active'}")
        if is_sandbox:
            click.echo(
                f"Sandbox:    yes: {user.domain} is a sandbox domain; its mail is kept in "
                "`relaybox inbox` unless the recipient is allowed (`relaybox domain show`)"
            )
        click.echo(f"Created:    {clock.iso(user.created_at)}")
        click.echo(f"Last login: {clock.iso(user.last_login_at) or 'never'}")
        click.echo(f"Password changed: {clock.iso(user.password_changed_at)}")
        click.echo(f"Old password still works: {_grace_text(user, now)}")
        for line in controls.lines(user, cfg, counts, now):
            click.echo(line)

    @user_group.command("reset-password")
    @click.argument("login")
    @click.option(
        "--grace",
        default=None,
        metavar="DURATION",
        help="How long the old password keeps working, at most 30d "
        "(default auth.reset_grace; 0: not at all).",
    )
    @click.option("--password-stdin", is_flag=True, help="Read the new password from stdin.")
    @common.json_option
    @click.pass_context
    @common.user_errors
    def user_reset(
        ctx: click.Context, login: str, grace: str | None, password_stdin: bool, json_: bool
    ) -> None:
        """Give LOGIN a new password; the old one works for a grace period."""
        cfg = common.get_config(ctx)
        seconds = _parse_grace(grace, cfg)
        _get(cfg, login)  # an unknown user fails before a password is read or generated
        password, generated = _new_password(cfg, password_stdin)
        now = clock.system()
        user = _with_store(
            cfg,
            lambda db, h: users.reset_password(
                db, login, password, grace=seconds, hasher=h, now=now, actor=events.current_actor()
            ),
        )
        _print_password(cfg, user, password, generated, json_, now)
        if not json_:
            click.echo(f"Old password still works: {_grace_text(user, now)}")

    @user_group.command("revoke-old")
    @click.argument("login")
    @click.pass_context
    @common.user_errors
    def user_revoke_old(ctx: click.Context, login: str) -> None:
        """End LOGIN's grace window: only the current password works from now on."""
        cfg = common.get_config(ctx)
        now = clock.system()
        before = _get(cfg, login)
        _with_store(
            cfg, lambda db, _h: users.revoke_old(db, login, now=now, actor=events.current_actor())
        )
        if before.old_password_works(now):
            click.echo(f"{before.login}: the old password no longer works")
        else:
            click.echo(f"{before.login}: no old password was still working; nothing changed")

    @user_group.command("delete")
    @click.argument("login")
    @click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
    @click.pass_context
    @common.user_errors
    def user_delete(ctx: click.Context, login: str, yes: bool) -> None:
        """Delete LOGIN: its passwords stop working at once."""
        cfg = common.get_config(ctx)
        user = _get(cfg, login)
        common.confirm_or_abort(
            f"Delete SMTP user {user.login}? Apps using it can no longer send.", yes
        )
        now = clock.system()
        _with_store(
            cfg, lambda db, _h: users.delete(db, user.login, now=now, actor=events.current_actor())
        )
        click.echo(f"deleted {user.login}")

    for name, disabled in (("disable", True), ("enable", False)):
        _register_toggle(user_group, name, disabled)
    controls.register(user_group, _show_json)


def _register_toggle(group: click.Group, name: str, disabled: bool) -> None:
    text = (
        "Refuse every password of LOGIN (nothing is forgotten)."
        if disabled
        else "Accept LOGIN's passwords again."
    )

    @group.command(name, help=text)
    @click.argument("login")
    @click.pass_context
    @common.user_errors
    def toggle(ctx: click.Context, login: str) -> None:
        cfg = common.get_config(ctx)
        now = clock.system()
        user = _with_store(
            cfg,
            lambda db, _h: users.set_disabled(
                db, login, disabled, now=now, actor=events.current_actor()
            ),
        )
        click.echo(f"{user.login}: {'disabled' if user.disabled else 'enabled'}")


def _show_data(
    cfg: Config, user: User, is_sandbox: bool, counts: Counts, now: float
) -> dict[str, Any]:
    """The `user show --json` object: `user list`'s keys (issue 14's last), then the connection
    and whether it is a sandbox user."""
    data = _row(user, now) | controls.fields(user, cfg, counts, now)
    data["host"] = cfg.public_hostname
    data["listeners"] = _listeners(cfg)
    data["sandbox"] = is_sandbox
    return data


def _show_json(cfg: Config, user: User) -> dict[str, Any]:
    """`user show --json` of a user just read (what `user set --json` prints)."""
    now = clock.system()
    user, is_sandbox, counts = _with_store(
        cfg, lambda db, _h: controls.details(cfg, db, user.login, now)
    )
    return _show_data(cfg, user, is_sandbox, counts, now)


def _get(cfg: Config, login: str) -> User:
    user = _with_store(cfg, lambda db, _h: users.get(db, login))
    if user is None:
        raise click.ClickException(f"no such user: {users.normalize_login(login)}")
    return user


def _parse_grace(grace: str | None, cfg: Config) -> float:
    if grace is None:
        return float(cfg.auth.reset_grace)
    try:
        seconds = float(parse_duration(grace))
    except ValueError as exc:
        raise click.ClickException(f"--grace: {exc}") from None
    if seconds > MAX_GRACE:
        # An old password left working for years by a typo (99999d) is a leaked one kept alive.
        cap = format_duration(MAX_GRACE)
        raise click.ClickException(f"--grace: {grace} is too long: at most {cap}")
    return seconds
