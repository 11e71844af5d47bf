"""Group admission (relay/store/admissions.py) on the real counts store, on each engine: what a
batch decides when a session goes away before its turn, and when the store fails under a batch."""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import pytest

from relay import userrules
from relay.store import usage
from relay.store.admissions import Admissions
from relay.store.db import Statement, StoreError
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


_INSERT = (
    "INSERT INTO usage_days (login, day, accepted, recipients, hour, hour_accepted)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_READ = "SELECT accepted FROM usage_days WHERE login = ?"


async def test_read_then_write_is_one_transaction_on_each_engine(counts: Store) -> None:
    """What the admission is written with (on SQLite one trip to the writer's thread, the
    decision made there): the rows read, the statements made of them applied, their result
    returned; a decision that raises, or a statement that fails, leaves nothing written."""
    db = counts
    seen: list[list[tuple[object, ...]]] = []

    def first(rows: list[Any]) -> tuple[str, list[Statement]]:
        seen.append([tuple(r) for r in rows])
        return "made", [(_INSERT, [(LOGIN, "2027-01-15", 1, 2, 0.0, 1)])]

    assert await db.read_then_write(_READ, (LOGIN,), first) == "made"
    assert seen == [[]]

    def raises(rows: list[Any]) -> tuple[None, list[Statement]]:
        seen.append([tuple(r) for r in rows])
        raise ValueError("a decision that fails")

    with pytest.raises(ValueError, match="a decision that fails"):
        await db.read_then_write(_READ, (LOGIN,), raises)
    assert seen[-1] == [(1,)]

    def half(rows: list[Any]) -> tuple[None, list[Statement]]:
        bump = ("UPDATE usage_days SET accepted = 99 WHERE login = ?", [(LOGIN,)])
        again = (_INSERT, [(LOGIN, "2027-01-15", 5, 5, 0.0, 5)])  # the key exists: refused
        return None, [bump, again]

    with pytest.raises(StoreError):
        await db.read_then_write(_READ, (LOGIN,), half)
    row = await db.fetchone(_READ, (LOGIN,))
    assert row is not None and row[0] == 1  # the UPDATE went with the failed INSERT


@pytest.mark.parametrize(
    "now",
    [0.0, 86_399.999, 86_400.0, NOW, 1_796_083_199.75, 1_796_083_200.0, 4_102_444_800.5],
)
def test_the_day_key_is_the_utc_date_on_each_side_of_midnight(now: float) -> None:
    # userrules keeps the names of the days it made: a kept one must never be another day's
    expected = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%d")
    assert userrules.day_key(now) == expected
    assert userrules.day_key(now + userrules.DAY) != expected
    assert userrules.day_key(userrules.day_start(now)) == expected
