"""`relaybox serve`: run the relay in the foreground (systemd runs it as Type=notify)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable

import click

from admin import common
from relay.config import Config, ConfigError
from relay.service import access, posterproc
from relay.service.server import Server
from relay.service.supervisor import Supervisor, watch_supervisor
from relay.store.db import StoreError

log = logging.getLogger("relaybox.serve")


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
    # No format here prints a record's thread, process or caller: not looking them up takes a
    # third off each line's cost, one line a message (the logging HOWTO's "Optimization").
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    root.setLevel(level)
    # aiosmtpd logs every command line at INFO; our mail log says what matters.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    # aiosqlite logs every statement with its parameters at DEBUG (hashes, DKIM keys): never.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)


class HangupLatch:
    """SIGHUP from the start of ``serve`` until the event loop's handler takes over: remembered,
    where the default action would end the process (a reload asked by a script or a supervisor
    while relaybox is starting). The config is read after this is installed, so a SIGHUP before
    that changes nothing; one after it is replayed once the relay is serving."""

    def __init__(self) -> None:
        self.seen = False
        signal.signal(signal.SIGHUP, self._note)

    def _note(self, signum: int, frame: object) -> None:
        self.seen = True


def worker_command(cfg: Config, log_level: str) -> Callable[[int], list[str]]:
    """How the supervisor starts worker I: this interpreter in isolated mode (``-I``), so neither
    the working directory nor PYTHON* variables reach sys.path. Plain ``-m`` puts the working
    directory first: started as root from a directory holding an ``admin/cli.py``, that file would
    run as root."""
    argv = [sys.executable, "-I", "-m", "admin.cli"]
    if not cfg.source.startswith("("):  # a file, not the built-in defaults
        argv += ["--config", cfg.source]

    def command(index: int) -> list[str]:
        return [*argv, "serve", "--worker", str(index), "--log-level", log_level]

    return command


def poster_command(log_level: str) -> list[str]:
    """The command line of a worker's webhook poster process (relay/service/posterproc.py)."""
    return [sys.executable, "-I", "-m", "admin.cli", "webhook-poster", "--log-level", log_level]


async def _serve(server: Server, after_bind: Callable[[], None], hangup: HangupLatch) -> None:
    # A worker of `workers = N` stops (drains) when its supervisor is gone, as on SIGTERM.
    watch_supervisor(server.request_stop)
    await server.run(after_bind=after_bind, hangup_seen=lambda: hangup.seen)


def register(cli: click.Group) -> None:
    @cli.command("serve")
    @click.option(
        "--log-level",
        type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
        default="INFO",
        show_default=True,
    )
    @click.option("--worker", type=click.IntRange(0, 63), default=None, hidden=True)
    @click.pass_context
    def serve(ctx: click.Context, log_level: str, worker: int | None) -> None:
        """Run the relay in the foreground until SIGTERM (SIGHUP reloads)."""
        hangup = HangupLatch()
        cfg = common.get_config(ctx)
        setup_logging(log_level)
        secret = access.config_secret(cfg)
        if worker is None and secret is not None and secret.exposed:  # once, not per worker
            log.warning("%s", secret.detail)
        if worker is None and cfg.workers > 1:
            # The supervisor touches no state: each worker binds, drops root and opens the store.
            supervisor = Supervisor(cfg, worker_command(cfg, log_level))
            ctx.exit(asyncio.run(supervisor.run(hangup_seen=lambda: hangup.seen)))
        if worker is not None and worker >= cfg.workers:
            raise click.ClickException(f"--worker {worker}: the config has workers = {cfg.workers}")
        server = Server(cfg, worker=worker or 0)
        server.webhooks.poster_command = poster_command(log_level)
        try:
            # As root on a state dir owned by the service user: bind first, then become it.
            asyncio.run(_serve(server, lambda: common.drop_privileges_for(cfg.state_dir), hangup))
        except StoreError as exc:
            raise click.ClickException(f"store error: {exc}") from None
        except (OSError, ConfigError) as exc:  # a ConfigError here: the TLS files, named
            raise click.ClickException(f"cannot start: {exc}") from None

    @cli.command("webhook-poster", hidden=True)
    @click.option(
        "--log-level",
        type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
        default="INFO",
    )
    @click.pass_context
    def webhook_poster(ctx: click.Context, log_level: str) -> None:
        """A worker's webhook poster (started by serve, fed through its stdin)."""
        setup_logging(log_level)
        # Its worker stops it (end of file on stdin, after the posts in flight): a SIGTERM or
        # Ctrl-C meant for the whole service must not cut the posts short.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        ctx.exit(asyncio.run(posterproc.run()))
