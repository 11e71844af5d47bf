"""`relaybox serve`: run the relay in the foreground (systemd runs it as Type=notify)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import click

from admin import common
from relay.db import StoreError
from relay.server import Server


def setup_logging(level: str) -> None:
    """Log to stderr; journald adds the time, so only add one when not under journald."""
    under_journald = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not under_journald:
        fmt = "%(asctime)s " + fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiosmtpd logs every command line at INFO; our mail log says what matters.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    # aiosqlite logs every statement with its parameters at DEBUG (hashes, DKIM keys): never.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)


def register(cli: click.Group) -> None:
    @cli.command("serve")
    @click.option(
        "--log-level",
        type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
        default="INFO",
        show_default=True,
    )
    @click.pass_context
    def serve(ctx: click.Context, log_level: str) -> None:
        """Run the relay in the foreground until SIGTERM (SIGHUP reloads)."""
        cfg = common.get_config(ctx)
        setup_logging(log_level)
        try:
            # As root on a state dir owned by the service user: bind first, then become it.
            asyncio.run(
                Server(cfg).run(after_bind=lambda: common.drop_privileges_for(cfg.state_dir))
            )
        except StoreError as exc:
            raise click.ClickException(f"store error: {exc}") from None
        except OSError as exc:
            raise click.ClickException(f"cannot start: {exc}") from None
