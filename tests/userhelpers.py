"""Fixtures for SMTP-user tests: a hasher, verified domains, a CLI config file.

Loaded through ``pytest_plugins`` in conftest.py. A verified domain is made through the real
domains store (add, then record passing results for every required check), the same path
``relaybox domain verify`` takes, minus the DNS.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from admin.cli import cli
from relay import config as config_mod
from relay.config import Config
from relay.store import shared
from relay.store.engine import Store
from relay.store.passwords import Hasher

DOMAIN = "example.com"


async def make_domain(
    db: Store, cfg: Config, name: str = DOMAIN, *, now: float, verified: bool = True
) -> str:
    """Add ``name`` (pending); with ``verified``, record a pass for every required check."""
    # Imported here so loading this plugin never depends on the domains module being importable.
    from relay import dnscheck, grammar
    from relay.store import domains

    await domains.add(db, name, cfg=cfg, now=now, actor="test")
    if verified:
        passing = [dnscheck.CheckResult(c, "pass", "", "", "") for c in cfg.dns.required]
        await domains.record_results(db, name, passing, cfg=cfg, now=now)
    return grammar.normalize_domain(name)


def make_domain_sync(cfg: Config, name: str = DOMAIN, *, now: float, verified: bool = True) -> str:
    """The same, from a synchronous (CLI) test: opens and closes its own connection."""

    async def _main() -> str:
        db = await shared.open_main(cfg)
        try:
            return await make_domain(db, cfg, name, now=now, verified=verified)
        finally:
            await db.close()

    return asyncio.run(_main())


async def seed_user(cfg: Config, login: str, *, now: float) -> str:
    """Before a ``relaybox serve`` process starts: a verified domain and a user with a generated
    password in ``cfg``'s state dir. Returns the password, registered for the leak check."""
    from relay.store import users
    from relay.store.passwords import generate_password
    from tests import leaks

    password = leaks.add(generate_password())
    leaks.add_auth_payload(login, password)
    db = await shared.open_main(cfg)
    hasher = Hasher(cfg.auth)
    try:
        await make_domain(db, cfg, login.rpartition("@")[2], now=now)
        await users.create(db, login, password, hasher=hasher, cfg=cfg, now=now, actor="test")
    finally:
        hasher.close()
        await db.close()
    return password


@pytest.fixture
def hasher(cfg: Config) -> Iterator[Hasher]:
    h = Hasher(cfg.auth)
    yield h
    h.close()


CLI_CONFIG = """\
state_dir = "{state_dir}"
public_hostname = "smtp.relay.test"

[[listen]]
address = "127.0.0.1"
port = 587
mode = "starttls"

[[listen]]
address = "127.0.0.1"
port = 465
mode = "tls"

[auth]
reset_grace = "2h"
min_password_length = 14
argon2 = {{ time_cost = 1, memory_kib = 1024, parallelism = 1 }}

[dns]
dkim_key_type = "ed25519"
"""


@pytest.fixture
def cli_config(tmp_path: Path) -> Path:
    """A config file for CLI tests: state in tmp, cheap argon2, a 2h default grace."""
    path = tmp_path / "relaybox.toml"
    path.write_text(CLI_CONFIG.format(state_dir=tmp_path / "cli-state"))
    return path


@pytest.fixture
def conf(cli_config: Path) -> Config:
    """The CLI tests' config, loaded."""
    return config_mod.load(cli_config)


@pytest.fixture
def relaybox(cli_config: Path) -> Any:
    """Run `relaybox --config <tmp file> ARGS...` in process; stdout and stderr kept apart."""

    def invoke(*args: str, input: str | None = None) -> Result:
        return CliRunner().invoke(cli, ["--config", str(cli_config), *args], input=input)

    return invoke


def json_of(result: Result) -> Any:
    """A command's --json output; it must have succeeded."""
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def one_line_error(result: Result, *fragments: str) -> str:
    """A CLI error as operators get it: exit 1, one line on stderr naming ``fragments``, no
    traceback, nothing on stdout."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


@pytest.fixture
def domain(conf: Config) -> str:
    """A verified domain in the CLI tests' store."""
    return make_domain_sync(conf, now=time.time())
