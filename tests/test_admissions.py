"""Group admission (relay/store/admissions.py) on the real counts store, on each engine: what a
batch decides when a session goes away before its turn, and when the store fails under a batch."""

from __future__ import annotations

import asyncio

import pytest

from relay.store import usage
from relay.store.admissions import Admissions
from relay.store.db import StoreError
from relay.store.engine import Store
from relay.userrules import Limits

LOGIN = "app@example.com"
NOW = 1_800_000_000.0
LIMITS = Limits(messages_per_hour=0, messages_per_day=0, recipients_per_day=0)


async def test_a_session_gone_before_its_turn_is_not_counted(counts: Store) -> None:
    db = counts
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


REFUSE = {  # a trigger that fails every insert into usage_days: a store fault mid-transaction
    "sqlite": [
        "CREATE TRIGGER refuse BEFORE INSERT ON usage_days BEGIN SELECT RAISE(ABORT, 'no'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql"
        " AS $$ BEGIN RAISE EXCEPTION 'no'; END $$",
        "CREATE TRIGGER refuse BEFORE INSERT ON usage_days FOR EACH ROW EXECUTE FUNCTION refuse()",
    ],
}
ALLOW = {"sqlite": ["DROP TRIGGER refuse"], "postgresql": ["DROP TRIGGER refuse ON usage_days"]}


async def _ddl(db: Store, statements: list[str]) -> None:
    async with db.transaction() as tx:
        for sql in statements:
            await tx.execute(sql)


async def test_a_store_failure_answers_the_whole_batch_and_the_writer_goes_on(
    counts: Store,
) -> None:
    db = counts
    await _ddl(db, REFUSE[db.engine])
    admissions = Admissions(db)
    try:
        both = [admissions.admit(LOGIN, 1, LIMITS, NOW) for _ in range(2)]
        results = await asyncio.gather(*both, return_exceptions=True)
        assert all(isinstance(r, StoreError) for r in results), results
        await _ddl(db, ALLOW[db.engine])
        assert await admissions.admit(LOGIN, 1, LIMITS, NOW) is None
    finally:
        await admissions.close()
    assert (await usage.snapshot(db, LOGIN, NOW)).messages_today == 1
