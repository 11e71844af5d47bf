"""`relaybox store ...`: the shared store's engine, schema and moving up (status, migrate, copy).

``status --json``: ``{"engine", "where", "reachable", "components": {NAME: {"version",
"expected"}}, "users", "domains"}``. ``copy --json``: ``{"to", "tables": [{"table", "rows",
"sha256"}]}``. The rules live in relay/store/ (engine.py, pg.py, copy.py).
"""

from __future__ import annotations

import dataclasses

import click

from admin import common
from relay import clock
from relay.config import Config, ConfigError
from relay.errors import Invalid
from relay.store import copy, events, pg, shared
from relay.store.db import Database, StoreError, schema_version
from relay.store.engine import Store


def _expected() -> dict[str, int]:
    return {name: max(m.version for m in pair[1]) for name, pair in shared.COMPONENTS.items()}


async def _status(cfg: Config) -> dict[str, object]:
    expected = _expected()
    out: dict[str, object] = {"engine": cfg.store.engine}
    if cfg.store.url:
        out["where"] = pg.redact_url(cfg.store.url)
        try:
            main = await shared.open_pg(cfg, "main", migrate=False)
        except StoreError:
            out.update(reachable=False, components={}, users=None, domains=None)
            return out
        try:
            found = await pg.versions(main)
            out["reachable"] = True
            out["components"] = {
                n: {"version": found.get(n, 0), "expected": v} for n, v in expected.items()
            }
            if found.get("main", 0):
                out.update(await _counts(main))
            else:
                out.update(users=None, domains=None)
        finally:
            await main.close()
        return out
    out["where"] = str(cfg.state_dir)
    out["reachable"] = True
    components: dict[str, object] = {}
    for name, path in (("main", cfg.db_path), ("usage", cfg.usage_path)):
        version = 0
        if path.exists():
            version = await schema_version(path)
        components[name] = {"version": version, "expected": expected[name]}
    out["components"] = components
    if cfg.db_path.exists():
        async with common.main_db(cfg) as embedded:
            out.update(await _counts(embedded))
    else:
        out.update(users=None, domains=None)
    return out


async def _counts(db: Store) -> dict[str, object]:
    users = await db.fetchone("SELECT COUNT(*) FROM users")
    domains = await db.fetchone("SELECT COUNT(*) FROM domains")
    return {"users": int(users[0]) if users else 0, "domains": int(domains[0]) if domains else 0}


async def _migrate(cfg: Config) -> dict[str, int]:
    """Open (so migrate) each component; its version after."""
    out: dict[str, int] = {}
    for name in shared.COMPONENTS:
        store = await (shared.open_main(cfg) if name == "main" else shared.open_counts(cfg))
        await store.close()
    status = await _status(cfg)
    components = status["components"]
    assert isinstance(components, dict)
    for name, info in components.items():
        out[name] = int(info["version"])
    return out


def _target(cfg: Config, url: str) -> Config:
    try:
        store = dataclasses.replace(cfg.store, url=url)
    except ValueError as exc:
        raise Invalid(f"--to: {exc}") from None
    if not store.url:
        raise Invalid("--to: expected postgresql://USER@HOST[:PORT]/DATABASE")
    return dataclasses.replace(cfg, store=store)


async def _copy(cfg: Config, target_cfg: Config, actor: str) -> list[copy.TableCopy]:
    common.drop_privileges_for(cfg.state_dir)
    if not cfg.db_path.exists():
        raise Invalid(f"there is no embedded store to copy: {cfg.db_path} does not exist")
    source = await Database.open(cfg.db_path, shared.COMPONENTS["main"][0])
    counts = (
        await Database.open(cfg.usage_path, shared.COMPONENTS["usage"][0], synchronous="NORMAL")
        if cfg.usage_path.exists()
        else None
    )
    try:
        main = await shared.open_pg(target_cfg, "main")
        try:
            usage = await shared.open_pg(target_cfg, "usage")
            try:
                copied = await copy.copy_store(source, counts, main, usage)
                detail = " ".join(f"{c.table}={c.rows}" for c in copied)
                await events.record(
                    main,
                    now=clock.system(),
                    actor=actor,
                    action="store.copy",
                    target=main.where,
                    detail=f"from {cfg.db_path}: {detail}",
                )
            finally:
                await usage.close()
        finally:
            await main.close()
    finally:
        await source.close()
        if counts is not None:
            await counts.close()
    return copied


def register(cli: click.Group) -> None:
    @cli.group("store")
    def store_group() -> None:
        """The shared store: which engine, its schema, moving up to PostgreSQL."""

    @store_group.command("status")
    @common.json_option
    @click.pass_context
    @common.user_errors
    def status(ctx: click.Context, json_: bool) -> None:
        """Show the store's engine, where it is, and its schema versions."""
        cfg = common.get_config(ctx)
        data = common.run(_status(cfg))
        if json_:
            common.emit_json(data)
            return
        click.echo(f"engine: {data['engine']} ({data['where']})")
        if not data["reachable"]:
            raise click.ClickException(f"the store at {data['where']} is unreachable")
        components = data["components"]
        assert isinstance(components, dict)
        for name, info in components.items():
            state = "current" if info["version"] == info["expected"] else "needs migrate"
            click.echo(f"schema {name}: version {info['version']} of {info['expected']} ({state})")
        if data.get("users") is not None:
            click.echo(f"users: {data['users']}, domains: {data['domains']}")

    @store_group.command("migrate")
    @click.pass_context
    @common.user_errors
    def migrate(ctx: click.Context) -> None:
        """Apply the schema migrations this relaybox has (nodes starting later find them done)."""
        cfg = common.get_config(ctx)
        common.drop_privileges_for(cfg.state_dir)
        for name, version in common.run(_migrate(cfg)).items():
            click.echo(f"schema {name}: version {version}")

    @store_group.command("copy")
    @click.option("--to", "url", required=True, help="postgresql://USER@HOST[:PORT]/DATABASE")
    @common.json_option
    @click.pass_context
    @common.user_errors
    def copy_cmd(ctx: click.Context, url: str, json_: bool) -> None:
        """Copy the embedded store (users, domains, DKIM keys, audit log...) into an empty
        PostgreSQL store, verified by counts and hashes. The password, TLS and timeout are the
        [store] section's; then set [store] url and restart."""
        cfg = common.get_config(ctx)
        if cfg.store.url:
            raise Invalid("[store] url is set: the copy reads the embedded store; unset it")
        try:
            target = _target(cfg, url)
        except ConfigError as exc:
            raise Invalid(str(exc)) from None
        copied = common.run(_copy(cfg, target, events.current_actor()))
        where = pg.redact_url(url)
        if json_:
            common.emit_json({"to": where, "tables": [c.as_json() for c in copied]})
            return
        for c in copied:
            click.echo(f"{c.table}: {c.rows} row(s), sha256 {c.sha256[:16]}")
        click.echo(f"copied and verified into {where}; now set [store] url and restart relaybox")
