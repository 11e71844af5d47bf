"""The PostgreSQL engine of the shared store (``[store] url = "postgresql://..."``).

Driver: psycopg 3 with psycopg_pool. It speaks through libpq, so TLS to the database
(``sslmode``, ``sslrootcert``), ``~/.pgpass`` and ``PGPASSWORD`` work as PostgreSQL's own tools
document them; it is typed and asyncio-native. Each process keeps one small pool; every
statement runs on a pooled connection in autocommit, every write transaction is ``BEGIN`` plus a
transaction-scoped advisory lock of its store (one key for the main tables, one for the counts):
writers of a store are serialised across every node and worker, as SQLite's ``BEGIN
IMMEDIATE`` serialises them on one box, so the store modules' rules read the same on both.

The store modules' SQL is shared with SQLite: ``?`` placeholders become psycopg's ``%s``. The
schema (relay/store/pg_schema.py) has its own text, versioned with SQLite's: version N of a
component means the same tables on both engines. ``relaybox_schema`` records the versions.

A connection the database dropped (a restart, a failover) is found at the first statement and
replaced once; a database that stays away is a :class:`StoreError` after ``connect_timeout``, and
the pool reconnects by itself when it is back.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import psycopg_pool
from psycopg.rows import RowMaker

from relay.config_sections import StoreConfig
from relay.store.db import Migration, StoreError
from relay.store.engine import Compute, IntegrityError, Params, Row, T, Tx


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key for ``name``."""
    return int.from_bytes(hashlib.sha256(f"relaybox:{name}".encode()).digest()[:8], signed=True)


MIGRATE_LOCK = lock_key("migrate")


@functools.lru_cache(maxsize=512)
def translate(sql: str) -> str:
    """The store's ``?`` placeholders as psycopg's ``%s`` (a literal ``%`` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


class PgRow:
    """A row readable by name and by position, as sqlite3.Row is."""

    __slots__ = ("_index", "_values")

    def __init__(self, index: dict[str, int], values: Sequence[Any]) -> None:
        self._index = index
        self._values = values

    def __getitem__(self, key: int | str, /) -> Any:
        if isinstance(key, str):
            return self._values[self._index[key]]
        return self._values[key]

    def keys(self) -> list[str]:
        return list(self._index)

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)


def _row_factory(cursor: psycopg.AsyncCursor[Any]) -> RowMaker[PgRow]:
    names = [c.name for c in cursor.description or ()]
    index = {name: i for i, name in enumerate(names)}

    def make(values: Sequence[Any]) -> PgRow:
        return PgRow(index, values)

    return make


def _error(exc: BaseException, what: str) -> StoreError:
    if isinstance(exc, psycopg.errors.IntegrityError):
        return IntegrityError(f"{what}: {exc.sqlstate}: {_first_line(exc)}")
    return StoreError(f"{what}: {type(exc).__name__}: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""


def redact_url(url: str) -> str:
    """``url`` without a password (for messages and status)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:********@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def connect_kwargs(cfg: StoreConfig) -> dict[str, Any]:
    """libpq parameters beside the url: TLS, timeout, the password from its file."""
    kwargs: dict[str, Any] = {
        "application_name": "relaybox",
        "connect_timeout": max(1, round(float(cfg.connect_timeout))),
    }
    if cfg.sslmode:
        kwargs["sslmode"] = cfg.sslmode
    if cfg.sslrootcert:
        kwargs["sslrootcert"] = cfg.sslrootcert
    if cfg.password_file:
        try:
            text = Path(cfg.password_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise StoreError(f"store.password_file: cannot read it: {exc.strerror}") from None
        kwargs["password"] = text.strip("\r\n")
    return kwargs


class PgTx:
    """:class:`~relay.store.engine.Tx` on a connection inside ``BEGIN``."""

    def __init__(self, conn: psycopg.AsyncConnection[PgRow]) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Params = ()) -> int:
        try:
            cur = await self._conn.execute(translate(sql), params)
        except psycopg.Error as exc:
            raise _error(exc, "write") from exc
        return cur.rowcount

    async def executemany(self, sql: str, params: Iterable[Params]) -> None:
        try:
            async with self._conn.cursor() as cur:
                await cur.executemany(translate(sql), params)
        except psycopg.Error as exc:
            raise _error(exc, "write") from exc

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        try:
            cur = await self._conn.execute(translate(sql), params)
            return list(await cur.fetchall())
        except psycopg.Error as exc:
            raise _error(exc, "write") from exc

    async def fetchone(self, sql: str, params: Params = ()) -> Row | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None


Pool = psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[PgRow]]


class PgStore:
    """:class:`~relay.store.engine.Store` on a PostgreSQL database: one of its components
    (``main``, ``usage``), whose writers one advisory lock serialises."""

    engine = "postgresql"

    def __init__(self, pool: Pool, timeout: float, component: str, url: str) -> None:
        self._pool = pool
        self._timeout = timeout
        self.lock_key = lock_key(component)
        self.component = component
        self.url = url

    @property
    def where(self) -> str:
        return redact_url(self.url)

    @property
    def generation(self) -> None:
        """None: nodes share this store, a file of one cannot tell the others (every lookup
        reads; relay/store/readcache.py)."""
        return None

    async def _getconn(self) -> psycopg.AsyncConnection[PgRow]:
        try:
            return await self._pool.getconn(timeout=self._timeout)
        except psycopg_pool.PoolTimeout as exc:
            raise StoreError(f"{self.component}: the database is unreachable") from exc

    async def _run(self, conn: psycopg.AsyncConnection[PgRow], sql: str, params: Params) -> Any:
        cur = await conn.execute(translate(sql), params)
        return await cur.fetchall() if cur.description else []

    async def _autocommit(self, sql: str, params: Params) -> list[Row]:
        """One statement on its own; once more on a fresh connection if the first one had been
        dropped by the server (a restart or failover since it was last used)."""
        for attempt in (1, 2):
            conn = await self._getconn()
            try:
                return list(await self._run(conn, sql, params))
            except psycopg.OperationalError as exc:
                if attempt == 2 or not conn.broken:
                    raise _error(exc, self.component) from exc
            except psycopg.Error as exc:
                raise _error(exc, self.component) from exc
            finally:
                await self._pool.putconn(conn)
        raise AssertionError("unreachable")

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        return await self._autocommit(sql, params)

    async def fetchone(self, sql: str, params: Params = ()) -> Row | None:
        rows = await self._autocommit(sql, params)
        return rows[0] if rows else None

    async def write_fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        async with self.transaction() as tx:
            return await tx.fetchall(sql, params)

    async def read_then_write(self, sql: str, params: Params, compute: Compute[T]) -> T:
        async with self.transaction() as tx:
            result, statements = compute(await tx.fetchall(sql, params))
            for statement, rows in statements:
                await tx.executemany(statement, rows)
        return result

    async def _begin(self) -> psycopg.AsyncConnection[PgRow]:
        for attempt in (1, 2):
            conn = await self._getconn()
            try:
                # One round trip: the key is our own integer, so no parameter is needed (and
                # psycopg sends a parameterless text of two statements in one simple query).
                await conn.execute(f"BEGIN; SELECT pg_advisory_xact_lock({int(self.lock_key)})")
                return conn
            except psycopg.Error as exc:
                await self._pool.putconn(conn)
                if attempt == 2 or not isinstance(exc, psycopg.OperationalError):
                    raise _error(exc, f"{self.component}: cannot begin a write") from exc
        raise AssertionError("unreachable")

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        conn = await self._begin()
        try:
            try:
                yield PgTx(conn)
            except BaseException:
                if not conn.broken:
                    try:
                        await conn.execute("ROLLBACK")
                    except psycopg.Error:
                        pass
                raise
            try:
                await conn.execute("COMMIT")
            except psycopg.Error as exc:
                raise _error(exc, f"{self.component}: commit failed") from exc
        finally:
            await self._pool.putconn(conn)

    async def close(self) -> None:
        await self._pool.close()


async def open_store(cfg: StoreConfig, component: str) -> PgStore:
    """``component`` on a pool of its own to ``cfg.url``, open once the pool holds a connection
    (StoreError if it cannot)."""
    timeout = float(cfg.connect_timeout)
    pool: Pool = psycopg_pool.AsyncConnectionPool(
        cfg.url,
        connection_class=psycopg.AsyncConnection[PgRow],
        kwargs={"autocommit": True, "row_factory": _row_factory, **connect_kwargs(cfg)},
        min_size=1,
        max_size=cfg.pool_size,
        open=False,
        timeout=timeout,
        reconnect_timeout=0,
        name="relaybox",
    )
    try:
        await pool.open(wait=True, timeout=timeout)
    except (psycopg_pool.PoolTimeout, psycopg.Error) as exc:
        await pool.close()
        raise StoreError(
            f"cannot reach the store at {redact_url(cfg.url)} within {timeout:g} s"
        ) from exc
    return PgStore(pool, timeout, component, cfg.url)


async def versions(store: PgStore) -> dict[str, int]:
    """The schema version of each component in the database ({} before the first migration)."""
    row = await store.fetchone("SELECT to_regclass('relaybox_schema') IS NOT NULL")
    if not (row and row[0]):
        return {}
    rows = await store.fetchall("SELECT component, version FROM relaybox_schema")
    return {str(r[0]): int(r[1]) for r in rows}


async def migrate(store: PgStore, migrations: Sequence[Migration]) -> int:
    """Apply ``store.component``'s migrations newer than its recorded version, each in its own
    transaction under the migration lock (nodes starting together take turns); the version now."""
    latest = max((m.version for m in migrations), default=0)
    async with store.transaction() as tx:
        await tx.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATE_LOCK,))
        await tx.execute(
            "CREATE TABLE IF NOT EXISTS relaybox_schema ("
            " component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
        )
    current = 0
    for m in sorted(migrations, key=lambda m: m.version):
        async with store.transaction() as tx:
            await tx.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATE_LOCK,))
            row = await tx.fetchone(
                "SELECT version FROM relaybox_schema WHERE component = ?", (store.component,)
            )
            current = int(row[0]) if row else 0
            if current > latest:
                raise StoreError(
                    f"store schema {store.component} version {current} is newer than this "
                    f"relaybox ({latest}): refusing to run an older release on it"
                )
            if m.version <= current:
                continue
            for stmt in (s.strip() for s in m.sql.split(";")):
                if stmt:
                    await tx.execute(stmt)
            await tx.execute(
                "INSERT INTO relaybox_schema (component, version) VALUES (?, ?)"
                " ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                (store.component, m.version),
            )
            current = m.version
    return current
