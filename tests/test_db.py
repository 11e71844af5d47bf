"""The store connection: pragmas, file modes, migrations, and reads that see every commit."""

from __future__ import annotations

import asyncio
import stat
import sys
from pathlib import Path

import pytest

from relay.store.db import MAIN_MIGRATIONS, Database, Migration, StoreError

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


OPEN_ONE = """
import asyncio, sys
from pathlib import Path
from relay.store.db import MAIN_MIGRATIONS, Database

async def main() -> None:
    sys.stdin.readline()  # every process waits here, then they all open at once
    db = await Database.open(Path(sys.argv[1]), MAIN_MIGRATIONS)
    await db.close()

asyncio.run(main())
"""


@pytest.mark.parametrize("round_", range(10))
async def test_processes_opening_a_fresh_database_together_all_succeed(
    tmp_path: Path, round_: int
) -> None:
    """Regression: `relaybox serve` with workers = 2 on a fresh state dir: both workers create
    and migrate the databases at the same moment, and one failed with "database is locked"
    (switching to WAL) or would re-run a migration the other had just applied. Six processes
    released together: every one opens, the schema is applied once."""
    path = tmp_path / "state" / "relaybox.db"
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            OPEN_ONE,
            str(path),
            stdin=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(8)
    ]
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
    results = [await p.communicate() for p in procs]
    errors = [err.decode() for (_out, err), p in zip(results, procs, strict=True) if p.returncode]
    assert not errors, errors[0]
    db = await Database.open(path, MAIN_MIGRATIONS)
    try:
        (version,) = (await db.fetchone("PRAGMA user_version")) or (0,)
        assert version == max(m.version for m in MAIN_MIGRATIONS)
    finally:
        await db.close()
