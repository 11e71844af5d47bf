"""The spool: group commit, durability across reopen, recovery of in-flight work, admin writes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from relay.clock import ManualClock
from relay.config import Config
from relay.db import StoreError
from relay.errors import Invalid, NotFound
from relay.spool import NewMessage, Outcome, Spool, new_id

BODY = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: t\r\n\r\nhello\r\n"


@pytest.fixture
async def spool(cfg: Config, clock: ManualClock) -> AsyncIterator[Spool]:
    sp = await Spool.open(cfg, clock=clock)
    yield sp
    await sp.close()


async def test_enqueue_then_show(spool: Spool, clock: ManualClock) -> None:
    rcpts = ["b@Example.NET", "c@example.org"]
    msg_id = await spool.enqueue(sender="a@example.com", recipients=rcpts, body=BODY, user="u")
    info = await spool.show(msg_id)
    assert info.sender == "a@example.com" and info.user == "u" and info.size == len(BODY)
    assert info.created_at == clock()
    assert [(r.address, r.state, r.attempts) for r in info.recipients] == [
        ("b@Example.NET", "queued", 0),
        ("c@example.org", "queued", 0),
    ]
    loaded = await spool.load(msg_id)
    assert loaded is not None and loaded.body == BODY


async def test_ids_are_unique_and_sort_by_time() -> None:
    ids = [new_id(1_800_000_000.0 + i) for i in range(50)]
    assert len(set(ids)) == 50 and ids == sorted(ids)
    assert len(set(new_id(1.0) for _ in range(1000))) == 1000


async def test_enqueue_without_recipients_is_refused(spool: Spool) -> None:
    with pytest.raises(Invalid):
        await spool.enqueue(sender="a@example.com", recipients=[], body=BODY, user=None)


async def test_concurrent_enqueues_share_commits(spool: Spool) -> None:
    """Group commit: 64 writers at once need far fewer than 64 transactions."""

    async def one(i: int) -> str:
        return await spool.enqueue(
            sender="a@example.com", recipients=[f"r{i}@example.net"], body=BODY, user=None
        )

    ids = await asyncio.gather(*(one(i) for i in range(64)))
    assert len(set(ids)) == 64
    assert spool.batched_ops == 64
    assert spool.batches <= 8, f"{spool.batches} transactions for 64 concurrent enqueues"
    stats = await spool.stats()
    assert stats.messages == 64 and stats.recipients["queued"] == 64


async def test_a_committed_message_survives_reopen(cfg: Config, clock: ManualClock) -> None:
    sp = await Spool.open(cfg, clock=clock)
    msg_id = await sp.enqueue(sender="a@example.com", recipients=["b@x.test"], body=BODY, user=None)
    await sp.close()
    sp = await Spool.open(cfg, clock=clock)
    try:
        loaded = await sp.load(msg_id)
        assert loaded is not None and loaded.body == BODY
        assert [r.address for r in await sp.claim_due(10)] == ["b@x.test"]
    finally:
        await sp.close()


async def test_closed_spool_refuses_with_store_error(cfg: Config, clock: ManualClock) -> None:
    sp = await Spool.open(cfg, clock=clock)
    await sp.close()
    with pytest.raises(StoreError):
        await sp.enqueue(sender="a@example.com", recipients=["b@x.test"], body=BODY, user=None)


async def test_claim_takes_due_recipients_once(spool: Spool, clock: ManualClock) -> None:
    a = await spool.enqueue(
        sender="s@x.test", recipients=["1@a.test", "2@b.test"], body=BODY, user=None
    )
    claimed = await spool.claim_due(10)
    assert [(c.message_id, c.idx, c.domain) for c in claimed] == [
        (a, 0, "a.test"),
        (a, 1, "b.test"),
    ]
    assert await spool.claim_due(10) == []  # in flight: not claimed twice
    info = await spool.show(a)
    assert all(r.in_flight for r in info.recipients)
    assert (await spool.stats()).in_flight == 2


async def test_deferred_recipient_is_due_at_its_time(spool: Spool, clock: ManualClock) -> None:
    a = await spool.enqueue(sender="s@x.test", recipients=["1@a.test"], body=BODY, user=None)
    [c] = await spool.claim_due(10)
    later = clock() + 300
    await spool.record(
        [Outcome(a, c.idx, "deferred", 451, "451 4.3.0 later", "mx[1.2.3.4]", later)]
    )
    assert await spool.claim_due(10) == []
    assert await spool.next_due() == later
    clock.advance(300)
    [again] = await spool.claim_due(10)
    assert again.attempts == 1
    r = (await spool.show(a)).recipients[0]
    assert (r.state, r.last_code, r.last_reply, r.relay) == (
        "deferred",
        451,
        "451 4.3.0 later",
        "mx[1.2.3.4]",
    )


async def test_final_outcomes_make_the_message_done(spool: Spool, clock: ManualClock) -> None:
    a = await spool.enqueue(
        sender="s@x.test", recipients=["1@a.test", "2@a.test"], body=BODY, user=None
    )
    c1, c2 = await spool.claim_due(10)
    await spool.record([Outcome(a, c1.idx, "delivered", 250, "250 ok", "r")])
    assert (await spool.show(a)).done_at is None  # one recipient still pending
    await spool.record([Outcome(a, c2.idx, "bounced", 550, "550 5.1.1 no", "r")])
    info = await spool.show(a)
    assert info.done_at == clock()
    loaded = await spool.load(a)
    assert loaded is not None and loaded.body is None  # body dropped once done
    assert [m.id for m in await spool.list_messages(("delivered",))] == [a]
    assert await spool.list_messages() == []  # nothing pending


async def test_bounce_is_queued_with_the_outcome(spool: Spool) -> None:
    a = await spool.enqueue(sender="s@x.test", recipients=["1@a.test"], body=BODY, user=None)
    [c] = await spool.claim_due(10)
    dsn = NewMessage(sender="", recipients=("s@x.test",), body=b"Subject: dsn\r\n\r\nx\r\n")
    dsn_id = await spool.record([Outcome(a, c.idx, "bounced", 550, "550 no", "r")], bounce=dsn)
    assert dsn_id is not None
    info = await spool.show(dsn_id)
    assert info.sender == "" and [r.address for r in info.recipients] == ["s@x.test"]


async def test_recovery_makes_in_flight_work_due_again(cfg: Config, clock: ManualClock) -> None:
    sp = await Spool.open(cfg, clock=clock)
    a = await sp.enqueue(sender="s@x.test", recipients=["1@a.test"], body=BODY, user=None)
    assert len(await sp.claim_due(10)) == 1
    await sp.close()  # as if the process died mid-delivery

    admin = await Spool.open(cfg, clock=clock, recover=False)  # the CLI must not steal it
    try:
        assert (await admin.show(a)).recipients[0].in_flight
    finally:
        await admin.close()

    clock.advance(5)
    sp = await Spool.open(cfg, clock=clock)
    try:
        assert not (await sp.show(a)).recipients[0].in_flight
        assert [c.message_id for c in await sp.claim_due(10)] == [a]
    finally:
        await sp.close()


async def test_release_gives_back_without_counting_an_attempt(spool: Spool) -> None:
    a = await spool.enqueue(sender="s@x.test", recipients=["1@a.test"], body=BODY, user=None)
    [c] = await spool.claim_due(10)
    await spool.release([(a, c.idx)])
    [again] = await spool.claim_due(10)
    assert again.attempts == 0


async def test_retry_delete_and_purge(spool: Spool, clock: ManualClock) -> None:
    a = await spool.enqueue(sender="s@x.test", recipients=["1@a.test"], body=BODY, user=None)
    b = await spool.enqueue(sender="s@x.test", recipients=["2@a.test"], body=BODY, user=None)
    ca, cb = await spool.claim_due(10)
    far = clock() + 3600
    await spool.record([Outcome(a, 0, "deferred", 451, "451 x", "", far)])
    await spool.record([Outcome(b, 0, "delivered", 250, "250 ok", "")])
    assert await spool.claim_due(10) == []
    assert await spool.retry(a, now=clock()) == 1
    assert [c.message_id for c in await spool.claim_due(10)] == [a]
    await spool.record([Outcome(a, 0, "deferred", 451, "451 x", "", far)])
    assert await spool.retry(None, now=clock()) == 1
    with pytest.raises(NotFound):
        await spool.retry("nosuchid", now=clock())

    removed = await spool.delete(a)
    assert removed.id == a
    with pytest.raises(NotFound):
        await spool.show(a)

    clock.advance(7 * 86400 - 1)
    assert await spool.purge(now=clock(), retention=7 * 86400) == 0
    clock.advance(2)
    assert await spool.purge(now=clock(), retention=7 * 86400) == 1
    with pytest.raises(NotFound):
        await spool.show(b)
    assert (await spool.stats()).messages == 0


async def test_hot_queries_use_indexes(spool: Spool) -> None:
    """Claiming and the next-due lookup must not scan the table (the spool may hold 1M rows)."""
    plans = await spool.query_plans()
    assert set(plans) == {"claim", "next_due"}
    for name, steps in plans.items():
        assert steps, name
        for step in steps:
            assert not step.startswith("SCAN"), f"{name}: {step}"
        assert any("recipients_due" in s for s in steps), name


async def test_list_rejects_unknown_state(spool: Spool) -> None:
    with pytest.raises(Invalid):
        await spool.list_messages(("flying",))


async def test_a_failed_batch_fails_its_callers_and_the_writer_carries_on(spool: Spool) -> None:
    bad = spool.enqueue(sender="s@x.test", recipients=["1@a.test"], body=[b"x"], user=None)  # type: ignore[arg-type]
    with pytest.raises(StoreError):
        await bad
    msg_id = await spool.enqueue(sender="s@x.test", recipients=["1@a.test"], body=BODY, user=None)
    assert (await spool.show(msg_id)).sender == "s@x.test"
    assert (await spool.stats()).messages == 1  # nothing of the failed batch was written


async def test_depth_counts_pending_recipients(spool: Spool) -> None:
    a = await spool.enqueue(
        sender="s@x.test", recipients=["1@a.test", "2@a.test"], body=BODY, user=None
    )
    [c1, c2] = await spool.claim_due(10)
    await spool.record([Outcome(a, 0, "deferred", 451, "451 x", "", 0.0)])
    assert await spool.depth() == {"queued": 1, "deferred": 1}
