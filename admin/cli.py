"""`relaybox`: the admin command. Presentation only: every rule lives in relay/."""

from __future__ import annotations

import platform

import click

from admin import (
    audit_cmd,
    common,
    doctor_cmd,
    domain_cmds,
    inbox_cmd,
    lockinfo,
    queue_cmds,
    serve_cmd,
    store_cmds,
    suppression_cmds,
    user_cmds,
    webhook_cmds,
)
from relay import __version__
from relay import config as config_mod
from relay.service import tlsutil


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(f"relaybox {__version__} (Python {platform.python_version()})")
    click.echo(lockinfo.describe(lockinfo.recorded()))
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version and the lock the dependencies were installed from, and exit.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Config file (default: $RELAYBOX_CONFIG, /etc/relaybox/relaybox.toml, built-in).",
)
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """relaybox: SMTP submission relay with a built-in credential store."""
    ctx.ensure_object(dict)["config_path"] = config_path


@cli.group("config")
def config_group() -> None:
    """Show or check the configuration."""


@config_group.command("show")
@common.json_option
@click.pass_context
def config_show(ctx: click.Context, json_: bool) -> None:
    """Print the effective configuration (secrets redacted)."""
    cfg = common.get_config(ctx)
    data = config_mod.to_dict(cfg, redact=True)
    if json_:
        common.emit_json(data)
        return
    click.echo(f"# source: {cfg.source}")
    for key, value in data.items():
        click.echo(f"{key} = {value!r}")


@config_group.command("check")
@click.argument("path", required=False, type=click.Path(dir_okay=False))
@click.pass_context
def config_check(ctx: click.Context, path: str | None) -> None:
    """Validate a config file (default: the one in effect); exit 1 naming the bad key.

    A configured certificate and key must exist, parse and match (what `serve` and a reload
    load); the error names the file.
    """
    try:
        cfg = config_mod.load(path) if path else common.get_config(ctx)
        if cfg.tls.cert:
            tlsutil.loaded(cfg)
    except config_mod.ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"ok: {cfg.source}")


def _register() -> None:
    """Attach the command groups that live in their own modules."""
    for mod in (
        serve_cmd,
        domain_cmds,
        user_cmds,
        queue_cmds,
        inbox_cmd,
        suppression_cmds,
        webhook_cmds,
        store_cmds,
        audit_cmd,
        doctor_cmd,
    ):
        mod.register(cli)


_register()


def main() -> None:
    cli(prog_name="relaybox")


if __name__ == "__main__":  # `python -I -m admin.cli`: how `relaybox serve` starts its workers
    main()
