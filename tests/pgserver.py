"""The store tests' PostgreSQL fixtures (loaded through ``pytest_plugins``): a cluster for the
session (tests/pgcluster.py), and ``db`` / ``counts`` on each engine of the shared store.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from relay.config import Config
from relay.store import shared
from relay.store.db import Database
from relay.store.engine import SqliteStore, Store
from tests.pgcluster import PgServer, bindir, free_port, own_cluster, start_server

__all__ = ["PgServer", "free_port", "own_cluster", "sqlite_of", "start_server"]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    try:
        bindir()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    with own_cluster() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest) -> str:
    """The shared store's engine of a store test: each runs on both."""
    return str(request.param)


@pytest.fixture
def store_cfg(cfg: Config, engine: str, request: pytest.FixtureRequest) -> Config:
    """``cfg`` with its shared store on ``engine`` (PostgreSQL: a new database of the test
    cluster, tests/pgserver.py)."""
    if engine == "sqlite":
        return cfg
    server: PgServer = request.getfixturevalue("pg_server")
    return server.config(cfg)


@pytest.fixture
async def db(store_cfg: Config) -> AsyncIterator[Store]:
    """The shared store's main tables, on each engine."""
    database = await shared.open_main(store_cfg)
    yield database
    await database.close()


@pytest.fixture
async def counts(store_cfg: Config) -> AsyncIterator[Store]:
    """The shared store's counts (usage, AUTH failures), on each engine."""
    database = await shared.open_counts(store_cfg)
    yield database
    await database.close()


def sqlite_of(db: Store) -> Database:
    """The SQLite file under ``db``, for a test that reaches into SQLite's own connections (its
    reader's snapshot, its authorizer, its progress handler) to make a fault or an interleaving.
    On PostgreSQL such a test is skipped; the rules it checks are the store modules', which the
    other store tests run on both engines."""
    if not isinstance(db, SqliteStore):
        pytest.skip("drives SQLite's own connections")
    return db.db
