"""Opening the shared store on the configured engine (``[store]``): its main tables (users,
domains, audit events, suppressions, webhook endpoints) and its counts (per-user usage, AUTH
failures and lockouts). relay/store/engine.py says what each engine is."""

from __future__ import annotations

from collections.abc import Sequence

from relay.config import Config
from relay.store import pg, pg_schema, usage
from relay.store.db import MAIN_MIGRATIONS, Database, Migration
from relay.store.engine import SqliteStore, Store
from relay.store.readcache import Generation, generation_path

COMPONENTS: dict[str, tuple[Sequence[Migration], Sequence[Migration]]] = {
    # component: (its SQLite migrations, its PostgreSQL migrations), versioned together
    "main": (MAIN_MIGRATIONS, pg_schema.MAIN),
    "usage": (usage.USAGE_MIGRATIONS, pg_schema.USAGE),
}


async def open_pg(cfg: Config, component: str, *, migrate: bool = True) -> pg.PgStore:
    """``component`` of the PostgreSQL store, migrated first unless ``migrate`` is False."""
    store = await pg.open_store(cfg.store, component)
    if migrate:
        try:
            await pg.migrate(store, COMPONENTS[component][1])
        except BaseException:
            await store.close()
            raise
    return store


async def open_main(cfg: Config) -> Store:
    """The main tables (created and migrated if need be)."""
    if cfg.store.url:
        return await open_pg(cfg, "main")
    db = await Database.open(cfg.db_path, MAIN_MIGRATIONS)
    try:  # after the database: it made the state dir, and a file there is as private
        generation = Generation(generation_path(cfg.db_path))
    except BaseException:
        await db.close()
        raise
    return SqliteStore(db, generation)


def counts_exist(cfg: Config) -> bool:
    """Whether the counts may hold anything (before the server counted anything on SQLite
    there is no file, and the CLI makes none for reading zeros)."""
    return bool(cfg.store.url) or cfg.usage_path.exists()


async def open_counts(cfg: Config) -> Store:
    """The counts. On SQLite their own file, commits not fsynced (a power loss may lose the last
    counts, never mail); on PostgreSQL the same database as the main tables."""
    if cfg.store.url:
        return await open_pg(cfg, "usage")
    return SqliteStore(await usage.open_usage(cfg))
