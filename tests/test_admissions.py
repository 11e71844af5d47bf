"""Group admission (relay/store/admissions.py) on a real usage.db: what a batch decides when a
session goes away before its turn, and when the store fails under a batch."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from relay.store import usage
from relay.store.admissions import Admissions
from relay.store.db import Database, StoreError
from relay.userrules import Limits

LOGIN = "app@example.com"
NOW = 1_800_000_000.0
LIMITS = Limits(messages_per_hour=0, messages_per_day=0, recipients_per_day=0)


@pytest.fixture
async def db(tmp_path: Path) -> Database:
    database = await Database.open(tmp_path / "usage.db", usage.USAGE_MIGRATIONS)
    yield database  # type: ignore[misc]
    await database.close()


async def test_a_session_gone_before_its_turn_is_not_counted(db: Database) -> None:
    admissions = Admissions(db)
    try:
        gone = asyncio.ensure_future(admissions.admit(LOGIN, 1, LIMITS, NOW))
        kept = asyncio.ensure_future(admissions.admit(LOGIN, 2, LIMITS, NOW))
        await asyncio.sleep(0)  # sleep-ok: one turn, so that both are queued before the batch
        gone.cancel()
        assert await kept is None
        with pytest.raises(asyncio.CancelledError):
            await gone
    finally:
        await admissions.close()
    counts = await usage.snapshot(db, LOGIN, NOW)
    assert (counts.messages_today, counts.recipients_today) == (1, 2)


async def test_a_store_failure_answers_the_whole_batch_and_the_writer_goes_on(
    db: Database, tmp_path: Path
) -> None:
    with sqlite3.connect(tmp_path / "usage.db") as conn:
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON usage_days BEGIN SELECT RAISE(ABORT, 'no'); END"
        )
    admissions = Admissions(db)
    try:
        both = [admissions.admit(LOGIN, 1, LIMITS, NOW) for _ in range(2)]
        results = await asyncio.gather(*both, return_exceptions=True)
        assert all(isinstance(r, StoreError) for r in results), results
        with sqlite3.connect(tmp_path / "usage.db") as conn:
            conn.execute("DROP TRIGGER refuse")
        assert await admissions.admit(LOGIN, 1, LIMITS, NOW) is None
    finally:
        await admissions.close()
    assert (await usage.snapshot(db, LOGIN, NOW)).messages_today == 1
