"""SQLite connections, pragmas and migrations.

The databases in the state dir: ``relaybox.db`` (users, domains, audit events; written rarely,
shared by every worker and the CLI), ``spool-<worker>.db`` (the queue of one worker) and
``inbox.db`` (the sandbox domains' captured mail, relay/store/inbox.py; shared). All run in WAL
mode with ``synchronous=FULL`` so a COMMIT that returned is on disk, and ``busy_timeout`` so the CLI
and the server can write at the same time: every write transaction starts with ``BEGIN IMMEDIATE``
(take the write lock up front; no deadlock-prone lock upgrade).

Each :class:`Database` has one writer connection (its transactions serialised by an asyncio lock)
and one reader connection, each running in aiosqlite's own thread so SQL never blocks the loop.
Only the store modules (``users``, ``domains``, ``sandbox``, ``spool``, ``events``, ``inbox``...)
use it to run SQL.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiosqlite

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000


class StoreError(Exception):
    """The store failed for a reason that is not the caller's fault (busy, I/O, full disk).

    Callers answer it with a temporary failure (451 4.3.0 / 454 4.7.0) and never show its text to a
    client: the text may name files.
    """


@dataclass(frozen=True)
class Migration:
    version: int
    sql: str


def ensure_state_dir(path: Path) -> None:
    """Create the state dir 0700 (it holds password hashes and DKIM keys)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        if path.stat().st_mode & 0o077:
            path.chmod(0o700)
    except PermissionError:
        pass


def _create_private(path: Path) -> None:
    """Create the database file 0600 before SQLite does (it would honour the umask)."""
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)


async def _connect(path: Path, synchronous: str = "FULL") -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path, isolation_level=None)
    conn.row_factory = sqlite3.Row
    await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    await _set_wal(conn)
    await conn.execute(f"PRAGMA synchronous = {synchronous}")
    await conn.execute("PRAGMA foreign_keys = ON")
    return conn


async def _set_wal(conn: aiosqlite.Connection) -> None:
    """``journal_mode = WAL``, retried while another process holds the file.

    Switching a new file to WAL takes an exclusive lock, and where waiting could deadlock SQLite
    answers "database is locked" at once instead of calling the busy handler: seen once with
    two workers opening a fresh state dir together (not reproduced since). Retried for up to
    the busy timeout.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BUSY_TIMEOUT_MS / 1000
    delay = 0.005
    while True:
        try:
            await conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or loop.time() + delay > deadline:
                raise
        await asyncio.sleep(delay)  # sleep-ok: back-off while another process holds the lock
        delay = min(delay * 2, 0.1)


Statement = tuple[str, Sequence[Sequence[object]]]  # SQL and the rows it is executed for


def in_thread(conn: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], T]) -> Awaitable[T]:
    """Run ``fn`` with the sqlite3 connection itself, in ``conn``'s own thread: for what aiosqlite
    does not wrap (incremental blob I/O, ``Connection.blobopen``). Through aiosqlite's
    ``_execute``, the queue its own calls use (0.22, pinned; tests/test_spill.py writes through
    it), so it runs in order with them and inside the transaction ``conn`` is in."""
    return conn._execute(lambda: fn(conn._conn))  # type: ignore[no-untyped-call]


class Database:
    """One SQLite file: a serialised writer and a reader, both off the event loop."""

    def __init__(self, path: Path, writer: aiosqlite.Connection, reader: aiosqlite.Connection):
        self.path = path
        self._writer = writer
        self._reader = reader
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(
        cls, path: Path, migrations: Sequence[Migration], *, synchronous: str = "FULL"
    ) -> Database:
        """Open (create, migrate) ``path``. ``synchronous = "NORMAL"``: this handle's commits
        are not fsynced (WAL: a crash of the process loses nothing, a power loss may lose the
        last ones); only for counts that may come out a little low (relay/store/usage.py),
        never for mail or credentials. It is per connection: other handles stay FULL."""
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous: {synchronous!r}")
        ensure_state_dir(path.parent)
        _create_private(path)
        try:
            writer = await _connect(path, synchronous)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from exc
        try:
            await _migrate(writer, migrations)
            reader = await _connect(path, synchronous)
        except BaseException as exc:
            await writer.close()  # its thread would otherwise keep the process alive
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot open database {path}: {exc}") from exc
            raise
        return cls(path, writer, reader)

    async def close(self) -> None:
        # aiosqlite's thread would otherwise keep the process from exiting.
        await self._writer.close()
        await self._reader.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` on the writer; rolled back if the body raises."""
        async with self._write_lock:
            try:
                await self._writer.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot begin a write: {exc}") from exc
            try:
                yield self._writer
            except BaseException:
                try:
                    await self._writer.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise
            try:
                await self._writer.execute("COMMIT")
            except sqlite3.Error as exc:
                try:
                    await self._writer.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise StoreError(f"commit failed: {exc}") from exc

    async def in_write_thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn`` in ``BEGIN IMMEDIATE`` ... ``COMMIT``, one trip to the writer's thread (not one a
        statement: ~50 us of CPU each, bench/README.md), rolled back if it raises; run there."""

        def run(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result

        async with self._write_lock:
            try:
                return await in_thread(self._writer, run)
            except sqlite3.Error as exc:
                raise StoreError(f"write failed: {exc}") from exc

    async def write_statements(self, statements: Sequence[Statement]) -> None:
        """Each statement's ``executemany``, one transaction, one trip (:meth:`in_write_thread`)."""

        def run(conn: sqlite3.Connection) -> None:
            for sql, rows in statements:
                conn.executemany(sql, rows)

        await self.in_write_thread(run)

    async def fetchall(
        self, sql: str, params: Sequence[object] | dict[str, object] = ()
    ) -> list[sqlite3.Row]:
        # One thread operation for execute + fetch: with a separate execute and fetchall, another
        # coroutine's read could run in between on this connection, and overlapping statements
        # keep one read transaction (an old WAL snapshot) open across the writer's COMMITs.
        try:
            rows = await self._reader.execute_fetchall(sql, params)
        except sqlite3.Error as exc:
            raise StoreError(f"read failed: {exc}") from exc
        return list(rows)

    async def write_fetchall(
        self, sql: str, params: Sequence[object] | dict[str, object] = ()
    ) -> list[sqlite3.Row]:
        """One writing statement on the writer, in its own (implicit) transaction, and its rows
        (``RETURNING``): one thread operation, atomic as one statement is. For a hot path whose
        whole change fits in one statement (relay/store/usage.py's admission)."""
        async with self._write_lock:
            try:
                rows = await self._writer.execute_fetchall(sql, params)
            except sqlite3.Error as exc:
                raise StoreError(f"write failed: {exc}") from exc
        return list(rows)

    async def fetchone(
        self, sql: str, params: Sequence[object] | dict[str, object] = ()
    ) -> sqlite3.Row | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    @property
    def reader(self) -> aiosqlite.Connection:
        return self._reader


async def schema_version(path: Path) -> int:
    """The ``user_version`` of the database at ``path``, read only (no migration, no WAL switch)."""
    try:
        async with aiosqlite.connect(f"file:{path}?mode=ro", uri=True) as conn:
            async with conn.execute("PRAGMA user_version") as cur:
                row = await cur.fetchone()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    return int(row[0]) if row else 0


async def _migrate(conn: aiosqlite.Connection, migrations: Sequence[Migration]) -> None:
    """Apply migrations newer than ``PRAGMA user_version``, each in its own transaction.

    Migrations only add (tables, columns, indexes): an upgrade never destroys data.
    """
    async with conn.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    current = int(row[0]) if row else 0
    latest = max((m.version for m in migrations), default=0)
    if current > latest:
        raise StoreError(
            f"database schema version {current} is newer than this relaybox ({latest}): "
            "refusing to run an older release on it"
        )
    for m in sorted(migrations, key=lambda m: m.version):
        if m.version <= current:
            continue
        await conn.execute("BEGIN IMMEDIATE")
        try:
            # Read again under the write lock: another process (a worker starting at the same
            # moment) may have applied it while this one waited.
            async with conn.execute("PRAGMA user_version") as cur:
                row = await cur.fetchone()
            current = int(row[0]) if row else 0
            if m.version <= current:
                await conn.execute("COMMIT")
                continue
            for stmt in _split_sql(m.sql):
                await conn.execute(stmt)
            await conn.execute(f"PRAGMA user_version = {int(m.version)}")
        except BaseException:
            await conn.execute("ROLLBACK")
            raise
        await conn.execute("COMMIT")


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


# --- schema of the shared database ----------------------------------------------------------------

MAIN_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        """
        CREATE TABLE domains (
            name TEXT PRIMARY KEY,
            token TEXT NOT NULL,
            dkim_selector TEXT NOT NULL,
            dkim_algorithm TEXT NOT NULL,
            dkim_private_key TEXT NOT NULL,
            dkim_public_key TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'verified', 'failing', 'suspended')),
            checks TEXT NOT NULL DEFAULT '[]',
            created_at REAL NOT NULL,
            last_checked_at REAL,
            verified_at REAL,
            failing_since REAL
        );
        CREATE TABLE users (
            login TEXT PRIMARY KEY,
            domain TEXT NOT NULL REFERENCES domains(name),
            password_hash TEXT NOT NULL,
            previous_hash TEXT,
            previous_valid_until REAL,
            created_at REAL NOT NULL,
            password_changed_at REAL NOT NULL,
            last_login_at REAL,
            disabled INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX users_domain ON users(domain);
        CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at REAL NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL DEFAULT '',
            detail TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX events_at ON events(at)
        """,
    ),
    Migration(
        2,
        """
        ALTER TABLE domains ADD COLUMN sandbox INTEGER NOT NULL DEFAULT 0;
        CREATE TABLE sandbox_recipients (
            domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
            address TEXT NOT NULL,
            PRIMARY KEY (domain, address)
        ) WITHOUT ROWID
        """,
    ),
    Migration(
        3,
        """
        ALTER TABLE users ADD COLUMN messages_per_hour INTEGER;
        ALTER TABLE users ADD COLUMN messages_per_day INTEGER;
        ALTER TABLE users ADD COLUMN recipients_per_day INTEGER;
        ALTER TABLE users ADD COLUMN allow_ip TEXT NOT NULL DEFAULT '';
        ALTER TABLE users ADD COLUMN allow_from TEXT NOT NULL DEFAULT '';
        ALTER TABLE users ADD COLUMN expires_at REAL
        """,
    ),
    Migration(
        4,
        """
        CREATE TABLE suppressions (
            domain TEXT NOT NULL,
            address TEXT NOT NULL,
            reason TEXT NOT NULL DEFAULT '',
            code TEXT NOT NULL DEFAULT '',
            reply TEXT NOT NULL DEFAULT '',
            source TEXT NOT NULL CHECK (source IN ('bounce', 'admin')),
            created_at REAL NOT NULL,
            expires_at REAL,
            PRIMARY KEY (domain, address)
        ) WITHOUT ROWID;
        CREATE INDEX suppressions_address ON suppressions(address)
        """,
    ),
    # Webhook endpoints (relay/store/webhooks.py). The secret is stored: posts are signed with
    # it (the state dir is 0700, this file 0600, as for the DKIM keys above).
    Migration(
        5,
        """
        CREATE TABLE webhook_endpoints (
            id TEXT PRIMARY KEY,
            url TEXT NOT NULL,
            domain TEXT,
            events TEXT NOT NULL,
            secret TEXT NOT NULL,
            created_at REAL NOT NULL
        )
        """,
    ),
    # Periodic work that one node (or worker) does for all (relay/store/domains.py's recheck):
    # who did it last, and when.
    Migration(
        6,
        """
        CREATE TABLE leases (
            name TEXT PRIMARY KEY,
            holder TEXT NOT NULL,
            at REAL NOT NULL
        )
        """,
    ),
)
