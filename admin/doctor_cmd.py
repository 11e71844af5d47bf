"""`relaybox doctor`: tell the operator what is wrong before their users do.

The checks and their verdicts live in :mod:`relay.service.doctor`; this module reads the options,
judges the install (the lock recorded by `scripts/install`, which only admin/ knows about), opens
the store as the state dir's owner, and prints the results: a table, or ``--json``.
"""

from __future__ import annotations

import os
from dataclasses import asdict

import click

from admin import common, lockinfo
from relay.service import doctor
from relay.service.doctor import ORDER, Check, SendTest


def check_install() -> Check:
    """Whether the dependencies are the locked set they were installed from."""
    rec = lockinfo.recorded()
    status = "pass" if rec is not None and not rec.drift else "warn"
    return Check("install", status, lockinfo.describe(rec).removeprefix("dependencies: "))


def _test_password() -> str:
    env = os.environ.get("RELAYBOX_TEST_PASSWORD")
    if env:
        return env
    return common.read_secret("Password")


def register(cli: click.Group) -> None:
    @cli.command("doctor")
    @click.option("--send-test", "send_to", metavar="ADDRESS", help="Send a real test message.")
    @click.option("--user", "login", metavar="LOGIN", help="SMTP user for --send-test.")
    @common.json_option
    @click.pass_context
    @common.user_errors
    def doctor_command(
        ctx: click.Context, send_to: str | None, login: str | None, json_: bool
    ) -> None:
        """Check config, TLS, state dir, domains' DNS and the listeners; exit 1 on any failure.

        With --send-test ADDRESS --user LOGIN, also submit a real message through the running
        relay; the password comes from $RELAYBOX_TEST_PASSWORD or standard input.
        """
        cfg = common.get_config(ctx)
        send = None
        if send_to:
            if not login:
                raise click.UsageError("--send-test needs --user LOGIN")
            password = _test_password()
            if not password:
                raise click.ClickException("--send-test: no password given")
            send = SendTest(login, password, send_to)
        checks = common.run(
            doctor.run_checks(cfg, install=check_install(), open_db=common.main_db, send=send)
        )
        failed = any(c.status == "fail" for c in checks)
        if json_:
            common.emit_json({"ok": not failed, "checks": [asdict(c) for c in checks]})
        else:
            rows = [(c.check, c.status.upper(), c.detail) for c in checks]
            click.echo(common.table(["CHECK", "STATUS", "DETAIL"], rows))
            counts = {s: sum(c.status == s for c in checks) for s in ORDER}
            click.echo(f"\n{counts['pass']} pass, {counts['warn']} warn, {counts['fail']} fail")
        if failed:
            ctx.exit(1)
