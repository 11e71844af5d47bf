"""The spool: group commit, durability across reopen, recovery of in-flight work, admin writes."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import AsyncIterator

import pytest

from relay.clock import ManualClock
from relay.config import Config
from relay.errors import Invalid, NotFound
from relay.store import spool_admin
from relay.store.db import Database, Migration, StoreError
from relay.store.spool import (
    SPOOL_MIGRATIONS,
    DueRecipient,
    Message,
    NewMessage,
    Outcome,
    Spool,
    new_id,
)

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


async def test_the_operators_retry_and_delete_span_the_workers_and_are_audited(
    cfg: Config, clock: ManualClock, db: Database
) -> None:
    """spool_admin.retry/delete (``relaybox queue retry/delete``) find a message in whichever
    worker's spool holds it, and write one audit event each to the shared database."""
    spools = [await Spool.open(cfg, worker=w, clock=clock) for w in (0, 1)]
    try:
        far = clock() + 3600
        ids = []
        for sp in spools:
            msg = await sp.enqueue(sender="s@x.test", recipients=["1@a.test"], body=BODY, user=None)
            await sp.claim_due(10)
            await sp.record([Outcome(msg, 0, "deferred", 451, "451 x", "", far)])
            ids.append(msg)
        now = clock()
        assert await spool_admin.retry(spools, None, now=now, audit=db, actor="alice") == 2
        assert await spool_admin.retry(spools, ids[1], now=now, audit=db, actor="alice") == 1
        removed = await spool_admin.delete(spools, ids[0], now=now, audit=db, actor="bob")
        assert removed.id == ids[0] and len(removed.recipients) == 1
        with pytest.raises(NotFound, match="no message nosuchid in the queue"):
            await spool_admin.retry(spools, "nosuchid", now=now, audit=db, actor="alice")
        with pytest.raises(NotFound):
            await spool_admin.delete(spools, ids[0], now=now, audit=db, actor="bob")
        with pytest.raises(NotFound):
            await spools[0].show(ids[0])
        assert (await spools[1].show(ids[1])).recipients[0].next_attempt_at == now
    finally:
        for sp in spools:
            await sp.close()
    rows = await db.fetchall("SELECT at, actor, action, target, detail FROM events ORDER BY id")
    assert [tuple(r) for r in rows] == [
        (now, "alice", "queue.retry", "all", "recipients=2"),
        (now, "alice", "queue.retry", ids[1], "recipients=1"),
        (now, "bob", "queue.delete", ids[0], "from=s@x.test recipients=1"),
    ]


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


# --- behaviours the mutation run of relay/store/spool.py found unguarded --------------------------


async def test_ids_are_16_base32hex_characters() -> None:
    for now in (1.0, 1_800_000_000.0, 4_000_000_000.123):
        assert re.fullmatch(r"[0-9a-v]{16}", new_id(now)), now


async def test_ids_one_millisecond_apart_sort_by_time() -> None:
    """The time part has millisecond resolution: an id made 1 ms later always sorts after
    (were the two in one time slot, the random part would order them half of the time)."""
    t = 1_800_000_000.0
    for _ in range(64):
        assert new_id(t) < new_id(t + 0.001)


async def test_each_commit_is_counted_once(spool: Spool) -> None:
    for i in range(3):  # one after another: each is its own transaction
        await spool.enqueue(sender="s@x.test", recipients=[f"{i}@a.test"], body=BODY, user=None)
    assert (spool.batches, spool.batched_ops) == (3, 3)


async def test_one_transaction_holds_at_most_1024_writes(spool: Spool) -> None:
    """1025 writes submitted at once are written in two transactions, 1024 then 1."""
    await spool.enqueue(sender="s@x.test", recipients=["0@a.test"], body=BODY, user=None)
    batches, ops = spool.batches, spool.batched_ops
    ids = await asyncio.gather(
        *(
            spool.enqueue(sender="s@x.test", recipients=[f"{i}@a.test"], body=BODY, user=None)
            for i in range(1025)
        )
    )
    assert len(set(ids)) == 1025
    assert (spool.batches - batches, spool.batched_ops - ops) == (2, 1025)


async def test_close_writes_what_was_already_submitted(cfg: Config, clock: ManualClock) -> None:
    """An enqueue submitted just before close() is committed, and close() returns."""
    sp = await Spool.open(cfg, clock=clock)
    await sp.enqueue(sender="s@x.test", recipients=["0@a.test"], body=BODY, user=None)
    enqueue = sp.enqueue(sender="s@x.test", recipients=["1@a.test"], body=BODY, user=None)
    # gather starts the enqueue first: it is in the writer's queue when close() runs. The bound
    # only turns a hang into a failure (close() takes milliseconds).
    async with asyncio.timeout(30):
        msg_id, _ = await asyncio.gather(enqueue, sp.close())
    sp = await Spool.open(cfg, clock=clock)
    try:
        assert [r.address for r in (await sp.show(msg_id)).recipients] == ["1@a.test"]
    finally:
        await sp.close()


async def test_an_enqueue_while_closing_is_refused(cfg: Config, clock: ManualClock) -> None:
    """Submitted after close() began, a write would never be taken: it fails at once instead."""
    sp = await Spool.open(cfg, clock=clock)
    await sp.enqueue(sender="s@x.test", recipients=["0@a.test"], body=BODY, user=None)
    enqueue = sp.enqueue(sender="s@x.test", recipients=["1@a.test"], body=BODY, user=None)
    async with asyncio.timeout(30):  # turns a hang into a failure (this takes milliseconds)
        _, refused = await asyncio.gather(sp.close(), enqueue, return_exceptions=True)
    assert isinstance(refused, StoreError)


async def test_a_cancelled_enqueue_does_not_stop_the_writer(spool: Spool) -> None:
    """A client that goes away while its message is being committed cancels the enqueue; the
    writer still commits it and serves the next ones."""
    await spool.enqueue(sender="s@x.test", recipients=["0@a.test"], body=BODY, user=None)
    task = asyncio.create_task(
        spool.enqueue(sender="s@x.test", recipients=["1@a.test"], body=BODY, user=None)
    )
    # runs after the task submitted its write, before the writer takes it
    asyncio.get_running_loop().call_soon(task.cancel)
    with pytest.raises(asyncio.CancelledError):
        await task
    async with asyncio.timeout(30):  # turns a hang into a failure (this takes milliseconds)
        msg_id = await spool.enqueue(
            sender="s@x.test", recipients=["2@a.test"], body=BODY, user=None
        )
    assert (await spool.show(msg_id)).recipients[0].address == "2@a.test"
    assert (await spool.stats()).messages == 3


@pytest.mark.parametrize("state", ["delivered", "bounced"])
async def test_a_final_outcome_is_never_due_again(
    spool: Spool, clock: ManualClock, state: str
) -> None:
    """A next_attempt_at is only for "deferred": a final outcome that carries one is still final."""
    a = await spool.enqueue(sender="s@x.test", recipients=["1@a.test"], body=BODY, user=None)
    [c] = await spool.claim_due(10)
    await spool.record([Outcome(a, c.idx, state, 250, "reply", "r", clock())])
    assert await spool.next_due() is None
    assert await spool.claim_due(10) == []
    r = (await spool.show(a)).recipients[0]
    assert (r.state, r.next_attempt_at) == (state, None)
    assert (await spool.show(a)).done_at == clock()


async def test_the_default_worker_is_worker_0(cfg: Config, clock: ManualClock) -> None:
    sp = await Spool.open(cfg, clock=clock)
    try:
        msg_id = await sp.enqueue(sender="s@x.test", recipients=["1@a.test"], body=BODY, user=None)
    finally:
        await sp.close()
    assert cfg.spool_path(0).exists()
    sp = await Spool.open(cfg, worker=0, clock=clock, recover=False)
    try:
        assert (await sp.show(msg_id)).sender == "s@x.test"
    finally:
        await sp.close()


async def test_a_spool_file_of_schema_version_1_opens_with_its_queue(
    cfg: Config, clock: ManualClock
) -> None:
    """A spool left by the first release (schema version 1) is not migrated again."""
    path = cfg.spool_path(0)
    old = await Database.open(path, (Migration(1, SPOOL_MIGRATIONS[0].sql),))
    try:
        async with old.transaction() as conn:
            await conn.execute(
                "INSERT INTO messages (id, sender, user, size, created_at, body) "
                "VALUES ('old1', 's@x.test', NULL, 3, 1.0, x'616263')"
            )
            await conn.execute(
                "INSERT INTO recipients (message_id, idx, address, domain, next_attempt_at) "
                "VALUES ('old1', 0, 'r@a.test', 'a.test', 1.0)"
            )
    finally:
        await old.close()
    sp = await Spool.open(cfg, clock=clock)
    try:
        assert [(c.message_id, c.address) for c in await sp.claim_due(10)] == [("old1", "r@a.test")]
        loaded = await sp.load("old1")
        assert loaded is not None and loaded.body == b"abc"
    finally:
        await sp.close()


@pytest.mark.parametrize(
    "value",
    [
        DueRecipient("m", 0, "r@a.test", "a.test", 0),
        Message("m", "s@x.test", None, 1, 1.0, b"x"),
        Outcome("m", 0, "delivered", 250, "250 ok", "r"),
        NewMessage("s@x.test", ("r@a.test",), b"x"),
    ],
    ids=lambda v: type(v).__name__,
)
def test_the_spool_values_are_frozen_and_hashable(value: object) -> None:
    """They are handed between the spool and the deliverer: nobody can change one in passing,
    and they can be kept in sets and as keys."""
    assert hash(value) == hash(dataclasses.replace(value))  # type: ignore[type-var]
    field = dataclasses.fields(value)[0].name  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(value, field, "changed")
