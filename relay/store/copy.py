"""Moving up: copy an embedded install's shared state into an empty PostgreSQL store
(`relaybox store copy --to postgresql://...`), verified by counts and hashes.

What is copied: every main table (users with their hashes and controls, domains with their DKIM
keys, sandbox recipients, suppressions, webhook endpoints, the audit log) and the usage history
(``usage_days``). Not copied: AUTH failures, lockouts and limit hits (they age out within hours
and describe the old box's clients). The source is read in one read transaction (one
consistent snapshot, even while relaybox runs); the target is written in one transaction that
commits only if every table's count and hash, read back through that transaction, equal the
source's. So a copy is complete or absent.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

import aiosqlite

from relay.errors import Conflict
from relay.store.db import Database, StoreError
from relay.store.engine import Row, Tx
from relay.store.pg import PgStore

# table -> its key, in the order a copy inserts them (domains before the users referring to them)
MAIN_TABLES: tuple[tuple[str, str], ...] = (
    ("domains", "name"),
    ("users", "login"),
    ("sandbox_recipients", "domain, address"),
    ("suppressions", "domain, address"),
    ("webhook_endpoints", "id"),
    ("events", "id"),
)
USAGE_TABLES: tuple[tuple[str, str], ...] = (("usage_days", "login, day"),)
BATCH = 500
Source = dict[str, tuple[list[str], list[sqlite3.Row]]]  # table -> (columns, rows in key order)


@dataclass(frozen=True)
class TableCopy:
    table: str
    rows: int
    sha256: str

    def as_json(self) -> dict[str, object]:
        return {"table": self.table, "rows": self.rows, "sha256": self.sha256}


def _canonical(value: object) -> bytes:
    """One value as both engines give it back: floats by repr, ints, text, NULL."""
    if value is None:
        return b"\x00N"
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, float):
        return b"\x00F" + repr(value).encode()
    if isinstance(value, int):
        return b"\x00I" + str(value).encode()
    if isinstance(value, bytes):
        return b"\x00B" + value
    return b"\x00T" + str(value).encode("utf-8", "surrogatepass")


def digest(rows: Sequence[Row | Sequence[object]]) -> str:
    """SHA-256 over rows in key order, each value canonical (see :func:`_canonical`)."""
    h = hashlib.sha256()
    for row in rows:
        h.update(b"\x01" + b"".join(_canonical(v) for v in row))
    return h.hexdigest()


async def _source_columns(reader: aiosqlite.Connection, table: str) -> list[str]:
    rows = await reader.execute_fetchall(f"PRAGMA table_info({table})")
    return [str(r[1]) for r in rows]


async def _read_source(db: Database, tables: Sequence[tuple[str, str]]) -> Source:
    """Every table's columns and rows in key order, from one snapshot."""
    out: Source = {}
    reader = db.reader
    try:
        await reader.execute("BEGIN")
        try:
            for table, key in tables:
                columns = await _source_columns(reader, table)
                if not columns:
                    continue  # a table this database's schema does not have yet
                rows = await reader.execute_fetchall(
                    f"SELECT {', '.join(columns)} FROM {table} ORDER BY {key}"
                )
                out[table] = (columns, list(rows))
        finally:
            await reader.execute("ROLLBACK")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {db.path}: {exc}") from exc
    return out


async def _require_empty(tx: Tx, tables: Sequence[tuple[str, str]]) -> None:
    for table, _key in tables:
        row = await tx.fetchone(f"SELECT COUNT(*) FROM {table}")
        if row is not None and int(row[0]):
            raise Conflict(
                f"the target store is not empty ({table} has {int(row[0])} row(s)): "
                "copy into an empty database"
            )


async def _copy_into(
    tx: Tx,
    source: dict[str, tuple[list[str], list[sqlite3.Row]]],
    tables: Sequence[tuple[str, str]],
) -> list[TableCopy]:
    copied: list[TableCopy] = []
    for table, key in tables:
        if table not in source:
            continue
        columns, rows = source[table]
        marks = ", ".join("?" * len(columns))
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"
        for start in range(0, len(rows), BATCH):
            await tx.executemany(sql, [tuple(r) for r in rows[start : start + BATCH]])
        back = await tx.fetchall(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {key}")
        want, got = digest(rows), digest(back)
        if len(back) != len(rows) or want != got:
            raise StoreError(
                f"copy of {table} does not verify: {len(rows)} row(s) read, {len(back)} written"
                f" (sha256 {want[:12]} vs {got[:12]}); nothing was committed"
            )
        copied.append(TableCopy(table, len(rows), want))
    if "events" in source:  # new audit events continue after the copied ids
        await tx.execute(
            "SELECT setval(pg_get_serial_sequence('events', 'id'),"
            " GREATEST((SELECT MAX(id) FROM events), 1))"
        )
    return copied


async def copy_store(
    main: Database, counts: Database | None, target_main: PgStore, target_counts: PgStore
) -> list[TableCopy]:
    """Copy ``main`` (and ``counts``, if the install has any) into the empty, migrated target
    stores; each table's copy as verified. Conflict if the target holds anything."""
    source = await _read_source(main, MAIN_TABLES)
    usage_source = await _read_source(counts, USAGE_TABLES) if counts is not None else {}
    async with target_main.transaction() as tx:
        await _require_empty(tx, MAIN_TABLES)
        await _require_empty(tx, USAGE_TABLES)
        copied = await _copy_into(tx, source, MAIN_TABLES)
        # The same database: the counts' lock too, so no node counts into it meanwhile.
        await tx.execute("SELECT pg_advisory_xact_lock(?)", (target_counts.lock_key,))
        copied += await _copy_into(tx, usage_source, USAGE_TABLES)
    return copied
