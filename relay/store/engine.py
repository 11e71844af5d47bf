"""The shared store's interface, and its embedded (SQLite) engine.

The shared state (users, domains with their DKIM keys, audit events, suppressions, webhook
endpoints; and the counts: AUTH failures, lockouts, per-user usage) lives in a :class:`Store`: by
default the SQLite files in the state dir (:class:`SqliteStore` over relay/store/db.py's
:class:`~relay.store.db.Database`), or one PostgreSQL database shared by every node
(relay/store/pg.py). The store modules (``users``, ``domains``, ``events``, ``usage``...) hold the
SQL, written once in the subset both engines read the same way: ``?`` placeholders, ``ON
CONFLICT ... DO``, ``RETURNING``, no engine-specific functions.

A write transaction (:meth:`Store.transaction`) is serialised against every other writer of the
same store, in every process and on every node: SQLite's ``BEGIN IMMEDIATE`` takes the file's
write lock, PostgreSQL's transaction takes a transaction-scoped advisory lock. So the store
modules' read-then-write rules (a count checked, then raised) hold on both engines without a
lock of their own.

The local state (the spool, the webhook outbox, the sandbox inbox) stays in SQLite files of the
node (relay/store/spool.py, relay/store/inbox.py), which use :class:`Database` directly.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol, TypeVar

import aiosqlite

from relay.store.db import Database, Statement, StoreError
from relay.store.readcache import Generation

Params = Sequence[object]
T = TypeVar("T")
# Rows read in a write transaction -> (a result, the statements to execute for it)
Compute = Callable[[list["Row"]], tuple[T, Sequence[Statement]]]


class IntegrityError(StoreError):
    """A constraint refused the statement (a duplicate key, a missing foreign key).

    Raised inside a transaction; the caller maps it to its own answer (a Conflict). The
    transaction is rolled back as the error leaves it."""


class Row(Protocol):
    """A result row: by column name (``row["login"]``) or position (``row[0]``)."""

    def __getitem__(self, key: int | str, /) -> Any: ...

    def keys(self) -> list[str]: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Any]: ...


class Tx(Protocol):
    """The statements of one write transaction."""

    async def execute(self, sql: str, params: Params = ()) -> int:
        """Run a statement; the number of rows it changed."""
        ...

    async def executemany(self, sql: str, params: Iterable[Params]) -> None: ...

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]: ...

    async def fetchone(self, sql: str, params: Params = ()) -> Row | None: ...


class Store(Protocol):
    """A shared store: reads, and serialised write transactions."""

    @property
    def engine(self) -> str:
        """``sqlite`` or ``postgresql``."""
        ...

    @property
    def where(self) -> str:
        """Where it is, for messages: a path, or a URL without its password."""
        ...

    @property
    def generation(self) -> Generation | None:
        """What moves after each write, for the answers kept by relay/store/readcache.py (None:
        nothing is kept, every lookup reads)."""
        ...

    def transaction(self) -> AbstractAsyncContextManager[Tx]: ...

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]: ...

    async def fetchone(self, sql: str, params: Params = ()) -> Row | None: ...

    async def write_fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        """One writing statement in its own transaction, and its ``RETURNING`` rows."""
        ...

    async def read_then_write(self, sql: str, params: Params, compute: Compute[T]) -> T:
        """One write transaction: the rows of ``sql``, then the statements ``compute`` makes of
        them (``executemany`` each); ``compute``'s result. On SQLite one trip to the writer's
        thread, ``compute`` run there: it must be plain code on plain data."""
        ...

    async def close(self) -> None: ...


class SqliteTx:
    """:class:`Tx` on an aiosqlite connection inside ``BEGIN IMMEDIATE``."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Params = ()) -> int:
        try:
            async with self._conn.execute(sql, params) as cur:
                return cur.rowcount
        except sqlite3.IntegrityError as exc:
            raise IntegrityError(str(exc)) from exc
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc

    async def executemany(self, sql: str, params: Iterable[Params]) -> None:
        try:
            await self._conn.executemany(sql, params)
        except sqlite3.IntegrityError as exc:
            raise IntegrityError(str(exc)) from exc
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        try:
            return list(await self._conn.execute_fetchall(sql, params))
        except sqlite3.IntegrityError as exc:
            raise IntegrityError(str(exc)) from exc
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc

    async def fetchone(self, sql: str, params: Params = ()) -> Row | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None


class SqliteStore:
    """:class:`Store` on one SQLite file of the state dir. With a ``generation``, each write
    moves it once over (committed or not: a failed one costs the caches a read)."""

    engine = "sqlite"

    def __init__(self, db: Database, generation: Generation | None = None) -> None:
        self.db = db
        self._generation = generation

    @property
    def where(self) -> str:
        return str(self.db.path)

    @property
    def generation(self) -> Generation | None:
        return self._generation

    def _written(self) -> None:
        if self._generation is not None:
            self._generation.advance()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        try:
            async with self.db.transaction() as conn:
                yield SqliteTx(conn)
        finally:
            self._written()

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        return list(await self.db.fetchall(sql, params))

    async def fetchone(self, sql: str, params: Params = ()) -> Row | None:
        return await self.db.fetchone(sql, params)

    async def write_fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        try:
            return list(await self.db.write_fetchall(sql, params))
        finally:
            self._written()

    async def read_then_write(self, sql: str, params: Params, compute: Compute[T]) -> T:
        def run(conn: sqlite3.Connection) -> T:
            result, statements = compute(conn.execute(sql, params).fetchall())
            for statement, rows in statements:
                conn.executemany(statement, rows)
            return result

        try:
            return await self.db.in_write_thread(run)
        finally:
            self._written()

    async def close(self) -> None:
        await self.db.close()
        if self._generation is not None:
            self._generation.close()
