"""The two engines of the shared store (relay/store/engine.py, pg.py): one schema in two texts
held in step, `relaybox store status|migrate|copy` against a real PostgreSQL (tests/pgserver.py),
and the config that points relaybox at it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest

from relay import config as config_mod
from relay.config import Config
from relay.config_sections import StoreConfig
from relay.store import (
    admissions,
    domains,
    events,
    leases,
    logins,
    pg,
    shared,
    suppressions,
    usage,
    users,
)
from relay.store.db import StoreError
from relay.store.engine import Store
from relay.store.passwords import Hasher
from relay.userrules import Limits
from tests.pgserver import PgServer, free_port
from tests.userhelpers import make_domain

LOGIN = "app@example.com"
PASSWORD = "Store-engines-password-1"
NOW = 1_800_000_000.0


def _sqlite_columns(path: Path) -> dict[str, list[str]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        return {
            str(name): [str(r[1]) for r in conn.execute(f"PRAGMA table_info({name})")]
            for (name,) in tables
            if not name.startswith("sqlite_")
        }


async def _pg_columns(store: Store) -> dict[str, list[str]]:
    rows = await store.fetchall(
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = 'public' AND table_name <> 'relaybox_schema'"
        " ORDER BY table_name, ordinal_position"
    )
    out: dict[str, list[str]] = {}
    for table, column in rows:
        out.setdefault(str(table), []).append(str(column))
    return out


async def test_both_engines_have_the_same_tables_columns_and_versions(
    cfg: Config, pg_server: PgServer
) -> None:
    for name, (lite, post) in shared.COMPONENTS.items():
        assert [m.version for m in lite] == [m.version for m in post], name
    pg_cfg = pg_server.config(cfg)
    main, counts = await shared.open_main(cfg), await shared.open_counts(cfg)
    await main.close()
    await counts.close()
    lite_tables = _sqlite_columns(cfg.db_path) | _sqlite_columns(cfg.usage_path)
    pg_main, pg_counts = await shared.open_main(pg_cfg), await shared.open_counts(pg_cfg)
    try:
        assert isinstance(pg_main, pg.PgStore)
        assert await pg.versions(pg_main) == {
            n: max(m.version for m in p) for n, (_, p) in shared.COMPONENTS.items()
        }
        assert await _pg_columns(pg_main) == lite_tables
    finally:
        await pg_main.close()
        await pg_counts.close()


async def test_nodes_migrating_at_once_take_turns(cfg: Config, pg_server: PgServer) -> None:
    """Three processes' worth of first starts on one empty database: one migrates, the others
    find it done (no "relation already exists")."""
    pg_cfg = pg_server.config(cfg)
    stores = await asyncio.gather(*(shared.open_main(pg_cfg) for _ in range(3)))
    for s in stores:
        await s.close()


async def test_a_store_newer_than_this_relaybox_is_refused(
    cfg: Config, pg_server: PgServer
) -> None:
    pg_cfg = pg_server.config(cfg)
    store = await shared.open_main(pg_cfg)
    try:
        async with store.transaction() as tx:
            await tx.execute("UPDATE relaybox_schema SET version = 99 WHERE component = 'main'")
    finally:
        await store.close()
    with pytest.raises(StoreError, match="version 99 is newer than this relaybox"):
        await shared.open_main(pg_cfg)


async def test_a_wrong_password_or_no_server_is_a_store_error_naming_no_secret(
    cfg: Config, pg_server: PgServer, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    bad = dataclasses.replace(
        pg_server.store_config("postgres"), password_file=str(wrong), connect_timeout=1
    )
    with pytest.raises(StoreError, match="cannot reach the store") as caught:
        await shared.open_main(dataclasses.replace(cfg, store=bad))
    assert "not-the-password" not in repr(caught.value.__cause__) + str(caught.value)
    nowhere = dataclasses.replace(bad, url=f"postgresql://relaybox@127.0.0.1:{free_port()}/x")
    with pytest.raises(StoreError, match="cannot reach the store"):
        await shared.open_main(dataclasses.replace(cfg, store=nowhere))


def test_the_store_url_never_holds_the_password() -> None:
    with pytest.raises(ValueError, match="put it in password_file"):
        StoreConfig(url="postgresql://relaybox:secret@db.internal/relaybox")
    with pytest.raises(ValueError, match="expected postgresql://"):
        StoreConfig(url="mysql://db.internal/relaybox")
    with pytest.raises(ValueError, match="sslmode"):
        StoreConfig(url="postgresql://relaybox@db/x", sslmode="on")
    cfg = config_mod.from_dict({"store": {"url": "postgresql://relaybox@db.internal/relaybox"}})
    assert cfg.store.engine == "postgresql" and cfg.store.sslmode == "prefer"
    assert pg.redact_url("postgresql://u:pw@[::1]:5433/d") == "postgresql://u:********@[::1]:5433/d"


# --- moving up: store copy ------------------------------------------------------------------------


async def _seed_embedded(cfg: Config) -> None:
    """An embedded install with something in every table a copy takes."""
    db = await shared.open_main(cfg)
    counts = await shared.open_counts(cfg)
    hasher = Hasher(cfg.auth)
    try:
        await make_domain(db, cfg, now=NOW)
        await users.create(db, LOGIN, PASSWORD, hasher=hasher, cfg=cfg, now=NOW, actor="t")
        await users.update_settings(
            db,
            LOGIN,
            users.SettingsChange(allow_ip=("192.0.2.0/24",), allow_from=("*@example.com",)),
            now=NOW,
            actor="t",
        )
        await suppressions.add(db, "gone@dest.test", domain="example.com", now=NOW, actor="t")
        await admissions.admit(counts, LOGIN, 3, Limits(0, 0, 0), NOW)
    finally:
        hasher.close()
        await counts.close()
        await db.close()


def test_store_copy_moves_every_credential_and_verifies(
    relaybox: Any, conf: Config, pg_server: PgServer
) -> None:
    asyncio.run(_seed_embedded(conf))
    dbname = pg_server.new_database()
    url = pg_server.url(dbname)
    # The target's password and TLS come from the [store] section, whose url stays empty.
    section = f'\n[store]\npassword_file = "{pg_server.password_file}"\nsslmode = "disable"\n'
    cli_config = conf.source
    Path(cli_config).write_text(Path(cli_config).read_text() + section)
    done = relaybox("store", "copy", "--to", url, "--json")
    assert done.exit_code == 0, done.output
    data = json.loads(done.stdout)
    rows = {t["table"]: t["rows"] for t in data["tables"]}
    assert rows["domains"] == 1 and rows["users"] == 1 and rows["suppressions"] == 1
    assert rows["usage_days"] == 1 and rows["events"] >= 3
    again = relaybox("store", "copy", "--to", url)
    assert again.exit_code == 1 and "not empty" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1 and "Traceback" not in again.stderr

    pg_cfg = pg_server.config(conf, dbname)

    async def check() -> None:
        db = await shared.open_main(pg_cfg)
        counts = await shared.open_counts(pg_cfg)
        hasher = Hasher(pg_cfg.auth)
        try:
            result = await logins.verify(db, LOGIN, PASSWORD, hasher=hasher, now=NOW)
            assert result.matched == "current"  # the hash came across: the password still works
            user = await users.get(db, LOGIN)
            assert user is not None and user.allow_ip == ("192.0.2.0/24",)
            key = await domains.signing_key(db, "example.com")
            assert key is not None and "PRIVATE KEY" in key.private_pem
            assert (await usage.snapshot(counts, LOGIN, NOW)).recipients_today == 3
            copied = [e for e in await events.recent(db) if e.action == "store.copy"]
            assert len(copied) == 1
            await events.record(db, now=NOW, actor="t", action="after", target="x")  # ids go on
        finally:
            hasher.close()
            await counts.close()
            await db.close()

    asyncio.run(check())


def test_store_status_and_migrate_on_postgresql(
    relaybox: Any, conf: Config, pg_server: PgServer
) -> None:
    dbname = pg_server.new_database()
    section = (
        f'\n[store]\nurl = "{pg_server.url(dbname)}"\n'
        f'password_file = "{pg_server.password_file}"\nsslmode = "disable"\n'
    )
    Path(conf.source).write_text(Path(conf.source).read_text() + section)
    before = relaybox("store", "status", "--json")
    assert before.exit_code == 0, before.output
    data = json.loads(before.stdout)
    assert data["engine"] == "postgresql" and data["reachable"] is True
    assert data["components"]["main"]["version"] == 0 and data["users"] is None
    migrated = relaybox("store", "migrate")
    assert migrated.exit_code == 0, migrated.output
    latest = max(m.version for m in shared.COMPONENTS["main"][1])
    assert f"schema main: version {latest}" in migrated.stdout
    after = relaybox("store", "status")
    assert "needs migrate" not in after.stdout and "users: 0, domains: 0" in after.stdout


def test_store_status_of_an_unreachable_store_is_one_line(
    relaybox: Any, conf: Config, pg_server: PgServer
) -> None:
    section = (
        f'\n[store]\nurl = "postgresql://relaybox@127.0.0.1:{free_port()}/x"\n'
        'connect_timeout = "1s"\n'
    )
    Path(conf.source).write_text(Path(conf.source).read_text() + section)
    result = relaybox("store", "status")
    assert result.exit_code == 1 and "unreachable" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_pg_server_is_really_password_protected(pg_server: PgServer) -> None:
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(
            host="127.0.0.1", port=pg_server.port, user="relaybox", dbname="postgres", password="x"
        )


async def test_one_recheck_per_interval_whoever_asks(db: Store) -> None:
    """Every node and worker asks on its own timer; the first to ask after the interval does it,
    the others asking at the same moment do not (on both engines)."""
    interval = 3600.0
    asked = await asyncio.gather(*(leases.recheck_due(db, NOW, interval) for _ in range(5)))
    assert sorted(asked) == [False, False, False, False, True]
    assert not await leases.recheck_due(db, NOW + interval / 2, interval)
    assert await leases.recheck_due(db, NOW + interval, interval)
    row = await db.fetchone("SELECT holder FROM leases WHERE name = ?", (leases.DOMAIN_RECHECK,))
    assert row is not None and f"pid {os.getpid()}" in row[0]
