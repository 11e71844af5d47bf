"""`relaybox domain ...`: sender domains (add, verify, list, show, set, remove).

Presentation only: the rules live in relay/store/domains.py (sandbox domains:
relay/store/sandbox.py), the DNS in relay/dnscheck.py. Records are printed as zone-file lines, long
TXT values split into quoted <=255-byte strings (RFC 1035 3.3.14); ``--json`` carries each value
whole (a check result in the shape of CheckResult.as_json), and says whether the domain is a sandbox
(``sandbox``) and whom its mail may reach (``allow_rcpt``: a list for a sandbox domain, null for any
other).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from admin import common
from relay import clock, dkimkeys, dnscheck
from relay.config import Config
from relay.dnscheck import CheckResult
from relay.grammar import normalize_domain
from relay.store import domains, events, sandbox
from relay.store.domains import Domain
from relay.store.engine import Store

T = TypeVar("T")

_WHY = {
    "ownership": "proves you control the domain",
    "spf": "authorizes relaybox to send for the domain (RFC 7208); merge it into an existing "
    "v=spf1 record, a domain may have only one",
    "dkim": "the public key receivers verify relaybox's signatures with (RFC 6376)",
    "dmarc": "suggested policy (RFC 7489); skip it if the domain already has one",
}
_CELL = 56  # longest expected/found shown in the verify table (--json carries them whole)


def _with_db(cfg: Config, fn: Callable[[Store], Awaitable[T]]) -> T:
    async def _main() -> T:
        async with common.main_db(cfg) as db:
            return await fn(db)

    return common.run(_main())


def _domain_json(d: Domain, cfg: Config, allowed: tuple[str, ...]) -> dict[str, Any]:
    return {
        "name": d.name,
        "state": d.state,
        "records": [
            {"purpose": r.purpose, "type": r.type, "name": r.name, "value": r.value}
            for r in domains.records(d, cfg)
        ],
        "checks": [c.as_json() for c in d.checks],
        "sandbox": d.sandbox,
        "allow_rcpt": list(allowed) if d.sandbox else None,
    }


def _state_text(d: Domain) -> str:
    return f"{d.state} (sandbox)" if d.sandbox else d.state


def _capture_text(d: Domain, allowed: tuple[str, ...]) -> str:
    """Where a sandbox domain's mail goes, in one line."""
    if not allowed:
        return f"{d.name}: all its mail is kept in the sandbox inbox (`relaybox inbox list`)"
    return common.shown(
        f"{d.name}: mail to {', '.join(allowed)} is delivered; to anyone else it is kept in the "
        "sandbox inbox (`relaybox inbox list`)"
    )


def _print_records(d: Domain, cfg: Config) -> None:
    for r in domains.records(d, cfg):
        click.echo(f"; {r.purpose}: {_WHY[r.purpose]}")
        click.echo(f"{r.name}.\tIN\t{r.type}\t{dkimkeys.zone_strings(r.value)}")


def _short(text: str) -> str:
    return text if len(text) <= _CELL else text[: _CELL - 3] + "..."


def _result_text(c: CheckResult) -> str:
    return f"{c.result}: {c.reason}" if c.reason else c.result


def _print_checks(checks: tuple[CheckResult, ...]) -> None:
    rows = [(c.check, _short(c.expected), _short(c.found) or "-", _result_text(c)) for c in checks]
    click.echo(common.table(("Check", "Expected", "Found", "Result"), rows))


def _not_verified_line(d: Domain, cfg: Config) -> str:
    bad = [
        f"{c.check}: {c.reason or c.result}"
        for c in d.checks
        if c.check in cfg.dns.required and c.result != "pass"
    ]
    line = f"not verified: {d.name} is {d.state}" + (f" ({'; '.join(bad)})" if bad else "")
    return common.shown(line)  # the reasons quote what DNS answered


def register(cli: click.Group) -> None:
    @cli.group("domain")
    def domain_group() -> None:
        """Sender domains: DNS records to publish, and their verification."""

    @domain_group.command("add")
    @click.argument("domain")
    @click.option(
        "--sandbox",
        "is_sandbox",
        is_flag=True,
        help="A sandbox domain: verified at once without DNS; its mail is kept in the local "
        "inbox (`relaybox inbox`) and never leaves the box, except to --allow-rcpt.",
    )
    @click.option(
        "--allow-rcpt",
        "allow_rcpt",
        multiple=True,
        metavar="ADDRESS",
        help="With --sandbox: deliver mail to ADDRESS (repeatable) as usual.",
    )
    @common.json_option
    @click.pass_context
    @common.user_errors
    def domain_add(
        ctx: click.Context, domain: str, is_sandbox: bool, allow_rcpt: tuple[str, ...], json_: bool
    ) -> None:
        """Add DOMAIN (IDNA names accepted) and print the DNS records to publish.

        A new ownership token and DKIM key are created (dns.dkim_key_type: RSA 2048 by default).
        With --sandbox there is nothing to publish: try relaybox out with a name of your choice.
        """
        cfg = common.get_config(ctx)
        name = normalize_domain(domain)
        if allow_rcpt and not is_sandbox:
            raise click.ClickException("--allow-rcpt: only for a sandbox domain (add --sandbox)")
        now = clock.system()
        actor = events.current_actor()

        async def run(db: Store) -> tuple[Domain, tuple[str, ...]]:
            if is_sandbox:
                return await sandbox.add(
                    db, name, allow_rcpt=allow_rcpt, cfg=cfg, now=now, actor=actor
                )
            return await domains.add(db, name, cfg=cfg, now=now, actor=actor), ()

        d, allowed = _with_db(cfg, run)
        if json_:
            common.emit_json(_domain_json(d, cfg, allowed))
            return
        if d.sandbox:
            click.echo(f"Added {d.name} (sandbox): verified, no DNS records needed.")
            click.echo(_capture_text(d, allowed))
            click.echo(f"\nnext: relaybox user add NAME@{d.name}")
            return
        click.echo(f"Added {d.name} (pending). Publish these DNS records:\n")
        _print_records(d, cfg)
        click.echo(f"\nthen run: relaybox domain verify {d.name}")

    @domain_group.command("verify")
    @click.argument("domain")
    @common.json_option
    @click.pass_context
    @common.user_errors
    def domain_verify(ctx: click.Context, domain: str, json_: bool) -> None:
        """Check DOMAIN's DNS records now and print check, expected, found, result.

        Exit status: 0 when DOMAIN is verified after the checks; 1 otherwise (pending, failing
        or suspended), with one "not verified: ..." line on stderr after the table. A DNS
        timeout or SERVFAIL is reported as temperror and never changes the domain's state.
        """
        cfg = common.get_config(ctx)
        now = clock.system()

        async def run(db: Store) -> Domain:
            return await domains.verify(
                db,
                domain,
                resolver=dnscheck.make_resolver(cfg),
                cfg=cfg,
                now=now,
                actor=events.current_actor(),
            )

        d = _with_db(cfg, run)
        if json_:
            common.emit_json(
                {"name": d.name, "state": d.state, "checks": [c.as_json() for c in d.checks]}
            )
        else:
            _print_checks(d.checks)
            click.echo(f"\n{d.name}: {d.state}")
        if d.state != "verified":
            click.echo(_not_verified_line(d, cfg), err=True)
            ctx.exit(1)

    @domain_group.command("list")
    @common.json_option
    @click.pass_context
    @common.user_errors
    def domain_list(ctx: click.Context, json_: bool) -> None:
        """List domains with their state."""
        cfg = common.get_config(ctx)
        found = _with_db(cfg, domains.list_all)
        if json_:
            common.emit_json(
                [
                    {
                        "name": d.name,
                        "state": d.state,
                        "created_at": clock.iso(d.created_at),
                        "last_checked_at": clock.iso(d.last_checked_at),
                        "verified_at": clock.iso(d.verified_at),
                        "failing_since": clock.iso(d.failing_since),
                        "sandbox": d.sandbox,
                    }
                    for d in found
                ]
            )
            return
        if not found:
            click.echo("no domains yet: `relaybox domain add DOMAIN`")
            return
        rows = [
            (
                d.name,
                _state_text(d),
                "- (sandbox)" if d.sandbox else clock.iso(d.last_checked_at) or "never",
                clock.iso(d.verified_at) or "-",
                clock.iso(d.failing_since) or "-",
            )
            for d in found
        ]
        click.echo(
            common.table(("Domain", "State", "Last checked", "Verified", "Failing since"), rows)
        )

    @domain_group.command("show")
    @click.argument("domain")
    @common.json_option
    @click.pass_context
    @common.user_errors
    def domain_show(ctx: click.Context, domain: str, json_: bool) -> None:
        """DOMAIN's state, the records to publish, and the last check results."""
        cfg = common.get_config(ctx)
        d = _get(cfg, domain)
        allowed = _with_db(cfg, lambda db: sandbox.allowed(db, d.name)) if d.sandbox else ()
        if json_:
            common.emit_json(_domain_json(d, cfg, allowed))
            return
        click.echo(f"{d.name}: {_state_text(d)}")
        click.echo(f"created {clock.iso(d.created_at)}")
        if d.sandbox:
            click.echo("verified without DNS: a sandbox domain is never checked")
            click.echo(_capture_text(d, allowed))
            click.echo(f"DKIM: signs as d={d.name} s={d.dkim_selector} ({d.dkim_algorithm})")
            return
        click.echo(f"last checked {clock.iso(d.last_checked_at) or 'never'}")
        if d.verified_at is not None:
            click.echo(f"verified {clock.iso(d.verified_at)}")
        if d.failing_since is not None:
            until = clock.iso(d.failing_since + cfg.dns.failure_grace)
            click.echo(f"failing since {clock.iso(d.failing_since)} (suspended from {until})")
        click.echo("\nRecords to publish:")
        _print_records(d, cfg)
        if d.checks:
            click.echo("\nLast check:")
            _print_checks(d.checks)

    @domain_group.command("set")
    @click.argument("domain")
    @click.option(
        "--allow-rcpt",
        "add",
        multiple=True,
        metavar="ADDRESS",
        help="Deliver the sandbox domain's mail to ADDRESS as usual (repeatable).",
    )
    @click.option(
        "--remove-rcpt",
        "remove",
        multiple=True,
        metavar="ADDRESS",
        help="Capture mail to ADDRESS again (repeatable).",
    )
    @click.option(
        "--no-allow-rcpt",
        "clear",
        is_flag=True,
        help="Allow nobody (before any --allow-rcpt): every message is captured.",
    )
    @common.json_option
    @click.pass_context
    @common.user_errors
    def domain_set(
        ctx: click.Context,
        domain: str,
        add: tuple[str, ...],
        remove: tuple[str, ...],
        clear: bool,
        json_: bool,
    ) -> None:
        """Change whom sandbox DOMAIN's mail may reach (the rest is kept in the inbox).

        Mail already queued goes where it was meant to go when it was accepted.
        """
        cfg = common.get_config(ctx)
        if not (add or remove or clear):
            raise click.ClickException(
                "nothing to change: give --allow-rcpt, --remove-rcpt or --no-allow-rcpt"
            )
        now = clock.system()
        name = normalize_domain(domain)

        async def run(db: Store) -> tuple[Domain | None, tuple[str, ...]]:
            allowed = await sandbox.set_allowed(
                db,
                name,
                add=add,
                remove=remove,
                clear=clear,
                now=now,
                actor=events.current_actor(),
            )
            return await domains.get(db, name), allowed

        d, allowed = _with_db(cfg, run)
        if d is None:  # removed meanwhile
            raise click.ClickException(f"no such domain: {name}")
        if json_:
            common.emit_json(_domain_json(d, cfg, allowed))
            return
        click.echo(_capture_text(d, allowed))

    @domain_group.command("remove")
    @click.argument("domain")
    @click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
    @click.option("--with-users", is_flag=True, help="Also delete the domain's SMTP users.")
    @click.pass_context
    @common.user_errors
    def domain_remove(ctx: click.Context, domain: str, yes: bool, with_users: bool) -> None:
        """Remove DOMAIN and its DKIM key. Refused while it has SMTP users, unless --with-users."""
        cfg = common.get_config(ctx)
        d = _get(cfg, domain)
        also = " and all its SMTP users" if with_users else ""
        common.confirm_or_abort(
            f"Remove domain {d.name}{also}? Its DKIM key is destroyed; mail from it stops.", yes
        )
        now = clock.system()
        _with_db(
            cfg,
            lambda db: domains.remove(
                db, d.name, with_users=with_users, now=now, actor=events.current_actor()
            ),
        )
        click.echo(f"removed {d.name}")


def _get(cfg: Config, domain: str) -> Domain:
    name = normalize_domain(domain)
    d = _with_db(cfg, lambda db: domains.get(db, name))
    if d is None:
        raise click.ClickException(f"no such domain: {name}")
    return d
