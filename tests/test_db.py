"""The store connection: pragmas, file modes, migrations, and reads that see every commit."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest

from relay.store.db import Database, Migration, StoreError

SCHEMA = (Migration(1, "CREATE TABLE t (x INTEGER)"),)


async def test_files_are_private_and_pragmas_set(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "state" / "x.db", SCHEMA)
    try:
        assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / "state" / "x.db").stat().st_mode) == 0o600
        (mode,) = (await db.fetchone("PRAGMA journal_mode")) or ("",)
        assert mode == "wal"
        (sync,) = (await db.fetchone("PRAGMA synchronous")) or (0,)
        assert sync == 2  # FULL: a COMMIT that returned is on disk
    finally:
        await db.close()


async def test_reads_see_each_commit_while_other_reads_interleave(tmp_path: Path) -> None:
    """Regression: interleaved reads on the shared reader connection pinned an old snapshot,
    so a message committed (and claimed) a moment ago could read as missing."""
    db = await Database.open(tmp_path / "x.db", SCHEMA)
    stop = asyncio.Event()

    async def noise() -> None:
        while not stop.is_set():
            await db.fetchall("SELECT count(*) FROM t")

    tasks = [asyncio.create_task(noise()) for _ in range(4)]
    try:
        for i in range(300):
            async with db.transaction() as conn:
                await conn.execute("INSERT INTO t VALUES (?)", (i,))
            assert await db.fetchone("SELECT x FROM t WHERE x = ?", (i,)) is not None, i
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await db.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    db = await Database.open(path, (*SCHEMA, Migration(2, "CREATE TABLE u (y INTEGER)")))
    await db.close()
    with pytest.raises(StoreError, match="newer than this relaybox"):
        await Database.open(path, SCHEMA)


async def test_failed_transaction_rolls_back(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "x.db", SCHEMA)
    try:
        with pytest.raises(RuntimeError):
            async with db.transaction() as conn:
                await conn.execute("INSERT INTO t VALUES (1)")
                raise RuntimeError("boom")
        assert await db.fetchall("SELECT * FROM t") == []
    finally:
        await db.close()
